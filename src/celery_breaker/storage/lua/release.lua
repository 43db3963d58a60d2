-- release: claim the parked entries a breaker lets run now, under a lease.
-- KEYS 1-5, ARGV 1-2 and the reply's first item: see parked.lua; KEYS 6 the breaker's
--   state hash (read, and reset if unreadable; never otherwise changed here); KEYS 7 its
--   probe leases (read only).
-- ARGV: 3 most entries to claim, 4 full pace (entries per second), 5 ramp (seconds from a
--       tenth of the pace to all of it), 6 lease seconds, 7 '' for that fixed pace, or the
--       adaptive law (core/pacing.py PacingLaw.text: start;ceiling;judge_every;slow_start;
--       step;back_off;bad_share;floor;least_bad;in_flight_s, the ceiling '' for none; 4 and
--       5 are then unused), 8 the transitions channel ('' none: a reset is not published),
--       9 the idle TTL in ms ('' none): the pacing hash lives that long past the last release
--       (it names no entry; without it, every breaker that ever released kept one for good),
--       10 the most entries the pace may let go, those past their deadline claimed in this
--       call counted among them ('' or absent: 3 alone bounds them): what a releasing
--       worker's pool will take; probes, and entries past their deadline, are not held
--       back by it
-- Returns { repairs, quiet, entry, payload, entry, payload, ... }; quiet: the seconds in
--   which nothing can come due here unless someone moves the breaker (an OPEN breaker's time
--   left, none for a FORCED_OPEN one, each bounded by the next deadline and the next lease
--   to run out): '0' when something may, '' when nothing ever will by itself.
--
-- What the breaker lets run (read from its state hash):
--   CLOSED, DISABLED, or no breaker state at all: entries at a paced ramp, oldest first,
--     or at the adaptive pace (mirrors core/pacing.py advance/allowed/took, step for step);
--   OPEN whose time is up, or HALF_OPEN: half_open_max_calls entries once per open period
--     (the probes), again only if that period's probes never reported back;
--   OPEN, FORCED_OPEN: nothing.
-- Whatever the breaker says, entries past their deadline (expires, max defer age) are
-- released, so Celery revokes or fails them as it should; and claims whose lease ran out
-- (a releaser died between claiming and publishing) go back to the queue, in order.
--
-- What it reads is checked (checks.lua): a state hash the breaker scripts would reset
-- (an unknown state, an unreadable policy or count, an open_until beyond the policy's
-- longest open duration) is deleted here, so a breaker nobody calls any more cannot hold
-- its tasks for ever: the next breaker script starts it afresh, CLOSED. Unreadable pacing
-- restarts the ramp (or the adaptive pace); claims, deadlines and orders no script wrote
-- are repaired.
local K_STATE = KEYS[6]
local K_LEASES = KEYS[7] -- (the breaker's probe leases; absent from older callers)
-- Seconds after a period's probes went before a probe slot found free again sends another
-- (a probe on its way to a worker has taken none yet), at most the claim lease.
local PROBES_AGAIN_AFTER = 5
local most, pace, ramp, lease = read_whole(ARGV[3]), read_number(ARGV[4]), read_number(ARGV[5]), read_number(ARGV[6])
if most == nil or pace == nil or ramp == nil or lease == nil or pace < 0 or ramp < 0 or lease <= 0 then
  return redis.error_reply('celery-breaker: release needs a count, a pace, a ramp and a lease')
end
local paced = nil -- (ARGV[10]: '' or absent, no bound of its own)
if (ARGV[10] or '') ~= '' then
  paced = read_whole(ARGV[10])
  if paced == nil then
    return redis.error_reply('celery-breaker: release got an unreadable paced count ' .. show(ARGV[10]))
  end
end
local law = nil
if (ARGV[7] or '') ~= '' then
  law = read_law(ARGV[7])
  if law == nil then return redis.error_reply('celery-breaker: release got an unreadable pacing law') end
end

-- Claims whose lease ran out go back to the queue, in their original order; so do claims
-- whose deadline lies beyond any lease (no releaser set it).
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', K_CLAIMS, '-inf', fmt(now))) do
  redis.call('ZREM', K_CLAIMS, entry)
  requeue(entry)
end
local stray = redis.call('ZRANGEBYSCORE', K_CLAIMS, '(' .. fmt(now + lease + CLOCK_SLACK), '+inf', 'WITHSCORES')
for i = 1, #stray, 2 do
  redis.call('ZREM', K_CLAIMS, stray[i])
  repaired('unreadable claim deadline ' .. show(stray[i + 1]) .. ' of ' .. show(stray[i]) .. ' in ' .. K_CLAIMS
    .. ' (requeued)')
  requeue(stray[i])
end
drop_bad_deadlines()
fix_bad_orders()

local out = { '', '0' }
local function claim(entry)
  local message = redis.call('HGET', K_MSGS, entry)
  redis.call('ZREM', K_QUEUE, entry)
  redis.call('ZREM', K_DEADLINES, entry)
  if message then
    redis.call('ZADD', K_CLAIMS, fmt(now + lease), entry)
    out[#out + 1] = entry
    out[#out + 1] = string.sub(message, (string.find(message, '\n', 1, true) or 0) + 1)
  else
    lost_message(entry)
  end
end

-- Past their deadline: released whatever the breaker says.
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', K_DEADLINES, '-inf', fmt(now), 'LIMIT', 0, most)) do
  claim(entry)
end

-- The breaker's state, as the breaker scripts would read it (common.lua load).
local STATES = { closed = true, open = true, half_open = true, forced_open = true, disabled = true }
local state = redis.call('HMGET', K_STATE, 'st', 'ou', 'tr', 'pol', 'gen', 'hos', 'ok', 'ko', 'sl', 'rf', 'rh')
local st, trips, policy, gen = state[1], state[3] or '0', state[4] or '', state[5] or '0'
local ou, hos, limits = nil, 0, nil
-- What the breaker counted (the adaptive pace's feedback; 'sl' and 'rf' are absent from hashes
-- older than them), and until when a refusal asked the release to wait ('rh', if ever)
local counts = { read_whole(state[7] or '0'), read_whole(state[8] or '0'), read_whole(state[9] or '0'),
  read_whole(state[10] or '0') }
local held_until = nil
if st then
  local why = nil
  limits = policy_limits(policy)
  if not STATES[st] then
    why = 'st=' .. show(st)
  elseif limits == nil then
    why = 'policy ' .. show(policy)
  elseif read_whole(trips) == nil then
    why = 'tr=' .. show(trips)
  elseif read_whole(gen) == nil then
    why = 'gen=' .. show(gen)
  elseif counts[1] == nil or counts[2] == nil or counts[3] == nil or counts[4] == nil then
    why = 'ok=' .. show(state[7]) .. ' ko=' .. show(state[8]) .. ' sl=' .. show(state[9]) .. ' rf=' .. show(state[10])
  elseif (state[11] or '') ~= '' and read_time(state[11], now, limits.longest_open) == nil then
    why = 'rh=' .. show(state[11])
  else
    if (state[11] or '') ~= '' then held_until = read_time(state[11], now, limits.longest_open) end
    hos = read_whole(state[6] or '0')
    if hos == nil or (st == 'half_open' and hos >= limits.probes_to_close) then why = 'hos=' .. show(state[6]) end
    if st == 'open' then
      ou = read_time(state[2], now, limits.longest_open)
      if ou == nil then why = 'ou=' .. show(state[2]) end
    end
  end
  if why ~= nil and (st == 'forced_open' or st == 'disabled') then
    -- An operator's state is left only by an operator: kept, with what it counted read as
    -- nothing (the breaker's next script mends the rest, and says so). Reset, it came
    -- back CLOSED and its parked tasks went to the downstream the operator held off.
    counts, held_until, why = { 0, 0, 0, 0 }, nil, nil
    if read_whole(gen) == nil then gen = '0' end
  end
  if why ~= nil then
    redis.call('DEL', K_STATE)
    repaired('unreadable ' .. why .. ' in ' .. K_STATE .. ' (the breaker was reset)')
    -- Told as forget.lua tells a deletion, so a process whose view still holds the breaker
    -- OPEN stops rejecting at once, rather than when that view's open period ends.
    if (ARGV[8] or '') ~= '' then
      redis.call('PUBLISH', ARGV[8], table.concat({ K_STATE, '0', '0', 'closed', '' }, '\n'))
    end
    st = nil
    gen = '0'
  end
end
if not st then counts, held_until = { 0, 0, 0, 0 }, nil end

local allowed = 0
local probing = false -- (releasing this open period's probes)
local adaptive = nil -- the adaptive pace, written back once the entries are claimed
if law ~= nil and (not st or st == 'closed' or st == 'disabled') then
  adaptive = advance_pace(law, read_pace(law), { gen = read_whole(gen), ok = counts[1], ko = counts[2], sl = counts[3],
    rf = counts[4], rh = held_until })
  allowed = math.floor(adaptive.tokens)
elseif not st or st == 'closed' or st == 'disabled' then
  -- A paced ramp, restarted whenever the breaker (re)closes: a tenth of the pace at
  -- first, all of it after `ramp` seconds; at most one second's worth at once (and at
  -- least one task's, or a pace below 1/s would never let one go).
  local p = redis.call('HMGET', K_PACE, 'gen', 'since', 'tokens', 'at')
  local since, tokens, at = read_time(p[2], now, 0), read_number(p[3]), read_time(p[4], now, 0)
  if p[1] and (since == nil or at == nil or tokens == nil or tokens < 0 or read_whole(p[1]) == nil) then
    repaired('unreadable pacing gen=' .. show(p[1]) .. ' since=' .. show(p[2]) .. ' tokens=' .. show(p[3]) .. ' at='
      .. show(p[4]) .. ' in ' .. K_PACE .. ' (the ramp restarts)')
    since = nil
  end
  if p[1] ~= gen or since == nil or tokens == nil or at == nil then
    since, tokens, at = now, 0, now
  elseif now < at then
    -- The clock stepped back (a failover to a server whose clock is behind): the ramp's
    -- start moves back with it, or the pace fell to a tenth until the clock caught up.
    since = since - (at - now)
  end
  local share = 1
  if ramp > 0 then share = math.min(1, 0.1 + 0.9 * math.max(0, now - since) / ramp) end
  local rate = pace * share
  tokens = math.min(math.max(rate, 1), tokens + rate * math.max(0, now - at))
  -- A refusal asked the release to wait (its Retry-After): nothing goes, nothing saves up.
  if held_until ~= nil and now < held_until then tokens = 0 end
  allowed = math.floor(tokens)
  redis.call('HSET', K_PACE, 'gen', gen, 'since', fmt(since), 'tokens', fmt(tokens - allowed), 'at', fmt(now))
elseif (st == 'open' and now >= ou) or st == 'half_open' then
  -- The probes of this open period (counted by trips), once; again when they have not
  -- closed or reopened the breaker within a lease: still OPEN (none ran: revoked,
  -- expired, dropped) or still HALF_OPEN (too few came back to close it). Probes are
  -- never held back by `most`: fewer than the breaker needs to close could never close it.
  probing = true
  local p = redis.call('HMGET', K_PACE, 'probe_trip', 'probe_at')
  local probe_at = 0
  if p[1] or p[2] then
    probe_at = read_time(p[2], now, 0)
    if read_whole(p[1]) == nil or probe_at == nil then
      repaired('unreadable pacing probe_trip=' .. show(p[1]) .. ' probe_at=' .. show(p[2]) .. ' in ' .. K_PACE
        .. ' (the probes go again)')
      p[1], probe_at = false, 0
    end
  end
  if p[1] ~= trips or now - probe_at > lease then
    allowed = limits.max_calls
    redis.call('HSET', K_PACE, 'probe_trip', trips, 'probe_at', fmt(now))
  elseif st == 'half_open' and K_LEASES ~= nil and now - probe_at > math.min(lease, PROBES_AGAIN_AFTER) then
    -- A slot of this period is free again: a probe's lease ran out (its worker died with
    -- it: a lease as short as its task's time limit, decision 85) and it never reported.
    -- As many probes as are free go now, not a whole claim lease (30 s) after the first.
    local live = 0
    if redis.call('TYPE', K_LEASES).ok == 'hash' then -- (another type: the breaker's script repairs it)
      local flat = redis.call('HGETALL', K_LEASES)
      for i = 2, #flat, 2 do
        local deadline = read_number(flat[i])
        if deadline == nil or deadline > now then live = live + 1 end -- (unreadable: counted as taken)
      end
    end
    local free = limits.max_calls - hos - live
    if free > 0 then
      allowed = free
      redis.call('HSET', K_PACE, 'probe_at', fmt(now))
    end
  end
end
-- Probes are held back neither by `most` nor by the entries past their deadline claimed above
-- (this period's probe slot is taken now: probes not sent now would go only a lease later).
-- The paced count takes in the entries past their deadline claimed above too: they take a
-- worker's slot as well (if only to be revoked).
if not probing then
  allowed = math.min(allowed, most - (#out - 2) / 2)
  if paced ~= nil then allowed = math.min(allowed, paced - (#out - 2) / 2) end
end
local taken = 0
if allowed > 0 then
  for _, entry in ipairs(redis.call('ZRANGE', K_QUEUE, 0, allowed - 1)) do
    claim(entry)
    taken = taken + 1
  end
end
if adaptive ~= nil then write_pace(took_pace(adaptive, taken)) end
-- How long nothing comes due here (the reply's quiet): a releaser need not ask before then.
if st == 'forced_open' or (st == 'open' and now < ou) then
  local quiet = nil -- (forced open: no end of its own)
  if st == 'open' then quiet = ou - now end
  for _, key in ipairs({ K_DEADLINES, K_CLAIMS }) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local at = tonumber(first[2] or '')
    if at ~= nil and (quiet == nil or at - now < quiet) then quiet = math.max(0, at - now) end
  end
  out[2] = quiet == nil and '' or fmt(quiet)
end
local idle_ms = read_whole(ARGV[9] or '')
if idle_ms ~= nil and idle_ms > 0 then redis.call('PEXPIRE', K_PACE, idle_ms) end -- (no key: nothing)
out[1] = table.concat(repairs, '; ')
return out
