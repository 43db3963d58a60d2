"""The async API: ``acall``, ``async with`` and decorated coroutine functions (run with asyncio.run)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import pytest

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.core import Outcome
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


def test_async_with_never_suspends_and_binds_each_blocks_breaker(clock: FakeClock) -> None:
    """A coroutine driven by hand (no event loop: any runner, trio's too) ends at its
    first step: entering and leaving a block awaits nothing."""
    outer = make(clock, name="outer")
    inner = CircuitBreaker("inner", storage=outer.store, clock=clock)

    async def scenario() -> list[CircuitBreaker]:
        seen = []
        for _ in range(3):  # (what the blocks await is made once per breaker, then reused)
            async with outer as a, inner as b:
                seen += [a, b]
            async with outer as a, outer as nested:  # nested on one object: the stack
                seen += [a, nested]
        return seen

    coroutine = scenario()
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    assert done.value.value == [outer, inner, outer, outer] * 3
    assert (outer.snapshot().successes, inner.snapshot().successes) == (9, 3)
    assert not outer._slot
    assert not inner._slot


def test_an_async_block_never_swallows_its_exception(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5)

    async def in_an_exit_stack() -> None:
        async with contextlib.AsyncExitStack() as stack:
            assert await stack.enter_async_context(breaker) is breaker
            raise ConnectionError("down")

    async def by_hand() -> None:
        assert await breaker.__aenter__() is breaker
        await breaker.__aexit__(ConnectionError, ConnectionError("down"), None)

    with pytest.raises(ConnectionError):
        asyncio.run(in_an_exit_stack())
    asyncio.run(by_hand())
    snap = breaker.snapshot()
    assert (snap.successes, snap.failures) == (0, 2)
    assert not breaker._slot


def test_a_cancelled_async_block_counts_neither_way_and_frees_the_slot(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)

    async def scenario() -> None:
        entered = asyncio.Event()

        async def guarded() -> None:
            async with breaker:
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(guarded())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with breaker:  # the cancelled block let go of the slot: this one takes it
            assert breaker._slot
            assert not breaker._stacked

    asyncio.run(scenario())
    snap = breaker.snapshot()
    assert (snap.state, snap.successes, snap.failures) == (State.CLOSED, 1, 0)
    assert not breaker._slot


def test_an_async_block_inside_a_run_uses_the_runs_ticket(clock: FakeClock) -> None:
    breaker = make(clock)

    async def body() -> None:
        async with breaker as entered:
            assert entered is breaker

    run = breaker.begin_run(lambda exc: exc)
    with run:
        asyncio.run(body())  # (its task copies this context: the run is current there)
        assert run.claimed
        assert run.recorded is Outcome.SUCCESS
        assert run.settle(None) is Outcome.SUCCESS  # recorded by the block, not again
    assert breaker.snapshot().successes == 1


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
