-- acquire: admit a call (CLOSED, DISABLED), or a HALF_OPEN probe under its lease, or reject.
-- Mirrors BreakerMachine.admit; an OPEN breaker whose time is up half-opens here, so the
-- half-open move and the first probe are one atomic step. Rejections are counted here.
-- ARGV[8]: seconds a probe's lease lasts if shorter than the policy's half_open_max_wait
-- ('' none): a health check's, its timeout and a margin (BreakerMachine.admit's lease_for).

local function reject(retry_after)
  S.rj = S.rj + 1
  return reply('reject', fmt(retry_after))
end

local function admit_probe()
  local live, soonest = 0, nil
  for lease, deadline in pairs(read_leases()) do
    if deadline <= now then
      redis.call('HDEL', K_LEASES, lease) -- a probe that never reported frees its slot
    else
      live = live + 1
      if soonest == nil or deadline < soonest then soonest = deadline end
    end
  end
  if live + S.hos < P.max_calls then
    local lease = S.nl
    S.nl = lease + 1
    local lease_for = P.max_wait
    local asked = tonumber(ARGV[8] or '')
    if asked ~= nil and asked > 0 and asked < lease_for then lease_for = asked end
    redis.call('HSET', K_LEASES, lease, fmt(now + lease_for))
    touch(K_LEASES)
    return reply('probe', lease)
  end
  -- Every slot is taken: the next chance is when a lease expires, and probes usually
  -- report sooner, so do not wait longer than one open period.
  soonest = soonest or (now + P.reset_timeout)
  return reject(math.min(soonest - now, P.reset_timeout))
end

if S.st == CLOSED or S.st == DISABLED then return reply('admit') end
if S.st == FORCED_OPEN then return reject(nil) end
if S.st == OPEN then
  if now < S.ou then return reject(S.ou - now) end
  move(HALF_OPEN)
end
return admit_probe()
