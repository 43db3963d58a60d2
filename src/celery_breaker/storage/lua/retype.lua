-- retype: replace a key of another type than expected (one of a store's own keys that a
-- foreign value took: the parking index, its marker); a missing key stays missing.
-- KEYS: 1 the key; ARGV: 1 the type it must hold
-- Returns the type it held instead ('' when it held the right one, or nothing).
local found = redis.call('TYPE', KEYS[1]).ok
if found == 'none' or found == ARGV[1] then return '' end
redis.call('DEL', KEYS[1])
return found
