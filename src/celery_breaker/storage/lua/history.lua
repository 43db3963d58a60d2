-- history: append one metrics snapshot of a breaker to its history, drop what the TTL has
-- outlived, and keep the key no longer than the TTL after the last append.
-- KEYS: 1 history (zset: '{"at":T,...snapshot}' -> T, epoch seconds)
-- ARGV: 1 the caller's clock (epoch seconds) or '' (Redis TIME), 2 the snapshot as a JSON
--       object (its leading '{' is replaced by '{"at":T,'), or '' only to check the key's
--       type (a reader met WRONGTYPE), 3 TTL in seconds
-- Returns { T as text ('' when only checking), entries kept, the type a foreign value had or '' }.
local K_HISTORY = KEYS[1]
local now, ttl = script_now(ARGV[1]), read_number(ARGV[3])
if not finite(now) then return redis.error_reply('celery-breaker: history needs a finite time') end
if ttl == nil or ttl <= 0 then return redis.error_reply('celery-breaker: history needs a TTL > 0') end
local checking = ARGV[2] == ''
if not checking and string.sub(ARGV[2], 1, 1) ~= '{' then
  return redis.error_reply('celery-breaker: history needs a JSON object')
end
-- A key of another type (a foreign value, a collision) is replaced: history is expendable.
local found = redis.call('TYPE', K_HISTORY).ok
local foreign = ''
if found ~= 'none' and found ~= 'zset' then
  redis.call('DEL', K_HISTORY)
  foreign = found
end
if checking then return { '', redis.call('ZCARD', K_HISTORY), foreign } end
-- Milliseconds: within a double's precision for epoch seconds, and valid JSON.
local at = string.format('%.3f', now)
redis.call('ZADD', K_HISTORY, at, '{"at":' .. at .. ',' .. string.sub(ARGV[2], 2))
redis.call('ZREMRANGEBYSCORE', K_HISTORY, '-inf', '(' .. string.format('%.3f', now - ttl))
-- Entries later than any clock could have stamped them would never be dropped.
redis.call('ZREMRANGEBYSCORE', K_HISTORY, '(' .. string.format('%.3f', now + CLOCK_SLACK), '+inf')
redis.call('PEXPIRE', K_HISTORY, math.ceil(ttl * 1000))
return { at, redis.call('ZCARD', K_HISTORY), foreign }
