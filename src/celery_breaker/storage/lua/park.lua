-- park: keep a deferred task's message in Redis until its breaker lets it run again.
-- KEYS: 1 queue (zset: entry -> order), 2 messages (hash: entry -> 'order\npayload'),
--       3 deadlines (zset: entry -> when it must be released whatever the breaker says)
-- ARGV: 1 entry id, 2 order (epoch seconds of the first deferral), 3 payload,
--       4 deadline (epoch seconds) or ''
-- The same entry parked twice (a message redelivered after a crash) is parked once.
local entry, order, payload, deadline = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if order == nil then return redis.error_reply('celery-breaker: park needs a numeric order') end
redis.call('ZADD', KEYS[1], 'NX', order, entry)
redis.call('HSET', KEYS[2], entry, ARGV[2] .. '\n' .. payload)
if deadline ~= nil then redis.call('ZADD', KEYS[3], 'NX', deadline, entry) end
return redis.call('ZCARD', KEYS[1])
