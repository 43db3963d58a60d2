"""A run admission (a task's ticket for its whole run) and what guarded calls inside the run do with it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker import breaker as breaker_module
from celery_breaker.breaker import _RUN, RunAdmission, current_run
from celery_breaker.breaker import CircuitBreaker as _Breaker
from celery_breaker.breaker import checks as checks_module
from celery_breaker.core import Outcome, Probe
from celery_breaker.testing import FakeClock, fresh_store

from .support import down, fail, make, ok, state_of


def keep(exc: BaseException) -> BaseException | None:
    return exc


@contextlib.contextmanager
def running(breaker: CircuitBreaker) -> Iterator[RunAdmission]:
    """Admit a run on ``breaker`` and make it current, as BreakerTask does."""
    cell, ticket, start = breaker._admit()
    run = RunAdmission(breaker, cell, ticket, start, keep)
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)


def recorded(run: RunAdmission) -> Outcome | None:
    """Read afresh (a call, so type checkers do not narrow it across calls)."""
    return run.recorded


def half_open_with_one_probe(clock: FakeClock) -> CircuitBreaker:
    breaker = make(clock, failure_threshold=1, reset_timeout=10, half_open_max_calls=1)
    with pytest.raises(ConnectionError):
        breaker.call(down)
    clock.advance(10)
    return breaker


def test_another_object_for_the_same_breaker_uses_the_runs_probe_slot(clock: FakeClock) -> None:
    task_side = half_open_with_one_probe(clock)
    library_side = CircuitBreaker("svc", task_side.policy, storage=task_side.store, clock=clock)
    with running(task_side) as run:
        assert type(run.ticket) is Probe  # the run holds the only probe slot ...
        assert library_side.call(ok) == "ok"  # ... and the library's call inside it uses it
        assert run.recorded is Outcome.SUCCESS
        assert run.settle(None) is Outcome.SUCCESS  # nothing recorded twice
    assert state_of(task_side) is State.CLOSED


def test_the_runs_first_block_is_timed_from_the_block_not_from_admission(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=None, slow_call_duration=1.0, slow_call_rate_threshold=1.0,
                   minimum_calls=1)  # fmt: skip
    with running(breaker) as run:
        clock.advance(30)  # local work before the downstream call
        with breaker:
            clock.advance(0.1)
        assert run.recorded is Outcome.SUCCESS
    snapshot = breaker.snapshot()
    assert (snapshot.window_calls, snapshot.window_slow_calls) == (1, 0)
    assert state_of(breaker) is State.CLOSED


def test_a_run_that_never_used_a_guarded_call_records_its_own_outcome(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    with running(breaker) as run:
        assert run.settle(ConnectionError("down")) is Outcome.FAILURE
    assert state_of(breaker) is State.OPEN


def test_the_run_remembers_the_last_outcome_it_recorded(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5)
    with running(breaker) as run:
        with pytest.raises(ConnectionError):
            breaker.call(down)
        assert recorded(run) is Outcome.FAILURE
        assert breaker.call(ok) == "ok"
        assert recorded(run) is Outcome.SUCCESS


def test_outside_a_run_nothing_changes(clock: FakeClock) -> None:
    breaker = half_open_with_one_probe(clock)
    other = CircuitBreaker("svc", breaker.policy, storage=breaker.store, clock=clock)
    with breaker, pytest.raises(CircuitOpenError):  # the block takes the only probe
        other.call(ok)


def test_a_breaker_keeps_the_policy_it_was_created_with(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="celery_breaker")
    clock = FakeClock()
    store = fresh_store()
    first = CircuitBreaker("svc", {"failure_threshold": 3}, storage=store, clock=clock)
    second = CircuitBreaker("svc", {"failure_threshold": 4}, storage=store, clock=clock)
    assert "already exists" in caplog.text
    for breaker in (first, second, first):  # alternating objects no longer restart the windows
        with pytest.raises(ConnectionError):
            breaker.call(down)
    assert state_of(first) is State.OPEN
    second.reset()  # reset adopts the caller's policy
    assert second._cell.policy.failure_threshold == 4


def test_blocks_exited_out_of_order_record_on_their_own_breaker(clock: FakeClock) -> None:
    a = make(clock, name="a", failure_threshold=1)
    b = CircuitBreaker("b", {"failure_threshold": 1}, storage=a.store, clock=clock)
    a.__enter__()
    b.__enter__()
    failure = ConnectionError("a failed")
    a.__exit__(type(failure), failure, None)  # a first, as an ExitStack may do
    b.__exit__(None, None, None)
    assert state_of(a) is State.OPEN
    assert state_of(b) is State.CLOSED
    assert b.snapshot().successes == 1


def test_an_ordinary_ticket_in_half_open_is_not_a_probe(clock: FakeClock) -> None:
    breaker = half_open_with_one_probe(clock)
    cell = breaker._cell
    probe, _ = cell.acquire(breaker.policy, clock.monotonic())
    assert type(probe) is Probe
    # A call that read "passing" just before the trip and the generation just after
    # carries an int ticket of this generation: its success must not close the breaker.
    cell.record_success(cell.generation, 0.0, breaker.policy, clock.monotonic())
    assert state_of(breaker) is State.HALF_OPEN


# -- enter_run: admitted and current in one call (what BreakerTask does) ------------


def fields(run: RunAdmission) -> dict[str, object]:
    # (``_own``: the run's own breaker, made on first use)
    return {name: getattr(run, name) for name in RunAdmission.__slots__ if name not in ("_token", "_own")}


def test_enter_run_admits_like_begin_run_and_is_current_until_it_leaves(clock: FakeClock) -> None:
    breaker = make(clock)
    begun = breaker.begin_run(keep, counts_itself=False)
    run = breaker.enter_run(keep, counts_itself=False)
    try:
        assert isinstance(run, RunAdmission)
        assert current_run() is run
        assert fields(run) == fields(begun)  # every field as RunAdmission.__init__ sets it
        assert (run.claimed, run.recorded, run.released, run.refused_for) == (False, None, False, None)
        assert run.settle(None) is Outcome.IGNORED  # counts_itself=False: a run alone is neutral
    finally:
        run.leave()
    assert current_run() is None
    assert breaker.snapshot().successes == 0


def test_a_run_entered_inside_another_claims_its_ticket_and_gives_it_back(clock: FakeClock) -> None:
    breaker = make(clock)
    with running(breaker) as outer:
        inner = breaker.enter_run(keep)
        try:
            assert current_run() is inner
            assert outer.claimed  # the outer run's ticket serves the inner run, as in _admit
            assert inner.settle(None) is Outcome.SUCCESS
            # (the inner run recorded on the outer's ticket: the outer is told, as it would
            # be of its own guarded call's outcome)
            assert outer.recorded is Outcome.SUCCESS
        finally:
            inner.leave()
        assert current_run() is outer
    assert current_run() is None
    assert breaker.snapshot().successes == 1


def test_a_rejected_enter_run_leaves_no_run_current(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=10)
    with pytest.raises(ConnectionError):
        breaker.call(down)
    with pytest.raises(CircuitOpenError):
        breaker.enter_run(keep)
    assert current_run() is None


def test_an_entered_run_records_what_the_calls_inside_it_recorded(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2)
    run = breaker.enter_run(keep)
    try:
        with pytest.raises(ConnectionError):
            breaker.call(down)  # uses the run's ticket
        assert run.claimed
        assert recorded(run) is Outcome.FAILURE
        assert run.settle(ConnectionError("down")) is Outcome.FAILURE  # nothing recorded twice
    finally:
        run.leave()
    assert breaker.snapshot().failures == 1


def test_each_block_in_a_run_tells_it_what_it_recorded_and_other_breakers_do_not(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=5)
    other = make(clock, name="other")

    async def async_block(guard: CircuitBreaker, body: Callable[[], object]) -> None:
        async with guard:
            body()

    run = breaker.enter_run(keep)
    try:
        with pytest.raises(ConnectionError), breaker:  # the run's own ticket
            down()
        assert recorded(run) is Outcome.FAILURE
        with other:
            ok()
        asyncio.run(async_block(other, ok))
        assert recorded(run) is Outcome.FAILURE  # another breaker's blocks are not the run's
        with breaker:  # an ordinary ticket (the run's is spent), still the run's breaker
            ok()
        assert recorded(run) is Outcome.SUCCESS
        with pytest.raises(ConnectionError):
            asyncio.run(async_block(breaker, down))
        assert recorded(run) is Outcome.FAILURE
        asyncio.run(async_block(breaker, ok))
        assert recorded(run) is Outcome.SUCCESS
    finally:
        run.leave()
    assert (breaker.snapshot().successes, breaker.snapshot().failures) == (2, 2)


# -- a run's own breaker: its calls are the run's in threads the body starts ----------


def in_thread(fn: Callable[[], object]) -> object:
    """Run ``fn`` in a new thread (which starts with a context of its own), and return
    what it returned (or raise what it raised)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def test_a_call_in_a_thread_through_the_runs_own_breaker_uses_the_runs_probe(clock: FakeClock) -> None:
    breaker = half_open_with_one_probe(clock)
    run = breaker.enter_run(keep)
    try:
        own = run.own_breaker()
        assert own is run.own_breaker()  # made once a run
        assert in_thread(lambda: own.call(ok)) == "ok"  # not rejected by the probe its run holds
        assert run.claimed
        assert recorded(run) is Outcome.SUCCESS
        assert run.settle(None) is Outcome.SUCCESS  # nothing counted twice
    finally:
        run.leave()
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().successes == 1


