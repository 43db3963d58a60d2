-- celery-breaker: one breaker's adaptive release pace, as people see it (collect_metrics):
-- read only, nothing repaired (release.lua repairs what it reads, and restarts a pace it
-- cannot read).
-- KEYS: 1 the pacing hash, 2 the breaker's state hash. ARGV: 1 the caller's clock or '' (Redis TIME).
-- Reply: { '' } unless a pace is under way (begun under the breaker's generation now, and used
-- by a release within IDLE seconds), else { its generation, its rate (tasks per second), its
-- limit ('' none), the seconds the release still waits after a refusal ('' none), the bad
-- share it learnt as the downstream's usual ('' none yet) }. (Never empty: an empty reply is
-- a failed script to store.py.)

-- A pace no release has used for this long is not under way: no worker releases at it now
-- (releasers look every 0.2 s; under breaker_release_pace="fixed" none uses it).
local IDLE = 5
-- pacing.USUAL_LEAST: outcomes of good news before their bad share is the usual one.
local USUAL_LEAST = 50
local now = script_now(ARGV[1])
local p = redis.call('HMGET', KEYS[1], 'a_gen', 'rate', 'lim', 'a_at', 'ubd', 'usn', 'ugen')
local s = redis.call('HMGET', KEYS[2], 'gen', 'rh')
local pace_gen, rate, used_at = read_whole(p[1]), read_number(p[2]), read_time(p[4], now, 0)
if pace_gen == nil or rate == nil or rate <= 0 or used_at == nil or now - used_at > IDLE
    or pace_gen ~= read_whole(s[1] or '0') then
  return { '' }
end
local limit = read_number(p[3])
if limit ~= nil and limit <= 0 then limit = nil end
local held = nil
-- (A wait beyond any open duration is release.lua's to repair; here it is only shown.)
local ends = read_time(s[2], now)
if ends ~= nil and ends > now then held = ends - now end
-- (A share learnt under another generation is an earlier pace's: none, as pacing.lua reads it.)
local usual = nil
local bad, seen = read_whole(p[5]), read_whole(p[6])
if read_whole(p[7] or '') == pace_gen and bad ~= nil and seen ~= nil and seen >= USUAL_LEAST and bad <= seen then
  usual = bad / seen
end
return { fmt(pace_gen), fmt(rate), fmt(limit), fmt(held), fmt(usual) }
