"""Adaptive release: the pace at which a closed breaker's parked tasks go, from their outcomes.

The control law, once, in plain Python; ``storage/lua/release.lua`` keeps the same law,
step for step, on Redis's clock, so every worker releases at one shared pace
(``tests/storage/test_pacing.py`` proves the two agree).

A pace is a token bucket (``rate`` tasks per second, at most one second's worth held)
whose rate is judged every ``judge_every`` seconds against what the breaker counted
since the last judgement (its ``Outcomes``):

* bad news -- a refusal (a released task met a 429: ``BreakerMachine.record``'s
  ``refused``), or at least ``least_bad`` failures and slow successes (the policy's
  ``slow_call_duration``) above ``bad_share`` of the outcomes (or of a judgement's
  worth of tasks at the current rate, if more) -- cuts the rate at once (not at the
  next judgement: a downstream near its capacity answers 429 a moment later, which
  reopens the breaker) to ``back_off`` of itself, and the cut rate becomes the
  ``threshold``;
* after a cut, outcomes judge nothing for ``SETTLE_LEAST`` judgements (the downstream
  works off what came before the cut: its queue, its rate window), nor while the tasks
  released before the cut and awaiting their outcome then (queued in the broker,
  running in the workers: ``owed``) are still coming back, beyond those judgements for
  at most twice the time they take at the cut rate, and never more than ``SETTLE_MOST``
  judgements (an estimate that never drains, tasks lost or never parked, stops holding
  judgement then); a refusal among that news caps the ``limit`` (below) at the rate
  before the cut. Meanwhile nothing is released while more tasks await their outcome
  than ``in_flight_s`` worth at the cut rate: a downstream that slowed below the cut
  rate (every call slow, 50 a second against 185 released) had the whole backlog
  queued in the broker before the settling ended; now the release follows what comes
  back, and the backlog stays parked. Bad news after that cuts again only if it is no better than the news
  that made the cut (``cut_share``; judged over a whole judgement; a refusal always
  cuts): better bad news shows the cut working, holds the rate, and becomes the share
  to beat. One overshoot is one cut, not a cut for every judgement its queue takes to
  drain;
* otherwise, every ``judge_every`` seconds (each due ``judge_every`` after the last was
  due, not after the look that made it; or once outcomes came back, if later), when
  successes came back, the release used at least half of what the rate allowed, and the
  released tasks do not queue (below), the rate grows by ``slow_start`` while below the
  threshold (there is none at first), and by ``1 + step`` at or above it; the first
  failures or slow calls too few to be bad news put the threshold at the rate (the
  downstream's slow zone is near: it is approached by small steps from there);
* released tasks queue (in the broker: the workers are all busy) when fewer outcomes came
  back in a judgement than ``KEPT_UP`` of the tasks released in it, and no more came back
  per second than in the judgement before: then the rate does not grow. How many are in
  flight says nothing of it: a downstream whose calls take 2.5 s has 2.5 s of releases
  in flight however many workers wait for them, and the rule this one replaced (no
  growth with more than ``in_flight_s`` worth in flight) held such a release at its
  start rate for good (docs/decisions.md, 78);
* after a refusal nothing is released until the time the downstream asked for (its
  Retry-After: the breaker's ``held_until``), and what the downstream took becomes a
  ``limit``: the successes per second that came back with the refusal (what a rate
  limiter lets through), no more than the rate and no less than ``LIMIT_LEAST`` of it,
  or ``LIMIT_AGAIN`` of it when a limit was set already (the rate was then one the pace
  set below a limit, no ramp's overshoot; decision 94), the rate itself when nothing
  succeeded (a burst of refusals, not a capacity); the
  cut rate is at most ``near`` of it. The rate at the news was no measure: the ramp
  had grown one or two steps past the capacity by then, and each regrowth to 95 % of
  it was refused again, a Retry-After each time (decision 79). Growth stops at ``near``
  of the limit, and from there the limit creeps up by
  ``creep`` per judgement (a rate limiter that answers 429 with no slowdown first is
  met again only as its limit is probed, not every few seconds); after ``plateau``
  judgements there with no refusal the creep doubles every judgement, and once it would
  grow the rate by more than ``step`` the limit is dropped, with the threshold: the
  rate doubles again (a refusal not met again in all that time was a moment's, not the
  downstream's capacity, and held the rest of the release near it);
* a refusal met at a limit the rate had held for ``LIMIT_HELD`` judgements or more
  (``at_limit``) is not measured again: the limit becomes the rate refused, the cut goes
  to ``near`` of it, and the limit is ``kept``: it does not creep for its plateau, which
  doubles with each refusal so met (``plateau * 2 ** kept`` judgements), ``KEPT_MOST``
  times at most (a stored pace beyond what the law writes restarts). A limiter that
  answers only 429 gives no other news of where its capacity is: a refusal after a second
  or more at a rate says that rate is the capacity, give or take a creep, where the few
  successes of a fraction of a judgement measured it at 0.5-0.7 of it (decision 94);
* a breaker that reopens releases nothing (the release script sees it OPEN); when it
  closes again (a new generation) the pace starts again from ``start``, with the
  threshold at ``back_off`` of the rate it had reached (a Retry-After met by a task
  that was not released trips the breaker: this kind of bad news).

Failures and slow successes are judged beyond the downstream's **usual share** of them:
the share the pace's first judgements of good news showed (``USUAL_LEAST`` outcomes, at
its lowest rates, where the release is not what slows the downstream; a judgement with
more than ``USUAL_MOST`` of them bad teaches nothing: that is strain), then kept for the
rest of the pace. Bad outcomes up to what that share predicts, and chance above it
(``USUAL_NOISE`` standard deviations), are no news (``beyond_usual``), though
``least_bad`` still counts them all (a judgement of 3 outcomes, all slow, is news). A
downstream whose calls are slow or fail at a steady 8 % whatever the load had its pace
cut again and again, and held near ``least_bad / (judge_every * 8 %)`` tasks a second;
a downstream without such a share has none (0), and every bad outcome counts, as
before. The share is not learnt all along: one that slows gradually as the load grows
would have had its slowness taken for its usual one, step by step, until most calls
were slow.

The rate stays within ``[floor, ceiling]`` (``breaker_release_rate`` when set). The
O(1) state is a ``Pace``; nothing here reads a clock: every step is given ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..clock import Clock
from ..errors import ConfigurationError

__all__ = [
    "BACK_OFF",
    "BAD_SHARE",
    "CREEP",
    "DOUBLINGS_MOST",
    "FLOOR",
    "IN_FLIGHT_S",
    "JUDGE_EVERY",
    "KEPT_MOST",
    "KEPT_UP",
    "LEAST_BAD",
    "LIMIT_AGAIN",
    "LIMIT_HELD",
    "LIMIT_LEAST",
    "NEAR",
    "PLATEAU",
    "RATE_LEAST",
    "RATE_MOST",
    "SETTLE_LEAST",
    "SETTLE_MOST",
    "SLOW_START",
    "START_RATE",
    "STEP",
    "USUAL_LEAST",
    "USUAL_MOST",
    "USUAL_NOISE",
    "AdaptivePacer",
    "Outcomes",
    "Pace",
    "PacingLaw",
    "advance",
    "allowed",
    "begin",
    "beyond_the_law",
    "beyond_usual",
    "took",
]

#: Tasks per second released at first, after every (re)close.
START_RATE = 10.0
#: Seconds between two judgements of the rate.
JUDGE_EVERY = 0.5
#: The rate's factor per judgement while below the threshold: about doubling a second
#: (x 1.96), as TCP's slow start doubles per round trip. A step past a downstream's
#: capacity is cut at the next look that brings bad news, and the surplus it sent is
#: owed (below), not cut for again; x 1.25 (x 1.56 a second) took 2.5 s longer to reach
#: 100/s (docs/decisions.md, 50).
SLOW_START = 1.4
#: Above the threshold, the rate grows by this share of itself per judgement (21 % a second).
STEP = 0.1
#: The rate's factor on bad news (and the threshold's, after a reopen).
BACK_OFF = 0.8
#: Bad outcomes (failures, slow calls) above this share of the outcomes are bad news.
BAD_SHARE = 0.05
#: The lowest rate, in tasks per second, however bad the news.
FLOOR = 1.0
#: The lowest ceiling a worker is given (``breaker_release_rate``: one task an hour). A
#: threshold or a limit as low is one the law writes under such a ceiling, which may be
#: below ``floor``, and under it whatever another worker's ceiling (a rolling deploy); a
#: lower one is damage (decision 103).
RATE_LEAST = 1 / 3600
#: The highest rate, in tasks per second, with no ceiling (``breaker_release_rate``'s
#: largest): a stored pace above it is none a release wrote, and begins again.
RATE_MOST = 1_000_000.0
#: Fewer bad outcomes than this are no news (one slow run on a busy host cuts nothing).
LEAST_BAD = 3
#: After a cut, seconds' worth of released tasks (at the cut rate) that may await their
#: outcome (queued in the broker, running, or their successes not yet sent) while it
#: settles; with more in flight nothing more goes until some come back.
IN_FLIGHT_S = 1.5
#: Released tasks queue, and the rate does not grow, when fewer outcomes than this share of
#: the tasks released in a judgement came back in it, and no more per second than in the
#: judgement before (a release whose downstream answers slowly but keeps up gets back, a
#: latency later, as many as it sends; one whose workers are all busy gets back no more
#: however many it sends).
KEPT_UP = 0.75
#: After a cut, outcomes judge nothing for this many ``judge_every``: news of tasks released
#: before it, and of the downstream working off what they left (its queue, its rate window).
#: With 2, a downstream that counts requests per second was still slow a second after the
#: cut, and cut again: two cuts per overshoot (docs/decisions.md, 50).
SETTLE_LEAST = 4
#: After a cut, outcomes owed by tasks released before it hold judgement at most this many
#: ``judge_every`` beyond ``SETTLE_LEAST``: an estimate of tasks in flight that never
#: drains (tasks lost, or never parked) cannot freeze the rate for longer.
SETTLE_MOST = 20
#: After a refusal, growth stops at this share of its ``limit`` (what the downstream took) ...
NEAR = 0.95
#: A refusal's limit is at least this share of the rate refused: the successes of one
#: judgement measure what the downstream took only roughly (its window and the
#: judgement's are not one), and a limit set too low holds the release until its plateau.
LIMIT_LEAST = 0.5
#: ... and at least this share of it when a limit was set already (the rate was below it).
LIMIT_AGAIN = 0.8
#: A refusal met after the rate had grown at its limit for this many judgements (a whole
#: second: a rate limiter's window took it) keeps the limit at the rate refused, and its
#: plateau doubles (``Pace.kept``).
LIMIT_HELD = 2
#: ... which creeps up by this share of itself per judgement while the rate is there (1 %/s),
CREEP = 0.005
#: ... for this many judgements (5 s); from then on the creep doubles every judgement, and
#: once it would grow the rate faster than ``STEP`` the limit is dropped: a refusal that
#: the downstream has not repeated in all that time was a moment's, not its capacity.
PLATEAU = 10
#: A kept limit's plateau doubles with each refusal that keeps it up to this many times
#: (``law.plateau * 2 ** KEPT_MOST`` judgements: 85 min at the defaults), and no more:
#: counted without end, the ``kept`` of a downstream refusing every few seconds for hours
#: grew with no bound, and a stored ``lkp`` of any size was as good as any other, one
#: of 10**9 holding a limit from creeping for good. Bounded, a larger one is none the law
#: wrote, and the pace restarts (decision 97).
KEPT_MOST = 10
#: Past its plateau, a limit's creep doubles at most this many times (``at_limit`` counts
#: no further): any law's creep has passed its step by then, but for a creep below
#: ``step / 2**64`` (0 among them: a limit never dropped, its ``at_limit`` counted without
#: end, and ``creep * 2**at_limit`` no float in Python, where Lua made it NaN).
DOUBLINGS_MOST = 64
#: Outcomes of good news a pace must have seen before their bad share counts as the
#: downstream's usual one (``Pace.usual``): bad outcomes up to what it predicts are no news.
USUAL_LEAST = 50
#: Bad outcomes within this many standard deviations (Poisson: ``sqrt``) above the usual
#: share's prediction are chance, not news.
USUAL_NOISE = 2.0
#: A judgement whose bad share is above this teaches the usual share nothing: that much is
#: strain (the start rate too fast for a downstream still recovering), not its usual self.
USUAL_MOST = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class PacingLaw:
    """The adaptive release's parameters (the defaults are the module's constants)."""

    start: float = START_RATE
    ceiling: float | None = None
    """The highest rate (``breaker_release_rate``); ``None``: no ceiling."""
    judge_every: float = JUDGE_EVERY
    slow_start: float = SLOW_START
    step: float = STEP
    back_off: float = BACK_OFF
    bad_share: float = BAD_SHARE
    floor: float = FLOOR
    least_bad: int = LEAST_BAD
    in_flight_s: float = IN_FLIGHT_S
    near: float = NEAR
    creep: float = CREEP
    plateau: int = PLATEAU

    def __post_init__(self) -> None:
        checks = {
            "start": self.start > 0,
            "ceiling": self.ceiling is None or 0 < self.ceiling <= RATE_MOST,
            # (at most 10 s: a settling's end, stored in Redis, stays within 300 s of now)
            "judge_every": 0 < self.judge_every <= 10,
            "slow_start": self.slow_start >= 1,
            "step": self.step >= 0,
            "back_off": 0 < self.back_off < 1,
            "bad_share": 0 <= self.bad_share < 1,
            "floor": 0 < self.floor <= self.start,
            "least_bad": self.least_bad >= 1 and self.least_bad == int(self.least_bad),
            "in_flight_s": self.in_flight_s > 0,
            "near": 0 < self.near <= 1,
            "creep": self.creep >= 0,
            "plateau": self.plateau >= 0 and self.plateau == int(self.plateau),
        }
        for name, good in checks.items():
            value = getattr(self, name)
            if not good or (value is not None and not math.isfinite(value)):
                raise ConfigurationError(f"PacingLaw.{name}: {value!r} is out of bounds (see core/pacing.py)")

    def bound(self, rate: float) -> float:
        """``rate`` within ``[floor, ceiling]`` (no ceiling: ``RATE_MOST``)."""
        return min(RATE_MOST if self.ceiling is None else self.ceiling, max(self.floor, rate))

    def text(self) -> str:
        """The law as ``release.lua`` reads it: its fields in order, ``;``-separated (no ceiling: empty)."""
        fields = (self.start, self.ceiling, self.judge_every, self.slow_start, self.step, self.back_off,
                  self.bad_share, self.floor, self.least_bad, self.in_flight_s, self.near, self.creep,
                  self.plateau)  # fmt: skip
        return ";".join("" if value is None else repr(float(value)) for value in fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcomes:
    """What a breaker has counted so far (its state hash's ``gen``, ``ok``, ``ko``, ``sl``,
    ``rf``, ``rh``)."""

    generation: int
    successes: int
    failures: int
    """Refusals included."""
    slow: int
    refused: int = 0
    """Released tasks the downstream refused (429), counted among the failures too."""
    held_until: float | None = None
    """Until when the last refusal asked the release to wait (``None``: never asked)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Pace:
    """One breaker's adaptive release (``release.lua`` keeps it in the pacing hash)."""

    generation: int
    """The breaker's generation this pace began under: another one starts a new pace."""
    rate: float
    threshold: float | None
    """Where doubling ends (``None``: nowhere yet)."""
    tokens: float
    at: float
    """When ``tokens`` were last refilled."""
    judged_at: float
    seen: Outcomes
    """The breaker's counts at the last judgement."""
    used: int
    """Tasks released since the last judgement."""
    in_flight: int = 0
    """Tasks released without an outcome yet, as of the last judgement (an estimate: the
    breaker's outcomes include those of tasks that were never parked)."""
    cut_at: float | None = None
    """When the rate was last cut: for ``SETTLE_LEAST`` judgements after, outcomes are
    news of the rate before (in flight, or of a downstream still working it off), and
    judge nothing."""
    owed: int = 0
    """Outcomes still owed by tasks released before the last cut: until they came back
    (or ``settle_until``), outcomes are news of the rate before, and judge nothing."""
    settle_until: float | None = None
    """The latest time the owed outcomes hold judgement: ``SETTLE_LEAST`` judgements after
    the cut, plus twice the time the owed tasks take at the cut rate (at most
    ``SETTLE_MOST`` judgements)."""
    cut_share: float | None = None
    """The bad share of the news that made the last cut, or of later bad news that was
    better (``None`` once news without bad news came): bad news better than it cuts
    nothing, and becomes the share to beat."""
    limit: float | None = None
    """What the downstream took when it last refused (the successes per second back
    with the refusal, between ``LIMIT_LEAST`` of the rate and the rate; ``None``: no
    refusal in this pace); growth stops at ``law.near`` of it, which creeps up by
    ``law.creep`` per judgement."""
    at_limit: int = 0
    """Judgements the rate has grown at its limit since the limit was set (or the rate last
    cut): from ``law.plateau`` of them on the limit's creep doubles per judgement, and
    once it would pass ``law.step`` the limit is dropped."""
    kept: int = 0
    """Refusals met in a row at a limit the rate had held for ``LIMIT_HELD`` judgements
    (0: the limit is a measure, or there is none), at most ``KEPT_MOST``: a kept limit does
    not creep during its plateau, ``law.plateau * 2 ** kept`` judgements."""
    usual_bad: int = 0
    """Bad outcomes (failures, slow calls) in the judgements of good news of this pace."""
    usual_seen: int = 0
    """All outcomes in those judgements: ``usual_bad / usual_seen`` is the downstream's
    usual bad share, once ``USUAL_LEAST`` outcomes are in."""
    delivered: float = 0.0
    """Outcomes per second that came back in the last judgement of good news (0: none
    yet): released tasks queue while fewer come back than went, and no more than then."""

    @property
    def usual(self) -> float:
        """The bad share the downstream shows when the release is not too fast for it
        (0 until ``USUAL_LEAST`` outcomes of good news are in)."""
        return self.usual_bad / self.usual_seen if self.usual_seen >= USUAL_LEAST else 0.0