def test_the_base_breaker_in_a_thread_is_not_the_runs(clock: FakeClock) -> None:
    # (what the fix is not: the breaker object of the registry stays a breaker of its own)
    breaker = half_open_with_one_probe(clock)
    run = breaker.enter_run(keep)
    try:
        with pytest.raises(CircuitOpenError):
            in_thread(lambda: breaker.call(ok))
    finally:
        run.settle(None, neutral=True)
        run.leave()


def test_blocks_in_threads_through_the_runs_own_breaker_count_as_its_calls(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=10)
    run = breaker.enter_run(keep)
    own = run.own_breaker()

    def block(fail: bool) -> None:
        with own:
            if fail:
                raise ConnectionError("down")

    def attempt(i: int) -> None:
        with contextlib.suppress(ConnectionError):
            block(i == 0)

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(attempt, range(4)))
        assert run.claimed
        run.settle(None)  # the run had guarded calls: it does not count itself
    finally:
        run.leave()
    snapshot = breaker.snapshot()
    assert (snapshot.successes, snapshot.failures) == (3, 1)


def test_a_block_nested_in_a_lent_block_leaves_the_run_lent_until_the_outer_closes(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=10)
    run = breaker.enter_run(keep)
    own = run.own_breaker()
    seen: list[object] = []

    def nested() -> None:
        with own:
            with own:
                seen.append(current_run())
            seen.append(current_run())  # still lent: the outer block is open
            raise ConnectionError("down")

    try:
        with pytest.raises(ConnectionError):
            in_thread(nested)
        assert recorded(run) is Outcome.FAILURE  # the outer block's failure reached the run
    finally:
        run.settle(None)
        run.leave()
    assert seen == [run, run]
    assert breaker.snapshot().failures == 1


