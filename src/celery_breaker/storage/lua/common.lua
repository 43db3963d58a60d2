-- celery-breaker: the prelude every breaker script starts with (loads, validates, saves one breaker).
--
-- Each script is this file followed by one operation (acquire.lua, record.lua, ...), and
-- runs as ONE atomic step mirroring celery_breaker.core.machine.BreakerMachine.
--
-- KEYS (one hash tag, so Redis Cluster keeps them on one slot):
--   1 state hash, 2 failure-times list, 3 count-window ring (string), 4 time buckets (hash),
--   5 probe leases (hash: lease id -> deadline)
-- ARGV:
--   1 the caller's clock reading, or '' to use Redis TIME (the default: shared decisions
--     never depend on worker clocks); 2 idle TTL in ms; 3 what the caller counted locally
--     since its last script call: 'rejections;deferrals;generation;successes;stale successes;
--     check' (successes under that generation, stale ones under an earlier one; check = 1
--     asks for the key types to be checked first); 4 the caller's
--     policy text; 5 name; 6 '-' or '+' .. key; 7 the pub/sub channel transitions are
--     published on ('' for none); 8.. the operation's own arguments.
--
-- Every transition is PUBLISHed on ARGV[7] as 'state key\nincarnation\ngeneration\nstate\n
-- seconds until a probe may be admitted', so each process's local view follows it.

local K_STATE, K_FAILS, K_RING, K_BUCKETS, K_LEASES = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local TIME_BUCKETS = 20
local CLOSED, OPEN, HALF_OPEN, FORCED_OPEN, DISABLED = 'closed', 'open', 'half_open', 'forced_open', 'disabled'
local STATES = { closed = true, open = true, half_open = true, forced_open = true, disabled = true }
local OPERATOR_TARGETS = { closed = true, forced_open = true, disabled = true }
-- The policy's moves (core/state.py TRANSITIONS); operators may move anything to OPERATOR_TARGETS.
local POLICY_MOVES = {
  ['closed>open'] = 'trip',
  ['open>half_open'] = 'open duration over',
  ['half_open>open'] = 'probe failed',
  ['half_open>closed'] = 'probes succeeded',
}

local warnings = {}
local transition = nil

local function fmt(x)
  if x == nil then return '' end
  return string.format('%.17g', x)
end

local function opt_number(text)
  -- '' is None; anything else must parse (nil signals corruption to the caller)
  if text == '' then return false end
  return tonumber(text)
end

local function read_now()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local now = read_now()
local ttl_ms = tonumber(ARGV[2])
local given_policy = ARGV[4]

