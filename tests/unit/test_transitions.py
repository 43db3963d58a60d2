"""Every transition: the legal-move table, the automatic moves and the operator moves from every state."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.core import TRANSITIONS, Transition
from celery_breaker.core.state import IllegalTransition, check_transition
from celery_breaker.testing import FakeClock, fresh_store

from .support import fail, ok, state_of

AUTOMATIC = {
    (State.CLOSED, State.OPEN): "trip",
    (State.OPEN, State.HALF_OPEN): "open duration over",
    (State.HALF_OPEN, State.OPEN): "probe failed",
    (State.HALF_OPEN, State.CLOSED): "probes succeeded",
}
OPERATOR_TARGETS = (State.CLOSED, State.FORCED_OPEN, State.DISABLED)
ALL_PAIRS = list(itertools.product(State, State))


def make(clock: FakeClock, **policy: Any) -> tuple[CircuitBreaker, list[Transition]]:
    breaker = CircuitBreaker("svc", BreakerPolicy(**policy), storage=fresh_store(), clock=clock)
    seen: list[Transition] = []
    breaker.add_listener(seen.append)
    return breaker, seen


def moves(seen: list[Transition]) -> list[tuple[State, State]]:
    return [(t.source, t.target) for t in seen]


# -- the table ------------------------------------------------------------------


def test_table_holds_exactly_the_automatic_and_operator_moves() -> None:
    expected = dict(AUTOMATIC)
    for source in State:
        for target in OPERATOR_TARGETS:
            expected[(source, target)] = "operator"
    assert set(expected) == set(TRANSITIONS)
    # HALF_OPEN -> CLOSED is both automatic and an operator move: 4 + 15 - 1 pairs.
    assert len(TRANSITIONS) == 4 + len(State) * len(OPERATOR_TARGETS) - 1
    for pair in set(expected) - set(AUTOMATIC):
        assert TRANSITIONS[pair] == "operator"


def test_automatic_moves_keep_their_reason_in_the_table() -> None:
    for pair, reason in AUTOMATIC.items():
        assert TRANSITIONS[pair] == reason


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS, ids=[f"{s.value}->{t.value}" for s, t in ALL_PAIRS])
def test_check_transition_allows_table_pairs_and_rejects_others(source: State, target: State) -> None:
    if (source, target) in TRANSITIONS:
        assert check_transition(source, target) == TRANSITIONS[(source, target)]
    else:
        with pytest.raises(IllegalTransition, match=f"from {source.value} to {target.value}"):
            check_transition(source, target)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (State.CLOSED, State.HALF_OPEN),
        (State.OPEN, State.OPEN),
        (State.FORCED_OPEN, State.OPEN),
        (State.FORCED_OPEN, State.HALF_OPEN),
        (State.DISABLED, State.OPEN),
        (State.DISABLED, State.HALF_OPEN),
        (State.HALF_OPEN, State.HALF_OPEN),
    ],
)
def test_known_illegal_pairs_raise(source: State, target: State) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(source, target)


def test_state_values_are_their_strings() -> None:
    assert [str(s) for s in State] == ["closed", "open", "half_open", "forced_open", "disabled"]
    assert State("half_open") is State.HALF_OPEN


# -- automatic moves -------------------------------------------------------------


def test_closed_to_open_on_trip(clock: FakeClock) -> None:
    breaker, seen = make(clock, failure_threshold=3)
    fail(breaker, 2)
    assert state_of(breaker) is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN
    assert moves(seen) == [(State.CLOSED, State.OPEN)]
    assert seen[0].reason == "3 failures within 60 s"


def test_open_to_half_open_only_on_the_next_call_after_reset_timeout(clock: FakeClock) -> None:
    breaker, seen = make(clock, failure_threshold=1, reset_timeout=30)
    fail(breaker)
    clock.advance(30)
    assert state_of(breaker) is State.OPEN  # nothing reads the clock until a call arrives
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.HALF_OPEN
    assert moves(seen) == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN)]
    assert seen[1].reason == "open duration over"


def test_half_open_to_closed_after_success_threshold_successes(clock: FakeClock) -> None:
    breaker, seen = make(clock, failure_threshold=1, success_threshold=3, half_open_max_calls=3)
    fail(breaker)
    clock.advance(30)
    breaker.call(ok)
    breaker.call(ok)
    assert state_of(breaker) is State.HALF_OPEN
    breaker.call(ok)
    assert state_of(breaker) is State.CLOSED
    assert moves(seen)[-1] == (State.HALF_OPEN, State.CLOSED)
    assert seen[-1].reason == "3 probes succeeded"


def test_half_open_to_open_on_any_failure_even_after_successes(clock: FakeClock) -> None:
    breaker, seen = make(clock, failure_threshold=1, success_threshold=3, half_open_max_calls=3)
    fail(breaker)
    clock.advance(30)
    breaker.call(ok)
    breaker.call(ok)
    fail(breaker)
    assert state_of(breaker) is State.OPEN
    assert moves(seen)[-1] == (State.HALF_OPEN, State.OPEN)
    assert seen[-1].reason == "probe failed"
    assert breaker.snapshot().trips == 2


def test_slow_probe_reopens_when_slow_call_duration_is_set(clock: FakeClock) -> None:
    breaker, seen = make(
        clock, failure_threshold=1, slow_call_duration=2.0, slow_call_rate_threshold=1.0, minimum_calls=100
    )
    fail(breaker)
    clock.advance(30)

    def slow() -> str:
        clock.advance(2.0)
        return "late but fine"

    assert breaker.call(slow) == "late but fine"
    assert state_of(breaker) is State.OPEN
    assert seen[-1].reason == "slow probe"


def test_fast_enough_probe_is_a_success_with_slow_call_duration_set(clock: FakeClock) -> None:
    breaker, _ = make(
        clock,
        failure_threshold=1,
        success_threshold=1,
        slow_call_duration=2.0,
        slow_call_rate_threshold=1.0,
        minimum_calls=100,
    )
    fail(breaker)
    clock.advance(30)

    def quick() -> None:
        clock.advance(1.99)

    breaker.call(quick)
    assert state_of(breaker) is State.CLOSED


# -- operator moves from every state ------------------------------------------------


def put_in(state: State, breaker: CircuitBreaker, clock: FakeClock) -> None:
    if state is State.OPEN:
        fail(breaker, 5)
    elif state is State.HALF_OPEN:
        fail(breaker, 5)
        clock.advance(30)
        breaker.call(ok)  # one of the two successes needed to close
    elif state is State.FORCED_OPEN:
        breaker.force_open()
    elif state is State.DISABLED:
        breaker.disable()
    assert breaker.state is state


OPERATIONS: dict[str, tuple[Callable[[CircuitBreaker], None], State]] = {
    "force_open": (CircuitBreaker.force_open, State.FORCED_OPEN),
    "disable": (CircuitBreaker.disable, State.DISABLED),
    "force_closed": (CircuitBreaker.force_closed, State.DISABLED),
    "close": (CircuitBreaker.close, State.CLOSED),
    "reset": (CircuitBreaker.reset, State.CLOSED),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("source", list(State), ids=[s.value for s in State])
def test_operator_moves_from_every_state(clock: FakeClock, source: State, operation: str) -> None:
    breaker, seen = make(clock)
    put_in(source, breaker, clock)
    generation = breaker.snapshot().generation
    operate, target = OPERATIONS[operation]
    made = len(seen)
    operate(breaker)
    assert breaker.state is target
    if source is target:  # already there, and this fresh breaker holds nothing to forget
        assert breaker.snapshot().generation == generation
        assert len(seen) == made  # no transition: a move that changes nothing is none
        return
    assert breaker.snapshot().generation == generation + 1
    assert moves(seen)[-1] == (source, target)
    assert seen[-1].reason == ("reset" if operation == "reset" else "operator")


def test_a_close_or_reset_that_forgets_something_is_a_move_and_the_next_is_none(clock: FakeClock) -> None:
    """``celery control`` sends one action to every worker: with a shared store the first
    makes the move, and the others find nothing left to change."""
    breaker, seen = make(clock)
    fail(breaker, 2)  # closed, with two failures in its window
    breaker.close()  # forgets them: a move, which fences the calls in flight
    assert (moves(seen), breaker.snapshot().window_failures) == ([(State.CLOSED, State.CLOSED)], 0)
    breaker.close()
    assert len(seen) == 1
    breaker.reset()  # lifetime counters to zero: a move
    assert len(seen) == 2
    assert breaker.snapshot().failures == 0
    breaker.reset()
    assert len(seen) == 2
    breaker.force_open()
    breaker.force_open()
    assert moves(seen)[2:] == [(State.CLOSED, State.FORCED_OPEN)]
    assert breaker.snapshot().generation == 3


def test_forced_open_rejects_forever_until_an_operator_acts(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    breaker.force_open()
    clock.advance(10 * 24 * 3600)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    assert state_of(breaker) is State.FORCED_OPEN
    breaker.close()
    assert breaker.call(ok) == "ok"


def test_disabled_admits_everything_and_never_trips(clock: FakeClock) -> None:
    breaker, seen = make(clock, failure_threshold=1)
    breaker.disable()
    fail(breaker, 50)
    assert state_of(breaker) is State.DISABLED
    assert breaker.call(ok) == "ok"
    assert moves(seen) == [(State.CLOSED, State.DISABLED)]
    assert breaker.snapshot().failures == 50


def test_close_keeps_lifetime_counters_but_clears_the_window(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=3)
    fail(breaker, 3)
    breaker.close()
    snap = breaker.snapshot()
    assert (snap.failures, snap.trips, snap.window_failures) == (3, 1, 0)
    fail(breaker, 2)
    assert state_of(breaker) is State.CLOSED  # the 3 old failures no longer count


def test_reset_forgets_counters(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=3)
    fail(breaker, 3)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    breaker.reset()
    snap = breaker.snapshot()
    assert (snap.failures, snap.successes, snap.rejections, snap.trips) == (0, 0, 0, 0)
    assert (snap.last_failure, snap.opened_at) == (None, None)


# -- transition records ----------------------------------------------------------------


def test_listener_receives_frozen_transition_records(clock: FakeClock) -> None:
    breaker, seen = make(clock, failure_threshold=2, reset_timeout=30)
    fail(breaker, 2)
    (trip,) = seen
    assert (trip.name, trip.key, trip.label) == ("svc", None, "svc")
    assert trip.at == clock.time()
    assert trip.open_until == clock.time() + 30
    assert (trip.failures, trip.calls, trip.trips, trip.generation) == (2, 0, 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        trip.reason = "changed"  # type: ignore[misc]


def test_removed_listener_hears_nothing(clock: FakeClock) -> None:
    breaker, seen = make(clock, failure_threshold=1)
    breaker.remove_listener(seen.append)
    fail(breaker)
    assert seen == []
    assert state_of(breaker) is State.OPEN


def test_per_key_transition_label(clock: FakeClock) -> None:
    breaker = CircuitBreaker("crm", storage=fresh_store(), clock=clock, key="t9")
    seen: list[Transition] = []
    breaker.add_listener(seen.append)
    breaker.force_open()
    assert seen[0].label == "crm[t9]"
    assert seen[0].open_until is None