def test_the_run_is_lent_only_for_the_call_and_given_back(clock: FakeClock) -> None:
    breaker = make(clock)
    run = breaker.enter_run(keep)
    own = run.own_breaker()
    try:

        def call_then_look() -> object:
            inside = own.call(current_run)
            return inside, current_run()

        assert in_thread(call_then_look) == (run, None)

        def block_then_look() -> object:
            with own:
                inside = current_run()
            return inside, current_run()

        assert in_thread(block_then_look) == (run, None)
    finally:
        run.settle(None)
        run.leave()


@pytest.mark.parametrize("form", ["async with", "acall", "decorator"])
def test_async_forms_in_a_thread_through_the_runs_own_breaker_use_the_runs_probe(clock: FakeClock, form: str) -> None:
    breaker = half_open_with_one_probe(clock)
    run = breaker.enter_run(keep)
    own = run.own_breaker()

    async def through_own() -> str:
        if form == "async with":
            async with own:
                return "ok"
        if form == "acall":
            return await own.acall(_aok)
        return await own(_aok)()

    try:
        assert in_thread(lambda: asyncio.run(through_own())) == "ok"
        run.settle(None)
    finally:
        run.leave()
    assert state_of(breaker) is State.CLOSED


async def _aok() -> str:
    return "ok"


