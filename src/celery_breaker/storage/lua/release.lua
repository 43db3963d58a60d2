-- release: claim the parked entries a breaker lets run now, under a lease.
-- KEYS: 1 breaker state (hash), 2 queue (zset), 3 messages (hash), 4 claims (zset: entry ->
--       lease deadline), 5 deadlines (zset), 6 pacing (hash)
-- ARGV: 1 most entries to claim, 2 full pace (entries per second), 3 ramp (seconds from a
--       tenth of the pace to all of it), 4 lease seconds, 5 the caller's clock or '' (TIME)
-- Returns { entry, payload, entry, payload, ... }.
--
-- What the breaker lets run (read from its state hash, never changed here):
--   CLOSED, DISABLED, or no breaker state at all: entries at a paced ramp, oldest first;
--   OPEN whose time is up, or HALF_OPEN: half_open_max_calls entries once per open period
--     (the probes), again only if that period's probes never reported back;
--   OPEN, FORCED_OPEN: nothing.
-- Whatever the breaker says, entries past their deadline (expires, max defer age) are
-- released, so Celery revokes or fails them as it should; and claims whose lease ran out
-- (a releaser died between claiming and publishing) go back to the queue, in order.
local K_STATE, K_QUEUE, K_MSGS, K_CLAIMS, K_DEADLINES, K_PACE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local most, pace, ramp, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Claims whose lease ran out go back to the queue, in their original order.
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', K_CLAIMS, '-inf', now)) do
  redis.call('ZREM', K_CLAIMS, entry)
  local message = redis.call('HGET', K_MSGS, entry)
  if message then
    local order = tonumber(string.match(message, '^([^\n]*)\n')) or now
    redis.call('ZADD', K_QUEUE, order, entry)
  end
end

local out = {}
local function claim(entry)
  local message = redis.call('HGET', K_MSGS, entry)
  redis.call('ZREM', K_QUEUE, entry)
  redis.call('ZREM', K_DEADLINES, entry)
  if message then
    redis.call('ZADD', K_CLAIMS, now + lease, entry)
    out[#out + 1] = entry
    out[#out + 1] = string.sub(message, (string.find(message, '\n', 1, true) or 0) + 1)
  end
end

-- Past their deadline: released whatever the breaker says.
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', K_DEADLINES, '-inf', now, 'LIMIT', 0, most)) do
  claim(entry)
end

local allowed = 0
local state = redis.call('HMGET', K_STATE, 'st', 'ou', 'tr', 'pol', 'gen', 'hos')
local st, ou, trips, policy, gen = state[1], tonumber(state[2] or ''), state[3] or '0', state[4] or '', state[5] or '0'
if not st or st == 'closed' or st == 'disabled' then
  -- A paced ramp, restarted whenever the breaker (re)closes: a tenth of the pace at
  -- first, all of it after `ramp` seconds; at most one second's worth at once.
  local p = redis.call('HMGET', K_PACE, 'gen', 'since', 'tokens', 'at')
  local since, tokens, at = tonumber(p[2] or ''), tonumber(p[3] or ''), tonumber(p[4] or '')
  if p[1] ~= gen or since == nil or tokens == nil or at == nil then
    since, tokens, at = now, 0, now
  end
  local share = 1
  if ramp > 0 then share = math.min(1, 0.1 + 0.9 * (now - since) / ramp) end
  local rate = pace * share
  tokens = math.min(rate, tokens + rate * math.max(0, now - at))
  allowed = math.floor(tokens)
  redis.call('HSET', K_PACE, 'gen', gen, 'since', since, 'tokens', tokens - allowed, 'at', now)
elseif (st == 'open' and ou ~= nil and now >= ou) or st == 'half_open' then
  -- The probes of this open period (counted by trips), once; again if none reported
  -- within a lease (their tasks were lost or rejected).
  local p = redis.call('HMGET', K_PACE, 'probe_trip', 'probe_at')
  local probe_at = tonumber(p[2] or '') or 0
  if p[1] ~= trips or (st == 'half_open' and (tonumber(state[6] or '') or 0) == 0 and now - probe_at > lease) then
    -- half_open_max_calls, by name in a keyed (version 3) policy text, else the 10th field
    -- of a positional one (versions 1 and 2, written by earlier releases)
    if string.sub(policy, 1, 1) == '{' then
      local decoded, described = pcall(cjson.decode, policy)
      allowed = decoded and type(described) == 'table' and tonumber(described.half_open_max_calls) or 1
    else
      local fields = {}
      for item in (policy .. ';'):gmatch('([^;]*);') do fields[#fields + 1] = item end
      allowed = tonumber(fields[10] or '') or 1
    end
    redis.call('HSET', K_PACE, 'probe_trip', trips, 'probe_at', now)
  end
end
allowed = math.min(allowed, most - #out / 2)
if allowed > 0 then
  for _, entry in ipairs(redis.call('ZRANGE', K_QUEUE, 0, allowed - 1)) do claim(entry) end
end
return out
