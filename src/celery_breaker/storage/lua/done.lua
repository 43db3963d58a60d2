-- done: forget entries a releaser published again (ARGV 3...: the entry ids it claimed).
-- KEYS, ARGV 1-2 and the reply's first item: see parked.lua.
-- An entry parked again since it was claimed (the released task ran, failed, was retried
-- and parked under the same id: a retry starts its deferral count afresh) is queued
-- again, with its new message: only its claim goes, the message stays for the next
-- release. Deleting it as well left a queue entry without a message, which the next
-- release dropped: the task was lost.
-- Returns { repairs, entries whose message went }.
local forgotten = 0
for i = 3, #ARGV do
  local entry = ARGV[i]
  redis.call('ZREM', K_CLAIMS, entry)
  if not redis.call('ZSCORE', K_QUEUE, entry) then
    forgotten = forgotten + redis.call('HDEL', K_MSGS, entry)
  end
end
return { table.concat(repairs, '; '), forgotten }
