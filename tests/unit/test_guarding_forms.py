"""Every guarding form on its cheap path: ``with`` blocks in the object's slot or on the
context's stack, the decorators' inlined path, and a run's fast settle keep their tickets apart."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.breaker import _RUN, RunAdmission
from celery_breaker.core import Outcome
from celery_breaker.testing import FakeClock, fresh_store

from .support import down, fail, make, ok, state_of

#: Trips once half the calls in the window took 5 s or more: which block a duration
#: belongs to shows in the state.
SLOW = {"failure_threshold": None, "slow_call_duration": 5.0, "slow_call_rate_threshold": 0.5, "minimum_calls": 1}


def keep(exc: BaseException) -> BaseException | None:
    return exc


def slow_calls(breaker: CircuitBreaker) -> int:
    return breaker.snapshot().window_slow_calls


def test_a_block_leaves_the_slot_free_and_counts_once(clock: FakeClock) -> None:
    breaker = make(clock)
    for _ in range(3):
        with breaker:
            ok()
    assert breaker.snapshot().successes == 3
    assert not breaker._slot
    assert not breaker._stacked  # one block at a time: the slot only


def test_nested_blocks_on_one_breaker_keep_their_own_outcome_and_duration(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=None, slow_call_duration=5.0, slow_call_rate_threshold=0.9,
                   minimum_calls=10)  # fmt: skip

    def outer_block() -> None:  # 6 s, failed
        with breaker:
            clock.advance(3)
            with breaker:  # the inner one: 1 s, fine
                clock.advance(1)
            clock.advance(2)
            down()

    with pytest.raises(ConnectionError):
        outer_block()
    snapshot = breaker.snapshot()
    assert (snapshot.successes, snapshot.failures, snapshot.window_slow_calls) == (1, 1, 1)
    assert not breaker._slot


def test_blocks_in_two_threads_on_one_object_keep_their_tickets_apart(clock: FakeClock) -> None:
    breaker = make(clock, **SLOW)  # type: ignore[arg-type]
    entered, leave = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_block() -> None:  # takes the slot first, leaves last after 6 s: slow
        try:
            with breaker:
                entered.set()
                assert leave.wait(10)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=slow_block)
    worker.start()
    assert entered.wait(10)
    clock.advance(5)
    with breaker:  # enters while the slot is taken: the stack; 1 s, fast
        clock.advance(1)
    assert slow_calls(breaker) == 0
    assert state_of(breaker) is State.CLOSED
    leave.set()
    worker.join()
    assert errors == []
    assert breaker.snapshot().successes == 2
    assert state_of(breaker) is State.OPEN  # the slow one (6 s) tripped the slow-call rate
    assert not breaker._slot


def test_interleaved_tasks_on_one_breaker_record_their_own_blocks(clock: FakeClock) -> None:
    breaker = make(clock, **SLOW)  # type: ignore[arg-type]

    async def scenario() -> None:
        first_in, second_in, first_go, second_go = (asyncio.Event() for _ in range(4))

        async def guarded(entered: asyncio.Event, go: asyncio.Event) -> None:
            async with breaker:
                entered.set()
                await go.wait()

        first = asyncio.create_task(guarded(first_in, first_go))
        await first_in.wait()  # the first takes the slot at 0 s ...
        clock.advance(5)
        second = asyncio.create_task(guarded(second_in, second_go))
        await second_in.wait()  # ... the second goes on its task's stack at 5 s
        clock.advance(1)
        second_go.set()  # the second leaves first: 1 s, fast
        await second
        assert state_of(breaker) is State.CLOSED
        first_go.set()  # the first: 6 s, slow, and half the window is slow now
        await first
        assert state_of(breaker) is State.OPEN

    asyncio.run(scenario())
    assert breaker.snapshot().successes == 2
    assert not breaker._slot


def test_a_task_never_closes_a_block_it_inherited(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2)
    other = make(clock, name="other")

    async def scenario() -> None:
        async with other:  # (the slot of another object: unrelated)
            pass
        release = asyncio.Event()
        holder_in = asyncio.Event()

        async def holder() -> None:
            async with breaker:  # takes the slot
                holder_in.set()
                await release.wait()

        held = asyncio.create_task(holder())
        await holder_in.wait()
        async with breaker:  # stacked, and the parent's block is open when the child is made
            child = asyncio.create_task(child_block())
            release.set()
            await held
            await child
        assert not breaker._slot

    async def child_block() -> None:
        with pytest.raises(ConnectionError):
            async with breaker:  # the child's own block, not the parent's inherited one
                raise ConnectionError("child failed")

    asyncio.run(scenario())
    snapshot = breaker.snapshot()
    assert (snapshot.successes, snapshot.failures) == (2, 1)


def test_exiting_a_block_never_entered_is_an_error(clock: FakeClock) -> None:
    breaker = make(clock)
    with pytest.raises(RuntimeError, match="without being entered"):
        breaker.__exit__(None, None, None)
    with breaker:
        pass
    with pytest.raises(RuntimeError, match="without being entered"):
        breaker.__exit__(None, None, None)


@contextlib.contextmanager
def guarded_client(breaker: CircuitBreaker) -> Iterator[str]:
    """A sync context manager guarding a client while it is used (a web dependency, say)."""
    with breaker:
        yield "client"


async def use_off_the_loop(breaker: CircuitBreaker, count: int, fails: bool = False) -> list[object]:
    """``count`` concurrent users of ``guarded_client``, each entering and leaving it in
    worker threads as frameworks run a sync context manager (Starlette's threadpool,
    ``asyncio.to_thread``): each step runs in its own copy of the caller's context."""
    entered = 0
    all_in = asyncio.Event()

    async def one() -> None:
        nonlocal entered
        manager = guarded_client(breaker)
        await asyncio.to_thread(manager.__enter__)
        entered += 1
        if entered == count:
            all_in.set()
        await all_in.wait()  # (every block open before any closes)
        if fails:
            error = ConnectionError("down")
            await asyncio.to_thread(manager.__exit__, ConnectionError, error, None)
        else:
            await asyncio.to_thread(manager.__exit__, None, None, None)

    return await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)


