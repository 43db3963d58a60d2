-- celery-breaker: the adaptive release's law, for release.lua (which follows this file):
-- core/pacing.py's begin/advance/took, step for step, on the script's clock.
--
-- The law (ARGV[7] of release, PacingLaw.text): 'start;ceiling;judge_every;slow_start;
-- step;back_off;bad_share;floor;least_bad;in_flight_s;near;creep', the ceiling '' for none.
-- The pace lives in the pacing hash (K_PACE) beside the fixed ramp's fields (gen, since,
-- tokens, at: workers of both kinds, during a rolling upgrade, keep a pace each): 'a_gen'
-- the breaker generation it began under, 'rate', 'thr' the threshold ('' none),
-- 'a_tokens', 'a_at' when they were refilled, 'jat' when the rate was last judged, 'sok', 'sko', 'ssl',
-- 'srf' the breaker's successes, failures, slow calls and refusals then ('srf' is absent from
-- paces older than it: read as the breaker's count now), 'used' entries released since,
-- 'infl' tasks released without an outcome as of the last judgement, 'cut' when the rate
-- was last cut ('' never), 'lim' the rate the downstream last refused at ('' none).
-- Unreadable fields restart the pace (begin, without a threshold), with a warning.

local LAW_FIELDS = { 'start', 'ceiling', 'judge_every', 'slow_start', 'step', 'back_off', 'bad_share', 'floor',
  'least_bad', 'in_flight_s', 'near', 'creep' }

