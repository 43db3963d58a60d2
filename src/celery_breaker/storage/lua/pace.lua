-- celery-breaker: one breaker's adaptive release pace, as people see it (collect_metrics):
-- read only, nothing repaired (release.lua repairs what it reads, and restarts a pace it
-- cannot read). KEYS and ARGV: see pace_prelude.lua.
-- The pace is read by pacing.lua's read_pace, as release.lua reads it: a pace the next
-- release would restart (a field unreadable, or beyond what the law writes) is none here
-- too, and the pace that release begins is shown from then on.
-- Reply: { '' } unless a pace is under way (begun under the breaker's generation now, and used
-- by a release within IDLE seconds), else { its generation, its rate (tasks per second), its
-- limit ('' none), the seconds the release still waits after a refusal ('' none), the bad
-- share it learnt as the downstream's usual ('' none yet) }. (Never empty: an empty reply is
-- a failed script to store.py.)

-- A pace no release has used for this long is not under way: no worker releases at it now
-- (releasers look every 0.2 s; under breaker_release_pace="fixed" none uses it).
local IDLE = 5
local law = read_law(ARGV[2] or '')
if law == nil then return redis.error_reply('celery-breaker: pace got an unreadable pacing law') end
local s = redis.call('HMGET', K_STATE, 'gen', 'rh')
local pace = read_pace(law)
if pace == nil or now - pace.at > IDLE or pace.gen ~= read_whole(s[1] or '0') then
  return { '' }
end
local held = nil
-- (A wait beyond any open duration is release.lua's to repair; here it is only shown.)
local ends = read_time(s[2], now)
if ends ~= nil and ends > now then held = ends - now end
-- (read_pace drops a share learnt under another generation: an earlier pace's)
local usual = nil
if pace.usn >= USUAL_LEAST then usual = pace.ubd / pace.usn end
return { fmt(pace.gen), fmt(pace.rate), fmt(pace.lim), fmt(held), fmt(usual) }
