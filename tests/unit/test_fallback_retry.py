"""While a shared store is down, it is tried again once per ``retry_interval`` for the whole
store, not once per breaker: a new per-key breaker takes its stand-in at once.

Before, each new cell tried the store first, and a store that accepts connections but never
answers cost every new per-key breaker its socket timeout (0.5 s): two calls a second.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, State
from celery_breaker.clock import Clock
from celery_breaker.errors import StorageError
from celery_breaker.storage import FallbackStore, MemoryStore
from celery_breaker.storage.contract import Cell
from celery_breaker.testing import FakeClock

from .support import ok

RETRY = 5.0


class SilentStore(MemoryStore):
    """A shared store that cannot be reached while ``down``; counts every attempt."""

    shared = True  # (so breakers wrap it in a FallbackStore)

    def __init__(self) -> None:
        super().__init__("memory://silent")
        self.down_now = True
        self.attempts = 0

    def cell(self, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> Any:
        self.attempts += 1
        if self.down_now:
            raise StorageError("redis store redis://silent: acquire failed: Timeout reading from socket")
        return super().cell(name, key, policy, clock)


@pytest.fixture
def silent() -> SilentStore:
    return SilentStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def keyed(store: FallbackStore, clock: FakeClock, key: str) -> CircuitBreaker:
    return CircuitBreaker("tenant", {"failure_threshold": 2}, storage=store, clock=clock, key=key)


def test_new_breakers_take_their_stand_in_without_trying_a_store_that_is_down(
    silent: SilentStore, clock: FakeClock
) -> None:
    store = FallbackStore(silent, "local", retry_interval=RETRY)
    breakers = [keyed(store, clock, f"t{i}") for i in range(20)]
    assert silent.attempts == 1  # the first found it down; the other 19 did not ask
    assert all(breaker.call(ok) == "ok" for breaker in breakers)  # each on its stand-in
    assert silent.attempts == 1
    assert store.down


def test_the_store_is_tried_once_per_interval_for_all_its_breakers(silent: SilentStore, clock: FakeClock) -> None:
    store = FallbackStore(silent, "local", retry_interval=RETRY)
    breakers = [keyed(store, clock, f"t{i}") for i in range(10)]
    clock.advance(RETRY - 0.1)
    for breaker in breakers:
        breaker.call(ok)
    assert silent.attempts == 1
    clock.advance(0.1)  # due: one breaker tries, for all of them
    for breaker in breakers:
        breaker.call(ok)
    keyed(store, clock, "new")
    assert silent.attempts == 2


def test_every_breaker_rejoins_once_the_store_answers(silent: SilentStore, clock: FakeClock) -> None:
    store = FallbackStore(silent, "deny", retry_interval=RETRY)
    breakers = [keyed(store, clock, f"t{i}") for i in range(5)]
    assert {breaker.state for breaker in breakers} == {State.FORCED_OPEN}  # deny: the stand-ins reject
    silent.down_now = False
    clock.advance(RETRY)
    for breaker in breakers:
        assert breaker.call(ok) == "ok"  # one retry found it up; the others followed at once
    assert not store.down
    assert {breaker.state for breaker in breakers} == {State.CLOSED}
    shared: list[Cell] = [silent.cell("tenant", f"t{i}", BreakerPolicy(), clock) for i in range(5)]
    assert {cell.state for cell in shared} == {State.CLOSED}


class _Heard:
    """A parking whose store's transitions this process hears (``hearing``)."""

    def hearing(self) -> int:
        return 1


class PartlyDownStore(SilentStore):
    """A shared store this process still hears while its breakers cannot be reached (a
    Cluster whose other primary answers the transitions channel)."""

    parking = cast(Any, _Heard())


def test_a_new_breaker_failing_on_a_store_it_still_hears_does_not_postpone_the_retry(clock: FakeClock) -> None:
    # A breaker made while the store is down asks it when this process still hears it;
    # failing, it pushed the retry of every stand-in 5 s on: with a new per-key breaker
    # every few seconds, those on their stand-ins were never retried.
    partly = PartlyDownStore()
    store = FallbackStore(partly, "local", retry_interval=RETRY)
    first = keyed(store, clock, "t0")
    assert partly.attempts == 1
    clock.advance(RETRY - 1)
    keyed(store, clock, "t1")  # (asks, as the store is heard, and fails)
    assert partly.attempts == 2
    clock.advance(1)  # (the first failure's retry is due)
    partly.down_now = False
    assert first.call(ok) == "ok"
    assert partly.attempts == 3
    assert not store.down