def beyond_usual(pace: Pace, bad: int, came_back: int) -> float:
    """How many of ``bad`` outcomes (among ``came_back``) are more than the downstream's
    usual share predicts, chance allowed (``USUAL_NOISE``); all of them while it has none."""
    expected = pace.usual * came_back
    if expected <= 0:
        return float(bad)
    return max(0.0, bad - expected - USUAL_NOISE * math.sqrt(expected))


def beyond_the_law(law: PacingLaw, pace: Pace) -> str | None:
    """The first field of ``pace`` holding a value no step of ``law`` writes (``None``:
    none). ``pacing.lua`` restarts a stored pace with such a field, as it does an unreadable
    one (decision 97): each of these, readable but absurd, held the release wrong for good
    or for a long while (a ``kept`` of 10**9: a limit that never creeps; a usual share of
    1: no failure ever news; a judgement 5 minutes ahead: no growth for 5 minutes). Times
    are allowed a judgement's rounding; ``used`` a second's worth at ``RATE_MOST`` more
    than the time since the last judgement could refill."""
    judge = law.judge_every
    # (the law bounds a rate to its ceiling, which may be below its floor; another
    # worker's ceiling may be lower still, down to RATE_LEAST: decision 103)
    least = min(law.bound(0.0), RATE_LEAST)
    bounds = {
        # (both set at a rate the law bounded, or above it)
        "threshold": pace.threshold is None or least <= pace.threshold <= RATE_MOST,
        # (set at most at the rate, or at the rate before a cut; crept only from near of it)
        "limit": pace.limit is None
        or least <= pace.limit <= RATE_MOST * max(1 / law.back_off, (1 + law.step) / law.near),
        "kept": pace.kept <= KEPT_MOST,
        "at_limit": pace.kept > KEPT_MOST or pace.at_limit <= law.plateau * 2**pace.kept + DOUBLINGS_MOST,
        "judged_at": pace.judged_at <= pace.at + judge,
        "cut_at": pace.cut_at is None or pace.cut_at <= pace.at,
        "settle_until": pace.settle_until is None
        or pace.cut_at is None
        or pace.settle_until - pace.cut_at <= judge * (SETTLE_LEAST + SETTLE_MOST + 1),
        "used": pace.used <= RATE_MOST * (1 + max(0.0, pace.at - pace.judged_at)),
        # (a judgement with more than USUAL_MOST of its outcomes bad teaches it nothing)
        "usual_bad": pace.usual_bad <= USUAL_MOST * pace.usual_seen,
    }
    return next((name for name, good in bounds.items() if not good), None)


