-- purge: discard up to ARGV[1] parked entries of one breaker, oldest first (an operator's
-- `celery breaker purge`). Claimed entries (being published by a releaser) are left.
-- KEYS: 1 queue (zset), 2 messages (hash), 3 deadlines (zset)
-- ARGV: 1 most entries to discard in this call (the caller loops, so Redis is never
--       blocked for long)
-- Returns how many it discarded.
local most = tonumber(ARGV[1])
if most == nil or most < 1 then return redis.error_reply('celery-breaker: purge needs a positive count') end
local entries = redis.call('ZRANGE', KEYS[1], 0, most - 1)
if #entries > 0 then
  redis.call('ZREM', KEYS[1], unpack(entries))
  redis.call('ZREM', KEYS[3], unpack(entries))
  redis.call('HDEL', KEYS[2], unpack(entries))
end
return #entries
