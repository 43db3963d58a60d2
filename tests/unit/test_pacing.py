"""The adaptive release's law (core/pacing.py) on a fake clock: grow while tasks succeed, cut back on bad news."""

from __future__ import annotations

import collections
import math
from dataclasses import replace
from typing import Any

import pytest

from celery_breaker.core.pacing import (
    DOUBLINGS_MOST,
    KEPT_MOST,
    LIMIT_AGAIN,
    LIMIT_LEAST,
    RATE_LEAST,
    RATE_MOST,
    SETTLE_LEAST,
    SETTLE_MOST,
    USUAL_LEAST,
    AdaptivePacer,
    Outcomes,
    Pace,
    PacingLaw,
    advance,
    allowed,
    begin,
    beyond_the_law,
    beyond_usual,
    took,
)
from celery_breaker.errors import ConfigurationError
from celery_breaker.testing import FakeClock

from .support import ROUND_LAW as LAW


class Downstream:
    """What the breaker counts: every released task succeeds, fails or is slow, as told."""

    def __init__(self) -> None:
        self.generation = 1
        self.successes = self.failures = self.slow = 0

    def outcomes(self) -> Outcomes:
        return Outcomes(generation=self.generation, successes=self.successes, failures=self.failures, slow=self.slow)


def run(pacer: AdaptivePacer, clock: FakeClock, downstream: Downstream, seconds: float, *, answer: str = "ok") -> int:
    """Release for ``seconds`` in 0.25 s ticks (a big backlog; exact in binary, so the rate
    is judged on whole seconds); every released task answers at once."""
    released = 0
    for _ in range(round(seconds * 4)):
        clock.advance(0.25)
        count = pacer.release(downstream.outcomes(), waiting=10_000)
        released += count
        if answer == "ok":
            downstream.successes += count
        elif answer == "slow":
            downstream.successes += count
            downstream.slow += count
        else:
            downstream.failures += count
    return released


def test_the_pace_starts_at_the_start_rate_with_nothing_held() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    assert pacer.release(downstream.outcomes(), waiting=100) == 0  # the first look only starts the pace
    assert pacer.rate == 5.0
    clock.advance(0.5)
    assert pacer.release(downstream.outcomes(), waiting=100) == 2  # 2.5 tokens


def test_the_rate_doubles_every_second_while_released_tasks_succeed() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    rates = []
    for _ in range(5):
        run(pacer, clock, downstream, 1.0)
        rates.append(pacer.rate)
    assert rates == [10.0, 20.0, 40.0, 80.0, 160.0]


def test_judgements_keep_their_own_cadence_when_looks_come_between() -> None:
    """The releasers look every few tenths of a second, not on the judgement's beat: each
    judgement is due ``judge_every`` after the previous one was due, not after the look
    that made it. Timed from the look, every step of the ramp came a look late (a
    judgement every ~0.62 s, not 0.5 s, in a real run: x1.72 a second, not x1.96)."""
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    start = clock.monotonic()
    rates = []
    for _ in range(16):  # looks 0.375 s apart, for 6 s; judgements due every 1 s
        clock.advance(0.375)
        downstream.successes += pacer.release(downstream.outcomes(), waiting=10_000)
        rates.append(pacer.rate)
    # judged at 1.125, 2.25, 3.0, 4.125, 5.25 and 6.0 s: six doublings (five, a look late each time)
    assert pacer.rate == 5.0 * 2**6
    assert rates.count(10.0) == 3  # (1.125 to 1.875 s)
    clock.advance(0.375)
    pacer.release(downstream.outcomes(), waiting=0)
    assert pacer.pace is not None
    assert pacer.pace.judged_at == start + 6.0  # (the last judgement's due time, not the look after it)


def test_failures_cut_the_rate_and_set_the_threshold_growth_is_then_gentler() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 4.0)
    assert pacer.rate == 80.0
    run(pacer, clock, downstream, 0.25, answer="fail")
    run(pacer, clock, downstream, 0.25)  # cut at the next look, not at the next judgement
    assert pacer.rate == pytest.approx(56.0)  # 80 * 0.7
    assert pacer.pace is not None
    assert pacer.pace.threshold == pytest.approx(56.0)
    run(pacer, clock, downstream, 5.0)  # (four seconds settling, then a whole one)
    assert pacer.rate == pytest.approx(56.0 * 1.1)  # a tenth more per second
    run(pacer, clock, downstream, 1.0)
    assert pacer.rate == pytest.approx(56.0 * 1.1 * 1.1)


def test_bad_news_that_goes_on_after_a_cut_cuts_again_but_not_at_once() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 4.0)
    run(pacer, clock, downstream, 4.0, answer="fail")
    assert pacer.rate == pytest.approx(56.0)  # the tasks released before the cut fail too: settling
    run(pacer, clock, downstream, 0.5, answer="fail")
    assert pacer.rate == pytest.approx(39.2)


def test_slow_calls_are_bad_news_like_failures() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 3.0)
    assert pacer.rate == 40.0
    run(pacer, clock, downstream, 0.25, answer="slow")
    run(pacer, clock, downstream, 0.25)
    assert pacer.rate == pytest.approx(28.0)


def test_a_few_failures_below_the_bad_share_do_not_cut_but_end_the_doubling() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 4.0)  # 80/s
    released = run(pacer, clock, downstream, 0.75)
    downstream.failures += 1  # 1 in ~80: under 5 %
    run(pacer, clock, downstream, 0.25)
    assert released > 20
    # Not cut, but the downstream's slow zone may be near: from here it grows by a tenth.
    assert pacer.rate == pytest.approx(88.0)
    assert pacer.pace is not None
    assert pacer.pace.threshold == 80.0
    run(pacer, clock, downstream, 1.0)
    assert pacer.rate == pytest.approx(96.8)


