-- operate: an operator's move (ARGV[8] 'force' with ARGV[9] the target state), a reset to a
-- fresh CLOSED breaker under the caller's policy (ARGV[8] 'reset'), or one deferral counted
-- (ARGV[8] 'deferral'). Mirrors BreakerMachine.operate, .renew and .note_deferral.

-- A move that would change nothing is none (BreakerMachine.operate and .renew): no
-- generation, no transition, no event. So one action every worker takes (celery control
-- broadcasts it) makes one transition, not one per worker.
local function windows_at_rest() -- BreakerMachine.is_at_rest, in CLOSED
  for _, rule in ipairs(P.rules) do
    local kind = RULES[rule.kind]
    if kind.failures(rule) > 0 or kind.calls(rule) > 0 then return false end
  end
  return true
end

local function fresh() -- BreakerMachine.is_fresh
  return S.st == CLOSED and S.pol == given_policy and windows_at_rest()
    and S.ok == 0 and S.ko == 0 and S.rj == 0 and S.df == 0 and S.tr == 0
    and S.ls == nil and S.lf == nil and S.oa == nil
end

local action = ARGV[8]
if action == 'force' then
  local target = ARGV[9]
  if not OPERATOR_TARGETS[target] then error('celery-breaker: operators cannot move to ' .. target) end
  if S.st ~= target or (target == CLOSED and not windows_at_rest()) then move(target, 'operator') end
elseif action == 'reset' then
  if fresh() then return reply('ok') end
  -- The one way to change an existing breaker's policy: windows restart under the new one.
  local policy = parse_policy(given_policy)
  if policy == nil then error('celery-breaker: unparsable policy ' .. given_policy) end
  clear_windows()
  S.pol, P = given_policy, policy
  move(CLOSED, 'reset')
  S.rg = S.gen -- (counts sent later from an earlier generation are dropped: common.lua)
  S.ok, S.ko, S.rj, S.df, S.tr = 0, 0, 0, 0, 0
  S.ls, S.lf, S.oa = nil, nil, nil
elseif action == 'deferral' then
  S.df = S.df + 1
elseif action ~= 'view' then
  error('celery-breaker: unknown operation ' .. tostring(action))
end
return reply('ok')
