-- celery-breaker: the prelude every breaker script starts with (loads, validates, saves one breaker).
--
-- Each script is checks.lua, this file and one operation (acquire.lua, record.lua, ...), and
-- runs as ONE atomic step mirroring celery_breaker.core.machine.BreakerMachine.
--
-- KEYS (one hash tag, so Redis Cluster keeps them on one slot):
--   1 state hash, 2 failure-times list, 3 count-window ring (string), 4 time buckets (hash),
--   5 probe leases (hash: lease id -> deadline)
-- ARGV:
--   1 the caller's clock reading, or '' to use Redis TIME (the default: shared decisions
--     never depend on worker clocks); 2 idle TTL in ms; 3 what the caller counted locally
--     since its last script call: 'rejections;deferrals;generation;successes;stale successes;
--     check;incarnation;generation;counted incarnation;counted generation;stale generation;
--     send' (successes under that generation, stale ones under an earlier one; check = 1
--     asks for the key types to be checked first, 2 also resets the breaker: the caller's
--     last try failed on its data; the caller's view, the incarnation and generation it
--     last saw, if any; the view the oldest of those counts was counted under, at the
--     earliest, '' for one it cannot tell; the oldest generation a stale success was
--     admitted in, '' for none: counts from before a reset or from another incarnation
--     are dropped, see below; and send = 1 when the call only sends those counts, a
--     flush, which makes no breaker for counts it drops); 4 the caller's policy
--     text (see parse_policy; '' for a listing, which never creates a breaker); 5 name
--     ('' for a listing: read from the keys); 6 '-' or '+' .. key; 7 the pub/sub channel
--     transitions are published on ('' for none); 8.. the operation's own arguments.
--
-- Everything read from the keys is checked (checks.lua): a key of another type, a value
-- that is no number or out of its bounds, a state hash naming another breaker. A bad
-- state hash resets the breaker (all five keys); a bad window or lease is cleared alone.
-- Each is reported in the reply's warn, naming the key and the value. A listing (ARGV[4]
-- '') repairs nothing: it answers such a breaker as unreadable, and writes nothing at all.
--
-- Replies are flat key/value pairs, as HGETALL's (see reply(); storage/redis/replies.py
-- reads them by name). Every transition (and every reset) is PUBLISHed on ARGV[7] as
-- 'state key\nincarnation\ngeneration\nstate\nseconds until a probe may be admitted', so
-- each process's local view follows it.

local K_STATE, K_FAILS, K_RING, K_BUCKETS, K_LEASES = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
-- The five a save keeps alive (never KEYS itself: record.lua is also given the parked
-- queue and claims to read, which must never get a TTL; decision 91).
local BREAKER_KEYS = { K_STATE, K_FAILS, K_RING, K_BUCKETS, K_LEASES }
local TIME_BUCKETS = 20
-- A count window's ring is a string: SETRANGE past Redis's 512 MB string limit fails.
local MAX_RING = 536870912
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
local wiped = false -- the breaker was reset as unreadable: every process's view must follow

