-- lookout: take, keep or give up the turn to watch a store's parking for lost tasks. One
-- releaser of all the workers sharing the store counts the parked tasks at a time; the
-- others only ask for the turn, so the count's cost does not grow with the workers.
-- KEYS: 1 the turn's key (a string: who holds it, expiring with its lease; '' once its
--       holder gave it up)
-- ARGV: 1 the caller's id, 2 the lease in ms,
--       3 'take': take a free turn; 'keep': only keep the caller's own, or take one its
--       holder gave up (a store restarted empty lost the key: its last holder, which
--       remembers the count before, takes it back first; see
--       integration/deferral/release.py); 'give': give the caller's turn up (marked given
--       up for a lease, so that another takes it at once)
-- Returns 1 when the caller holds the turn now, 0 when another does, -1 when nobody does
-- and the caller did not take it.
--
-- What the key holds is never trusted: another type, or a value with no expiry or one
-- longer than a lease (no releaser wrote it), would keep every releaser from watching for
-- good, so it counts as free.
local key, me, lease, mode = KEYS[1], ARGV[1], read_whole(ARGV[2]), ARGV[3]
if lease == nil or lease < 1 then
  return redis.error_reply('lookout: lease must be whole milliseconds, got ' .. ARGV[2])
end
local holder, given_up = false, false
local kind = redis.call('TYPE', key).ok
if kind == 'string' then
  holder = redis.call('GET', key)
  local left = redis.call('PTTL', key)
  if holder ~= me and (left < 0 or left > lease) then holder = false end
  if holder == '' then holder, given_up = false, true end
end
if mode == 'give' then
  if holder == me then redis.call('SET', key, '', 'PX', lease) end
  return 0
end
if holder == me or (holder == false and (mode == 'take' or given_up)) then
  redis.call('SET', key, me, 'PX', lease)  -- (SET replaces a key of any type)
  return 1
end
if holder == false then return -1 end
return 0
