-- purge: discard up to ARGV[3] parked entries of one breaker, oldest first (an operator's
-- `celery breaker purge`). Claimed entries (being published by a releaser) are left.
-- KEYS, ARGV 1-2 and the reply's first item: see parked.lua.
-- ARGV: 3 most entries to discard in this call (the caller loops, so Redis is never
--       blocked for long)
-- Returns { repairs, how many it discarded }.
local most = read_whole(ARGV[3])
if most == nil or most < 1 then return redis.error_reply('celery-breaker: purge needs a positive count') end
local entries = redis.call('ZRANGE', K_QUEUE, 0, most - 1)
if #entries > 0 then
  redis.call('ZREM', K_QUEUE, unpack(entries))
  redis.call('ZREM', K_DEADLINES, unpack(entries))
  redis.call('HDEL', K_MSGS, unpack(entries))
end
return { table.concat(repairs, '; '), #entries }