class Refusing(Downstream):
    """A downstream that refuses (429) some released tasks, asking the release to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0
        self.held_until: float | None = None

    def outcomes(self) -> Outcomes:
        return Outcomes(generation=self.generation, successes=self.successes, failures=self.failures, slow=self.slow,
                        refused=self.refused, held_until=self.held_until)  # fmt: skip

    def refuse(self, now: float, wait: float) -> None:
        self.failures += 1  # (a refusal is counted as a failure too)
        self.refused += 1
        self.held_until = max(self.held_until or now, now + wait)


def test_one_refusal_cuts_at_once_and_the_release_waits_as_long_as_asked() -> None:
    clock, downstream = FakeClock(), Refusing()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 4.0)
    assert pacer.rate == 80.0  # (just doubled: the tasks released since went at 40/s)
    downstream.refuse(clock.monotonic(), 1.5)  # one refusal: below least_bad's share, still bad news
    held = [run(pacer, clock, downstream, 0.25) for _ in range(6)]
    assert pacer.pace is not None
    # The limit is what came back with the refusal, 40/s (not 80/s, the rate by the time
    # the news came), and the cut is below it: 95 % of it, under 70 % of 80/s.
    assert pacer.pace.limit == pytest.approx(40.0)
    assert pacer.rate == pytest.approx(38.0)
    assert held == [0] * 5 + [9]  # nothing for 1.5 s, then the cut rate from empty
    assert pacer.pace.threshold == pytest.approx(38.0)


def test_a_refusal_sets_the_limit_at_what_the_downstream_took() -> None:
    """A rate limiter taking 150/s, met by a ramp that grew to 290/s by the news: its
    limit is the successes per second back with the refusal, and the cut goes below it.
    As the rate at the news, the limit (290/s) let the pace grow back past the capacity
    after every Retry-After, each refused again: 3.35x N / C with a 5 s wait."""
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    pace = Pace(generation=1, rate=290.0, threshold=None, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=140)
    news = Outcomes(generation=1, successes=1075, failures=30, slow=0, refused=30, held_until=15.5)
    cut = advance(LAW, pace, news, 10.5)
    assert cut.limit == pytest.approx(150.0)  # 75 successes in 0.5 s
    assert cut.rate == pytest.approx(142.5)
    # Few successes are a rough measure: the limit is at least LIMIT_LEAST of the rate.
    few = replace(news, successes=1010)
    assert advance(LAW, pace, few, 10.5).limit == pytest.approx(290.0 * LIMIT_LEAST)
    # None back but refusals (a burst, another client filling the limit): no measure at
    # all, the rate refused is the limit, as before.
    burst = replace(news, successes=1000)
    refused = advance(LAW, pace, burst, 10.5)
    assert refused.limit == 290.0
    assert refused.rate == pytest.approx(203.0)


def test_a_refusal_at_a_limit_already_set_measures_it_at_most_a_fifth_below_the_rate() -> None:
    """A pace back at 95 % of a limit, refused again before the rate held it a second (a
    limiter that takes a little less than the first refusal measured): the few successes
    back since the judgement measure it roughly, as at the first refusal, but the rate
    was no ramp's overshoot, set below a limit the downstream had taken once already: the
    limit is at least LIMIT_AGAIN (80 %) of the rate, not half of it. Against the bench's
    sliding window of 150/s, the release sat at 60 % of it for a plateau."""
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    pace = Pace(generation=1, rate=95.0, threshold=95.0, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=20,
                limit=100.0, at_limit=1)  # fmt: skip
    news = Outcomes(generation=1, successes=1008, failures=1, slow=0, refused=1, held_until=11.2)
    cut = advance(LAW, pace, news, 10.2)  # (8 successes in 0.2 s: 40/s)
    assert cut.limit == pytest.approx(95.0 * LIMIT_AGAIN)
    assert cut.rate == pytest.approx(95.0 * 0.7)  # (back_off: below 95 % of the limit)
    # A pace's first refusal (no limit yet: the ramp's overshoot) is measured as before.
    first = advance(LAW, replace(pace, limit=None, at_limit=0), news, 10.2)
    assert first.limit == pytest.approx(95.0 * LIMIT_LEAST)


def refused_at_80(law: PacingLaw = LAW) -> tuple[AdaptivePacer, FakeClock, Refusing]:
    """A pace held at 80/s (by a ceiling, then lifted), refused there once (a 0.25 s
    wait) with 80/s coming back, and cut to 56/s."""
    clock, downstream = FakeClock(), Refusing()
    pacer = AdaptivePacer(replace(law, ceiling=80.0), clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 5.0)
    assert pacer.rate == 80.0
    pacer.law = law
    downstream.refuse(clock.monotonic(), 0.25)
    run(pacer, clock, downstream, 0.5)
    assert pacer.pace is not None
    assert pacer.pace.limit == 80.0
    assert pacer.rate == pytest.approx(56.0)
    return pacer, clock, downstream


def test_refusals_heard_while_the_pace_settles_cut_once_but_each_wait_holds() -> None:
    pacer, clock, downstream = refused_at_80()
    downstream.refuse(clock.monotonic(), 1.0)  # news of the rate before the cut: no second cut
    assert run(pacer, clock, downstream, 0.75) == 0
    assert pacer.rate == pytest.approx(56.0)
    assert run(pacer, clock, downstream, 0.5) > 0


def test_after_a_refusal_growth_stops_short_of_the_rate_refused_and_probes_above_it_slowly() -> None:
    """A rate limiter that answers 429 with no slowdown first: the pace is refused at 80/s,
    cut to 56/s, grows back to 76/s (95 % of 80) and no further at once, then creeps up by
    half a percent of the limit per judgement, so the next refusal is far off."""
    pacer, clock, downstream = refused_at_80()
    assert pacer.pace is not None
    assert pacer.pace.limit == 80.0
    rates = []
    for _ in range(10):
        run(pacer, clock, downstream, 1.0)
        rates.append(round(pacer.rate, 2))
    # (4 s settling after the cut, x1.1 a second up to 76, then the limit creeps by half a
    # percent a judgement: 80 * 1.005 ** k, the rate at 95 % of it)
    assert rates == [56.0, 56.0, 56.0, 56.0, 61.6, 67.76, 74.54, 76.0, 76.38, 76.76]
    assert pacer.pace.limit == pytest.approx(80.0 * 1.005**2)


def at_the_limit(law: PacingLaw = LAW) -> tuple[AdaptivePacer, FakeClock, Refusing]:
    """A pace refused once at 80/s and back at its limit (76/s) eight seconds later."""
    pacer, clock, downstream = refused_at_80(law)
    run(pacer, clock, downstream, 8.0)
    assert pacer.pace is not None
    assert (pacer.rate, pacer.pace.limit, pacer.pace.at_limit) == (76.0, 80.0, 0)
    return pacer, clock, downstream


def test_a_refusal_not_met_again_is_dropped_after_the_plateau_and_the_rate_doubles_again() -> None:
    """A 429 that was a moment's (a burst at the downstream's restart, another client's
    spike), not its capacity: after ``plateau`` judgements at the limit the creep doubles
    every judgement, and once it would pass ``step`` the limit and its threshold are
    dropped. Kept for good, the limit held the release near the rate refused, creeping
    1 % a second: minutes for a backlog a healthy downstream takes in seconds."""
    pacer, clock, downstream = at_the_limit()
    assert pacer.pace is not None
    limits = []
    for _ in range(14):
        run(pacer, clock, downstream, 1.0)
        limits.append(pacer.pace.limit)
    lifts = [1.005] * 10 + [1.01, 1.02, 1.04, 1.08]  # (creep 0.005, plateau 10, step 0.1)
    expected, limit = [], 80.0
    for lift in lifts:
        limit *= lift
        expected.append(pytest.approx(limit))
    assert limits == expected
    assert pacer.rate == pytest.approx(80.0 * 0.95 * math.prod(lifts))  # (95 % of the limit just lifted)
    run(pacer, clock, downstream, 1.0)  # the next lift (1.16) would pass the step: dropped
    assert (pacer.pace.limit, pacer.pace.threshold, pacer.pace.at_limit) == (None, None, 0)
    before = pacer.rate
    run(pacer, clock, downstream, 1.0)
    assert pacer.rate == pytest.approx(before * 2.0)  # slow start again (ROUND_LAW: x2 a judgement)


def test_a_refusal_met_at_a_limit_held_keeps_the_limit_at_the_rate_refused() -> None:
    """A true rate limiter is met again while the limit still creeps slowly, after the rate
    had held at it for seconds: the downstream took about that rate, so the limit becomes
    the rate refused (not the successes of the look since the judgement, which measured a
    fixed window of 300/s refusing a 306/s release at 178/s), the cut goes to 95 % of it,
    and the plateau starts over, kept (decision 94)."""
    pacer, clock, downstream = at_the_limit()
    assert pacer.pace is not None
    run(pacer, clock, downstream, 6.0)
    assert pacer.pace.at_limit == 6
    refused_at = pacer.rate
    downstream.refuse(clock.monotonic(), 0.25)
    run(pacer, clock, downstream, 0.25)
    assert (pacer.pace.at_limit, pacer.pace.kept) == (0, 1)
    assert pacer.pace.limit == refused_at
    assert pacer.rate == pytest.approx(refused_at * 0.95)  # (0.7 of it, measured again, before)


def test_a_refusal_met_as_the_rate_reaches_its_limit_measures_it_again() -> None:
    """A limit met again within a second of the rate reaching it was no measure of the
    downstream (the first refusal's few successes, come back in a burst): it is measured
    again from what came back, and nothing is kept. Then, once the rate held a second at
    the new limit, a refusal there keeps it; a kept limit does not creep for twice the
    plateau (its downstream was refused just above it), then probes, and is dropped as any."""
    pacer, clock, downstream = at_the_limit()
    assert pacer.pace is not None
    run(pacer, clock, downstream, 1.0)
    assert pacer.pace.at_limit == 1
    refused_at = pacer.rate
    downstream.refuse(clock.monotonic(), 0.25)
    run(pacer, clock, downstream, 0.25)
    assert pacer.pace.kept == 0
    assert pacer.rate == pytest.approx(refused_at * 0.7)  # (measured: cut by back_off, the rule before)
    pacer, clock, downstream = at_the_limit()
    run(pacer, clock, downstream, 2.0)
    assert pacer.pace is not None
    assert pacer.pace.at_limit == 2
    refused_at = pacer.rate
    downstream.refuse(clock.monotonic(), 0.25)
    run(pacer, clock, downstream, 0.25)
    assert (pacer.pace.limit, pacer.pace.kept) == (refused_at, 1)
    held, lifts = [], []
    while pacer.pace.limit == refused_at:
        run(pacer, clock, downstream, 1.0)
        held.append(pacer.pace.at_limit)
    # (20 judgements at the limit without creep, twice the plateau; the next lifts it)
    assert held[-2:] == [2 * LAW.plateau, 2 * LAW.plateau + 1]
    limit = refused_at
    while pacer.pace.limit is not None:
        lifts.append(pacer.pace.limit / limit)
        limit = pacer.pace.limit
        run(pacer, clock, downstream, 1.0)
    assert lifts == pytest.approx([1.01, 1.02, 1.04, 1.08])  # (then dropped, as any limit)
    assert pacer.pace.kept == 0


def test_bad_news_at_the_limit_starts_its_plateau_over() -> None:
    pacer, clock, downstream = at_the_limit()
    assert pacer.pace is not None
    run(pacer, clock, downstream, 6.0)
    run(pacer, clock, downstream, 0.25, answer="slow")
    run(pacer, clock, downstream, 0.25)
    assert pacer.pace.at_limit == 0
    assert pacer.pace.limit == pytest.approx(80.0 * 1.005**6)  # (a cut without a refusal keeps the limit)


def test_without_creep_a_limit_is_never_dropped() -> None:
    pacer, clock, downstream = at_the_limit(replace(LAW, creep=0.0))
    run(pacer, clock, downstream, 60.0)
    assert pacer.pace is not None
    assert (pacer.rate, pacer.pace.limit) == (76.0, 80.0)


def test_without_creep_a_limit_held_for_half_an_hour_counts_its_judgements_no_further() -> None:
    """``at_limit`` stops at ``DOUBLINGS_MOST`` judgements past the plateau. Counted on, a
    limit held without creep for 1,024 judgements past it made ``creep * 2**at_limit`` an
    int too large for a float: the law raised OverflowError (where ``release.lua`` made the
    limit NaN, and restarted the pace at its next look)."""
    pacer, clock, downstream = at_the_limit(replace(LAW, creep=0.0))
    run(pacer, clock, downstream, 1_800.0)
    assert pacer.pace is not None
    assert (pacer.rate, pacer.pace.limit) == (76.0, 80.0)
    assert pacer.pace.at_limit == LAW.plateau + DOUBLINGS_MOST
    assert beyond_the_law(pacer.law, pacer.pace) is None


def test_a_kept_limits_plateau_doubles_kept_most_times_and_no_more() -> None:
    """A downstream that refuses the rate each time it has held its limit a second: each
    refusal keeps the limit, and its plateau doubles, ``KEPT_MOST`` times (85 min at the
    defaults); the next ones keep it as long. Counted on, ``kept`` grew without bound."""
    pacer, clock, downstream = at_the_limit()
    assert pacer.pace is not None
    kept = []
    for _ in range(KEPT_MOST + 3):
        while pacer.pace.at_limit < 2:
            run(pacer, clock, downstream, 1.0)
        downstream.refuse(clock.monotonic(), 0.25)
        run(pacer, clock, downstream, 0.25)
        kept.append(pacer.pace.kept)
        assert beyond_the_law(LAW, pacer.pace) is None
    assert kept == [*range(1, KEPT_MOST + 1), KEPT_MOST, KEPT_MOST, KEPT_MOST]
    assert pacer.pace.limit is not None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"threshold": RATE_MOST * 2}, "threshold"),
        ({"threshold": RATE_LEAST / 2}, "threshold"),
        ({"limit": RATE_MOST * 2}, "limit"),
        ({"limit": 1e-300}, "limit"),
        ({"kept": KEPT_MOST + 1}, "kept"),
        ({"kept": 0, "at_limit": LAW.plateau + DOUBLINGS_MOST + 1}, "at_limit"),
        ({"kept": 3, "at_limit": LAW.plateau * 8 + DOUBLINGS_MOST + 1}, "at_limit"),
        ({"judged_at": 10.0 + 2 * LAW.judge_every}, "judged_at"),
        ({"cut_at": 10.5}, "cut_at"),
        ({"cut_at": 9.0, "settle_until": 9.0 + 26 * LAW.judge_every}, "settle_until"),
        ({"used": 3 * int(RATE_MOST)}, "used"),
        ({"usual_bad": 60, "usual_seen": 60}, "usual_bad"),
    ],
)
def test_a_pace_no_step_of_the_law_writes_names_its_field(changes: dict[str, Any], field: str) -> None:
    seen = Outcomes(generation=1, successes=0, failures=0, slow=0)
    pace = Pace(generation=1, rate=50.0, threshold=40.0, tokens=0.0, at=10.0, judged_at=9.0, seen=seen, used=20,
                limit=60.0, kept=3, at_limit=LAW.plateau * 8 + DOUBLINGS_MOST, usual_bad=15, usual_seen=60)  # fmt: skip
    # (whatever the ceiling a worker is given: the status reads every pace without it,
    # storage/redis/parking.py SHOWN_LAW)
    for ceiling in (None, RATE_LEAST, 0.5, 40.0, RATE_MOST):
        law = replace(LAW, ceiling=ceiling)
        assert beyond_the_law(law, pace) is None  # (each at its bound)
        assert beyond_the_law(law, replace(pace, kept=KEPT_MOST)) is None
        assert beyond_the_law(law, replace(pace, **changes)) == field


@pytest.mark.parametrize("reader_ceiling", [0.5, None, 20.0])
def test_a_threshold_the_law_writes_under_a_ceiling_below_its_floor_is_within_it(
    reader_ceiling: float | None,
) -> None:
    """``breaker_release_rate=0.5``, below the floor: every rate is bounded to 0.5, the
    threshold of a reopened breaker's pace too. The law wrote it, so it is within its
    bounds, and within those of a worker with another ceiling (a rolling deploy). Before
    decision 103, ``release.lua`` restarted it with a WARNING at each look."""
    slow = replace(LAW, ceiling=0.5)
    seen = Outcomes(generation=1, successes=10, failures=0, slow=0)
    before = Pace(generation=1, rate=0.5, threshold=None, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=0)
    pace = advance(slow, before, replace(seen, generation=2, failures=1), 20.0)
    assert (pace.rate, pace.threshold) == (0.5, 0.5)
    assert beyond_the_law(replace(LAW, ceiling=reader_ceiling), pace) is None


def test_a_refusal_counted_under_an_earlier_generation_starts_no_cut() -> None:
    clock, downstream = FakeClock(), Refusing()
    downstream.refused, downstream.failures = 7, 7  # refusals before this pace began
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 2.0)
    assert pacer.rate == 20.0


def test_no_growth_without_successes_back_or_without_using_the_pace() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    for _ in range(30):  # released, but no outcome came back (the tasks are still running)
        clock.advance(0.1)
        pacer.release(downstream.outcomes(), waiting=10_000)
    assert pacer.rate == 5.0
    pacer = AdaptivePacer(LAW, clock)
    for _ in range(30):  # successes (other traffic), but a backlog too small to use the pace
        clock.advance(0.1)
        downstream.successes += 10
        pacer.release(downstream.outcomes(), waiting=0)
    assert pacer.rate == 5.0


def test_the_ceiling_and_the_floor_bound_the_rate() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(replace(LAW, ceiling=30.0), clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 6.0)
    assert pacer.rate == 30.0
    run(pacer, clock, downstream, 45.0, answer="fail")  # (a cut every 4 s: 30 * 0.7 ** 10 < 1)
    assert pacer.rate == 1.0
    assert PacingLaw().bound(1e300) == RATE_MOST  # (no ceiling: a million a second, at most)


def test_a_lower_ceiling_holds_a_pace_grown_above_it_at_once() -> None:
    """Workers restarted with a lower ``breaker_release_rate`` while a release is under way
    (same generation): the stored rate is held to the new ceiling at the next look, even
    while no released task answers (before, only a growth step or a cut bounded it, and
    the release went on at the old rate)."""
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 5.0)
    assert pacer.rate == 160.0
    pacer.law = replace(LAW, ceiling=20.0)
    released = 0
    for _ in range(20):  # 5 s; nothing comes back (the tasks queue up downstream)
        clock.advance(0.25)
        released += pacer.release(downstream.outcomes(), waiting=10_000)
    assert pacer.rate == 20.0
    assert released <= 20 * 5 + 20  # at most the ceiling's pace, with one second saved up


def test_a_new_generation_restarts_the_pace_below_the_rate_it_had_reached() -> None:
    """The breaker reopened (the release script then releases nothing) and closed again."""
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(LAW, clock)
    pacer.release(downstream.outcomes(), waiting=0)
    run(pacer, clock, downstream, 5.0)
    assert pacer.rate == 160.0
    downstream.generation += 3  # open, half-open, closed
    clock.advance(30)
    assert pacer.release(downstream.outcomes(), waiting=10_000) == 0  # nothing held across the outage
    assert pacer.rate == 5.0
    assert pacer.pace is not None
    assert pacer.pace.threshold == pytest.approx(112.0)
    run(pacer, clock, downstream, 5.0)
    assert pacer.rate == pytest.approx(112.0)  # 10, 20, 40, 80, then the threshold


def test_counts_that_went_back_are_a_new_baseline() -> None:
    """A breaker whose state expired starts counting from 0 under the same generation."""
    clock = FakeClock()
    law = LAW
    pace = begin(law, Outcomes(generation=0, successes=500, failures=50, slow=0), clock.monotonic())
    clock.advance(1.0)
    pace = advance(law, pace, Outcomes(generation=0, successes=3, failures=0, slow=0), clock.monotonic())
    assert pace.rate == 5.0
    assert pace.seen.successes == 3


def test_at_most_one_seconds_worth_is_held() -> None:
    clock = FakeClock()
    law = LAW
    outcomes = Outcomes(generation=0, successes=0, failures=0, slow=0)
    pace = begin(law, outcomes, clock.monotonic())
    pace = advance(law, pace, outcomes, clock.advance(0.5))
    pace = advance(law, pace, outcomes, clock.advance(0.4))
    assert allowed(pace) == 4
    pace = took(pace, 4)
    assert pace.tokens == pytest.approx(0.5)
    assert pace.used == 4
    pace = advance(law, pace, outcomes, clock.advance(60.0))  # a minute without a look
    assert allowed(pace) == 5


@pytest.mark.parametrize(
    "changes",
    [{"start": 0}, {"ceiling": -1.0}, {"ceiling": 2e6}, {"back_off": 1.0}, {"bad_share": 1.0}, {"floor": 20.0},
     {"judge_every": float("nan")}, {"judge_every": 11.0}, {"slow_start": 0.5}, {"least_bad": 0}, {"in_flight_s": 0.0},
     {"plateau": -1}, {"plateau": 1.5}],
)  # fmt: skip
def test_a_bad_law_names_its_field(changes: dict[str, Any]) -> None:
    (field,) = changes
    with pytest.raises(ConfigurationError, match=f"PacingLaw.{field}"):
        PacingLaw(**changes)


def test_after_a_cut_bad_news_while_tasks_released_before_it_are_owed_cuts_nothing() -> None:
    """The tasks released before the cut are still queued in the broker: their slow calls
    are old news, however long after the cut they come back."""
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    news = Outcomes(generation=1, successes=1040, failures=0, slow=40)
    pace = Pace(generation=1, rate=50.0, threshold=50.0, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=40,
                in_flight=200, cut_at=5.0, owed=200, settle_until=20.0)  # fmt: skip
    held = advance(LAW, pace, news, 11.0)  # 6 s after the cut, 40 of the 200 owed came back
    assert held.rate == 50.0
    assert held.owed == 160
    assert advance(LAW, replace(pace, owed=0), news, 11.0).rate == 35.0  # nothing owed: news of this rate
    assert advance(LAW, replace(pace, cut_at=None), news, 11.0).rate == 35.0  # (the first cut always goes)
    assert advance(LAW, pace, news, 20.0).rate == 35.0  # owed for too long: the estimate no longer holds


def test_a_cut_owes_what_is_in_flight_and_judges_again_once_it_came_back() -> None:
    """An overshoot is one cut: the tasks it released drain from the broker at the
    workers' speed, slow all the way, and only the outcomes after theirs judge the cut rate
    -- at once, even while many tasks are in flight."""
    law = replace(LAW, in_flight_s=1.0)
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    pace = Pace(generation=1, rate=100.0, threshold=None, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=50,
                in_flight=250)  # fmt: skip
    slow = replace(seen, successes=1020, slow=20)
    cut = advance(law, pace, slow, 10.5)
    assert cut.rate == pytest.approx(70.0)
    assert (cut.cut_at, cut.owed) == (10.5, 280)  # 250 + 50 released - 20 back
    assert cut.settle_until == pytest.approx(10.5 + 4.0 + 2 * 280 / 70.0)  # (SETTLE_LEAST: 4 judgements)
    pace = cut
    for second in range(1, 6):  # 50 slow outcomes a second, 50 more released: 250 of 280 back
        news = replace(pace.seen, successes=pace.seen.successes + 50, slow=pace.seen.slow + 50)
        pace = advance(law, replace(pace, used=50), news, 10.5 + second)
        assert pace.rate == pytest.approx(70.0), f"second {second}"  # (the fifth: owed, past the least)
    assert pace.owed == 30
    news = replace(pace.seen, successes=pace.seen.successes + 50, slow=pace.seen.slow + 50)
    pace = advance(law, replace(pace, used=50), news, 16.5)  # the last 30 owed among them: still old news
    assert pace.rate == pytest.approx(70.0)
    assert pace.owed == 0
    assert pace.in_flight > law.in_flight_s * pace.rate  # (many in flight: news is judged all the same)
    news = replace(pace.seen, successes=pace.seen.successes + 50, slow=pace.seen.slow + 50)
    assert advance(law, replace(pace, used=50), news, 17.5).rate == pytest.approx(49.0)


def test_the_law_text_is_what_release_lua_reads() -> None:
    assert LAW.text() == "5.0;;1.0;2.0;0.1;0.7;0.05;1.0;1.0;1000.0;0.95;0.005;10.0"
    assert replace(LAW, ceiling=150).text() == "5.0;150.0;1.0;2.0;0.1;0.7;0.05;1.0;1.0;1000.0;0.95;0.005;10.0"


def test_bad_news_better_than_the_cuts_holds_the_rate_worse_news_cuts_again() -> None:
    """A downstream with a memory (a queue, a rate window) stays slow for a while after
    the cut: news that improves shows the cut working and cuts nothing more; news no
    better than the cut's cuts again; news without bad news ends the comparison."""
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    pace = Pace(generation=1, rate=100.0, threshold=None, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=100)
    pace = advance(LAW, pace, replace(seen, successes=1100, slow=30), 10.5)  # 30 % slow: cut
    assert (pace.rate, pace.cut_share) == pytest.approx((70.0, 0.3))

    def news(slow: int, at: float, current: Pace) -> Pace:
        released = round(70 * (at - current.judged_at))  # (the pace used)
        outcomes = replace(current.seen, successes=current.seen.successes + released, slow=current.seen.slow + slow)
        return advance(LAW, replace(current, used=released), outcomes, at)

    # (after the four judgements a cut holds them, SETTLE_LEAST)
    eased = news(63, 15.0, pace)  # 20 %: better, held
    assert (eased.rate, eased.cut_share, eased.cut_at) == pytest.approx((70.0, 0.2, 10.5))
    assert news(14, 16.0, eased).rate == pytest.approx(49.0)  # 20 % again: no better, cut
    assert news(95, 15.0, pace).rate == pytest.approx(49.0)  # 30 %: as bad as the cut's, cut
    quiet = news(0, 15.0, pace)  # good news: grown, and the cut's share forgotten
    assert quiet.rate == pytest.approx(77.0)
    assert quiet.cut_share is None
    assert news(7, 16.0, quiet).rate == pytest.approx(53.9)  # 10 %: bad news cuts at once


def cut_at_30_percent() -> Pace:
    """A pace at 100/s cut to 70/s at 10.5 by news 30 % slow, nothing in flight."""
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    pace = Pace(generation=1, rate=100.0, threshold=None, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=100)
    return advance(LAW, pace, replace(seen, successes=1100, slow=30), 10.5)


def test_a_refusal_cuts_even_when_its_news_is_better_than_the_cuts() -> None:
    pace = cut_at_30_percent()
    news = replace(pace.seen, successes=pace.seen.successes + 315, failures=1, refused=1)  # 0.3 %, one refused
    refused = advance(LAW, replace(pace, used=315), news, 15.0)
    assert refused.rate == pytest.approx(49.0)
    assert refused.limit == pytest.approx(70.0)


def test_better_bad_news_is_compared_only_over_a_whole_judgement() -> None:
    """A look 0.25 s after the last judgement brings a few slow calls: its share (over a
    judgement's worth at the rate) would look better than any, and is left for the
    judgement to come rather than becoming the share to beat."""
    pace = cut_at_30_percent()
    pace = advance(LAW, replace(pace, used=262), replace(pace.seen, successes=pace.seen.successes + 262), 14.25)
    assert pace.cut_share == pytest.approx(0.3)  # (still settling: the outcomes judged nothing)
    early = replace(pace.seen, successes=pace.seen.successes + 10, slow=pace.seen.slow + 4)
    looked = advance(LAW, replace(pace, used=35), early, 14.75)  # settled; 0.5 s since the last look
    assert looked.seen == pace.seen  # not judged: the outcomes wait for the judgement
    assert looked.cut_share == pace.cut_share


def test_a_refusal_heard_while_settling_caps_the_limit_at_the_rate_before_the_cut() -> None:
    pace = cut_at_30_percent()  # (no refusal yet: no limit)
    assert pace.limit is None
    news = replace(pace.seen, successes=pace.seen.successes + 70, failures=1, refused=1)
    settling = advance(LAW, replace(pace, used=70), news, 11.5)
    assert settling.rate == pytest.approx(70.0)  # old news: no second cut
    assert settling.limit == pytest.approx(100.0)  # 70 / 0.7: the rate it was released at
    lower = advance(LAW, replace(settling, used=70, limit=90.0), replace(news, failures=2, refused=2), 12.5)
    assert lower.limit == 90.0  # (a limit already lower stays)


def test_owed_outcomes_hold_judgement_for_at_most_settle_most_judgements() -> None:
    law = replace(LAW, in_flight_s=1.0)
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    pace = Pace(generation=1, rate=100.0, threshold=None, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=0,
                in_flight=1_000_000)  # fmt: skip
    cut = advance(law, pace, replace(seen, successes=1020, slow=20), 10.5)
    assert cut.owed == 1_000_000 - 20
    assert cut.settle_until == pytest.approx(10.5 + (SETTLE_LEAST + SETTLE_MOST) * law.judge_every)


def test_a_clock_that_steps_back_holds_nothing_back() -> None:
    """Redis's clock steps back after a failover to a server whose clock is behind (the
    law is given each reading: no monotonic clock here): the pace's times move back with
    it. Kept ahead of the clock, they released nothing (and judged nothing) for as long
    as the step: 100 s here."""
    law, successes, now = LAW, 0, 1000.0
    pace = begin(law, Outcomes(generation=0, successes=0, failures=0, slow=0), now)
    released = []
    for tick in range(13):  # 2 s in 0.25 s ticks, a look 100 s earlier, then 1 s more
        now += 0.25 if tick != 8 else -100.0
        pace = advance(law, pace, Outcomes(generation=0, successes=successes, failures=0, slow=0), now)
        count = allowed(pace)
        pace = took(pace, count)
        successes += count
        released.append(count)
    assert released[:8] == [1, 1, 1, 2, 2, 3, 2, 3]  # 5/s, then 10/s
    assert released[8:] == [0, 5, 5, 5, 5]  # 20/s at once after the step (it lasted no time)
    assert pace.rate == 40.0  # and judged a second after it
    assert pace.at == now


def test_while_a_cut_settles_nothing_goes_beyond_what_comes_back() -> None:
    # A downstream that slows to 50 a second (every call slow) while 289 a second are
    # released: the pace is cut, and its settling held judgement for up to 12 s while the
    # release went on at the cut rate. The whole backlog went to the broker (904 tasks
    # queued there at the worst), ahead of every other task of its queue. Now, while the
    # cut settles, nothing goes while more is in flight than in_flight_s at the cut rate.
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(PacingLaw(), clock)  # (the defaults)
    backlog, queued, done, worst = 1500, 0.0, 0.0, 0.0
    for tick in range(200):  # 40 s in 0.2 s ticks; slow from 5 s to 20 s
        clock.advance(0.2)
        count = pacer.release(downstream.outcomes(), waiting=backlog)
        backlog -= count
        queued += count
        slow = 5 <= tick * 0.2 < 20
        finished = min(queued, (50 if slow else 400) * 0.2)
        queued -= finished
        done += finished
        new = int(done) - downstream.successes
        downstream.successes += new
        if slow:
            downstream.slow += new
        worst = max(worst, queued)
    assert worst < 450  # (904 before: the whole backlog)
    assert backlog == 0
    assert queued < 1  # and it drained, 22 s in (21 s before)


def drain(pacer: AdaptivePacer, clock: FakeClock, downstream: Downstream, backlog: int, slow_share: Any) -> float:
    """Seconds until ``backlog`` tasks have gone through workers that run 600 a second,
    against a downstream with no limit whose calls are slow at ``slow_share(rate)``
    (evenly: every 1/share-th call), in 0.2 s ticks."""
    queued, done, owed_slow = 0.0, 0.0, 0.0
    for tick in range(1, 3001):
        clock.advance(0.2)
        count = pacer.release(downstream.outcomes(), waiting=backlog)
        backlog -= count
        queued += count
        finished = min(queued, 600 * 0.2)
        queued -= finished
        done += finished
        new = int(done) - downstream.successes
        downstream.successes += new
        owed_slow += new * slow_share(pacer.rate)
        downstream.slow += int(owed_slow)
        owed_slow -= int(owed_slow)
        if backlog == 0 and queued < 1:
            return tick * 0.2
    return math.inf


@pytest.mark.parametrize("share", [0.08, 0.15])
def test_a_downstream_slow_at_a_steady_share_whatever_the_load_is_not_held_back(share: float) -> None:
    # Slowness the release does not cause: 8 % of the calls slow at any rate. Every
    # judgement's few slow calls were bad news, the pace was cut again and again, and held
    # near least_bad / (judge_every * share): 3,000 tasks took 62 s (113 s at 15 %),
    # where a downstream without slow calls takes 10 s.
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(PacingLaw(), clock)  # (the defaults)
    assert drain(pacer, clock, downstream, 3000, lambda rate: share) < 25
    assert pacer.pace is not None
    assert pacer.pace.usual == pytest.approx(share, abs=0.02)  # learnt from the first judgements


def test_slowness_beyond_the_usual_share_still_cuts_the_pace() -> None:
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(PacingLaw(), clock)
    # 8 % slow at any rate, then 40 % once the release passes 150 a second.
    drain(pacer, clock, downstream, 3000, lambda rate: 0.08 if rate < 150 else 0.4)
    assert pacer.pace is not None
    assert pacer.pace.cut_at is not None
    assert pacer.pace.threshold is not None
    assert pacer.pace.threshold < 150


def test_the_usual_share_is_learnt_at_the_start_and_then_kept() -> None:
    # Learnt all along, a downstream that slows as the load grows (the share of slow calls
    # in proportion to the rate) had its slowness taken for its usual one, step by step:
    # the pace ended where most calls were slow. The share the first judgements show
    # (at the lowest rates of the pace) is kept for the rest of it.
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(PacingLaw(), clock)
    drain(pacer, clock, downstream, 30_000, lambda rate: min(1.0, rate / 300))
    assert pacer.pace is not None
    assert USUAL_LEAST <= pacer.pace.usual_seen < 2 * USUAL_LEAST
    assert pacer.pace.usual < 0.15
    assert pacer.rate < 120  # (where 40 % of the calls are slow; learnt all along, it passed 240)


def test_without_a_usual_share_every_bad_outcome_counts() -> None:
    pace = begin(PacingLaw(), Outcomes(generation=1, successes=0, failures=0, slow=0), 0.0)
    assert beyond_usual(pace, 3, 100) == 3.0
    pace = replace(pace, usual_bad=4, usual_seen=USUAL_LEAST - 1)  # (too few outcomes yet)
    assert pace.usual == 0.0
    assert beyond_usual(pace, 3, 100) == 3.0
    pace = replace(pace, usual_bad=5, usual_seen=USUAL_LEAST)  # 10 %
    assert pace.usual == pytest.approx(0.1)
    assert beyond_usual(pace, 10, 100) == 0.0  # 10 expected, and chance: 2 * sqrt(10)
    assert beyond_usual(pace, 20, 100) == pytest.approx(20 - 10 - 2 * math.sqrt(10))


def test_a_few_outcomes_all_bad_are_news_whatever_the_usual_share() -> None:
    # With the usual share's allowance taken off before least_bad was applied, a judgement
    # of 3 outcomes, all slow, was no news once any share was learnt (2 % here): a slow
    # downstream at low rates was never cut.
    law = PacingLaw()
    pace = replace(begin(law, Outcomes(generation=1, successes=0, failures=0, slow=0), 0.0), rate=6.0, usual_bad=1,
                   usual_seen=USUAL_LEAST, used=3)  # fmt: skip
    pace = advance(law, pace, Outcomes(generation=1, successes=3, failures=0, slow=3), 0.5)
    assert pace.rate == pytest.approx(6.0 * law.back_off)
    assert pace.cut_at == 0.5


def test_a_downstream_strained_at_the_start_rate_teaches_no_usual_share() -> None:
    # A downstream still recovering, slower than the start rate (5 calls a second, FIFO,
    # a call slow once it waited 0.1 s): its first judgements bring only a bad outcome or
    # two each, too few to be news, and were learnt as its usual share (39 %), which then
    # hid the strain: the pace grew to 14/s and 724 tasks queued. Judgements more than
    # USUAL_MOST bad teach nothing now.
    clock, downstream = FakeClock(), Downstream()
    pacer = AdaptivePacer(PacingLaw(), clock)
    queue: collections.deque[float] = collections.deque()
    credit, backlog, longest = 0.0, 20_000, 0
    for tick in range(1, 2401):  # 120 s in 0.05 s ticks
        now = tick * 0.05
        clock.advance(0.05)
        count = pacer.release(downstream.outcomes(), waiting=backlog)
        backlog -= count
        queue.extend([now] * count)
        credit += 5 * 0.05
        while queue and credit >= 1:
            credit -= 1
            downstream.successes += 1
            if now - queue.popleft() + 0.02 >= 0.1:
                downstream.slow += 1
        credit = credit if queue else min(credit, 1.0)
        longest = max(longest, len(queue)) if tick > 1200 else longest
    assert pacer.pace is not None
    assert pacer.pace.usual == 0.0
    assert longest < 20  # (724 at the end, and growing)


def through_workers(pacer: AdaptivePacer, clock: FakeClock, backlog: int, *, latency: float, slots: int) -> Any:
    """Release ``backlog`` tasks to ``slots`` workers whose calls take ``latency`` seconds
    each (a downstream with no limit), in 0.2 s ticks: ``(seconds to drain, most tasks
    queued in the broker at once, highest rate)``."""
    downstream = Downstream()
    queued: collections.deque[float] = collections.deque()
    running: list[float] = []
    most_queued, peak = 0, 0.0
    for tick in range(1, 3001):
        now = tick * 0.2
        clock.advance(0.2)
        done = [end for end in running if end <= now + 1e-9]
        running = [end for end in running if end > now + 1e-9]
        downstream.successes += len(done)
        count = pacer.release(downstream.outcomes(), waiting=backlog)
        backlog -= count
        queued.extend([now] * count)
        while queued and len(running) < slots:
            queued.popleft()
            running.append(now + latency)
        most_queued, peak = max(most_queued, len(queued)), max(peak, pacer.rate)
        if backlog == 0 and not queued and not running:
            return now, most_queued, peak
    return math.inf, most_queued, peak


@pytest.mark.parametrize("latency", [2.0, 2.5, 5.0])
def test_a_downstream_slow_to_answer_is_released_at_the_workers_speed(latency: float) -> None:
    # Calls that take 2 s or more, 100 workers (40 to 50 a second), 1,000 tasks: a latency's
    # worth of releases is always in flight, above in_flight_s's worth, and the rule that
    # held growth on it kept the release at its start rate, 10 a second, for good: 102 to
    # 105 s. Growth is held only while fewer come back than went, no more than before.
    clock = FakeClock()
    took, _, peak = through_workers(AdaptivePacer(PacingLaw(), clock), clock, 1_000, latency=latency, slots=100)
    assert peak > 50
    assert took < 1_000 / (100 / latency) + 15  # (the workers' time, plus the ramp and a latency or two)


def test_tasks_queueing_behind_busy_workers_hold_the_rate_that_keeps_up_with_them() -> None:
    law = replace(LAW, in_flight_s=1.0)
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    pace = Pace(generation=1, rate=100.0, threshold=None, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=100,
                delivered=40.0)  # fmt: skip
    for second in range(1, 11):  # 100 released a second, 40 come back: they queue, no growth
        news = replace(pace.seen, successes=pace.seen.successes + 40)
        pace = advance(law, replace(pace, used=100), news, 10.0 + second)
        assert pace.rate == 100.0, f"second {second}"
        assert pace.delivered == 40.0
    # Fewer back than went, but more than before (a slow downstream's outcomes coming back a
    # latency after the rate grew): not queueing.
    news = replace(pace.seen, successes=pace.seen.successes + 60)
    pace = advance(law, replace(pace, used=100), news, 21.0)
    assert pace.rate == 200.0
    # As many back as went: not queueing, whatever came back before.
    pace = replace(pace, delivered=1_000.0)
    news = replace(pace.seen, successes=pace.seen.successes + 200)
    assert advance(law, replace(pace, used=200), news, 22.0).rate == 400.0


def test_a_latency_in_flight_is_no_queue() -> None:
    # 2.5 s calls, the rate held at 40 a second: 100 in flight (2.5 s of them, above
    # in_flight_s), and 40 a second come back: the rate grows.
    seen = Outcomes(generation=1, successes=1000, failures=0, slow=0)
    pace = Pace(generation=1, rate=40.0, threshold=None, tokens=0.0, at=10.0, judged_at=10.0, seen=seen, used=40,
                in_flight=100, delivered=40.0)  # fmt: skip
    law = replace(LAW, in_flight_s=1.5)
    assert pace.in_flight > law.in_flight_s * pace.rate
    news = replace(seen, successes=1040)
    assert advance(law, pace, news, 11.0).rate == 80.0
