-- snapshot: the breaker's state and metrics now (BreakerMachine.snapshot), after the local
-- view's part: lifetime counters, times (script clock), retry_after, the shown rule's counts
-- (wcalls, wko, wslow), probes in flight (replies.py Metrics names each key). For a listing
-- (no policy) it writes nothing, and a breaker it cannot read is answered as unreadable
-- (common.lua's unreadable(): {'absent', 1, 'unreadable', why, 'st', state}).

local calls, failures, slow = shown('calls'), shown('failures'), shown('slow_calls')
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
  'ok', S.ok, 'ko', S.ko, 'rj', S.rj, 'df', S.df, 'tr', S.tr, 'lf', fmt(S.lf), 'ls', fmt(S.ls),
  'oa', fmt(S.oa), 'ou', fmt(S.ou), 'ra', fmt(retry_after), 'wcalls', calls, 'wko', failures,
  'wslow', slow, 'live', live, 'nm', S.nm, 'ky', S.ky, 'stk', S.stk, 'od', fmt(S.od),
})
