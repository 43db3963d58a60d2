"""The async API: ``acall``, ``async with`` and decorated coroutine functions (run with asyncio.run)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.testing import FakeClock, fresh_store

from .support import make


async def fetch(value: int, *, scale: int = 1) -> int:
    return value * scale


async def down() -> None:
    raise ConnectionError("down")


def test_acall_returns_the_result_and_counts_a_success(clock: FakeClock) -> None:
    breaker = make(clock)
    assert asyncio.run(breaker.acall(fetch, 21, scale=2)) == 42
    assert breaker.snapshot().successes == 1


def test_acall_records_failures_and_trips(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2)

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await breaker.acall(down)
        with pytest.raises(CircuitOpenError):
            await breaker.acall(fetch, 1)

    asyncio.run(scenario())
    snap = breaker.snapshot()
    assert (snap.state, snap.failures, snap.rejections) == (State.OPEN, 2, 1)


def test_acall_rejects_without_awaiting(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.force_open()
    started: list[int] = []

    async def work() -> None:
        started.append(1)

    async def scenario() -> None:
        with pytest.raises(CircuitOpenError):
            await breaker.acall(work)

    asyncio.run(scenario())
    assert started == []


def test_async_with_records_success_and_failure(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)

    async def scenario() -> None:
        async with breaker as entered:
            assert entered is breaker
        with pytest.raises(ConnectionError):
            async with breaker:
                await down()
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pytest.fail("the body of a rejected block must not run")

    asyncio.run(scenario())
    snap = breaker.snapshot()
    assert (snap.successes, snap.failures, snap.rejections) == (1, 1, 1)


def test_decorated_coroutine_function_stays_a_coroutine_function(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)

    @breaker
    async def guarded(value: int) -> int:
        """Doc."""
        if value < 0:
            raise ConnectionError(value)
        return value + 1

    assert inspect.iscoroutinefunction(guarded)
    assert guarded.__name__ == "guarded"
    assert guarded.__doc__ == "Doc."
    assert asyncio.run(guarded(1)) == 2
    with pytest.raises(ConnectionError):
        asyncio.run(guarded(-1))
    with pytest.raises(CircuitOpenError):
        asyncio.run(guarded(1))


def test_concurrent_tasks_keep_their_own_blocks(clock: FakeClock) -> None:
    """Interleaved ``async with`` blocks in two tasks each record their own outcome."""
    store = fresh_store()
    a = CircuitBreaker("a", storage=store, clock=clock)
    b = CircuitBreaker("b", storage=store, clock=clock)

    async def guarded(breaker: CircuitBreaker, entered: asyncio.Event, release: asyncio.Event, fail: bool) -> None:
        async with breaker:
            entered.set()
            await release.wait()
            if fail:
                raise ConnectionError("down")

    async def scenario() -> None:
        a_in, b_in, a_go, b_go = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        task_a = asyncio.create_task(guarded(a, a_in, a_go, fail=True))
        await a_in.wait()
        task_b = asyncio.create_task(guarded(b, b_in, b_go, fail=False))
        await b_in.wait()
        a_go.set()  # a leaves first although b entered last
        with pytest.raises(ConnectionError):
            await task_a
        b_go.set()
        await task_b

    asyncio.run(scenario())
    assert (a.snapshot().failures, a.snapshot().successes) == (1, 0)
    assert (b.snapshot().failures, b.snapshot().successes) == (0, 1)


def test_async_half_open_admits_only_the_probe_limit(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, half_open_max_calls=2, success_threshold=2)

    async def scenario() -> list[str]:
        with pytest.raises(ConnectionError):
            await breaker.acall(down)
        clock.advance(30)
        release = asyncio.Event()

        async def probe() -> str:
            await release.wait()
            return "probe"

        async def attempt() -> str:
            try:
                return await breaker.acall(probe)
            except CircuitOpenError:
                return "rejected"

        tasks = [asyncio.create_task(attempt()) for _ in range(5)]
        while sum(1 for t in tasks if t.done()) < 3:  # the 3 rejections finish first
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        assert breaker.snapshot().probes_in_flight == 2
        release.set()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(scenario())
    assert sorted(results) == ["probe", "probe", "rejected", "rejected", "rejected"]
    assert breaker.state is State.CLOSED


def test_cancelled_probe_frees_its_slot_without_closing(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, half_open_max_calls=1, success_threshold=1)

    async def scenario() -> None:
        with pytest.raises(ConnectionError):
            await breaker.acall(down)
        clock.advance(30)
        started, never = asyncio.Event(), asyncio.Event()

        async def hang() -> None:
            started.set()
            await never.wait()

        task = asyncio.create_task(breaker.acall(hang))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    snap = breaker.snapshot()
    assert snap.probes_in_flight == 0
    assert snap.state is State.HALF_OPEN