def begin(law: PacingLaw, outcomes: Outcomes, now: float, before: Pace | None = None) -> Pace:
    """A new pace, from ``law.start``; after an earlier one (``before``: the breaker
    reopened), with its threshold at ``back_off`` of the rate it had reached."""
    threshold = None if before is None else law.bound(before.rate * law.back_off)
    return Pace(generation=outcomes.generation, rate=law.bound(min(law.start, threshold or law.start)),
                threshold=threshold, tokens=0.0, at=now, judged_at=now, seen=outcomes, used=0)  # fmt: skip


def advance(law: PacingLaw, pace: Pace | None, outcomes: Outcomes, now: float) -> Pace:
    """The pace at ``now``: begun (again) under a new generation, else tokens refilled and
    the rate judged against the outcomes since the last judgement: cut at once on bad
    news, grown every ``judge_every`` seconds on good news."""
    if pace is None or pace.generation != outcomes.generation:
        return begin(law, outcomes, now, pace)
    if now < pace.at:
        pace = _stepped_back(pace, pace.at - now)
    bounded = law.bound(pace.rate)
    if bounded != pace.rate:
        # A pace stored under another law (workers restarted with a lower
        # ``breaker_release_rate``): held to this one at once, not at its next judgement.
        pace = replace(pace, rate=bounded)
    # At most one second's worth saved up, and at least one task's (below 1/s, else none goes).
    tokens = min(max(pace.rate, 1.0), pace.tokens + pace.rate * max(0.0, now - pace.at))
    if outcomes.held_until is not None and now < outcomes.held_until:
        tokens = 0.0  # a refusal asked the release to wait: nothing goes, nothing saves up
    pace = replace(pace, tokens=tokens, at=max(pace.at, now))
    seen = pace.seen
    successes = outcomes.successes - seen.successes
    failures = outcomes.failures - seen.failures
    slow = outcomes.slow - seen.slow
    refused = outcomes.refused - seen.refused
    if successes < 0 or failures < 0 or slow < 0 or refused < 0:  # the breaker started again: a new baseline
        return replace(pace, judged_at=now, seen=outcomes, used=0)
    came_back = successes + failures
    in_flight = max(0, pace.in_flight + pace.used - came_back)
    owed = max(0, pace.owed - came_back)
    settling = pace.cut_at is not None and (
        now - pace.cut_at < SETTLE_LEAST * law.judge_every
        or (pace.owed > 0 and pace.settle_until is not None and now < pace.settle_until)
    )
    since = now - pace.judged_at
    bad = failures + slow
    rate, threshold, cut_at, limit, at_limit = pace.rate, pace.threshold, pace.cut_at, pace.limit, pace.at_limit
    kept = pace.kept
    settle_until = pace.settle_until
    if settling:
        # News of tasks released before the last cut (still in flight): judges nothing,
        # but a refusal among it says where the downstream's limit was: at most the rate
        # those tasks were released at, the rate before the cut.
        at_limit = pace.at_limit
        if refused > 0:
            before = rate / law.back_off
            limit = before if limit is None else min(limit, before)
            at_limit = 0
        # And while more is in flight than ``in_flight_s`` at this rate, nothing more goes:
        # a downstream that got slower than the cut works off what it has, and the backlog
        # stays parked, not queued in the broker ahead of other tasks.
        tokens = 0.0 if in_flight > law.in_flight_s * rate else pace.tokens
        return replace(pace, tokens=tokens, judged_at=now, seen=outcomes, used=0, in_flight=in_flight, owed=owed,
                       limit=limit, at_limit=at_limit)  # fmt: skip
    # Only bad outcomes beyond the downstream's usual share are news of the release's pace:
    # a downstream whose calls are slow at a steady 8 % whatever the load had the pace cut
    # again and again, and held near least_bad / (judge_every * 8 %) tasks a second.
    excess = beyond_usual(pace, bad, came_back)
    share = excess / max(came_back, pace.rate * law.judge_every)
    cut_share = pace.cut_share
    usual_bad, usual_seen = pace.usual_bad, pace.usual_seen
    # (``least_bad`` counts every bad outcome: with the usual share's allowance taken off
    # first, a judgement of 3 outcomes, all slow, was no news once any share was learnt)
    if refused > 0 or (bad >= law.least_bad and share > law.bad_share):
        if refused == 0 and cut_share is not None and share < cut_share:
            # Bad, but less so than the news that made the last cut: the cut is taking
            # effect (the downstream still works off what came before it). Judged over a
            # whole judgement (a shorter look's share is not comparable), and neither cut
            # again nor grown; the next bad news must be better still.
            if since < law.judge_every:
                return pace
            return replace(pace, judged_at=now, seen=outcomes, used=0, in_flight=in_flight, owed=owed,
                           cut_share=share)  # fmt: skip
        if refused > 0 and limit is not None and at_limit >= LIMIT_HELD:
            # Met again at a limit the rate had held for a second or more: the downstream
            # took about that rate, and refuses just above it. The limit is the rate
            # refused, not what a fraction of a judgement's successes measured (half of
            # it, or less), and it is kept: no creep for a plateau twice as long.
            limit, kept = rate, min(kept + 1, KEPT_MOST)
            rate = law.bound(limit * law.near)
        elif refused > 0:
            # What the downstream took, not the rate refused: by the news the ramp had
            # grown past it. (Nothing taken: a burst of refusals says nothing of a capacity.)
            # (At a limit set already, the rate was the pace's own, below that limit, not a
            # ramp's overshoot: measured at LIMIT_AGAIN of it at least.)
            limit, kept = rate, 0
            if successes > 0 and since > 0:
                least = rate * (LIMIT_LEAST if pace.limit is None else LIMIT_AGAIN)
                limit = min(rate, max(law.floor, successes / since, least))
            rate = law.bound(min(rate * law.back_off, limit * law.near))  # (below the limit: not refused again)
        else:
            rate = law.bound(rate * law.back_off)
        threshold, cut_at, owed, cut_share, at_limit = rate, now, in_flight, share, 0
        settle_until = now + law.judge_every * SETTLE_LEAST + min(2 * owed / rate, law.judge_every * SETTLE_MOST)
        judged_at = now
    elif since < law.judge_every or came_back == 0:
        return pace  # (no news yet: the judgement waits for some)
    else:
        # On the judgements' own cadence: the next is due ``judge_every`` after this one
        # was, not after the look that made it (looks come a tick apart, and a judgement
        # made at 0.6 s slowed every step of the ramp by a fifth); after a long pause, a
        # new cadence from now.
        judged_at = pace.judged_at + law.judge_every if since < 2 * law.judge_every else now
        cut_share = None  # (news without bad news: the next bad news cuts)
        if usual_seen < USUAL_LEAST and bad <= USUAL_MOST * came_back:
            usual_bad, usual_seen = usual_bad + bad, usual_seen + came_back
        # Released tasks queue (the workers are all busy) when fewer come back than went,
        # and no more than at the last judgement: no growth then. (Not judged by how many
        # are in flight: a downstream slow to answer keeps a latency's worth in flight.)
        delivered = came_back / since
        queueing = came_back < KEPT_UP * pace.used and delivered <= pace.delivered
        if successes > 0 and pace.used >= 0.5 * pace.rate * since and not queueing:
            if excess > 0 and (threshold is None or threshold > rate):
                threshold = rate  # the first bad outcomes: the slow zone is near
            if threshold is None or rate < threshold:
                grown = rate * law.slow_start
                if threshold is not None:
                    grown = min(grown, threshold)
            else:
                grown = rate * (1 + law.step)
            if limit is not None and rate >= limit * law.near:
                # At the limit: probe above it, slowly at first (a rate limiter is met
                # again only as its limit is probed), then faster (a refusal not repeated
                # in all that time was a moment's, not the downstream's capacity).
                # (a kept limit: no creep for a plateau twice as long per refusal that kept it)
                plateau = law.plateau * 2**kept
                lift = 0.0 if kept and at_limit < plateau else law.creep * 2 ** max(0, at_limit - plateau + 1)
                if lift > law.step:
                    # Dropped, and the threshold with it (set by the same news, or below
                    # the rate reached since): growth doubles again from here.
                    limit, threshold, at_limit, kept = None, None, 0, 0
                else:
                    limit, at_limit = limit * (1 + lift), min(at_limit + 1, plateau + DOUBLINGS_MOST)
            if limit is not None:
                grown = max(rate, min(grown, limit * law.near))
            rate = law.bound(grown)
        return replace(pace, rate=rate, threshold=threshold, tokens=min(max(rate, 1.0), pace.tokens),
                       judged_at=judged_at, seen=outcomes, used=0, in_flight=in_flight, limit=limit, owed=owed,
                       cut_share=cut_share, at_limit=at_limit, kept=kept, usual_bad=usual_bad,
                       usual_seen=usual_seen, delivered=delivered)  # fmt: skip
    return replace(pace, rate=rate, threshold=threshold, tokens=min(max(rate, 1.0), pace.tokens), judged_at=judged_at,
                   seen=outcomes, used=0, in_flight=in_flight, cut_at=cut_at, limit=limit, owed=owed,
                   settle_until=settle_until, cut_share=cut_share, at_limit=at_limit, kept=kept)  # fmt: skip