def test_a_sync_decorator_in_a_thread_through_the_runs_own_breaker_uses_the_runs_probe(clock: FakeClock) -> None:
    breaker = half_open_with_one_probe(clock)
    run = breaker.enter_run(keep)
    guarded = run.own_breaker()(ok)
    try:
        assert in_thread(guarded) == "ok"
        run.settle(None)
    finally:
        run.leave()
    assert state_of(breaker) is State.CLOSED


def test_the_runs_own_breaker_has_every_field_of_its_breaker(clock: FakeClock) -> None:
    # (made without __init__: a field added to CircuitBreaker must be copied there too)
    breaker = make(clock)
    run = breaker.enter_run(keep)
    try:
        own = run.own_breaker()
        fields = [name for cls in _Breaker.__mro__ for name in getattr(cls, "__slots__", ())]  # (each part's own)
        for name in fields:
            if name != "__weakref__":
                assert hasattr(own, name), name
        assert isinstance(own, CircuitBreaker)
        assert (own.name, own.key, own.policy, own.store) == (breaker.name, breaker.key, breaker.policy, breaker.store)
        assert run.covers(own)
        assert run.covers(breaker)
        assert "svc" in repr(own)
    finally:
        run.settle(None)
        run.leave()


def test_a_run_that_took_the_outer_runs_ticket_tells_it_what_it_recorded(clock: FakeClock) -> None:
    # A task calling another task of the same breaker directly: the inner run uses the
    # outer's ticket, so the outer learns what the inner recorded (here: a failure that
    # left the breaker open, after which the outer task waits rather than fails).
    breaker = make(clock, failure_threshold=1, reset_timeout=10)
    outer = breaker.enter_run(keep)
    try:
        inner = breaker.enter_run(keep)
        try:
            assert inner.outer is outer
            with pytest.raises(ConnectionError):
                breaker.call(down)
            inner.settle(ConnectionError("down"))
        finally:
            inner.leave()
        assert recorded(outer) is Outcome.FAILURE
        assert outer.failed_while_open()
        outer.settle(ConnectionError("down"))
    finally:
        outer.leave()
    assert breaker.snapshot().failures == 1


@pytest.mark.parametrize("half_open", [False, True])
def test_a_run_that_does_not_count_itself_gives_the_outer_runs_ticket_back(clock: FakeClock, half_open: bool) -> None:
    # A breaker_scope="calls" task called directly by a "run" task of the same breaker took
    # the outer's ticket and recorded it neutral: the outer's success was lost, and a
    # half-open breaker whose probes ran such a run never closed. Unused, the ticket goes
    # back to the outer run, which records its own outcome on it.
    breaker = make(clock, failure_threshold=1, reset_timeout=10, success_threshold=1)
    if half_open:
        fail(breaker)
        clock.advance(10)
    outer = breaker.enter_run(keep)
    inner = breaker.enter_run(keep, False)
    assert inner.outer is outer
    assert inner.succeed() is None  # (succeed leaves the run)
    assert not outer.claimed
    assert outer.succeed() is Outcome.SUCCESS
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.successes) == (State.CLOSED, 1)


def test_runs_of_other_breakers_do_not_take_the_outer_runs_ticket(clock: FakeClock) -> None:
    breaker = make(clock)
    other = make(clock, name="other")
    outer = breaker.enter_run(keep)
    try:
        inner = other.enter_run(keep)
        try:
            assert inner.outer is None
            inner.settle(None)
        finally:
            inner.leave()
        assert recorded(outer) is None
        outer.settle(None)
    finally:
        outer.leave()