-- Policy text: '2;failure_threshold;window;failure_rate;minimum_calls;count_window;
-- slow_call_duration;slow_call_rate;reset_timeout;half_open_max_calls;success_threshold;
-- half_open_max_wait;calls_to_judge;probes_to_close;backoff_multiplier;max_reset_timeout;
-- reset_jitter;longest_open' (empty = None). Version 1 (the first 14 fields, written by
-- releases without backoff) still parses, as a policy without backoff or jitter.
local function parse_policy(text)
  if type(text) ~= 'string' then return nil end
  local f = {}
  for item in (text .. ';'):gmatch('([^;]*);') do f[#f + 1] = item end
  if not ((#f == 18 and f[1] == '2') or (#f == 14 and f[1] == '1')) then return nil end
  local p = {
    failure_threshold = tonumber(f[2]), window = tonumber(f[3]), failure_rate = tonumber(f[4]),
    count_window = tonumber(f[6]), slow_duration = tonumber(f[7]), slow_rate = tonumber(f[8]),
    reset_timeout = tonumber(f[9]), max_calls = tonumber(f[10]), max_wait = tonumber(f[12]),
    calls_to_judge = tonumber(f[13]), probes_to_close = tonumber(f[14]),
    multiplier = 1, jitter = 0, longest_open = tonumber(f[9]),
  }
  if f[1] == '2' then
    p.multiplier, p.jitter, p.longest_open = tonumber(f[15]), tonumber(f[17]), tonumber(f[18])
  end
  if not (p.window and p.reset_timeout and p.max_calls and p.max_wait and p.calls_to_judge
      and p.probes_to_close and p.multiplier and p.jitter and p.longest_open) then
    return nil
  end
  p.uses_rates = p.failure_rate ~= nil or p.slow_rate ~= nil
  return p
end

local function wipe(reason)
  redis.call('DEL', K_STATE, K_FAILS, K_RING, K_BUCKETS, K_LEASES)
  warnings[#warnings + 1] = reason
end

-- What the caller counted locally (applied below, once the window functions exist), and
-- its request to check key types: a key of another type (a foreign value, a collision)
-- makes commands fail with WRONGTYPE, and the caller then runs the script again with the
-- check on, which resets the breaker. (Checking on every call would cost five commands.)
local pending = {}
for item in (ARGV[3] .. ';'):gmatch('([^;]*);') do pending[#pending + 1] = math.max(0, tonumber(item) or 0) end
if pending[6] == 1 then
  local EXPECTED_TYPES = { { K_STATE, 'hash' }, { K_FAILS, 'list' }, { K_RING, 'string' },
    { K_BUCKETS, 'hash' }, { K_LEASES, 'hash' } }
  for _, pair in ipairs(EXPECTED_TYPES) do
    local found = redis.call('TYPE', pair[1]).ok
    if found ~= 'none' and found ~= pair[2] then
      wipe(pair[1] .. ' held a ' .. found .. ', expected a ' .. pair[2])
      break
    end
  end
end

-- Keys written by this script get their TTL now; all five are refreshed together when
-- the state key's TTL has run down by a tenth (at most a minute), so an idle breaker
-- vanishes as a whole without five PEXPIREs on every call. FORCED_OPEN and DISABLED
-- keep no TTL at all (see save).
local touched = {}
local function touch(key) touched[key] = true end

local INTEGER_FIELDS = { 'gen', 'hos', 'nl', 'ok', 'ko', 'rj', 'df', 'tr', 'wn', 'wl', 'wc', 'wf', 'ws' }
local TIME_FIELDS = { 'oa', 'ou', 'ls', 'lf' }

local function fresh(policy_text)
  -- The incarnation tells a breaker from an earlier one under the same keys (expired or
  -- wiped): generations restart with it, so local views compare generations only within one.
  local s = { st = CLOSED, pol = policy_text, nm = ARGV[5], ky = ARGV[6], inc = fmt(now) }
  for _, name in ipairs(INTEGER_FIELDS) do s[name] = 0 end
  s.stk = 0
  return s
end

local function load()
  local flat = redis.call('HGETALL', K_STATE)
  if #flat == 0 then return nil end
  local raw = {}
  for i = 1, #flat, 2 do raw[flat[i]] = flat[i + 1] end
  local s = { st = raw.st, pol = raw.pol, nm = raw.nm or ARGV[5], ky = raw.ky or ARGV[6], inc = raw.inc or '0' }
  if not STATES[s.st or ''] then return false, 'state ' .. tostring(raw.st) end
  for _, name in ipairs(INTEGER_FIELDS) do
    s[name] = tonumber(raw[name] or '')
    if s[name] == nil then return false, name .. '=' .. tostring(raw[name]) end
  end
  for _, name in ipairs(TIME_FIELDS) do
    local value = opt_number(raw[name] or '')
    if value == nil then return false, name .. '=' .. tostring(raw[name]) end
    s[name] = value or nil
  end
  -- The trip streak and the open duration: absent in a hash written by a release
  -- without backoff, which reads as no streak.
  s.stk = tonumber(raw.stk or '0')
  if s.stk == nil then return false, 'stk=' .. tostring(raw.stk) end
  local od = opt_number(raw.od or '')
  if od == nil then return false, 'od=' .. tostring(raw.od) end
  s.od = od or nil
  if s.st == OPEN and s.ou == nil then return false, 'open without open_until' end
  if parse_policy(s.pol) == nil then return false, 'policy ' .. tostring(raw.pol) end
  return s
end

local S, why = load()
if S == false then
  wipe('unreadable ' .. why)
  S = nil
end
if S == nil then
  -- Asked about a breaker without a policy (a listing) that expired meanwhile: nothing to show.
  if given_policy == '' then do return { 'absent' } end end
  S = fresh(given_policy)
  redis.call('DEL', K_FAILS, K_RING, K_BUCKETS, K_LEASES) -- leftovers of an expired breaker
end
-- The stored policy wins (the breaker keeps the policy it was created with).
local P = parse_policy(S.pol)
if P == nil then error('celery-breaker: unparsable policy ' .. tostring(S.pol)) end
S.rj = S.rj + (pending[1] or 0)
S.df = S.df + (pending[2] or 0)

-- -- windows -----------------------------------------------------------------

local function clear_failure_times()
  redis.call('DEL', K_FAILS)
end

local function failure_times()
  local times = {}
  for _, text in ipairs(redis.call('LRANGE', K_FAILS, 0, -1)) do
    local t = tonumber(text)
    if t == nil then
      clear_failure_times()
      warnings[#warnings + 1] = 'unreadable failure time ' .. text
      return {}
    end
    times[#times + 1] = t
  end
  return times
end

local function failures_in_window()
  local count = 0
  for _, t in ipairs(failure_times()) do
    if now - t <= P.window then count = count + 1 end
  end
  return count
end

-- Time window: bucket i holds 'epoch:calls:failures:slow'; field 'h' is the newest epoch.
local function read_buckets()
  local flat = redis.call('HGETALL', K_BUCKETS)
  local buckets, head = {}, -1
  for i = 1, #flat, 2 do
    local field, value = flat[i], flat[i + 1]
    if field == 'h' then
      head = tonumber(value) or -1
    else
      local e, c, f, s = value:match('^(-?%d+):(%d+):(%d+):(%d+)$')
      if e == nil or tonumber(field) == nil then
        redis.call('DEL', K_BUCKETS)
        warnings[#warnings + 1] = 'unreadable time bucket ' .. value
        return {}, -1
      end
      buckets[tonumber(field)] = { tonumber(e), tonumber(c), tonumber(f), tonumber(s) }
    end
  end
  return buckets, head
end

local function bucket_width() return P.window / TIME_BUCKETS end

local function rate_totals()
  if P.count_window ~= nil then return S.wc, S.wf, S.ws end
  local buckets, head = read_buckets()
  local epoch = math.floor(now / bucket_width())
  if epoch > head then head = epoch end
  local calls, failures, slow = 0, 0, 0
  for _, b in pairs(buckets) do
    if b[1] > head - TIME_BUCKETS and b[1] <= head then
      calls, failures, slow = calls + b[2], failures + b[3], slow + b[4]
    end
  end
  return calls, failures, slow
end

local function rate_add(failed, slow, n)
  local f, s = failed and 1 or 0, slow and 1 or 0
  n = n or 1
  if P.count_window ~= nil then
    -- n outcomes at once (aggregated successes): only the last count_window of them matter
    for _ = 2, math.min(n, P.count_window) do rate_add(failed, slow, 1) end
    -- A ring of the last count_window outcomes, one byte each ('0' + failed + 2 * slow);
    -- the totals in the state hash are kept by subtract-on-evict.
    local i = S.wn
    if S.wl >= P.count_window then
      local old = (string.byte(redis.call('GETRANGE', K_RING, i, i)) or 48) - 48
      if old < 0 or old > 3 then old = 0 end
      S.wf = S.wf - old % 2
      S.ws = S.ws - math.floor(old / 2)
    else
      S.wl = S.wl + 1
      S.wc = S.wc + 1
    end
    redis.call('SETRANGE', K_RING, i, string.char(48 + f + 2 * s))
    touch(K_RING)
    S.wf, S.ws = S.wf + f, S.ws + s
    S.wn = (i + 1) % P.count_window
    return
  end
  local buckets, head = read_buckets()
  local epoch = math.floor(now / bucket_width())
  if epoch > head then head = epoch end
  if epoch <= head - TIME_BUCKETS then return end -- older than the window
  local i = epoch % TIME_BUCKETS
  local b = buckets[i]
  if b == nil or b[1] ~= epoch then b = { epoch, 0, 0, 0 } end
  redis.call('HSET', K_BUCKETS, 'h', head, i,
    string.format('%d:%d:%d:%d', epoch, b[2] + n, b[3] + f * n, b[4] + s * n))
  touch(K_BUCKETS)
end

local function clear_windows()
  clear_failure_times()
  redis.call('DEL', K_RING, K_BUCKETS)
  S.wn, S.wl, S.wc, S.wf, S.ws = 0, 0, 0, 0, 0
end

-- A ring position outside the ring would make SETRANGE allocate up to 512 MB.
if P.count_window ~= nil and (S.wn < 0 or S.wn >= P.count_window or S.wl < 0 or S.wl > P.count_window) then
  clear_windows()
  warnings[#warnings + 1] = 'count window position out of range'
end

-- -- leases ------------------------------------------------------------------

local function read_leases()
  local flat = redis.call('HGETALL', K_LEASES)
  local leases = {}
  for i = 1, #flat, 2 do
    local deadline = tonumber(flat[i + 1])
    if deadline == nil then
      redis.call('HDEL', K_LEASES, flat[i]) -- unreadable: treat as a lease that expired
      warnings[#warnings + 1] = 'unreadable probe lease ' .. flat[i + 1]
    else
      leases[flat[i]] = deadline
    end
  end
  return leases
end

-- -- transitions -------------------------------------------------------------

-- Seconds OPEN after the streak-th consecutive trip (BreakerPolicy.open_duration);
-- draw is uniform in [0, 1), sent by the caller (a script's math.random is not random).
local function open_seconds(streak, draw)
  local longest, seconds, multiplier = P.longest_open, P.reset_timeout, P.multiplier
  if streak > 1 and multiplier > 1 then
    -- compared in logs: multiplier ^ (streak - 1) may overflow
    if (streak - 1) * math.log(multiplier) >= math.log(longest / seconds) then
      seconds = longest
    else
      seconds = seconds * multiplier ^ (streak - 1)
    end
  end
  if P.jitter > 0 then seconds = seconds * (1 - P.jitter + 2 * P.jitter * draw) end
  return math.min(seconds, longest)
end

-- Only a trip moves to OPEN: for `seconds` (set by trip()).
local function move(target, reason, seconds)
  local source = S.st
  local why = POLICY_MOVES[source .. '>' .. target]
  if OPERATOR_TARGETS[target] and why == nil then why = 'operator' end
  if why == nil then error('celery-breaker: no transition from ' .. source .. ' to ' .. target) end
  local calls, failures = 0, 0
  if P.uses_rates then
    calls, failures = rate_totals()
  elseif P.failure_threshold ~= nil then
    failures = failures_in_window()
  end
  S.gen = S.gen + 1
  S.st = target
  S.ou = nil
  if target == OPEN or target == FORCED_OPEN then
    S.oa = now
    S.od = nil
    if target == OPEN then
      S.tr = S.tr + 1
      S.ou = now + seconds
      S.od = seconds
    end
  elseif target == HALF_OPEN then
    S.hos = 0
  else
    S.od, S.stk = nil, 0 -- CLOSED or DISABLED: the next trip starts a new streak
  end
  redis.call('DEL', K_LEASES) -- every move ends the probes of the previous period
  if target == OPEN or target == CLOSED or source == CLOSED then clear_windows() end
  transition = { source, target, reason or why, S.gen, failures, calls, S.tr }
end

-- Open the breaker (BreakerMachine._trip): for open_for seconds (a Retry-After, capped by
-- max_reset_timeout) when given, else for the backed-off open duration.
local function trip(reason, open_for, draw)
  local streak = 1
  if S.st == HALF_OPEN then streak = S.stk + 1 end
  local seconds
  if open_for == nil then
    seconds = open_seconds(streak, draw)
  else
    seconds = math.min(open_for, P.longest_open)
    local hint = string.format('retry-after %g s', open_for)
    if seconds < open_for then hint = hint .. string.format(' (capped at %g s)', seconds) end
    if reason ~= '' then reason = reason .. ', ' .. hint else reason = hint end
  end
  move(OPEN, reason, seconds)
  S.stk = streak
end

-- -- saving and replying -----------------------------------------------------

local function save()
  redis.call('HSET', K_STATE, 'st', S.st, 'pol', S.pol, 'nm', S.nm, 'ky', S.ky, 'inc', S.inc,
    'gen', S.gen, 'hos', S.hos, 'nl', S.nl, 'ok', S.ok, 'ko', S.ko, 'rj', S.rj, 'df', S.df,
    'tr', S.tr, 'wn', S.wn, 'wl', S.wl, 'wc', S.wc, 'wf', S.wf, 'ws', S.ws,
    'oa', fmt(S.oa), 'ou', fmt(S.ou), 'ls', fmt(S.ls), 'lf', fmt(S.lf), 'stk', S.stk, 'od', fmt(S.od))
  local pttl = redis.call('PTTL', K_STATE)
  if S.st == FORCED_OPEN or S.st == DISABLED then
    -- Set by an operator and left only by an operator (DESIGN.md): its keys never expire
    -- meanwhile, or an idle breaker would come back CLOSED and release its parked tasks.
    -- Leaving the state (PTTL -1 below the threshold) gives all five the idle TTL again.
    if pttl ~= -1 then
      for _, key in ipairs(KEYS) do redis.call('PERSIST', key) end
    end
  elseif pttl < ttl_ms - math.min(ttl_ms / 10, 60000) then
    for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl_ms) end
  else
    for key in pairs(touched) do redis.call('PEXPIRE', key, ttl_ms) end
  end
end

-- Tell every process's local view: after a transition, or when a probe slot frees up.
local announce = false

local function publish()
  if ARGV[7] == '' then return end
  local remaining = ''
  if S.ou ~= nil then remaining = fmt(S.ou - now) end
  redis.call('PUBLISH', ARGV[7], table.concat({ K_STATE, S.inc, S.gen, S.st, remaining }, '\n'))
end

-- The local view every reply starts with (the caller converts times to its own clock).
local function reply(verdict, value, extra)
  save()
  if transition ~= nil or announce then publish() end
  local remaining = ''
  if S.ou ~= nil then remaining = fmt(S.ou - now) end
  local policy_back = ''
  if S.pol ~= given_policy then policy_back = S.pol end
  local out = { S.st, S.gen, remaining, fmt(now), verdict, value or '', table.concat(warnings, '; '), policy_back }
  local t = transition or { '', '', '', '', '', '', '' }
  for _, v in ipairs(t) do out[#out + 1] = v end
  out[#out + 1] = S.inc
  for _, v in ipairs(extra or {}) do out[#out + 1] = v end
  return out
end

-- Successes the caller aggregated: counted, and in the window only under the generation
-- they were admitted in (a success never moves a CLOSED breaker, so this decides nothing).
local batch_gen, batch, stale = pending[3], pending[4] or 0, pending[5] or 0
if batch + stale > 0 then
  S.ok = S.ok + batch + stale
  S.ls = now
  if batch > 0 and batch_gen == S.gen and S.st == CLOSED and P.uses_rates then rate_add(false, false, batch) end
end
