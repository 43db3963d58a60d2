-- tidy: count one breaker's parked entries, after checking its parking keys when asked
-- (ARGV[1]: the caller met a key of another type counting them the cheap way, ZCARD).
-- KEYS, ARGV 1-2 and the reply's first item: see parked.lua.
-- Returns { repairs, entries parked, entries claimed (being published) }.
return { table.concat(repairs, '; '), redis.call('ZCARD', K_QUEUE), redis.call('ZCARD', K_CLAIMS) }