def test_a_run_and_its_own_breaker_are_freed_with_no_cycle_and_it_then_lends_nothing(clock: FakeClock) -> None:
    # (the run refers to its own breaker, which refers to the run weakly: freed when the
    # task returns, not left for the cyclic GC; a thread still calling it afterwards
    # calls a breaker like any other)
    breaker = make(clock)
    run = breaker.enter_run(keep)
    own = run.own_breaker()
    run.settle(None)
    run.leave()
    gone = weakref.ref(run)
    gc.disable()
    try:
        del run
        assert gone() is None
    finally:
        gc.enable()
    assert in_thread(lambda: own.call(current_run)) is None
    assert in_thread(lambda: own.call(ok)) == "ok"
    assert breaker.snapshot().successes == 3


def test_an_own_breaker_kept_from_an_earlier_run_lends_it_nothing_where_another_run_is_current(
    clock: FakeClock,
) -> None:
    # (a task that caches self.breaker on its instance: in the next run's body, the object
    # of the first run, still alive, lent it that run, and the next run counted itself too)
    breaker = make(clock, failure_threshold=3)
    first = breaker.enter_run(keep)
    kept = first.own_breaker()
    first.settle(None)
    first.leave()
    second = breaker.enter_run(keep)
    try:
        with pytest.raises(ConnectionError):
            kept.call(down)
        assert recorded(second) is Outcome.FAILURE  # the current run's call, as any breaker's
        second.settle(ConnectionError("down"))
    finally:
        second.leave()
    assert breaker.snapshot().failures == 1


# -- succeed: settle(None) and leave() in one call (a run whose body returned) ----------


def _call_ok(breaker: CircuitBreaker) -> None:
    breaker.call(ok)


def _call_down_and_catch(breaker: CircuitBreaker) -> None:
    with contextlib.suppress(ConnectionError):
        breaker.call(down)


def _stale_the_ticket(breaker: CircuitBreaker) -> None:
    # (another thread, where the run is not current, trips the breaker while the run goes
    # on: the run's ticket is stale, and still unclaimed)
    tripper = threading.Thread(target=fail, args=(breaker,))
    tripper.start()
    tripper.join()
    run = current_run()
    assert run is not None
    assert not run.claimed
    assert run.ticket != run.cell.generation


SUCCEED_CASES: dict[str, tuple[dict[str, object], Callable[[CircuitBreaker], None]]] = {
    # name: (policy, what the body does before it returns)
    "quiet cell, nothing in the body": ({}, lambda breaker: None),
    "a guarded call used the ticket": ({}, _call_ok),
    "a guarded call failed, caught in the body": ({"failure_threshold": 3}, _call_down_and_catch),
    "a rule minds successes (rate)": ({"failure_rate_threshold": 0.5, "minimum_calls": 2}, lambda breaker: None),
    "a run of consecutive failures, one failure in": ({"consecutive_failures": 2}, _call_down_and_catch),
    "the breaker tripped meanwhile (stale ticket)": ({"failure_threshold": 1}, _stale_the_ticket),
}


def _ended(
    clock: FakeClock, policy: dict[str, object], body: Callable[[CircuitBreaker], None], *, one_call: bool, **run: bool
) -> tuple[object, ...]:
    breaker = make(clock, **policy)  # type: ignore[arg-type]
    admission = breaker.enter_run(keep, **run)
    body(breaker)
    clock.advance(0.25)
    if one_call:
        outcome = admission.succeed()
    else:
        try:
            outcome = admission.settle(None)
        finally:
            admission.leave()
    snapshot = breaker.snapshot()
    return (
        outcome, current_run(), admission.claimed, admission.recorded, snapshot.state,
        snapshot.successes, snapshot.failures, snapshot.last_success,
    )  # fmt: skip


