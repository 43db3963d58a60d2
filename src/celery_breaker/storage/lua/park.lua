-- park: keep a deferred task's message in Redis until its breaker lets it run again.
-- KEYS, ARGV 1-2 and the reply's first item: see parked.lua.
-- ARGV: 3 entry id, 4 order (epoch seconds of the first deferral), 5 payload,
--       6 deadline (epoch seconds) or '', 7 a fresh parking life, 8 the end of one written
--       over entries parked already (storage/contract.py KEPT_LIFE)
-- KEYS[6]: the breaker's parking life (a string, parking.py LIFE_SUFFIX): written with the
-- entry when there is none, ending in ARGV[8] when entries were parked already, so the
-- loss watch tells a life gone alone from one lost with its entries; kept for good while
-- entries are parked.
-- The same entry parked twice (a message redelivered after a crash) is parked once.
-- Returns { repairs, entries parked }.
local entry, order, payload, deadline = ARGV[3], read_number(ARGV[4]), ARGV[5], read_number(ARGV[6])
if order == nil then return redis.error_reply('celery-breaker: park needs a finite numeric order') end
local K_LIFE = KEYS[6]
if K_LIFE ~= nil then
  if redis.call('EXISTS', K_LIFE) == 0 then
    local held = redis.call('ZCARD', K_QUEUE) + redis.call('ZCARD', K_CLAIMS)
    redis.call('SET', K_LIFE, ARGV[7] .. (held > 0 and ARGV[8] or ''))
  end
  redis.call('PERSIST', K_LIFE)
end
redis.call('ZADD', K_QUEUE, 'NX', fmt(order), entry)
redis.call('HSET', K_MSGS, entry, ARGV[4] .. '\n' .. payload)
if deadline ~= nil then redis.call('ZADD', K_DEADLINES, 'NX', fmt(deadline), entry) end
return { table.concat(repairs, '; '), redis.call('ZCARD', K_QUEUE) }
