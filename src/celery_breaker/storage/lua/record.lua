-- record: count one finished call and apply the transition the policy calls for.
-- Mirrors BreakerMachine.record. ARGV[8] ticket generation, ARGV[9] probe lease or -1,
-- ARGV[10] outcome (0 success, 1 failure, 2 ignored), ARGV[11] duration in seconds,
-- ARGV[12] a failure's Retry-After in seconds ('' for none: it opens the breaker at once),
-- ARGV[13] a uniform draw in [0, 1) for the open duration's jitter,
-- ARGV[14] '1' when the probe lease was spent on the breaker's health check ('' otherwise:
-- the transition it causes says which it was; see BreakerMachine._record_probe),
-- ARGV[15] '1' when the failure is the downstream refusing (429) a task released from the
-- parking (BreakerMachine.record's refused; ARGV[12] then says how long it asked for);
-- '2' when it refused a call that was not released (a fresh task's): a refusal too while
-- the breaker's release is under way (CLOSED or DISABLED, with tasks in its parked queue
-- or claimed from it: KEYS[6] and KEYS[7], parking.py's ':q' and ':c' under the breaker's
-- hash tag), else the failure it is (ARGV[12] then opens the breaker, as ever; the memory
-- store parks nothing, so BreakerMachine has no twin of this: RedisCell.finish_refusal);
-- ARGV[16] the incarnation whose acquire leased a probe ('' for an ordinary call).
-- Replies 'refused' when it counted the failure as a refusal (the caller's call then
-- waits, as a released one does), else 'ok'.

local generation, lease = tonumber(ARGV[8]), tonumber(ARGV[9])
local outcome, duration = tonumber(ARGV[10]), tonumber(ARGV[11])
local open_for, draw = tonumber(ARGV[12] or ''), tonumber(ARGV[13] or '') or 0.5
if open_for ~= nil and not (open_for > 0 and open_for < math.huge) then open_for = nil end
local is_probe = lease >= 0
local kind = ARGV[14] == '1' and 'health check' or 'probe'
-- Generations and lease numbers restart with every incarnation (common.lua fresh()): a
-- probe leased by a breaker since deleted or expired carries numbers the new one may have
-- given its own probe, so it is current only in the incarnation that leased it (else it
-- is counted, judges nothing and frees no lease, as a probe of an earlier generation).
local leased_by = ARGV[16] or ''
local current = generation == S.gen and (leased_by == S.inc or (leased_by == '' and not is_probe))
local refused = ARGV[15] == '1'
-- Seconds a release may hold back before a fresh call's 429 is no longer taken for its
-- doing (at least: twice the wait the 429 asks for, if longer; decision 91).
local FRESH_GRACE = 3

-- A CLOSED breaker's outcome goes through every trip rule (RULES, common.lua).
local function record_closed(failed, slow, hint)
  local reason = observe(failed, slow, 1)
  if hint ~= nil then
    trip('', hint, draw) -- a Retry-After opens at once, whatever the rules say
  elseif reason ~= nil then
    trip(reason, nil, draw)
  end
end

if outcome == 2 then
  if current and is_probe and redis.call('HDEL', K_LEASES, lease) == 1 then
    announce = true -- neutral: frees the slot, which other processes may be waiting for
  end
  return reply('ok')
end
-- An outcome admitted before an operator's reset belongs to the breaker that was reset.
-- (A negative generation is one no breaker has: a stand-in's, counted as stale.)
if not current and generation >= 0 and generation < S.rg then return reply('ok') end
local failed = outcome == 1
if failed then
  S.ko = S.ko + 1
  S.lf = now
else
  S.ok = S.ok + 1
  S.ls = now
end
-- An outcome that started under an earlier state is counted, but cannot move this one.
if not current then return reply('ok') end
local slow = P.slow_duration ~= nil and duration >= P.slow_duration
if slow and not failed then S.sl = S.sl + 1 end -- (slow successes: the adaptive release reads them, release.lua)
if not failed then open_for = nil end
local releasing = S.st == CLOSED or S.st == DISABLED
local holding = S.rh ~= nil and now < S.rh
if releasing and failed and not refused and ARGV[15] == '2' and (open_for == nil or open_for <= P.reset_timeout)
  and not (holding and S.rs ~= nil and now - S.rs > math.max(FRESH_GRACE, 2 * (open_for or 1))) then
  -- A fresh call's 429 while parked tasks are being released: the release and the fresh
  -- traffic together went faster than the downstream takes, and only the release can slow
  -- down; opening the breaker would stop both and start the release over (decision 91).
  -- One asking to wait longer than the breaker's own reset_timeout says "stop", not "slow
  -- down" (a quota spent for the day): it opens the breaker for that long, as before, or
  -- the fresh traffic would go on meeting it at its own rate while the release waits.
  -- Nor is one met once the release has held back (sent nothing) for longer than twice
  -- what the downstream asks (FRESH_GRACE at least, for the released tasks still queued
  -- when it began): those 429s are the fresh traffic's own, which only opening relieves.
  refused = redis.call('EXISTS', KEYS[6], KEYS[7]) > 0
end
if releasing and failed and refused then
  -- The release went faster than the downstream takes: no rule sees it, nothing opens;
  -- the release counts the refusal (rf) and waits as long as it was asked (rh), since
  -- rs if it was not waiting already. DISABLED releases too (an operator's breaker passes
  -- everything): its release waits alike.
  S.rf = S.rf + 1
  if not holding then S.rs = now end
  S.rh = math.max(S.rh or now, now + math.min(open_for or 1, P.longest_open))
  return reply('refused')
elseif S.st == CLOSED then
  record_closed(failed, slow, open_for)
elseif S.st == HALF_OPEN and is_probe then -- only probes speak in HALF_OPEN
  redis.call('HDEL', K_LEASES, lease)
  if failed or slow then
    trip(failed and (kind .. ' failed') or ('slow ' .. kind), open_for, draw)
  else
    S.hos = S.hos + 1
    if S.hos >= P.probes_to_close then
      if kind == 'health check' and S.hos == 1 then
        move(CLOSED, 'health check succeeded')
      else
        move(CLOSED, S.hos .. ' ' .. kind .. 's succeeded')
      end
    end
  end
end
return reply('ok')