def test_blocks_entered_and_left_in_worker_threads_each_close(clock: FakeClock) -> None:
    # Only the first took the slot; the others went on stacks of contexts their exits
    # never see. Each such exit found the slot empty (or took another's) and raised
    # "block exited without being entered", its outcome lost.
    breaker = make(clock, failure_threshold=5)
    assert asyncio.run(use_off_the_loop(breaker, 4)) == [None] * 4
    assert breaker.snapshot().successes == 4
    assert asyncio.run(use_off_the_loop(breaker, 5, fails=True)) == [None] * 5  # (each failure recorded)
    assert state_of(breaker) is State.OPEN
    assert breaker.snapshot().failures == 5
    assert not breaker._slot
    assert not breaker._open_blocks


def test_probes_entered_and_left_in_worker_threads_free_their_slots(clock: FakeClock) -> None:
    # Lost exits kept their probe leases: the breaker stayed half-open, refusing every
    # call, until the leases ran out (half_open_max_wait).
    breaker = make(clock, failure_threshold=1, half_open_max_calls=3, success_threshold=3)
    fail(breaker)
    clock.advance(60)
    assert asyncio.run(use_off_the_loop(breaker, 3)) == [None] * 3
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.probes_in_flight) == (State.CLOSED, 0)


def test_a_rejected_block_takes_no_slot(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.force_open()
    with pytest.raises(CircuitOpenError), breaker:
        pytest.fail("the body of a rejected block must not run")
    assert not breaker._slot
    breaker.close()
    with breaker:
        pass
    assert breaker.snapshot().successes == 1


def test_a_block_from_before_a_trip_moves_nothing(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=10, half_open_max_calls=1, success_threshold=1)
    breaker.__enter__()  # in the slot, CLOSED generation
    fail(breaker)  # another call trips it
    clock.advance(10)
    assert breaker.call(ok) == "ok"  # the probe closes it again
    assert state_of(breaker) is State.CLOSED
    failure = ConnectionError("late")
    breaker.__exit__(type(failure), failure, None)  # the old block fails: counted, moves nothing
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().failures == 2


def test_many_threads_share_one_object(clock: FakeClock) -> None:
    breaker = make(clock, failure_rate_threshold=0.5, minimum_calls=10)
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(500):
            with breaker:
                pass

    workers = [threading.Thread(target=work) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    snapshot = breaker.snapshot()
    assert (snapshot.successes, snapshot.window_calls, snapshot.state) == (4000, 4000, State.CLOSED)
    assert not breaker._slot


def test_the_decorators_use_the_run_and_the_open_path(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)

    @breaker
    def guarded() -> str:
        return ok()

    @breaker
    async def guarded_async() -> str:
        return ok()

    async def use_async() -> str:
        return await guarded_async()

    cell, ticket, start = breaker._admit()
    run = RunAdmission(breaker, cell, ticket, start, keep)
    token = _RUN.set(run)
    try:
        assert guarded() == "ok"
        assert run.claimed  # the run's ticket served it
        assert run.recorded is Outcome.SUCCESS
    finally:
        _RUN.reset(token)
    assert asyncio.run(use_async()) == "ok"
    fail(breaker)
    with pytest.raises(CircuitOpenError):
        guarded()
    with pytest.raises(CircuitOpenError):
        asyncio.run(use_async())
    assert breaker.snapshot().successes == 2


def test_a_run_that_returned_records_one_success(clock: FakeClock) -> None:
    breaker = make(clock)
    run = breaker.begin_run(keep)
    with run:
        assert run.settle(None) is Outcome.SUCCESS
        assert run.settle(None) is Outcome.SUCCESS  # settled once
    assert breaker.snapshot().successes == 1
    quiet = breaker.begin_run(keep, counts_itself=False)
    with quiet:
        assert quiet.settle(None) is Outcome.IGNORED  # breaker_scope="calls": a run alone is neutral
    assert breaker.snapshot().successes == 1


def test_a_block_exited_by_an_exit_stack_out_of_order(clock: FakeClock) -> None:
    a = make(clock, name="a", failure_threshold=1)
    b = CircuitBreaker("b", {"failure_threshold": 1}, storage=a.store, clock=clock)
    with contextlib.ExitStack() as stack:
        stack.enter_context(a)
        stack.enter_context(b)
        stack.pop_all()  # now exited by hand, a first
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert (a.snapshot().successes, b.snapshot().successes) == (1, 1)


class CountingClock(FakeClock):
    """A FakeClock that counts its monotonic readings."""

    __slots__ = ("reads",)

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return super().monotonic()


def _with(breaker: CircuitBreaker, body: Callable[[], object]) -> None:
    with breaker:
        body()


def _async_with(breaker: CircuitBreaker, body: Callable[[], object]) -> None:
    async def block() -> None:
        async with breaker:
            body()

    asyncio.run(block())


def _decorated(breaker: CircuitBreaker, body: Callable[[], object]) -> None:
    breaker(body)()


def _decorated_async(breaker: CircuitBreaker, body: Callable[[], object]) -> None:
    async def coroutine_body() -> None:
        body()

    async def main() -> None:
        await breaker(coroutine_body)()

    asyncio.run(main())


def _run(breaker: CircuitBreaker, body: Callable[[], object]) -> None:
    run = breaker.enter_run(keep)
    try:
        body()
        run.settle(None)
    finally:
        run.leave()


def _acall(breaker: CircuitBreaker, body: Callable[[], object]) -> None:
    async def coroutine_body() -> None:
        body()

    async def main() -> None:
        await breaker.acall(coroutine_body)

    asyncio.run(main())


FORMS: dict[str, Callable[[CircuitBreaker, Callable[[], object]], object]] = {
    "call": lambda breaker, body: breaker.call(body),
    "acall": _acall,
    "with": _with,
    "async with": _async_with,
    "decorator": _decorated,
    "async decorator": _decorated_async,
    "run admission": _run,
}


@pytest.mark.parametrize("form", FORMS)
def test_an_untimed_policy_reads_the_clock_once_per_closed_success(form: str) -> None:
    # No rule looks at durations (no slow_call_duration): a closed success reads the
    # clock once, at its end; with a slow-call rule, once more at its start.
    for policy, reads in (({}, 1), (SLOW, 2)):
        clock = CountingClock()
        breaker = CircuitBreaker("svc", policy, storage=fresh_store(), clock=clock)
        before = clock.reads
        FORMS[form](breaker, ok)
        assert (clock.reads - before, breaker.snapshot().successes) == (reads, 1), policy


@pytest.mark.parametrize("form", FORMS)
def test_every_form_stamps_a_success_with_its_end(clock: FakeClock, form: str) -> None:
    breaker = make(clock)
    FORMS[form](breaker, lambda: clock.advance(7))
    snapshot = breaker.snapshot()
    assert (snapshot.successes, snapshot.last_success) == (1, clock.time())


@pytest.mark.parametrize("form", FORMS)
def test_every_form_times_its_calls_under_a_slow_call_rule(clock: FakeClock, form: str) -> None:
    breaker = CircuitBreaker("svc", SLOW, storage=fresh_store(), clock=clock)
    FORMS[form](breaker, lambda: clock.advance(1))  # fast
    assert (slow_calls(breaker), state_of(breaker)) == (0, State.CLOSED)
    FORMS[form](breaker, lambda: clock.advance(6))  # slow: half the window, which trips
    assert state_of(breaker) is State.OPEN


@pytest.mark.parametrize("form", ["with", "run admission"])
def test_an_untimed_call_spanning_a_reset_to_a_slow_call_rule_is_not_slow(clock: FakeClock, form: str) -> None:
    # Begun under a policy that times nothing (no start reading); the breaker is reset to
    # a slow-call rule meanwhile. A reset starts a new generation, so the call's ticket is
    # stale: it is recorded (no start to measure from is no error), trips nothing, and is
    # not counted (admitted before the reset, it is the breaker's that was reset).
    breaker = make(clock)
    generation = breaker._cell.generation

    def body() -> None:
        breaker._cell.reset(BreakerPolicy.coerce(SLOW), clock.monotonic())
        assert breaker._cell.generation != generation
        clock.advance(60)

    FORMS[form](breaker, body)
    assert (slow_calls(breaker), state_of(breaker), breaker.snapshot().successes) == (0, State.CLOSED, 0)
