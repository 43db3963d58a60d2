-- lookout: take, keep or give up the turn to watch a store's parking for lost tasks. One
-- releaser of all the workers sharing the store counts the parked tasks at a time; the
-- others only ask for the turn, so the count's cost does not grow with the workers.
-- KEYS: 1 the turn's key (a string: who holds it, expiring with its lease)
-- ARGV: 1 the caller's id, 2 the lease in ms (0: give the turn up if the caller holds it),
--       3 '1' if the caller may take a free turn, '0' if it only keeps its own (a store
--       restarted empty lost the key: its last holder, which remembers the count before,
--       takes it back first; see integration/deferral/release.py)
-- Returns 1 when the caller holds the turn now, 0 when another does, -1 when nobody does.
--
-- What the key holds is never trusted: another type, or a value with no expiry or one
-- longer than a lease (no releaser wrote it), would keep every releaser from watching for
-- good, so it counts as free.
local key, me, lease = KEYS[1], ARGV[1], read_whole(ARGV[2])
if lease == nil then return redis.error_reply('lookout: lease must be whole milliseconds, got ' .. ARGV[2]) end
local holder = false
local kind = redis.call('TYPE', key).ok
if kind == 'string' then
  holder = redis.call('GET', key)
  local left = redis.call('PTTL', key)
  if holder ~= me and (left < 0 or left > math.max(lease, 1)) then holder = false end
end
if lease == 0 then
  if holder == me then redis.call('DEL', key) end
  return 0
end
if holder == me or (holder == false and ARGV[3] == '1') then
  redis.call('SET', key, me, 'PX', lease)  -- (SET replaces a key of any type)
  return 1
end
if holder == false then return -1 end
return 0
