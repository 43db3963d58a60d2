-- park: keep a deferred task's message in Redis until its breaker lets it run again.
-- KEYS, ARGV 1-2 and the reply's first item: see parked.lua.
-- ARGV: 3 entry id, 4 order (epoch seconds of the first deferral), 5 payload,
--       6 deadline (epoch seconds) or ''
-- The same entry parked twice (a message redelivered after a crash) is parked once.
-- Returns { repairs, entries parked }.
local entry, order, payload, deadline = ARGV[3], read_number(ARGV[4]), ARGV[5], read_number(ARGV[6])
if order == nil then return redis.error_reply('celery-breaker: park needs a finite numeric order') end
redis.call('ZADD', K_QUEUE, 'NX', fmt(order), entry)
redis.call('HSET', K_MSGS, entry, ARGV[4] .. '\n' .. payload)
if deadline ~= nil then redis.call('ZADD', K_DEADLINES, 'NX', fmt(deadline), entry) end
return { table.concat(repairs, '; '), redis.call('ZCARD', K_QUEUE) }