local now = script_now(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
local given_policy = ARGV[4]
-- A listing (no policy: status, watch, the page, Prometheus, inspect) only reads: it
-- never creates a breaker, and writes nothing, not even what a call would repair. A
-- breaker it cannot read is answered as unreadable (unreadable() below) and left as it
-- is, for an operator to see: a reset deleted an operator's forced_open with its keys
-- (decision 107). Its keys' TTLs are not refreshed either: only use keeps a breaker alive.
local listing = given_policy == ''

-- Delete keys, unless listing (what was cleared is still reported in warnings).
local function del(...)
  if not listing then redis.call('DEL', ...) end
end

-- The breaker's state hash as a table (S) and its policy (P), set once loaded (below);
-- the rules read and write them.
local S, P

-- Keys written by this script get their TTL now; all five are refreshed together when
-- the state key's TTL has run down by a tenth (at most a minute), so an idle breaker
-- vanishes as a whole without five PEXPIREs on every call. FORCED_OPEN and DISABLED
-- keep no TTL at all (see save).
local touched = {}
local function touch(key) touched[key] = true end

-- -- windows: where the rules keep their outcomes ----------------------------------

local function clear_failure_times()
  del(K_FAILS)
end

-- A failure time: it has happened (CLOCK_SLACK aside), within TIME_SPAN.
local function failure_time(text)
  return read_time(text, now, 0)
end

local function failure_times()
  local times = {}
  for _, text in ipairs(redis.call('LRANGE', K_FAILS, 0, -1)) do
    local t = failure_time(text)
    if t == nil then
      clear_failure_times()
      warnings[#warnings + 1] = 'unreadable failure time ' .. show(text) .. ' in ' .. K_FAILS .. ' (cleared)'
      return {}
    end
    times[#times + 1] = t
  end
  return times
end

local function failures_in_window(window)
  local count = 0
  for _, t in ipairs(failure_times()) do
    if now - t <= window then count = count + 1 end
  end
  return count
end

-- Time window: bucket i (0..19) holds 'epoch:calls:failures:slow' for an epoch with
-- epoch % 20 == i; field 'h' is the newest epoch. An epoch may lie ahead of now's by
-- CLOCK_SLACK at most (beyond, the window would drop every new outcome as too old).
local function read_buckets(rule)
  local width = rule.window / TIME_BUCKETS
  local latest = math.floor(now / width) + math.ceil(CLOCK_SLACK / width)
  local function epoch_of(text)
    local e = read_number(text)
    if e == nil or e ~= math.floor(e) or e > latest or e < -MAX_WHOLE then return nil end
    return e
  end
  local flat = redis.call('HGETALL', K_BUCKETS)
  local buckets, head = {}, -1
  for i = 1, #flat, 2 do
    local field, value = flat[i], flat[i + 1]
    local bad = nil
    if field == 'h' then
      head = epoch_of(value)
      if head == nil then bad = 'h=' .. show(value) end
    else
      local index = read_whole(field, TIME_BUCKETS - 1)
      local e, c, f, s = string.match(value, '^(-?%d+):(%d+):(%d+):(%d+)$')
      e, c, f, s = epoch_of(e), read_whole(c), read_whole(f), read_whole(s)
      if index == nil or e == nil or c == nil or f == nil or s == nil or f > c or s > c
          or e % TIME_BUCKETS ~= index then
        bad = show(field) .. '=' .. show(value)
      else
        buckets[index] = { e, c, f, s }
      end
    end
    if bad ~= nil then
      del(K_BUCKETS)
      warnings[#warnings + 1] = 'unreadable time bucket ' .. bad .. ' in ' .. K_BUCKETS .. ' (cleared)'
      return {}, -1
    end
  end
  return buckets, head
end

-- (calls, failures, slow calls) in a rates rule's window.
local function rate_totals(rule)
  if rule.count_window ~= nil then return S.wc, S.wf, S.ws end
  local buckets, head = read_buckets(rule)
  local epoch = math.floor(now / (rule.window / TIME_BUCKETS))
  if epoch > head then head = epoch end
  local calls, failures, slow = 0, 0, 0
  for _, b in pairs(buckets) do
    if b[1] > head - TIME_BUCKETS and b[1] <= head then
      calls, failures, slow = calls + b[2], failures + b[3], slow + b[4]
    end
  end
  return calls, failures, slow
end

local clear_rates -- (defined with the rule, below)

local function rate_add(rule, failed, slow, n)
  local f, s = failed and 1 or 0, slow and 1 or 0
  local size = rule.count_window
  if size ~= nil then
    -- n outcomes at once (aggregated successes): only the last count_window of them matter
    for _ = 2, math.min(n, size) do rate_add(rule, failed, slow, 1) end
    -- A ring of the last count_window outcomes, one byte each ('0' + failed + 2 * slow);
    -- the totals in the state hash are kept by subtract-on-evict.
    local i = S.wn
    if S.wl >= size then
      local byte = string.byte(redis.call('GETRANGE', K_RING, i, i))
      if byte == nil or byte < 48 or byte > 51 then
        -- (a ring shorter than its count, or a byte no script wrote: the totals cannot be trusted)
        clear_rates(rule)
        warnings[#warnings + 1] = 'unreadable count window byte ' .. show(byte) .. ' at ' .. i .. ' in ' .. K_RING
          .. ' (cleared)'
        return rate_add(rule, failed, slow, 1)
      end
      local old = byte - 48
      S.wf = S.wf - old % 2
      S.ws = S.ws - math.floor(old / 2)
    else
      S.wl = S.wl + 1
      S.wc = S.wc + 1
    end
    redis.call('SETRANGE', K_RING, i, string.char(48 + f + 2 * s))
    touch(K_RING)
    S.wf, S.ws = S.wf + f, S.ws + s
    S.wn = (i + 1) % size
    return
  end
  local buckets, head = read_buckets(rule)
  local epoch = math.floor(now / (rule.window / TIME_BUCKETS))
  if epoch > head then head = epoch end
  if epoch <= head - TIME_BUCKETS then return end -- older than the window
  local i = epoch % TIME_BUCKETS
  local b = buckets[i]
  if b == nil or b[1] ~= epoch then b = { epoch, 0, 0, 0 } end
  redis.call('HSET', K_BUCKETS, 'h', fmt(head), i,
    string.format('%.0f:%.0f:%.0f:%.0f', epoch, b[2] + n, b[3] + f * n, b[4] + s * n))
  touch(K_BUCKETS)
end

-- -- trip rules (core/rules.py) ----------------------------------------------------
--
-- By kind, the same kinds as core/rules.py, each with the same operations:
--   parse(spec)   the rule's parameters, read by name from the policy text (nil: unreadable);
--   check(rule)   the rule's stored state is sane (else it is cleared, with a warning);
--   observe(rule, failed, slow, n)  one outcome of a CLOSED breaker, or n aggregated
--                 successes at once: the reason to trip, or nil (TripRule.observe);
--   failures(rule), calls(rule), slow_calls(rule)  what the rule holds now, for transitions
--                 and snapshots (TripRule.failures, .calls, .slow_calls);
--   clear(rule)   forget every outcome (TripRule.clear).

-- (Parameters are read with checks.lua's number, whole, positive and fraction.)

local RULES = {}

-- threshold failures within window seconds: the times of the last `threshold` failures,
-- a list; it trips when they all fall within the window.
RULES.failures_within = {
  parse = function(spec)
    local rule = { threshold = whole(spec.threshold), window = positive(spec.window) }
    if rule.threshold == nil or rule.window == nil then return nil end
    return rule
  end,
  check = function(rule) end, -- (an unreadable time is found, and forgotten, when read)
  observe = function(rule, failed)
    if not failed then return nil end
    local threshold = rule.threshold
    redis.call('RPUSH', K_FAILS, fmt(now))
    touch(K_FAILS)
    redis.call('LTRIM', K_FAILS, -threshold, -1)
    if redis.call('LLEN', K_FAILS) == threshold then
      local text = redis.call('LINDEX', K_FAILS, 0)
      local oldest = failure_time(text)
      if oldest == nil then
        clear_failure_times() -- forget the unreadable history, keep this failure
        redis.call('RPUSH', K_FAILS, fmt(now))
        touch(K_FAILS)
        warnings[#warnings + 1] = 'unreadable failure time ' .. show(text) .. ' in ' .. K_FAILS .. ' (cleared)'
      elseif now - oldest <= rule.window then
        return string.format('%d failures within %g s', threshold, rule.window)
      end
    end
    return nil
  end,
  failures = function(rule) return failures_in_window(rule.window) end,
  calls = function(rule) return 0 end,
  slow_calls = function(rule) return 0 end,
  clear = function(rule) clear_failure_times() end,
}

-- threshold failures in a row: the run, field 'run' of the state hash. Any success ends
-- it (aggregated ones too, applied before the outcome a script records); ignored outcomes
-- never reach a rule.
RULES.consecutive_failures = {
  parse = function(spec)
    local threshold = whole(spec.threshold)
    if threshold == nil then return nil end
    return { threshold = threshold }
  end,
  check = function(rule) end, -- (the run is a whole number, checked when loaded)
  observe = function(rule, failed)
    if not failed then
      S.run = 0
      return nil
    end
    S.run = S.run + 1
    if S.run >= rule.threshold then return string.format('%d consecutive failures', rule.threshold) end
    return nil
  end,
  failures = function(rule) return S.run end,
  calls = function(rule) return 0 end,
  slow_calls = function(rule) return 0 end,
  clear = function(rule) S.run = 0 end,
}

-- The failure rate and the slow-call rate over one window: the last count_window calls
-- (a ring, totals in the state hash) or the last `window` seconds (time buckets). Judged
-- once calls_to_judge calls are in it, on a failed or slow call only.
RULES.rates = {
  parse = function(spec)
    local rule = {
      failure_rate = fraction(spec.failure_rate_threshold), slow_rate = fraction(spec.slow_call_rate_threshold),
      calls_to_judge = whole(spec.calls_to_judge), count_window = whole(spec.count_window),
      window = positive(spec.window),
    }
    if rule.calls_to_judge == nil or (rule.failure_rate == nil and rule.slow_rate == nil)
        or (spec.failure_rate_threshold ~= nil and rule.failure_rate == nil)
        or (spec.slow_call_rate_threshold ~= nil and rule.slow_rate == nil)
        or (spec.count_window ~= nil and rule.count_window == nil)
        or (rule.count_window == nil and rule.window == nil) then
      return nil
    end
    return rule
  end,
  check = function(rule)
    -- The ring's totals: a position inside the ring (outside, SETRANGE would allocate up
    -- to 512 MB), as many calls as outcomes held, no more failures or slow calls than
    -- calls. (A time window's buckets are checked as they are read.)
    local size = rule.count_window
    if size ~= nil and not (S.wn < size and S.wn < MAX_RING and S.wl <= size and S.wc == S.wl
        and S.wf <= S.wc and S.ws <= S.wc) then
      warnings[#warnings + 1] = string.format('count window out of range (wn=%s wl=%s wc=%s wf=%s ws=%s) in %s (cleared)',
        fmt(S.wn), fmt(S.wl), fmt(S.wc), fmt(S.wf), fmt(S.ws), K_STATE)
      RULES.rates.clear(rule)
    end
  end,
  observe = function(rule, failed, slow, n)
    rate_add(rule, failed, slow, n)
    if not (failed or slow) then return nil end
    local calls, failures, slow_calls = rate_totals(rule)
    if calls < rule.calls_to_judge then return nil end
    if rule.failure_rate ~= nil and failures >= rule.failure_rate * calls then
      return string.format('failure rate %d/%d >= %g%%', failures, calls, rule.failure_rate * 100)
    end
    if rule.slow_rate ~= nil and slow_calls >= rule.slow_rate * calls then
      return string.format('slow-call rate %d/%d >= %g%%', slow_calls, calls, rule.slow_rate * 100)
    end
    return nil
  end,
  failures = function(rule)
    local _, failures = rate_totals(rule)
    return failures
  end,
  calls = function(rule) return (rate_totals(rule)) end,
  slow_calls = function(rule)
    local _, _, slow = rate_totals(rule)
    return slow
  end,
  clear = function(rule)
    del(K_RING, K_BUCKETS)
    S.wn, S.wl, S.wc, S.wf, S.ws = 0, 0, 0, 0, 0
  end,
}
clear_rates = RULES.rates.clear

-- Every rule sees every outcome; the first reason wins (BreakerMachine._record_closed).
local function observe(failed, slow, n)
  local reason = nil
  for _, rule in ipairs(P.rules) do
    local said = RULES[rule.kind].observe(rule, failed, slow, n)
    if reason == nil then reason = said end
  end
  return reason
end

local function clear_windows()
  for _, rule in ipairs(P.rules) do RULES[rule.kind].clear(rule) end
end

-- The counts transitions and snapshots show: the last rule's (core/rules.py rules_for).
-- `count` is 'failures', 'calls' or 'slow_calls'.
local function shown(count)
  local rule = P.rules[#P.rules]
  if rule == nil then return 0 end
  return RULES[rule.kind][count](rule)
end

-- -- the policy text -----------------------------------------------------------------

local function add_rule(p, kind, spec)
  local rule = RULES[kind].parse(spec)
  if rule == nil then return false end
  rule.kind = kind
  p.rules[#p.rules + 1] = rule
  return true
end

-- Version 3 (replies.py policy_text): a JSON object, rules by kind and parameters by name:
-- {"v":3,"rules":[{"kind":"failures_within","threshold":5,"window":60.0},...],
--  "reset_timeout":..,"backoff_multiplier":..,"longest_open":..,"reset_jitter":..,
--  "half_open_max_calls":..,"probes_to_close":..,"half_open_max_wait":..,
--  "slow_call_duration":.. (absent: no call is slow),"fields":{..for Python only..}}.
-- A rule of a kind this release does not know (a newer release's) makes it unreadable.
local function parse_keyed(p, d)
  for _, spec in ipairs(d.rules) do
    if type(spec) ~= 'table' or type(spec.kind) ~= 'string' or RULES[spec.kind] == nil then return nil end
    if not add_rule(p, spec.kind, spec) then return nil end
  end
  return p
end

-- Versions 1 and 2 (earlier releases), positional (see checks.lua policy_limits): the
-- rules are made from failure_threshold, window, failure_rate, minimum_calls (calls_to_judge),
-- count_window and slow_call_rate.
local function parse_positional(p, f)
  local window, failure_threshold = positive(tonumber(f[3])), tonumber(f[2])
  local failure_rate, slow_rate, calls_to_judge = tonumber(f[4]), tonumber(f[8]), tonumber(f[13])
  if not (window and calls_to_judge) then return nil end
  if failure_threshold ~= nil and not add_rule(p, 'failures_within', { threshold = failure_threshold, window = window }) then
    return nil
  end
  if (failure_rate ~= nil or slow_rate ~= nil) and not add_rule(p, 'rates', {
      failure_rate_threshold = failure_rate, slow_call_rate_threshold = slow_rate,
      calls_to_judge = calls_to_judge, count_window = tonumber(f[6]), window = window }) then
    return nil
  end
  return p
end

-- The policy a text describes, or nil when it is unreadable here (a policy without a
-- rule, which BreakerPolicy refuses, would never trip).
local function parse_policy(text)
  local p, source = policy_limits(text)
  if p == nil then return nil end
  p.rules = {}
  if string.sub(text, 1, 1) == '{' then p = parse_keyed(p, source) else p = parse_positional(p, source) end
  if p == nil or #p.rules == 0 then return nil end
  return p
end

-- -- loading -------------------------------------------------------------------------

local function wipe(reason)
  del(K_STATE, K_FAILS, K_RING, K_BUCKETS, K_LEASES)
  warnings[#warnings + 1] = reason
  wiped = true
end

-- A listing's answer for a breaker it cannot read, written nothing: why, and the state the
-- hash holds when it names one (an operator's forced_open is what matters most to see).
local function unreadable(why)
  local st = ''
  if redis.call('TYPE', K_STATE).ok == 'hash' then st = redis.call('HGET', K_STATE, 'st') or '' end
  if not STATES[st] then st = '' end
  return { 'absent', 1, 'unreadable', why, 'st', st }
end

-- Which breaker the keys belong to: the caller's, or for a listing the one store.py's
-- quoting wrote into the keys. A listing leaves keys it cannot tell as a breaker's of this
-- prefix alone (another app's, or an earlier release's, under a colliding prefix): it skips them.
local want_nm, want_ky = ARGV[5], ARGV[6]
local function skip(why)
  return { 'absent', 1, 'foreign', why }
end
if want_nm == '' then
  want_nm, want_ky = breaker_of(K_STATE)
  if want_nm == nil then do return skip('not a key this store writes') end end
end

-- The name a state hash gives, if it names another breaker than the keys' (nil: the same).
local function named_otherwise(nm, ky)
  if (nm or want_nm) ~= want_nm or (ky or want_ky) ~= want_ky then
    return 'nm=' .. show(nm) .. ' ky=' .. show(ky) .. ', another breaker'
  end
  return nil
end

-- What the caller counted locally (applied below, once the breaker is loaded), and
-- its request to check key types: a key of another type (a foreign value, a collision)
-- makes commands fail with WRONGTYPE, and the caller then runs the script again with the
-- check on, which resets the breaker. (Checking on every call would cost five commands.)
-- After any other failure on the breaker's data the caller asks for a reset (check 2).
local pending, view = {}, {}
for item in (ARGV[3] .. ';'):gmatch('([^;]*);') do
  view[#view + 1] = item
  pending[#pending + 1] = math.max(0, tonumber(item) or 0)
end
local check = pending[6] or 0
-- The view the counts were counted under, if the caller can tell it ('' and '0': a process
-- that had read no breaker yet, or heard that it was deleted, or whose view is older than
-- the keys' idle life: the counts are the breaker's that is there now).
local counted_inc = view[9] or ''
local told = counted_inc ~= '' and counted_inc ~= '0'
local sending = view[12] == '1'
if check >= 1 then
  local EXPECTED_TYPES = { { K_STATE, 'hash' }, { K_FAILS, 'list' }, { K_RING, 'string' },
    { K_BUCKETS, 'hash' }, { K_LEASES, 'hash' } }
  for _, pair in ipairs(EXPECTED_TYPES) do
    local found = redis.call('TYPE', pair[1]).ok
    if found ~= 'none' and found ~= pair[2] then
      if listing then do return unreadable(pair[1] .. ' holds a ' .. found .. ', expected a ' .. pair[2]) end end
      wipe(pair[1] .. ' held a ' .. found .. ', expected a ' .. pair[2])
      break
    end
    if pair[1] == K_STATE and found == 'hash' and listing then
      local named = redis.call('HMGET', K_STATE, 'nm', 'ky')
      local other = named_otherwise(named[1] or nil, named[2] or nil)
      if other ~= nil then do return skip(other) end end
    end
  end
  if check >= 2 and not wiped and not listing then wipe('reset after a script failed on its data') end
end

-- Counters and generations must be whole (WHOLE_FIELDS); the trip streak, the run of
-- consecutive failures, the slow calls and the refusals counted (the adaptive release's
-- feedback, release.lua) may be absent from a hash an earlier release wrote (read as 0).
local WHOLE_FIELDS = { 'gen', 'hos', 'nl', 'ok', 'ko', 'rj', 'df', 'tr', 'wn', 'wl', 'wc', 'wf', 'ws' }
local LATER_WHOLE_FIELDS = { 'stk', 'run', 'sl', 'rf', 'rg' }
-- Times of what has happened ('' for never): within TIME_SPAN of now.
-- ('rs': when the release began holding back for a refusal, record.lua.)
local PAST_FIELDS = { 'oa', 'ls', 'lf', 'rs' }

local function fresh(policy_text)
  -- The incarnation tells a breaker from an earlier one under the same keys (expired or
  -- wiped): generations restart with it, so local views compare generations only within one.
  local s = { st = CLOSED, pol = policy_text, nm = want_nm, ky = want_ky, inc = fmt(now) }
  for _, name in ipairs(WHOLE_FIELDS) do s[name] = 0 end
  s.stk, s.run, s.sl, s.rf, s.rg = 0, 0, 0, 0, 0
  return s
end

-- The stored breaker and its policy; nil when there is none, false and why when it is
-- unreadable, 'foreign' and why when a listing finds another breaker's hash under the keys.
local function load()
  local flat = redis.call('HGETALL', K_STATE)
  if #flat == 0 then return nil end
  local raw = {}
  for i = 1, #flat, 2 do raw[flat[i]] = flat[i + 1] end
  local function bad(name) return false, name .. '=' .. show(raw[name]) end
  local other = named_otherwise(raw.nm, raw.ky)
  if other ~= nil then
    if listing then return 'foreign', other end
    return false, other
  end
  if not STATES[raw.st or ''] then return bad('st') end
  -- An operator's state (FORCED_OPEN, DISABLED) is left only by an operator: what else is
  -- unreadable is mended around it (counts and times start again, an unreadable policy
  -- gives way to the caller's), never by resetting the breaker, which came back CLOSED
  -- and released its parked tasks against the downstream the operator held off.
  local held = raw.st == FORCED_OPEN or raw.st == DISABLED
  local mended = {}
  local function mend(name)
    if not held or listing then return false end -- (a listing mends nothing: it is unreadable)
    mended[#mended + 1] = name .. '=' .. show(raw[name])
    return true
  end
  local policy = parse_policy(raw.pol)
  local pol = raw.pol
  if policy == nil then
    policy = given_policy ~= '' and parse_policy(given_policy) or nil
    if policy == nil or not mend('pol') then return false, 'policy ' .. show(raw.pol) end
    pol = given_policy
  end
  local s = { st = raw.st, pol = pol, nm = raw.nm or want_nm, ky = raw.ky or want_ky, inc = raw.inc or '0' }
  for _, name in ipairs(WHOLE_FIELDS) do
    s[name] = read_whole(raw[name])
    if s[name] == nil then
      if not mend(name) then return bad(name) end
      s[name] = 0
    end
  end
  for _, name in ipairs(LATER_WHOLE_FIELDS) do
    s[name] = read_whole(raw[name] or '0')
    if s[name] == nil then
      if not mend(name) then return bad(name) end
      s[name] = 0
    end
  end
  -- A generation mended to 0 went back within its incarnation: a process whose view was
  -- ahead ignored the replies and messages of the breaker's next moves, and its next script
  -- found the generation gone back and warned again, for the same damage. Generations
  -- restart under another incarnation instead, which every view takes at once (and the
  -- last reset's generation with them: counts from before are dropped as another's).
  local renumbered = read_whole(raw.gen) == nil
  if renumbered then s.rg = 0 end
  -- The generation of the last reset (rg): counts sent from before it are dropped. Beyond
  -- the generation it would drop every count for ever.
  if s.rg > s.gen then
    if not mend('rg') then return bad('rg') end
    s.rg = 0
  end
  for _, name in ipairs(PAST_FIELDS) do
    local text = raw[name] or ''
    if text ~= '' then
      s[name] = read_time(text, now)
      if s[name] == nil and not mend(name) then return bad(name) end
    end
  end
  -- open_until: at most the policy's longest open duration ahead (CLOCK_SLACK aside);
  -- the open duration itself never longer. (Only an OPEN breaker has them.)
  if (raw.ou or '') ~= '' then
    s.ou = read_time(raw.ou, now, policy.longest_open)
    if s.ou == nil and not mend('ou') then return bad('ou') end
  end
  -- The release waits until rh after a refusal (record.lua): as far ahead as open_until may be.
  if (raw.rh or '') ~= '' then
    s.rh = read_time(raw.rh, now, policy.longest_open)
    if s.rh == nil and not mend('rh') then return bad('rh') end
  end
  if (raw.od or '') ~= '' then
    s.od = read_number(raw.od)
    if s.od == nil or s.od < 0 or s.od > policy.longest_open then
      if not mend('od') then return bad('od') end
      s.od = nil
    end
  end
  -- The incarnation is published, a line of a message: a number as fmt() writes it.
  if #s.inc > 32 or not string.match(s.inc, '^[%d%.eE%+%-]+$') or read_number(s.inc) == nil then
    if not mend('inc') then return bad('inc') end
    renumbered = true
  end
  if renumbered then
    -- Another incarnation (views read the breaker again): now, as a new breaker's, unless
    -- that is the stored one (a clock that has not moved since: the caller's, on the test
    -- seam); then a millisecond on, a distinct number at any time read_time accepts.
    s.inc = fmt(now)
    if s.inc == raw.inc then s.inc = fmt(now + 0.001) end
  end
  if #mended > 0 then
    warnings[#warnings + 1] = 'unreadable ' .. table.concat(mended, ', ') .. ' in ' .. K_STATE .. ' (mended; kept '
      .. raw.st .. ', an operator\'s)'
    wiped = true -- (every process's view reads it again)
  end
  if s.st ~= OPEN then s.ou = nil end
  if s.st == OPEN and s.ou == nil then return false, 'open without open_until' end
  -- A half-open breaker closes after probes_to_close successes: more can only be corrupt
  -- (and would keep every probe slot taken for ever).
  if s.st == HALF_OPEN and s.hos >= policy.probes_to_close then return bad('hos') end
  return s, policy
end

local loaded, policy_or_why = load()
if loaded == 'foreign' then do return skip(policy_or_why) end end
if loaded == false then
  if listing then do return unreadable('unreadable ' .. policy_or_why .. ' in ' .. K_STATE) end end
  wipe('unreadable ' .. policy_or_why .. ' in ' .. K_STATE)
  loaded = nil
end
if loaded == nil then
  -- Asked about a breaker without a policy (a listing) that expired meanwhile, or was
  -- just reset: nothing to show, but what was reset.
  if listing then do return { 'absent', 1, 'warn', table.concat(warnings, '; ') } end end
  -- A flush that finds no breaker makes one only for counts that are the new breaker's
  -- (untold). Counted under a breaker since deleted (told: every incarnation but the one
  -- made here is gone), they are dropped below; made for nothing, the breaker came back,
  -- closed and empty, where the operator had deleted it. Nothing is written: the caller
  -- takes the view a delete publishes (forget.lua), so its next call asks, and makes it.
  local nothing = (pending[1] or 0) + (pending[2] or 0) + (pending[4] or 0) + (pending[5] or 0) == 0
  if sending and not wiped and (told or nothing) then
    do return { 'st', CLOSED, 'gen', 0, 'left', '', 'now', fmt(now), 'verdict', 'gone', 'value', '',
      'warn', table.concat(warnings, '; '), 'pol', '', 'inc', '0' } end
  end
  S = fresh(given_policy)
  redis.call('DEL', K_FAILS, K_RING, K_BUCKETS, K_LEASES) -- leftovers of an expired breaker
  -- The stored policy wins (the breaker keeps the policy it was created with); a new one has the caller's.
  P = parse_policy(given_policy)
  if P == nil then error('celery-breaker: unparsable policy ' .. tostring(given_policy)) end
else
  S, P = loaded, policy_or_why
  -- A generation below one a process saw in this incarnation went back (a foreign write,
  -- or a failover that lost the last writes): that process would ignore every reply and
  -- fence every outcome it admitted. Moved past it (the state is kept), so views follow.
  local seen = read_whole(view[8], MAX_WHOLE - 1)
  if view[7] == S.inc and seen ~= nil and seen > S.gen then
    warnings[#warnings + 1] = 'generation ' .. fmt(S.gen) .. ' in ' .. K_STATE .. ' went back from ' .. fmt(seen)
      .. ' (moved past it)'
    S.gen = seen + 1
    wiped = true
  end
end
for _, rule in ipairs(P.rules) do RULES[rule.kind].check(rule) end
-- Counts a process sends late (it flushes them every second) belong to the breaker they
-- were counted for: not to this one when a reset came between (counted under an earlier
-- generation than the reset's), nor when the breaker was deleted or expired meanwhile
-- (another incarnation). Else an operator's reset or delete is undone by the rejections,
-- deferrals and successes counted before it. Untold counts (above) count here.
-- Successes carry the generation they were counted under (pending[3], in the caller's
-- incarnation, view[7]): those of the reset's generation or later are kept. Stale ones,
-- the oldest generation they were admitted in (view[11]; a caller without it: the view's).
do
  local counted_gen = read_whole(view[10]) or 0
  local elsewhere = told and counted_inc ~= S.inc
  if elsewhere or (told and counted_gen < S.rg) then
    pending[1], pending[2] = 0, 0
    if view[7] ~= S.inc or (pending[3] or 0) < S.rg then pending[4] = 0 end
  end
  local stale_gen = read_whole(view[11]) -- (nil: '' or absent)
  if elsewhere or (stale_gen ~= nil and stale_gen < S.rg) or (stale_gen == nil and told and counted_gen < S.rg) then
    pending[5] = 0
  end
end
S.rj = S.rj + (pending[1] or 0)
S.df = S.df + (pending[2] or 0)

-- -- leases ------------------------------------------------------------------

-- Live probe leases: id (below the next id, nl) -> deadline (at most half_open_max_wait
-- ahead, CLOCK_SLACK aside). An unreadable lease is dropped, as if it had expired.
local function read_leases()
  local flat = redis.call('HGETALL', K_LEASES)
  local leases = {}
  for i = 1, #flat, 2 do
    local id, deadline = read_whole(flat[i], S.nl - 1), read_time(flat[i + 1], now, P.max_wait)
    if id == nil or deadline == nil then
      if not listing then redis.call('HDEL', K_LEASES, flat[i]) end
      warnings[#warnings + 1] = 'unreadable probe lease ' .. show(flat[i]) .. ' = ' .. show(flat[i + 1]) .. ' in '
        .. K_LEASES .. ' (dropped)'
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
  local calls, failures = shown('calls'), shown('failures')
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
  transition = { 'from', source, 'to', target, 'why', reason or why, 'mgen', S.gen, 'mko', failures,
    'mcalls', calls, 'mtr', S.tr }
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
    'oa', fmt(S.oa), 'ou', fmt(S.ou), 'ls', fmt(S.ls), 'lf', fmt(S.lf), 'stk', S.stk, 'od', fmt(S.od),
    'run', S.run, 'sl', S.sl, 'rf', S.rf, 'rh', fmt(S.rh), 'rs', fmt(S.rs), 'rg', S.rg)
  local pttl = redis.call('PTTL', K_STATE)
  if S.st == FORCED_OPEN or S.st == DISABLED then
    -- Set by an operator and left only by an operator (DESIGN.md): its keys never expire
    -- meanwhile, or an idle breaker would come back CLOSED and release its parked tasks.
    -- Leaving the state (PTTL -1 below the threshold) gives all five the idle TTL again.
    if pttl ~= -1 then
      for _, key in ipairs(BREAKER_KEYS) do redis.call('PERSIST', key) end
    end
    return
  end
  -- An OPEN breaker lives the idle TTL past the end of its open period: idle while it is
  -- open (every task parked, none calling), it must not come back CLOSED early and
  -- release its parked tasks (an idle_ttl shorter than the open duration).
  local keep = ttl_ms
  if S.st == OPEN and S.ou ~= nil and S.ou > now then keep = ttl_ms + math.ceil((S.ou - now) * 1000) end
  if pttl < keep - math.min(keep / 10, 60000) then
    for _, key in ipairs(BREAKER_KEYS) do redis.call('PEXPIRE', key, keep) end
  else
    for key in pairs(touched) do redis.call('PEXPIRE', key, keep) end
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

-- Every reply: key/value pairs (storage/redis/replies.py Reply): the local view (st, gen,
-- left: seconds until open_until, now: this script's clock, inc), the operation's verdict
-- and value, warn (what was reset as unreadable), pol (the stored policy text when it is not
-- the caller's), the transition made if any (from, to, why, mgen, mko, mcalls, mtr), then
-- the operation's `extra` pairs. The caller converts times to its own clock.
local function reply(verdict, value, extra)
  if listing then
    -- (what a call would have cleared or dropped is named, and left as it is)
    if #warnings > 0 then return unreadable((string.gsub(table.concat(warnings, '; '), ' %((%a+)%)', ''))) end
  else
    save()
    if transition ~= nil or announce or wiped then publish() end
  end
  local remaining = ''
  if S.ou ~= nil then remaining = fmt(S.ou - now) end
  local policy_back = ''
  if S.pol ~= given_policy then policy_back = S.pol end
  local out = { 'st', S.st, 'gen', S.gen, 'left', remaining, 'now', fmt(now), 'verdict', verdict,
    'value', value or '', 'warn', table.concat(warnings, '; '), 'pol', policy_back, 'inc', S.inc }
  for _, v in ipairs(transition or {}) do out[#out + 1] = v end
  for _, v in ipairs(extra or {}) do out[#out + 1] = v end
  return out
end

-- Successes the caller aggregated: counted, and seen by the rules only under the generation
-- they were admitted in, before the outcome this script records (so they end a run of
-- consecutive failures first; a success trips no rule, so this decides nothing by itself).
local batch_gen, batch, stale = pending[3], pending[4] or 0, pending[5] or 0
if batch + stale > 0 then
  S.ok = S.ok + batch + stale
  S.ls = now
  if batch > 0 and batch_gen == S.gen and S.st == CLOSED then observe(false, false, batch) end
end
