"""Adaptive release: the pace at which a closed breaker's parked tasks go, from their outcomes.

The control law, once, in plain Python; ``storage/lua/release.lua`` keeps the same law,
step for step, on Redis's clock, so every worker releases at one shared pace
(``tests/storage/test_pacing_contract.py`` proves the two agree).

A pace is a token bucket (``rate`` tasks per second, at most one second's worth held)
whose rate is judged every ``judge_every`` seconds against what the breaker counted
since the last judgement (its ``Outcomes``):

* bad news -- a refusal (a released task met a 429: ``BreakerMachine.record``'s
  ``refused``), or at least ``least_bad`` failures and slow successes (the policy's
  ``slow_call_duration``), and above ``bad_share`` of the outcomes, or of a judgement's worth of tasks at the current
  rate if more -- cuts the rate at once (not at the next judgement: a downstream near
  its capacity answers 429 a moment later, which reopens the breaker) to ``back_off``
  of itself, and the cut rate becomes the ``threshold``; the outcomes of the next
  ``2 * judge_every`` seconds, and while more than ``in_flight_s`` seconds' worth of
  released tasks await their outcome, are of tasks released before the cut (queued in
  the broker, running in the workers), and judge nothing;
* otherwise, every ``judge_every`` seconds (or once outcomes came back, if later), when
  successes came back and the release
  used at least half of what the rate allowed, the rate grows by ``slow_start`` while
  below the threshold (there is none at first), and by ``1 + step`` at or above it; the
  first failures or slow calls too few to be bad news put the threshold at the rate
  (the downstream's slow zone is near: it is approached by small steps from there);
* after a refusal nothing is released until the time the downstream asked for (its
  Retry-After: the breaker's ``held_until``), and the rate it was refused at becomes a
  ``limit``: growth stops at ``near`` of it, and from there the limit creeps up by
  ``creep`` per judgement (a rate limiter that answers 429 with no slowdown first is
  met again only as its limit is probed, not every few seconds);
* a breaker that reopens releases nothing (the release script sees it OPEN); when it
  closes again (a new generation) the pace starts again from ``start``, with the
  threshold at ``back_off`` of the rate it had reached (a Retry-After met by a task
  that was not released trips the breaker: this kind of bad news).

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
    "FLOOR",
    "IN_FLIGHT_S",
    "JUDGE_EVERY",
    "LEAST_BAD",
    "NEAR",
    "SLOW_START",
    "START_RATE",
    "STEP",
    "AdaptivePacer",
    "Outcomes",
    "Pace",
    "PacingLaw",
    "advance",
    "allowed",
    "begin",
    "took",
]

#: Tasks per second released at first, after every (re)close.
START_RATE = 10.0
#: Seconds between two judgements of the rate.
JUDGE_EVERY = 0.5
#: The rate's factor per judgement while below the threshold: small enough that one step
#: from below a downstream's slow zone (from ~80 % of its capacity) cannot jump past
#: its capacity (x 1.56 per second).
SLOW_START = 1.25
#: Above the threshold, the rate grows by this share of itself per judgement (21 % a second).
STEP = 0.1
#: The rate's factor on bad news (and the threshold's, after a reopen).
BACK_OFF = 0.8
#: Bad outcomes (failures, slow calls) above this share of the outcomes are bad news.
BAD_SHARE = 0.05
#: The lowest rate, in tasks per second, however bad the news.
FLOOR = 1.0
#: Fewer bad outcomes than this are no news (one slow run on a busy host cuts nothing).
LEAST_BAD = 3
#: Seconds' worth of released tasks (at the current rate) that may await their outcome
#: (queued in the broker, running, or their successes not yet sent: workers send them
#: every second); with more in flight the rate does not grow, nor is it cut again.
IN_FLIGHT_S = 1.5
#: After a refusal, growth stops at this share of the rate refused (its ``limit``) ...
NEAR = 0.95
#: ... which creeps up by this share of itself per judgement while the rate is there (1 %/s).
CREEP = 0.005


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

    def __post_init__(self) -> None:
        checks = {
            "start": self.start > 0,
            "ceiling": self.ceiling is None or self.ceiling > 0,
            "judge_every": self.judge_every > 0,
            "slow_start": self.slow_start >= 1,
            "step": self.step >= 0,
            "back_off": 0 < self.back_off < 1,
            "bad_share": 0 <= self.bad_share < 1,
            "floor": 0 < self.floor <= self.start,
            "least_bad": self.least_bad >= 1 and self.least_bad == int(self.least_bad),
            "in_flight_s": self.in_flight_s > 0,
            "near": 0 < self.near <= 1,
            "creep": self.creep >= 0,
        }
        for name, good in checks.items():
            value = getattr(self, name)
            if not good or (value is not None and not math.isfinite(value)):
                raise ConfigurationError(f"PacingLaw.{name}: {value!r} is out of bounds (see core/pacing.py)")

    def bound(self, rate: float) -> float:
        """``rate`` within ``[floor, ceiling]``."""
        rate = max(self.floor, rate)
        return rate if self.ceiling is None else min(self.ceiling, rate)

    def text(self) -> str:
        """The law as ``release.lua`` reads it: its fields in order, ``;``-separated (no ceiling: empty)."""
        fields = (self.start, self.ceiling, self.judge_every, self.slow_start, self.step, self.back_off,
                  self.bad_share, self.floor, self.least_bad, self.in_flight_s, self.near, self.creep)  # fmt: skip
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
    """When the rate was last cut: for ``2 * judge_every`` after, outcomes are news of
    the rate before (in flight), and judge nothing."""
    limit: float | None = None
    """The rate the downstream last refused at (``None``: no refusal in this pace);
    growth stops at ``law.near`` of it, which creeps up by ``law.creep`` per judgement."""


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
    tokens = min(pace.rate, pace.tokens + pace.rate * max(0.0, now - pace.at))
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
    in_flight = max(0, pace.in_flight + pace.used - successes - failures)
    crowded = in_flight > law.in_flight_s * pace.rate
    settling = pace.cut_at is not None and (now - pace.cut_at < 2 * law.judge_every or crowded)
    since = now - pace.judged_at
    bad = failures + slow
    rate, threshold, cut_at, limit = pace.rate, pace.threshold, pace.cut_at, pace.limit
    if settling:
        # News of tasks released before the last cut (still in flight): judges nothing.
        return replace(pace, judged_at=now, seen=outcomes, used=0, in_flight=in_flight)
    if refused > 0 or (
        bad >= law.least_bad and bad > law.bad_share * max(successes + failures, pace.rate * law.judge_every)
    ):
        if refused > 0:
            limit = rate  # (the rate it was refused at)
        rate = law.bound(rate * law.back_off)
        threshold, cut_at = rate, now
    elif since < law.judge_every or successes + failures == 0:
        return pace  # (no news yet: the judgement waits for some)
    elif successes > 0 and pace.used >= 0.5 * pace.rate * since and not crowded:
        if bad > 0 and (threshold is None or threshold > rate):
            threshold = rate  # the first bad outcomes: the slow zone is near
        if threshold is None or rate < threshold:
            grown = rate * law.slow_start
            if threshold is not None:
                grown = min(grown, threshold)
        else:
            grown = rate * (1 + law.step)
        if limit is not None:
            if rate >= limit * law.near:
                limit = limit * (1 + law.creep)  # at the limit: probe above it, slowly
            grown = max(rate, min(grown, limit * law.near))
        rate = law.bound(grown)
    return replace(pace, rate=rate, threshold=threshold, tokens=min(rate, pace.tokens), judged_at=now,
                   seen=outcomes, used=0, in_flight=in_flight, cut_at=cut_at, limit=limit)  # fmt: skip


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
