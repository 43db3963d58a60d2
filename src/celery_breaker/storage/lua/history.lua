-- history: append one metrics snapshot of a breaker to its history, drop what the TTL has
-- outlived, and keep the key no longer than the TTL after the last append.
-- KEYS: 1 history (zset: '{"at":T,...snapshot}' -> T, epoch seconds)
-- ARGV: 1 the caller's clock (epoch seconds) or '' (Redis TIME), 2 the snapshot as a JSON
--       object (its leading '{' is replaced by '{"at":T,'), 3 TTL in seconds
-- Returns { T as text, entries kept, the type a foreign value had or '' }.
local K_HISTORY = KEYS[1]
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[3])
if ttl == nil or ttl <= 0 then return redis.error_reply('celery-breaker: history needs a TTL > 0') end
if string.sub(ARGV[2], 1, 1) ~= '{' then return redis.error_reply('celery-breaker: history needs a JSON object') end
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- A key of another type (a foreign value, a collision) is replaced: history is expendable.
local found = redis.call('TYPE', K_HISTORY).ok
local foreign = ''
if found ~= 'none' and found ~= 'zset' then
  redis.call('DEL', K_HISTORY)
  foreign = found
end
-- Milliseconds: within a double's precision for epoch seconds, and valid JSON.
local at = string.format('%.3f', now)
redis.call('ZADD', K_HISTORY, at, '{"at":' .. at .. ',' .. string.sub(ARGV[2], 2))
redis.call('ZREMRANGEBYSCORE', K_HISTORY, '-inf', '(' .. string.format('%.3f', now - ttl))
redis.call('PEXPIRE', K_HISTORY, math.ceil(ttl * 1000))
return { at, redis.call('ZCARD', K_HISTORY), foreign }
