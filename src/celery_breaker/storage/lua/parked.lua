-- celery-breaker: the prelude of every parking script (park, release, done, purge, tidy): one
-- breaker's parked entries, their keys checked (each script is checks.lua, this file and
-- the script; storage/redis/parking.py runs them).
--
-- KEYS (the breaker's hash tag, parking.py PARKING_SUFFIXES): 1 queue (zset: entry ->
--   order), 2 messages (hash: entry -> 'order\npayload'), 3 claims (zset: entry -> lease
--   deadline), 4 deadlines (zset: entry -> when it goes whatever the breaker says),
--   5 pacing (hash); release adds 6, the breaker's state hash, and park 6, its parking
--   life (a string).
-- ARGV: 1 '1' asks for the key types to be checked first (the caller sends it after a
--   WRONGTYPE), 2 the caller's clock or '' (Redis TIME), then the script's own.
-- Every reply starts with what was repaired ('' when nothing), for the caller to log.

local K_QUEUE, K_MSGS, K_CLAIMS, K_DEADLINES, K_PACE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = script_now(ARGV[2])
local repairs = {}

local function repaired(what)
  repairs[#repairs + 1] = what
end

-- The order a message was parked with (epoch seconds of its first deferral: within
-- TIME_SPAN of now), or nil when the message holds none.
local function message_order(message)
  return read_time(string.match(message, '^([^\n]*)\n'), now)
end

-- A queued or claimed entry whose message is gone (the messages hash deleted or evicted
-- under an allkeys-* maxmemory policy): the task is lost. Dropped, and said once per
-- script with how many and the first one, so the loss is never silent.
local lost, lost_at, lost_first = 0, nil, nil
local function lost_message(entry)
  lost = lost + 1
  if lost_at == nil then
    lost_at = #repairs + 1
    lost_first = entry
  end
  repairs[lost_at] = lost .. ' parked task(s) lost, e.g. ' .. show(lost_first) .. ': parked in ' .. K_QUEUE
    .. ' or ' .. K_CLAIMS .. ' without their message in ' .. K_MSGS
    .. ' (deleted, or evicted: run Redis with maxmemory-policy noeviction); dropped'
end

-- Put an entry back in the queue at its own order (now if its message holds none); an
-- entry without a message is gone (lost_message).
local function requeue(entry)
  local message = redis.call('HGET', K_MSGS, entry)
  if not message then
    redis.call('ZREM', K_QUEUE, entry)
    lost_message(entry)
    return
  end
  local order = message_order(message)
  if order == nil then
    repaired('unreadable order ' .. show(string.match(message, '^([^\n]*)')) .. ' of ' .. show(entry) .. ' in '
      .. K_MSGS .. ' (queued at ' .. fmt(now) .. ')')
    order = now
  end
  redis.call('ZADD', K_QUEUE, fmt(order), entry)
end

-- Every message neither queued nor claimed goes back to the queue, in its order: after a
-- queue or claims key of another type was replaced, its entries stay parked.
local function requeue_orphans()
  local flat = redis.call('HGETALL', K_MSGS)
  for i = 1, #flat, 2 do
    local entry = flat[i]
    if not redis.call('ZSCORE', K_QUEUE, entry) and not redis.call('ZSCORE', K_CLAIMS, entry) then requeue(entry) end
  end
end

-- A key of another type is replaced by an empty one of the right type (created when
-- next written): no entry is lost that the messages hash still holds.
if ARGV[1] == '1' then
  local expected = { { K_QUEUE, 'zset' }, { K_MSGS, 'hash' }, { K_CLAIMS, 'zset' }, { K_DEADLINES, 'zset' },
    { K_PACE, 'hash' } }
  if KEYS[6] ~= nil then
    -- (park's sixth key is the parking life, LIFE_SUFFIX ':e'; release's the state hash)
    expected[#expected + 1] = { KEYS[6], string.sub(KEYS[6], -2) == ':e' and 'string' or 'hash' }
  end
  local orphans = false
  for _, pair in ipairs(expected) do
    local found = redis.call('TYPE', pair[1]).ok
    if found ~= 'none' and found ~= pair[2] then
      redis.call('DEL', pair[1])
      repaired(pair[1] .. ' held a ' .. found .. ', expected a ' .. pair[2] .. ' (replaced)')
      orphans = orphans or pair[1] == K_QUEUE or pair[1] == K_CLAIMS
    end
  end
  if orphans then requeue_orphans() end
end

-- Every message is queued or claimed: more messages than both hold means the queue or the
-- claims lost entries (deleted, or evicted under an allkeys-* maxmemory policy), whose
-- messages would wait for ever. Three O(1) reads per script; the repair only then.
local messages = redis.call('HLEN', K_MSGS)
if messages == 0 and redis.call('ZCARD', K_QUEUE) > 0 then
  -- The messages hash gone as a whole (deleted, or evicted) under queued entries: every one
  -- of them is lost. Dropped at once and said once, with the total; found a claim at a time,
  -- the loss was reported once per release tick, thousands of times for a big backlog.
  -- (Claimed entries are left: their messages went with their claims, to be published.)
  local first = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
  lost, lost_at, lost_first = redis.call('ZCARD', K_QUEUE) - 1, nil, first
  redis.call('DEL', K_QUEUE, K_DEADLINES)
  lost_message(first)
elseif messages > redis.call('ZCARD', K_QUEUE) + redis.call('ZCARD', K_CLAIMS) then
  local before = redis.call('ZCARD', K_QUEUE)
  requeue_orphans()
  local found = redis.call('ZCARD', K_QUEUE) - before
  if found > 0 then
    repaired(found .. ' message(s) in ' .. K_MSGS .. ' neither queued nor claimed (queued again)')
  end
end

-- Deadlines no caller could have set (beyond TIME_SPAN of now, or infinite): dropped, the
-- entry stays parked; a deadline of an entry without a message: dropped.
local function drop_bad_deadlines()
  local low, high = fmt(now - TIME_SPAN), fmt(now + TIME_SPAN)
  for _, range in ipairs({ { '-inf', '(' .. low }, { '(' .. high, '+inf' } }) do
    local bad = redis.call('ZRANGEBYSCORE', K_DEADLINES, range[1], range[2], 'WITHSCORES')
    for i = 1, #bad, 2 do
      redis.call('ZREM', K_DEADLINES, bad[i])
      repaired('unreadable deadline ' .. show(bad[i + 1]) .. ' of ' .. show(bad[i]) .. ' in ' .. K_DEADLINES
        .. ' (dropped)')
    end
  end
end

-- Queued entries whose order no caller could have given (beyond TIME_SPAN of now): queued
-- again at their message's order, or now.
local function fix_bad_orders()
  local low, high = fmt(now - TIME_SPAN), fmt(now + TIME_SPAN)
  for _, range in ipairs({ { '-inf', '(' .. low }, { '(' .. high, '+inf' } }) do
    local bad = redis.call('ZRANGEBYSCORE', K_QUEUE, range[1], range[2], 'WITHSCORES')
    for i = 1, #bad, 2 do
      repaired('unreadable order ' .. show(bad[i + 1]) .. ' of ' .. show(bad[i]) .. ' in ' .. K_QUEUE .. ' (requeued)')
      requeue(bad[i])
    end
  end
end
