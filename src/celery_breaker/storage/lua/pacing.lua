-- celery-breaker: the adaptive release's law, for release.lua (which follows this file):
-- core/pacing.py's begin/advance/took, step for step, on the script's clock.
--
-- The law (ARGV[7] of release, PacingLaw.text): 'start;ceiling;judge_every;slow_start;
-- step;back_off;bad_share;floor;least_bad;in_flight_s;near;creep;plateau', the ceiling '' for none.
-- The pace lives in the pacing hash (K_PACE) beside the fixed ramp's fields (gen, since,
-- tokens, at: workers of both kinds, during a rolling upgrade, keep a pace each): 'a_gen'
-- the breaker generation it began under, 'rate', 'thr' the threshold ('' none),
-- 'a_tokens', 'a_at' when they were refilled, 'jat' when the rate was last judged, 'sok', 'sko', 'ssl',
-- 'srf' the breaker's successes, failures, slow calls and refusals then ('srf' is absent from
-- paces older than it: read as the breaker's count now), 'used' entries released since,
-- 'infl' tasks released without an outcome as of the last judgement, 'cut' when the rate
-- was last cut ('' never), 'lim' what the downstream took when it last refused ('' none), 'owe'
-- outcomes still owed by tasks released before the cut and 'sut' until when they may hold
-- judgement ('' none; both absent from paces older than them: nothing owed), 'csh' the bad
-- share of the news that made the last cut or of better bad news since ('' none), 'alm' the
-- judgements the rate has grown at its limit since the limit was set or the rate cut (absent
-- from paces older than it, and ignored without a limit: 0), 'ubd' and 'usn' the bad and all
-- outcomes of the pace's first judgements of good news, until USUAL_LEAST were in (its usual
-- bad share; both absent from paces older than them: 0, none yet), 'ugen' the generation they
-- were learnt under (another: an older writer began this pace, and they are the last one's),
-- 'dlv' the outcomes per second that came back in the last judgement of good news and 'dgen'
-- the generation it was judged under (absent from paces older than it, or another: 0, none),
-- 'lkp' the refusals met in a row at a limit the rate had held for LIMIT_HELD judgements (a
-- kept limit: no creep during its plateau, plateau * 2^lkp judgements; at most KEPT_MOST;
-- absent from paces older than it, and ignored without a limit: 0).
-- Unreadable fields restart the pace (begin, without a threshold), with a warning; so do
-- readable ones no step of the law writes (beyond_the_law).

-- pacing.SETTLE_LEAST: judgements in which outcomes judge nothing after a cut.
local SETTLE_LEAST = 4
-- pacing.SETTLE_MOST: judgements the outcomes owed since a cut may hold judgement, at most,
-- beyond SETTLE_LEAST (judge_every <= 10 s: 'sut' stays within CLOCK_SLACK of now).
local SETTLE_MOST = 20
-- pacing.RATE_MOST: the highest rate with no ceiling; a stored pace above it restarts.
local RATE_MOST = 1000000
-- pacing.RATE_LEAST: the lowest ceiling a worker is given; a threshold or limit below it restarts.
local RATE_LEAST = 1 / 3600
-- pacing.USUAL_LEAST: outcomes of good news before their bad share is the usual one.
local USUAL_LEAST = 50
-- pacing.USUAL_NOISE: standard deviations above the usual share's prediction that are chance.
local USUAL_NOISE = 2.0
-- pacing.USUAL_MOST: a judgement with a bad share above it teaches the usual share nothing.
local USUAL_MOST = 0.25
-- pacing.LIMIT_LEAST: a refusal's limit is at least this share of the rate refused.
local LIMIT_LEAST = 0.5
-- pacing.LIMIT_AGAIN: ... and at least this share of it when a limit was set already.
local LIMIT_AGAIN = 0.8
-- pacing.KEPT_UP: fewer outcomes back than this share of the tasks released, and no more per
-- second than at the last judgement: the released tasks queue (no growth).
local KEPT_UP = 0.75
-- pacing.LIMIT_HELD: a refusal met after this many judgements at the limit keeps the limit
-- at the rate refused.
local LIMIT_HELD = 2
-- pacing.KEPT_MOST: a kept limit's plateau doubles this many times at most ('lkp' no higher).
local KEPT_MOST = 10
-- pacing.DOUBLINGS_MOST: past its plateau, a limit's creep doubles this many times at most.
local DOUBLINGS_MOST = 64

local LAW_FIELDS = { 'start', 'ceiling', 'judge_every', 'slow_start', 'step', 'back_off', 'bad_share', 'floor',
  'least_bad', 'in_flight_s', 'near', 'creep', 'plateau' }

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
  if not (law.start > 0 and (law.ceiling == nil or (law.ceiling > 0 and law.ceiling <= RATE_MOST)) and law.judge_every > 0 and law.judge_every <= 10
      and law.slow_start >= 1
      and law.step >= 0 and law.back_off > 0 and law.back_off < 1 and law.bad_share >= 0 and law.bad_share < 1
      and law.floor > 0 and law.floor <= law.start and law.least_bad >= 1
      and law.least_bad == math.floor(law.least_bad) and law.in_flight_s > 0 and law.near > 0 and law.near <= 1
      and law.creep >= 0 and law.plateau >= 0 and law.plateau == math.floor(law.plateau)) then
    return nil
  end
  return law
end

-- PacingLaw.bound: rate within [floor, ceiling] (no ceiling: RATE_MOST).
local function bound(law, rate)
  return math.min(law.ceiling or RATE_MOST, math.max(law.floor, rate))
end

-- pacing.beyond_the_law: the first field of a pace holding a value no step of the law writes
-- (nil: none). Readable but absurd ('lkp' 1e9: a limit that never creeps; 'ubd' = 'usn': no
-- failure ever news; 'jat' minutes ahead: no growth meanwhile), it restarts the pace as an
-- unreadable one does.
local function beyond_the_law(law, pace)
  local judge = law.judge_every
  local least = math.min(bound(law, 0), RATE_LEAST) -- (a ceiling below the floor, or another worker's)
  if pace.thr ~= nil and (pace.thr < least or pace.thr > RATE_MOST) then return 'thr' end
  if pace.lim ~= nil and (pace.lim < least
      or pace.lim > RATE_MOST * math.max(1 / law.back_off, (1 + law.step) / law.near)) then
    return 'lim'
  end
  if pace.lkp > KEPT_MOST then return 'lkp' end
  if pace.alm > law.plateau * 2 ^ pace.lkp + DOUBLINGS_MOST then return 'alm' end
  if pace.jat > pace.at + judge then return 'jat' end
  if pace.cut ~= nil and pace.cut > pace.at then return 'cut' end
  if pace.sut ~= nil and pace.cut ~= nil and pace.sut - pace.cut > judge * (SETTLE_LEAST + SETTLE_MOST + 1) then
    return 'sut'
  end
  if pace.used > RATE_MOST * (1 + math.max(0, pace.at - pace.jat)) then return 'used' end
  if pace.ubd > USUAL_MOST * pace.usn then return 'ubd' end
  return nil
end

-- The stored adaptive pace; nil when there is none (or only a fixed ramp's) or it is unreadable.
local function read_pace(law)
  local p = redis.call('HMGET', K_PACE, 'a_gen', 'rate', 'thr', 'a_tokens', 'a_at', 'jat', 'sok', 'sko', 'ssl', 'used',
    'cut', 'infl', 'srf', 'lim', 'owe', 'sut', 'csh', 'alm', 'ubd', 'usn', 'ugen', 'dlv', 'dgen', 'lkp')
  if not p[2] then return nil end
  local pace = { gen = read_whole(p[1]), rate = read_number(p[2]), thr = nil, tokens = read_number(p[4]),
    at = read_time(p[5], now, 0), jat = read_time(p[6], now, 0), sok = read_whole(p[7]), sko = read_whole(p[8]),
    ssl = read_whole(p[9]), used = read_whole(p[10]), infl = read_whole(p[12] or '0'), srf = nil,
    owe = read_whole(p[15] or '0'), alm = read_whole(p[18] or '0'), ubd = read_whole(p[19] or '0'),
    usn = read_whole(p[20] or '0'), dlv = read_number(p[22] or '0'), lkp = read_whole(p[24] or '0') }
  local good = true
  if p[13] then
    pace.srf = read_whole(p[13])
    good = pace.srf ~= nil
  end
  -- (a rate above RATE_MOST, or more tokens than one second's worth, no release wrote)
  good = good and pace.gen ~= nil and pace.rate ~= nil and pace.rate > 0 and pace.rate <= RATE_MOST
    and pace.tokens ~= nil and pace.tokens >= 0 and pace.tokens <= math.max(pace.rate, 1)
    and pace.at ~= nil and pace.jat ~= nil and pace.sok ~= nil and pace.sko ~= nil and pace.ssl ~= nil
    and pace.used ~= nil and pace.infl ~= nil and pace.owe ~= nil and pace.alm ~= nil and pace.ubd ~= nil
    and pace.usn ~= nil and pace.ubd <= pace.usn and pace.dlv ~= nil and pace.dlv >= 0 and pace.lkp ~= nil
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
  if (p[16] or '') ~= '' then
    pace.sut = read_time(p[16], now, 0)
    good = good and pace.sut ~= nil
  end
  if (p[17] or '') ~= '' then
    pace.csh = read_number(p[17])
    good = good and pace.csh ~= nil and pace.csh >= 0
    if pace.cut == nil then pace.csh = nil end -- (left behind by an older writer's pace)
  end
  if pace.lim == nil then pace.alm, pace.lkp = 0, 0 end -- (likewise)
  -- (likewise: an older writer that began this pace left the last pace's usual share)
  if read_whole(p[21] or '') ~= pace.gen then pace.ubd, pace.usn = 0, 0 end
  if pace.dlv ~= nil and read_whole(p[23] or '') ~= pace.gen then pace.dlv = 0 end -- (likewise)
  local absurd = nil
  if good then absurd = beyond_the_law(law, pace) end
  if not good or absurd ~= nil then
    local shown = {}
    for i, name in ipairs({ 'a_gen', 'rate', 'thr', 'a_tokens', 'a_at', 'jat', 'sok', 'sko', 'ssl', 'used', 'cut',
      'infl', 'srf', 'lim', 'owe', 'sut', 'csh', 'alm', 'ubd', 'usn', 'ugen', 'dlv', 'dgen', 'lkp' }) do
      shown[#shown + 1] = name .. '=' .. show(p[i])
    end
    local why = ''
    if absurd ~= nil then why = ' (' .. absurd .. ': beyond what the law writes)' end
    repaired('unreadable adaptive pace ' .. table.concat(shown, ' ') .. ' in ' .. K_PACE .. why .. ' (the pace restarts)')
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
    infl = 0, owe = 0, alm = 0, ubd = 0, usn = 0, dlv = 0, lkp = 0 }
end

-- pacing.beyond_usual: the bad outcomes (of came_back) beyond what the usual share predicts,
-- chance allowed; all of them while there is none.
local function beyond_usual(pace, bad, came_back)
  local usual = 0
  if pace.usn >= USUAL_LEAST then usual = pace.ubd / pace.usn end
  local expected = usual * came_back
  if expected <= 0 then return bad end
  return math.max(0, bad - expected - USUAL_NOISE * math.sqrt(expected))
end

-- The breaker's counts judged (pacing.advance's seen=outcomes, used=0, judged_at=now): the
-- next judgement counts from them.
local function judged(pace, outcomes)
  pace.jat, pace.sok, pace.sko, pace.ssl, pace.srf, pace.used = now, outcomes.ok, outcomes.ko, outcomes.sl,
    outcomes.rf, 0
end

-- pacing.advance: tokens refilled, and the rate judged against the breaker's counts
-- since the last judgement ({ gen, ok, ko, sl, rf, rh }): cut at once on bad news, grown every
-- judge_every seconds on good news; nothing goes while a refusal's wait (rh) lasts.
local function advance_pace(law, pace, outcomes)
  if pace == nil or pace.gen ~= outcomes.gen then return begin_pace(law, outcomes, pace) end
  if now < pace.at then
    -- pacing._stepped_back: the clock stepped back (a failover to a server whose clock is
    -- behind); the pace's times move back with it, or nothing went until it caught up
    local back = pace.at - now
    pace.at, pace.jat = pace.at - back, pace.jat - back
    if pace.cut ~= nil then pace.cut = pace.cut - back end
    if pace.sut ~= nil then pace.sut = pace.sut - back end
  end
  -- A pace stored under another law (workers restarted with a lower ceiling): held to this
  -- one at once, not at its next judgement.
  pace.rate = bound(law, pace.rate)
  pace.tokens = math.min(math.max(pace.rate, 1), pace.tokens + pace.rate * math.max(0, now - pace.at))
  if outcomes.rh ~= nil and now < outcomes.rh then
    pace.tokens = 0 -- a refusal asked the release to wait: nothing goes, nothing saves up
  end
  pace.at = math.max(pace.at, now)
  if pace.srf == nil then pace.srf = outcomes.rf end
  local ok, ko, sl, rf = outcomes.ok - pace.sok, outcomes.ko - pace.sko, outcomes.sl - pace.ssl, outcomes.rf - pace.srf
  if ok < 0 or ko < 0 or sl < 0 or rf < 0 then -- the breaker started again: a new baseline
    judged(pace, outcomes)
    return pace
  end
  local came_back = ok + ko
  local infl = math.max(0, pace.infl + pace.used - came_back)
  local owe = math.max(0, pace.owe - came_back)
  local settling = pace.cut ~= nil and (now - pace.cut < SETTLE_LEAST * law.judge_every
    or (pace.owe > 0 and pace.sut ~= nil and now < pace.sut))
  local since = now - pace.jat
  local bad = ko + sl
  local rate, thr, lim = pace.rate, pace.thr, pace.lim
  local jat
  if settling then
    -- news of tasks released before the last cut (still in flight): judges nothing, but a
    -- refusal among it caps the limit at the rate before the cut
    if rf > 0 then
      local before = rate / law.back_off
      if lim == nil or before < lim then lim = before end
      pace.alm = 0
    end
    judged(pace, outcomes)
    pace.infl, pace.owe, pace.lim = infl, owe, lim
    -- and while more is in flight than in_flight_s at this rate, nothing more goes
    if infl > law.in_flight_s * rate then pace.tokens = 0 end
    return pace
  end
  -- only bad outcomes beyond the downstream's usual share are news of the release's pace
  local excess = beyond_usual(pace, bad, came_back)
  local share = excess / math.max(came_back, pace.rate * law.judge_every)
  if rf > 0 or (bad >= law.least_bad and share > law.bad_share) then
    if rf == 0 and pace.csh ~= nil and share < pace.csh then
      -- bad, but less so than the news that made the last cut: the cut is taking effect
      -- (judged over a whole judgement only)
      if since < law.judge_every then return pace end
      judged(pace, outcomes)
      pace.infl, pace.owe, pace.csh = infl, owe, share
      return pace
    end
    if rf > 0 and lim ~= nil and pace.alm >= LIMIT_HELD then
      -- met again at a limit the rate had held for a second or more: the limit is the rate
      -- refused (not a fraction of a judgement's successes), and it is kept
      lim, pace.lkp = rate, math.min(pace.lkp + 1, KEPT_MOST)
      rate = bound(law, lim * law.near)
    elseif rf > 0 then
      -- what the downstream took (the successes per second back with the refusal), not the
      -- rate refused; nothing taken: a burst of refusals, the rate itself
      local least = rate * LIMIT_LEAST
      if lim ~= nil then least = rate * LIMIT_AGAIN end
      lim, pace.lkp = rate, 0
      if ok > 0 and since > 0 then lim = math.min(rate, math.max(law.floor, ok / since, least)) end
      rate = bound(law, math.min(rate * law.back_off, lim * law.near)) -- (below the limit: not refused again)
    else
      rate = bound(law, rate * law.back_off)
    end
    thr = rate
    pace.cut = now
    owe = infl
    pace.sut = now + law.judge_every * SETTLE_LEAST + math.min(2 * owe / rate, law.judge_every * SETTLE_MOST)
    pace.csh = share
    pace.alm = 0
    jat = now
  elseif since < law.judge_every or came_back == 0 then
    return pace -- (no news yet: the judgement waits for some)
  else
    -- on the judgements' own cadence (after a long pause, a new one from now)
    if since < 2 * law.judge_every then jat = pace.jat + law.judge_every else jat = now end
    pace.csh = nil -- (news without bad news: the next bad news cuts)
    if pace.usn < USUAL_LEAST and bad <= USUAL_MOST * came_back then
      pace.ubd, pace.usn = pace.ubd + bad, pace.usn + came_back
    end
    -- released tasks queue (the workers are all busy) when fewer come back than went, and no
    -- more than at the last judgement: no growth then (however many are in flight)
    local delivered = came_back / since
    local queueing = came_back < KEPT_UP * pace.used and delivered <= pace.dlv
    pace.dlv = delivered
    if ok > 0 and pace.used >= 0.5 * pace.rate * since and not queueing then
      if excess > 0 and (thr == nil or thr > rate) then thr = rate end -- the first bad outcomes: the slow zone is near
      local grown
      if thr == nil or rate < thr then
        grown = rate * law.slow_start
        if thr ~= nil then grown = math.min(grown, thr) end
      else
        grown = rate * (1 + law.step)
      end
      if lim ~= nil and rate >= lim * law.near then
        -- at the limit: probe above it, slowly at first, then faster; dropped (and the
        -- threshold with it) once the probe would pass the law's step
        -- (a kept limit: no creep for a plateau twice as long per refusal that kept it)
        local plateau = law.plateau * 2 ^ pace.lkp
        local lift = law.creep * 2 ^ math.max(0, pace.alm - plateau + 1)
        if pace.lkp > 0 and pace.alm < plateau then lift = 0 end
        if lift > law.step then
          lim, thr, pace.alm, pace.lkp = nil, nil, 0, 0
        else
          lim, pace.alm = lim * (1 + lift), math.min(pace.alm + 1, plateau + DOUBLINGS_MOST)
        end
      end
      if lim ~= nil then grown = math.max(rate, math.min(grown, lim * law.near)) end
      rate = bound(law, grown)
    end
  end
  judged(pace, outcomes)
  pace.jat = jat
  pace.rate, pace.thr, pace.tokens, pace.lim = rate, thr, math.min(math.max(rate, 1), pace.tokens), lim
  pace.infl, pace.owe = infl, owe
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
    fmt(pace.lim), 'owe', fmt(pace.owe), 'sut', fmt(pace.sut), 'csh', fmt(pace.csh), 'alm', fmt(pace.alm), 'ubd',
    fmt(pace.ubd), 'usn', fmt(pace.usn), 'ugen', fmt(pace.gen), 'dlv', fmt(pace.dlv), 'dgen', fmt(pace.gen), 'lkp', fmt(pace.lkp))
end
