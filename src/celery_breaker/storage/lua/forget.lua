-- Delete one breaker (an operator's `celery breaker delete`): KEYS are its state, failure
-- times, count ring, time buckets, leases and metrics history, which share one hash tag.
-- ARGV[1]: the transitions channel ('' for none). Every process hears that the breaker
-- is gone as a fresh CLOSED view, generation 0, under incarnation '0' (no breaker has
-- it: scripts write a time), so its next call asks Redis, which creates it afresh.
-- Reply: {1} when the breaker's state existed, else {0}.
local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', unpack(KEYS))
if ARGV[1] ~= '' then
  redis.call('PUBLISH', ARGV[1], table.concat({ KEYS[1], '0', '0', 'closed', '' }, '\n'))
end
return { existed }