-- The law from its text; nil when unreadable (PacingLaw.__post_init__'s bounds).
local function read_law(text)
  local fields = {}
  for field in string.gmatch(text .. ';', '([^;]*);') do fields[#fields + 1] = field end
  if #fields ~= #LAW_FIELDS then return nil end
  local law = {}
  for i, name in ipairs(LAW_FIELDS) do
    if not (name == 'ceiling' and fields[i] == '') then
      law[name] = read_number(fields[i])
      if law[name] == nil then return nil end
    end
  end
  if not (law.start > 0 and (law.ceiling == nil or law.ceiling > 0) and law.judge_every > 0 and law.slow_start >= 1
      and law.step >= 0 and law.back_off > 0 and law.back_off < 1 and law.bad_share >= 0 and law.bad_share < 1
      and law.floor > 0 and law.floor <= law.start and law.least_bad >= 1
      and law.least_bad == math.floor(law.least_bad) and law.in_flight_s > 0 and law.near > 0 and law.near <= 1
      and law.creep >= 0) then
    return nil
  end
  return law
end

-- PacingLaw.bound: rate within [floor, ceiling].
local function bound(law, rate)
  rate = math.max(law.floor, rate)
  if law.ceiling ~= nil then rate = math.min(law.ceiling, rate) end
  return rate
end

-- The stored adaptive pace; nil when there is none (or only a fixed ramp's) or it is unreadable.
local function read_pace()
  local p = redis.call('HMGET', K_PACE, 'a_gen', 'rate', 'thr', 'a_tokens', 'a_at', 'jat', 'sok', 'sko', 'ssl', 'used',
    'cut', 'infl', 'srf', 'lim')
  if not p[2] then return nil end
  local pace = { gen = read_whole(p[1]), rate = read_number(p[2]), thr = nil, tokens = read_number(p[4]),
    at = read_time(p[5], now, 0), jat = read_time(p[6], now, 0), sok = read_whole(p[7]), sko = read_whole(p[8]),
    ssl = read_whole(p[9]), used = read_whole(p[10]), infl = read_whole(p[12] or '0'), srf = nil }
  local good = true
  if p[13] then
    pace.srf = read_whole(p[13])
    good = pace.srf ~= nil
  end
  good = good and pace.gen ~= nil and pace.rate ~= nil and pace.rate > 0 and pace.tokens ~= nil and pace.tokens >= 0
    and pace.at ~= nil and pace.jat ~= nil and pace.sok ~= nil and pace.sko ~= nil and pace.ssl ~= nil
    and pace.used ~= nil and pace.infl ~= nil
  if (p[3] or '') ~= '' then
    pace.thr = read_number(p[3])
    good = good and pace.thr ~= nil and pace.thr > 0
  end
  if (p[11] or '') ~= '' then
    pace.cut = read_time(p[11], now, 0)
    good = good and pace.cut ~= nil
  end
  if (p[14] or '') ~= '' then
    pace.lim = read_number(p[14])
    good = good and pace.lim ~= nil and pace.lim > 0
  end
  if not good then
    local shown = {}
    for i, name in ipairs({ 'a_gen', 'rate', 'thr', 'a_tokens', 'a_at', 'jat', 'sok', 'sko', 'ssl', 'used', 'cut',
      'infl', 'srf', 'lim' }) do
      shown[#shown + 1] = name .. '=' .. show(p[i])
    end
    repaired('unreadable adaptive pace ' .. table.concat(shown, ' ') .. ' in ' .. K_PACE .. ' (the pace restarts)')
    return nil
  end
  return pace
end

-- pacing.begin: from the start rate; after an earlier pace, with the threshold at
-- back_off of the rate it had reached.
local function begin_pace(law, outcomes, before)
  local thr = nil
  if before ~= nil then thr = bound(law, before.rate * law.back_off) end
  return { gen = outcomes.gen, rate = bound(law, math.min(law.start, thr or law.start)), thr = thr, tokens = 0,
    at = now, jat = now, sok = outcomes.ok, sko = outcomes.ko, ssl = outcomes.sl, srf = outcomes.rf, used = 0,
    infl = 0 }
end

-- pacing.advance: tokens refilled, and the rate judged against the breaker's counts
-- since the last judgement ({ gen, ok, ko, sl, rf, rh }): cut at once on bad news, grown every
-- judge_every seconds on good news; nothing goes while a refusal's wait (rh) lasts.
local function advance_pace(law, pace, outcomes)
  if pace == nil or pace.gen ~= outcomes.gen then return begin_pace(law, outcomes, pace) end
  pace.tokens = math.min(pace.rate, pace.tokens + pace.rate * math.max(0, now - pace.at))
  if outcomes.rh ~= nil and now < outcomes.rh then
    pace.tokens = 0 -- a refusal asked the release to wait: nothing goes, nothing saves up
  end
  pace.at = math.max(pace.at, now)
  if pace.srf == nil then pace.srf = outcomes.rf end
  local ok, ko, sl, rf = outcomes.ok - pace.sok, outcomes.ko - pace.sko, outcomes.sl - pace.ssl, outcomes.rf - pace.srf
  if ok < 0 or ko < 0 or sl < 0 or rf < 0 then -- the breaker started again: a new baseline
    pace.jat, pace.sok, pace.sko, pace.ssl, pace.srf, pace.used = now, outcomes.ok, outcomes.ko, outcomes.sl,
      outcomes.rf, 0
    return pace
  end
  local infl = math.max(0, pace.infl + pace.used - ok - ko)
  local crowded = infl > law.in_flight_s * pace.rate
  local settling = pace.cut ~= nil and (now - pace.cut < 2 * law.judge_every or crowded)
  local since = now - pace.jat
  local bad = ko + sl
  local rate, thr, lim = pace.rate, pace.thr, pace.lim
  if settling then
    -- news of tasks released before the last cut (still in flight): judges nothing
    pace.jat, pace.sok, pace.sko, pace.ssl, pace.srf, pace.used = now, outcomes.ok, outcomes.ko, outcomes.sl,
      outcomes.rf, 0
    pace.infl = infl
    return pace
  end
  if rf > 0 or (bad >= law.least_bad and bad > law.bad_share * math.max(ok + ko, pace.rate * law.judge_every)) then
    if rf > 0 then lim = rate end -- (the rate it was refused at)
    rate = bound(law, rate * law.back_off)
    thr = rate
    pace.cut = now
  elseif since < law.judge_every or ok + ko == 0 then
    return pace -- (no news yet: the judgement waits for some)
  elseif ok > 0 and pace.used >= 0.5 * pace.rate * since and not crowded then
    if bad > 0 and (thr == nil or thr > rate) then thr = rate end -- the first bad outcomes: the slow zone is near
    local grown
    if thr == nil or rate < thr then
      grown = rate * law.slow_start
      if thr ~= nil then grown = math.min(grown, thr) end
    else
      grown = rate * (1 + law.step)
    end
    if lim ~= nil then
      if rate >= lim * law.near then lim = lim * (1 + law.creep) end -- at the limit: probe above it, slowly
      grown = math.max(rate, math.min(grown, lim * law.near))
    end
    rate = bound(law, grown)
  end
  pace.rate, pace.thr, pace.tokens, pace.jat, pace.lim = rate, thr, math.min(rate, pace.tokens), now, lim
  pace.sok, pace.sko, pace.ssl, pace.srf, pace.used, pace.infl = outcomes.ok, outcomes.ko, outcomes.sl, outcomes.rf,
    0, infl
  return pace
end

-- pacing.took: count entries released.
local function took_pace(pace, count)
  pace.tokens = pace.tokens - count
  pace.used = pace.used + count
  return pace
end

local function write_pace(pace)
  redis.call('HSET', K_PACE, 'a_gen', fmt(pace.gen), 'rate', fmt(pace.rate), 'thr', fmt(pace.thr), 'a_tokens',
    fmt(pace.tokens), 'a_at', fmt(pace.at), 'jat', fmt(pace.jat), 'sok', fmt(pace.sok), 'sko', fmt(pace.sko), 'ssl',
    fmt(pace.ssl), 'used', fmt(pace.used), 'cut', fmt(pace.cut), 'infl', fmt(pace.infl), 'srf', fmt(pace.srf), 'lim',
    fmt(pace.lim))
end
