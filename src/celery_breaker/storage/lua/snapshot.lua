-- snapshot: the breaker's state and metrics now (BreakerMachine.snapshot), after the local
-- view's part: lifetime counters, times (script clock), retry_after, window totals, probes.

local calls, failures, slow = 0, 0, 0
if P.uses_rates then
  calls, failures, slow = rate_totals()
elseif P.failure_threshold ~= nil then
  failures = failures_in_window()
end
local live, soonest = 0, nil
for _, deadline in pairs(read_leases()) do
  if deadline > now then
    live = live + 1
    if soonest == nil or deadline < soonest then soonest = deadline end
  end
end
local retry_after = 0
if S.st == OPEN then
  retry_after = math.max(0, S.ou - now)
elseif S.st == FORCED_OPEN then
  retry_after = nil
elseif S.st == HALF_OPEN and live + S.hos >= P.max_calls then
  retry_after = math.min((soonest or now) - now, P.reset_timeout)
end
return reply('ok', nil, {
  S.ok, S.ko, S.rj, S.df, S.tr, fmt(S.lf), fmt(S.ls), fmt(S.oa), fmt(S.ou), fmt(retry_after),
  calls, failures, slow, live, S.nm, S.ky, S.stk, fmt(S.od),
})
