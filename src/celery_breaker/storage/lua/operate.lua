-- operate: an operator's move (ARGV[8] 'force' with ARGV[9] the target state), a reset to a
-- fresh CLOSED breaker under the caller's policy (ARGV[8] 'reset'), or one deferral counted
-- (ARGV[8] 'deferral'). Mirrors BreakerMachine.force, .reset and .note_deferral.

local action = ARGV[8]
if action == 'force' then
  local target = ARGV[9]
  if not OPERATOR_TARGETS[target] then error('celery-breaker: operators cannot move to ' .. target) end
  move(target, 'operator')
elseif action == 'reset' then
  -- The one way to change an existing breaker's policy: windows restart under the new one.
  local policy = parse_policy(given_policy)
  if policy == nil then error('celery-breaker: unparsable policy ' .. given_policy) end
  clear_windows()
  S.pol, P = given_policy, policy
  move(CLOSED, 'reset')
  S.ok, S.ko, S.rj, S.df, S.tr = 0, 0, 0, 0, 0
  S.ls, S.lf, S.oa = nil, nil, nil
elseif action == 'deferral' then
  S.df = S.df + 1
elseif action ~= 'view' then
  error('celery-breaker: unknown operation ' .. tostring(action))
end
return reply('ok')
