-- celery-breaker: what pacing.lua reads before pace.lua runs its read_pace (the script is
-- checks.lua, this file, pacing.lua and pace.lua): the keys, the clock, and repairs, of
-- which a read-only script makes none (a pace the release would restart is shown as none).
-- KEYS: 1 the pacing hash, 2 the breaker's state hash. ARGV: 1 the caller's clock or '' (Redis
-- TIME), 2 the adaptive law (core/pacing.py PacingLaw.text).

local K_PACE, K_STATE = KEYS[1], KEYS[2]
local now = script_now(ARGV[1])

local function repaired(_) end