def _stepped_back(pace: Pace, back: float) -> Pace:
    """``pace`` after its clock stepped back ``back`` seconds (Redis's clock, after a
    failover to a server whose clock is behind): its times move back with it. Kept where
    they were, they lay ahead of the clock, and nothing was released (no token refilled),
    nor judged, until the clock had caught up with them."""
    return replace(pace, at=pace.at - back, judged_at=pace.judged_at - back,
                   cut_at=None if pace.cut_at is None else pace.cut_at - back,
                   settle_until=None if pace.settle_until is None else pace.settle_until - back)  # fmt: skip


def allowed(pace: Pace) -> int:
    """How many tasks the pace lets go now."""
    return math.floor(pace.tokens)


def took(pace: Pace, count: int) -> Pace:
    """The pace after ``count`` tasks went (at most ``allowed(pace)``)."""
    return replace(pace, tokens=pace.tokens - count, used=pace.used + count)


class AdaptivePacer:
    """One breaker's adaptive release in this process, on an injected clock (the law's
    reference: the Redis store runs the same law in ``release.lua``, shared)."""

    def __init__(self, law: PacingLaw, clock: Clock) -> None:
        self.law = law
        self.clock = clock
        self.pace: Pace | None = None

    def release(self, outcomes: Outcomes, waiting: int) -> int:
        """How many of ``waiting`` tasks go now, given the breaker's counts (and count them as gone)."""
        self.pace = advance(self.law, self.pace, outcomes, self.clock.monotonic())
        count = min(waiting, allowed(self.pace))
        self.pace = took(self.pace, count)
        return count

    @property
    def rate(self) -> float:
        """The current rate (tasks per second); ``law.start`` before the first release."""
        return self.law.start if self.pace is None else self.pace.rate