@pytest.mark.parametrize("counts_itself", [True, False])
@pytest.mark.parametrize("case", sorted(SUCCEED_CASES))
def test_succeed_ends_a_run_exactly_as_settle_none_then_leave(case: str, counts_itself: bool) -> None:
    policy, body = SUCCEED_CASES[case]
    both = [
        _ended(FakeClock(), policy, body, one_call=one_call, counts_itself=counts_itself) for one_call in (False, True)
    ]
    assert both[1] == both[0]
    assert both[1][1] is None  # no run current after either
    if case == "quiet cell, nothing in the body":
        # (the unfolded path is the one taken: counted with the clock's time, once)
        assert both[1][0] is (Outcome.SUCCESS if counts_itself else Outcome.IGNORED)
        assert both[1][5] == (1 if counts_itself else 0)


def test_succeed_inside_an_outer_run_tells_the_outer_and_leaves_it_current(clock: FakeClock) -> None:
    breaker = make(clock)
    with running(breaker) as outer:
        inner = breaker.enter_run(keep)
        assert inner.succeed() is Outcome.SUCCESS
        assert current_run() is outer
        assert outer.claimed
        assert outer.recorded is Outcome.SUCCESS
    assert breaker.snapshot().successes == 1


def test_a_probe_run_that_succeeds_counts_toward_closing(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1, reset_timeout=10, success_threshold=1)
    fail(breaker)
    clock.advance(10)
    run = breaker.enter_run(keep)
    assert type(run.ticket) is Probe
    assert run.succeed() is Outcome.SUCCESS
    assert state_of(breaker) is State.CLOSED
    assert current_run() is None


def test_succeed_leaves_the_run_even_when_recording_raises(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    breaker = make(clock, failure_rate_threshold=0.5, minimum_calls=2)

    def broken(*args: object) -> None:
        raise RuntimeError("store gone")

    run = breaker.enter_run(keep)
    assert not run.cell.quiet_success  # (a rate window minds a success: it goes to the cell)
    monkeypatch.setattr(type(run.cell), "record_success", broken)
    with pytest.raises(RuntimeError, match="store gone"):
        run.succeed()
    assert current_run() is None


# -- the lease of a probe slot a run wins (breaker.lease_runs_by) -------------------


@pytest.fixture
def leases_by_owner() -> Iterator[dict[object, float]]:
    """``lease_runs_by`` answering from a dict (the Celery integration's own lease is put
    back afterwards)."""
    leases: dict[object, float] = {}
    kept = list(checks_module._RUN_LEASE)
    breaker_module.lease_runs_by(leases.get)
    try:
        yield leases
    finally:
        checks_module._RUN_LEASE[:] = kept


@pytest.mark.parametrize(("owner", "held_for"), [("task", 7.0), ("unleased", 60.0), (None, 60.0)])
def test_a_probe_slot_a_run_wins_is_held_as_long_as_its_owners_lease(
    clock: FakeClock, leases_by_owner: dict[object, float], owner: object, held_for: float
) -> None:
    # (A run that dies without a verdict, its pool process killed at the task's hard time
    # limit, held the slot for half_open_max_wait: with half_open_max_calls=1, no probe at
    # all could go meanwhile.)
    leases_by_owner["task"] = 7.0
    leases_by_owner["unleased"] = 600.0  # (never longer than half_open_max_wait)
    breaker = make(
        clock, failure_threshold=1, reset_timeout=10, half_open_max_calls=1, success_threshold=1, half_open_max_wait=60
    )
    fail(breaker)
    clock.advance(10)
    run = breaker.enter_run(keep, True, None, owner)
    assert type(run.ticket) is Probe
    run.leave()  # (the run dies here: no verdict)
    other = CircuitBreaker("svc", breaker.policy, storage=breaker.store, clock=clock)
    clock.advance(held_for - 0.5)
    with pytest.raises(CircuitOpenError):
        other.call(ok)  # the slot is still the dead run's
    clock.advance(0.5)
    assert other.call(ok) == "ok"
    assert state_of(other) is State.CLOSED
