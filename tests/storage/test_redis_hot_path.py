"""The Redis hot path: local views kept fresh by published transitions, counts sent later.

Round trips are counted where they happen (``RedisStore.run``, per thread), against a
real redis-server; nothing here waits for time to pass except for the background thread
itself to notice a lost subscription (polled with a deadline).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.core import Probe
from celery_breaker.storage import flush_stores
from celery_breaker.storage.redis import RedisCell, RedisStore
from celery_breaker.storage.redis import agent as agent_module
from celery_breaker.testing import FakeClock

from ..servers import RedisServer
from ..unit.support import HeldCall, fail, ok, state_of
from .conftest import unique_prefix


class Trips:
    """Counts the scripts a store runs from the thread that made the counter."""

    def __init__(self, store: RedisStore) -> None:
        self.count = 0
        self._thread = threading.get_ident()
        run = store.run

        def counted(script: str, keys: list[str], args: list[str]) -> list[Any]:
            if threading.get_ident() == self._thread:
                self.count += 1
            return run(script, keys, args)

        store.run = counted  # type: ignore[method-assign]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition another thread makes true (not waiting for time to pass)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def view_of(cell: RedisCell) -> State:
    return cell.state  # (read afresh: another thread changes it)


def pending(cell: RedisCell) -> bool:
    return cell.pending


def live_breaker(url: str, policy: dict[str, Any], clock: FakeClock) -> tuple[CircuitBreaker, RedisStore, RedisCell]:
    """A breaker on its own store whose agent is subscribed and whose view is fresh."""
    store = RedisStore.from_url(url)
    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock)
    wait_for(lambda: store.live)
    assert store.sync()
    cell = store._cells[("svc", None)]
    if not cell.passing and cell.state is State.CLOSED:
        cell.refresh(clock.monotonic())  # a view read before the subscription never passes
    return breaker, store, cell


def test_closed_calls_and_open_rejections_make_no_round_trip(url: str) -> None:
    clock = FakeClock()
    breaker, store, cell = live_breaker(url, {"failure_threshold": 3}, clock)
    assert cell.passing
    trips = Trips(store)
    for _ in range(1000):
        breaker.call(ok)
    assert trips.count == 0
    breaker.force_open()
    trips.count = 0
    for _ in range(1000):
        with pytest.raises(CircuitOpenError):
            breaker.call(ok)
    assert trips.count == 0
    snap = breaker.snapshot()  # one script call, carrying everything counted locally
    assert trips.count == 1
    assert (snap.successes, snap.rejections) == (1000, 1000)


def test_a_failure_is_one_round_trip_and_carries_the_successes_before_it(url: str) -> None:
    clock = FakeClock()
    policy = {"failure_rate_threshold": 0.5, "count_window": 20, "minimum_calls": 20}
    breaker, store, _ = live_breaker(url, policy, clock)
    trips = Trips(store)
    for _ in range(9):
        breaker.call(ok)
    fail(breaker)
    assert trips.count == 1
    snap = breaker.snapshot()
    assert (snap.window_calls, snap.window_failures, snap.successes) == (10, 1, 9)


def test_aggregated_successes_fill_a_count_window_in_order_of_arrival(url: str) -> None:
    # 30 successes sent at once into a window of 20: the window holds 20 successes, then
    # 10 failures make it 50 % and trip.
    clock = FakeClock()
    policy = {"failure_rate_threshold": 0.5, "count_window": 20, "minimum_calls": 20, "failure_threshold": None}
    breaker, _, _ = live_breaker(url, policy, clock)
    for _ in range(30):
        breaker.call(ok)
    assert breaker.snapshot().window_calls == 20
    fail(breaker, 9)
    assert breaker.state is State.CLOSED
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_a_slow_success_is_sent_at_once(url: str) -> None:
    clock = FakeClock()
    policy = {"slow_call_duration": 1.0, "slow_call_rate_threshold": 0.5, "minimum_calls": 2, "failure_threshold": None}
    breaker, store, _ = live_breaker(url, policy, clock)
    trips = Trips(store)
    breaker.call(ok)
    assert trips.count == 0

    def slow() -> None:
        clock.advance(2.0)

    breaker.call(slow)
    assert trips.count == 1
    assert breaker.state is State.OPEN  # 1 slow of 2 calls: the aggregated success counted


def test_successes_from_before_a_trip_do_not_count_in_the_next_window(url: str) -> None:
    clock = FakeClock()
    policy = {"failure_rate_threshold": 0.5, "count_window": 4, "minimum_calls": 4, "failure_threshold": None}
    breaker, _, cell = live_breaker(url, policy, clock)
    stale = cell.generation
    breaker.force_open()
    breaker.close()
    breaker.call(ok)  # a fresh CLOSED generation
    cell.record_success(stale, 0.0, cell.policy, clock.monotonic())  # finished after the trip
    snap = breaker.snapshot()
    assert (snap.successes, snap.window_calls) == (2, 1)


def test_a_trip_reaches_every_other_process_view_through_the_channel(url: str) -> None:
    clock = FakeClock()
    here, _, _ = live_breaker(url, {"failure_threshold": 2}, clock)
    there, there_store, there_cell = live_breaker(url, {"failure_threshold": 2}, clock)
    assert there_cell.passing
    fail(here, 2)
    assert there_store.sync()
    assert (there_cell.state, there_cell.passing, there_cell.generation) == (State.OPEN, False, 1)
    assert there_cell.open_until == pytest.approx(clock.monotonic() + 30.0)
    trips = Trips(there_store)
    with pytest.raises(CircuitOpenError) as caught:
        there.call(ok)
    assert trips.count == 0
    assert caught.value.retry_after == pytest.approx(30.0)
    here.close()
    assert there_store.sync()
    # Heard, not read: the next call asks once (the close may come with another policy,
    # a reset's), then calls pass without asking.
    assert (there_cell.state, there_cell.passing) == (State.CLOSED, False)
    assert there.call(ok) == "ok"
    assert trips.count == 1
    assert there_cell.passing
    assert there.call(ok) == "ok"
    assert trips.count == 1


def test_only_the_probe_asks_in_half_open_the_others_reject_locally(url: str) -> None:
    clock = FakeClock()
    policy = {"failure_threshold": 1, "reset_timeout": 10.0, "half_open_max_calls": 1, "success_threshold": 1}
    prober, _prober_store, prober_cell = live_breaker(url, policy, clock)
    other, other_store, other_cell = live_breaker(url, policy, clock)
    fail(prober)
    clock.advance(10.0)
    ticket, _ = prober_cell.acquire(prober.policy, clock.monotonic())  # the one probe slot
    assert isinstance(ticket, Probe)
    assert other_store.sync()
    assert other_cell.state is State.HALF_OPEN
    trips = Trips(other_store)
    for _ in range(5):
        with pytest.raises(CircuitOpenError):
            other.call(ok)
    assert trips.count == 1  # asked once, then knew every slot was taken
    prober_cell.record_success(ticket, 0.01, prober.policy, clock.monotonic())
    assert other_store.sync()
    assert view_of(other_cell) is State.CLOSED
    assert other.call(ok) == "ok"  # (asks once after a heard transition)
    assert other_cell.passing


def test_a_neutral_probe_frees_its_slot_for_other_processes(url: str) -> None:
    clock = FakeClock()
    policy = {"failure_threshold": 1, "reset_timeout": 10.0, "half_open_max_calls": 1, "success_threshold": 1}
    prober, _, prober_cell = live_breaker(url, policy, clock)
    other, other_store, _ = live_breaker(url, policy, clock)
    fail(prober)
    clock.advance(10.0)
    ticket, _ = prober_cell.acquire(prober.policy, clock.monotonic())
    assert other_store.sync()
    with pytest.raises(CircuitOpenError):
        other.call(ok)
    from celery_breaker.core import Outcome

    prober_cell.finish(ticket, Outcome.IGNORED, 0.0, prober.policy, clock.monotonic())
    assert other_store.sync()
    assert other.call(ok) == "ok"  # it asked again and got the freed slot
    assert other.state is State.CLOSED


def test_losing_the_channel_makes_every_call_ask_until_it_is_back(url: str, server: redis.Redis) -> None:
    clock = FakeClock()
    breaker, store, cell = live_breaker(url, {"failure_threshold": 3}, clock)
    server.client_kill_filter(_type="pubsub")
    wait_for(lambda: store.losses == 1)
    wait_for(lambda: store.live)  # resubscribed; every view is read again
    wait_for(lambda: cell.passing)
    trips = Trips(store)
    breaker.call(ok)
    assert trips.count == 0


def test_a_silent_channel_is_declared_lost_by_the_heartbeat(
    url: str, server: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    _, store, cell = live_breaker(url, {"failure_threshold": 3}, clock)
    # CLIENT PAUSE holds every reply (the pings' too) without closing a connection.
    server.client_pause(int(agent_module.DEAD_AFTER * 1000 * 3), all=True)
    try:
        wait_for(lambda: store.losses == 1)
        assert not cell.passing
    finally:
        server.client_unpause()
    wait_for(lambda: cell.passing)


def test_a_forked_child_asks_redis_until_its_own_agent_hears(url: str) -> None:
    clock = FakeClock()
    breaker, store, cell = live_breaker(url, {"failure_threshold": 3}, clock)
    assert cell.passing
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what its view says, then whether it passes after a call
        try:
            before = cell.passing
            breaker.call(ok)
            wait_for(lambda: store.live)
            breaker.call(ok)
            os.write(
                write, f"{int(before)}{int(store._agent is not None and store._agent.pid == os.getpid())}".encode()
            )
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read, 16).decode()
    os.close(read)
    assert status == 0
    assert answer == "01"  # not passing after fork; its own agent started in the child


def test_a_subscription_redis_refuses_is_told_once(
    redis_url: str, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user without SUBSCRIBE (or the channel, for SUBSCRIBE alone) runs every script:
    calls work, each asking Redis, and nothing said why the fast path never came."""
    user = f"user-{unique_prefix()}"
    server.acl_setuser(
        user, enabled=True, passwords=["+secret"], keys=["*"], channels=["*"], commands=["+@all", "-subscribe"]
    )
    store = RedisStore.from_url(
        redis_url.replace("redis://", f"redis://{user}:secret@", 1) + f"?key_prefix={unique_prefix()}"
    )

    def refusals() -> int:
        entries: list[dict[str, Any]] = server.acl_log()
        return sum(int(entry["count"]) for entry in entries if entry["username"] == user)

    try:
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            assert CircuitBreaker("svc", storage=store).call(ok) == "ok"
            wait_for(lambda: refusals() >= 3)  # the agent tried three times
        told = [r.getMessage() for r in caplog.records if "refused to subscribe" in r.getMessage()]
        assert len(told) == 1
        assert store.channel in told[0]
        assert "no permissions to run the 'subscribe' command" in told[0]
        assert not store.live
    finally:
        store.close()
        server.acl_deluser(user)


def test_a_redis_refusing_writes_is_not_a_channel_lost_ten_times_a_second(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that answers SUBSCRIBE but refuses every write (full under noeviction,
    read-only, short of min-replicas-to-write) failed the agent's reading of its views
    after each subscription: it logged a lost channel, and tried again 0.1 s later, since
    the subscription had reset its backoff (ten WARNINGs and INFOs a second per process)."""
    with RedisServer() as server:
        server.start()
        store = RedisStore.from_url(f"{server.url}?key_prefix={unique_prefix()}")
        tries: list[float] = []
        go_live = store.go_live

        def counted() -> None:
            tries.append(time.monotonic())
            go_live()

        monkeypatch.setattr(store, "go_live", counted)
        # (Held: a view for the agent to read again, a write, after each subscription.
        # Unheld, only the call's unsent count (left to the store when the breaker was
        # freed) made that reading write; in a CI run on a busy machine the periodic flush
        # had sent it before the channel was killed, the reading succeeded, and the agent
        # never had to try five times.)
        breaker = CircuitBreaker("svc", storage=store)
        try:
            assert breaker.call(ok) == "ok"
            wait_for(lambda: store.settled)
            store.flush()  # (what that periodic flush did)
            server.admin().config_set("maxmemory", "1")  # (noeviction: every write refused)
            with caplog.at_level(logging.INFO, logger="celery_breaker"):
                server.admin().client_kill_filter(_type="pubsub")
                wait_for(lambda: len(tries) >= 5)
            # (This store's: earlier tests' stores, never closed, log their own, their
            # heartbeats missed on a loaded machine: 11 of them in a random-order run.)
            lost = [
                r for r in caplog.records
                if "lost the breaker transitions channel" in r.getMessage() and store.label in r.getMessage()
            ]  # fmt: skip
            assert len(lost) <= 1  # the connection killed, not each failed reading
            assert store.losses <= 1
            assert tries[4] - tries[1] >= 1.5  # backing off (0.25 + 0.5 + 1 s), not every 0.1 s
            assert not store.settled
        finally:
            store.close()


def test_foreign_messages_on_the_channel_are_ignored(url: str, server: redis.Redis) -> None:
    clock = FakeClock()
    breaker, store, cell = live_breaker(url, {"failure_threshold": 3}, clock)
    for junk in (b"hello", b"a\nb\nc\nd\ne", cell.state_key.encode() + b"\nx\nnot-a-number\nopen\n", b"\xff\xfe"):
        server.publish(store.channel, junk)
    assert store.sync()
    assert store.live
    assert cell.passing
    assert cell.state is State.CLOSED
    assert breaker.call(ok) == "ok"


def test_the_agent_stops_when_the_store_has_no_breakers(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "IDLE_EXIT", 0.0)
    clock = FakeClock()
    breaker, store, _ = live_breaker(url, {"failure_threshold": 3}, clock)
    agent = store._agent
    assert agent is not None
    del breaker
    store._cells.clear()
    agent.join(timeout=10)
    assert not agent.is_alive()
    assert not store.live
    assert store._agent is None
    again = CircuitBreaker("svc", {"failure_threshold": 3}, storage=store, clock=clock)  # starts a new one
    wait_for(lambda: store.live)
    assert again.call(ok) == "ok"


def test_sync_is_true_without_a_subscription(url: str) -> None:
    store = RedisStore.from_url(url)
    assert not store.live
    assert store.sync()


def test_policy_mismatch_slow_duration_is_adopted_from_redis(url: str) -> None:
    clock = FakeClock()
    first = BreakerPolicy(failure_threshold=3)
    CircuitBreaker("svc", first, storage=RedisStore.from_url(url), clock=clock)
    store = RedisStore.from_url(url)
    other = CircuitBreaker("svc", {"slow_call_duration": 0.5, "slow_call_rate_threshold": 0.5}, storage=store)
    cell = store._cells[("svc", None)]
    assert cell._slow is None  # the stored policy has no slow calls: successes stay local
    assert other.call(ok) == "ok"


def test_flush_stores_sends_what_was_counted_locally(url: str) -> None:
    clock = FakeClock()
    breaker, _, cell = live_breaker(url, {"failure_threshold": 3}, clock)
    for _ in range(5):
        breaker.call(ok)
    breaker._cell.note_deferral()
    assert pending(cell)
    flush_stores()  # what a prefork child does before it exits
    assert not pending(cell)
    elsewhere = CircuitBreaker("svc", storage=RedisStore.from_url(url), clock=clock).snapshot()
    assert (elsewhere.successes, elsewhere.deferrals) == (5, 1)


def test_flush_returns_only_once_a_flush_in_flight_on_another_thread_has_landed(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent thread may have taken the counts and not yet sent them: a flush that
    found nothing pending must still wait for that send (a CLI test saw the success land
    after ``flush_stores()`` returned)."""
    clock = FakeClock()
    breaker, store, cell = live_breaker(url, {"failure_threshold": 3}, clock)
    breaker.call(ok)
    assert pending(cell)
    taken, release = threading.Event(), threading.Event()
    run = store.run

    def slow_run(script: str, keys: Any, argv: Any) -> Any:
        if threading.current_thread().name == "in-flight":
            taken.set()  # the counts are taken (argv holds them), the reply is not back yet
            assert release.wait(10)
        return run(script, keys, argv)

    monkeypatch.setattr(store, "run", slow_run)
    in_flight = threading.Thread(target=cell.flush, name="in-flight")
    in_flight.start()
    assert taken.wait(10)
    assert not pending(cell)
    done = threading.Event()

    def flush_then_say_so() -> None:
        store.flush()
        done.set()

    flusher = threading.Thread(target=flush_then_say_so)
    flusher.start()
    assert not done.wait(0.2)  # held: the send in flight has not landed
    release.set()
    assert done.wait(10)
    in_flight.join(10)
    flusher.join(10)
    elsewhere = CircuitBreaker("svc", storage=RedisStore.from_url(url), clock=clock).snapshot()
    assert elsewhere.successes == 1


class Neutral(Exception):
    """An outcome the policy ignores."""


def test_a_process_that_frees_a_probe_slot_takes_it_again_without_waiting_for_its_message(url: str) -> None:
    """A neutral probe frees its slot at once: its own process's next call is admitted,
    not refused on "every slot taken" until the process hears its own message (held back
    here, as a busy channel may)."""
    clock = FakeClock()
    policy = BreakerPolicy(failure_threshold=1, half_open_max_calls=1, success_threshold=1, reset_timeout=5,
                           ignore_exceptions=(Neutral,))  # fmt: skip
    _, store, _ = live_breaker(url, {}, clock)
    breaker = CircuitBreaker("svc-probe", policy, storage=store, clock=clock)
    fail(breaker)
    clock.advance(5)
    breaker._cell.hear = lambda *args, **kwargs: None  # type: ignore[attr-defined]  # (its messages arrive late)
    breaker.__enter__()  # the one probe, held
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)  # every slot taken
    breaker.__exit__(Neutral, Neutral(), None)  # neutral: the slot is free again
    assert breaker.call(ok) == "ok"  # a new probe, admitted at once, closes it
    assert breaker.state is State.CLOSED


def test_an_open_period_longer_than_this_process_policy_allows_is_heard(url: str) -> None:
    """Another process reset the breaker to a policy with longer open periods, then it
    tripped: this process, still on the old policy, follows the trip."""
    clock = FakeClock()
    old = {"failure_threshold": 1, "reset_timeout": 30.0}  # at most 300 s open
    there, there_store, there_cell = live_breaker(url, old, clock)
    here_store = RedisStore.from_url(url)
    here = CircuitBreaker("svc", {"failure_threshold": 1, "reset_timeout": 3600.0}, storage=here_store, clock=clock)
    here.reset()
    fail(here)
    assert there_store.sync()
    assert there_cell.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        there.call(ok)
    here_store.close()


def test_a_reset_heard_from_another_process_brings_its_slow_call_limit(url: str) -> None:
    """Another process reset the breaker to a policy with a slow-call rule: this process's
    next slow success is judged slow (it trips the breaker), not counted as a fast one."""
    clock = FakeClock()
    there, there_store, _ = live_breaker(url, {"failure_threshold": 5}, clock)
    here_store = RedisStore.from_url(url)
    new = BreakerPolicy(failure_threshold=5, slow_call_duration=1.0, slow_call_rate_threshold=0.5, count_window=4,
                        minimum_calls=1)  # fmt: skip
    CircuitBreaker("svc", new, storage=here_store, clock=clock).reset()
    assert there_store.sync()

    def slow() -> str:
        clock.advance(3.0)
        return "ok"

    assert there.call(slow) == "ok"
    there_store.flush()
    assert state_of(there) is State.OPEN
    here_store.close()


def test_a_flush_while_other_threads_make_breakers_never_fails(url: str) -> None:
    # The agent's flush every second walked the store's weak map of cells while other
    # threads added to it (a new per-key breaker each): "dictionary changed size during
    # iteration", a WARNING with a traceback, and the store went dark (every call asking
    # Redis until every view was read again). A short switch interval makes the threads
    # take turns inside the walk often, as a long walk (tens of thousands of breakers) does.
    store = RedisStore.from_url(url)
    breakers = [CircuitBreaker("tenant", storage=store, key=f"first-{n}") for n in range(2000)]
    made = threading.Event()
    stop = threading.Event()

    def make() -> None:
        n = 0
        while not stop.is_set():
            breakers.append(CircuitBreaker("tenant", storage=store, key=str(n)))
            n += 1
            made.set()

    interval = sys.getswitchinterval()
    makers = [threading.Thread(target=make) for _ in range(2)]
    sys.setswitchinterval(1e-6)
    try:
        for maker in makers:
            maker.start()
        made.wait(10)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            store.flush()
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        for maker in makers:
            maker.join(10)
        store.close()


@pytest.mark.parametrize("operator_move", ["reset", "delete"])
def test_counts_sent_after_an_operators_reset_or_delete_do_not_undo_it(url: str, operator_move: str) -> None:
    # A worker counts rejections, deferrals and successes locally and sends them up to a
    # second later. An operator's reset (or delete) that came between was undone by them:
    # the fresh breaker showed the old breaker's rejections and deferrals (8-26 of them
    # under load). What was counted before the move is dropped; what after, kept.
    clock = FakeClock()
    there, there_store, cell = live_breaker(url, {"failure_threshold": 1}, clock)
    fail(there)
    assert there_store.sync()
    assert state_of(there) is State.OPEN
    with cell._sending:  # (the agent's flush waits: the counts stay unsent until after the move)
        for _ in range(5):
            with pytest.raises(CircuitOpenError):
                there.call(ok)
        for _ in range(3):
            there.note_deferral()
        assert cell.pending
        # The breaker made again after a delete is of a later time (this test's clock: its
        # incarnation is the time it is made at). Moved before the operator's store exists:
        # its agent's flush, reading the clock before the move and run after the delete,
        # made the breaker again under the deleted one's incarnation, which then took the
        # counts (1 run in 5-20 under load).
        clock.advance(1.0)
        here_store = RedisStore.from_url(url)
        operator = CircuitBreaker("svc", {"failure_threshold": 1}, storage=here_store, clock=clock)
        if operator_move == "reset":
            operator.reset()
        else:
            assert here_store.delete("svc", None)
    there_store.flush()
    snap = operator.snapshot()
    assert (snap.state, snap.rejections, snap.deferrals, snap.failures, snap.trips) == (State.CLOSED, 0, 0, 0, 0)
    # Counted after this process heard the move: sent and kept.
    assert there_store.sync()
    for _ in range(4):
        there.call(ok)
    there.note_deferral()
    there_store.flush()
    snap = operator.snapshot()
    assert (snap.successes, snap.deferrals) == (4, 1)
    here_store.close()


def test_counts_a_process_sends_without_having_heard_of_a_reset_are_dropped_once(url: str) -> None:
    # A process that has not heard the reset yet (its subscription lags) sends what it
    # counted before it with its next script call: dropped; its next counts are kept.
    clock = FakeClock()
    there, there_store, cell = live_breaker(url, {"failure_threshold": 3}, clock)
    fail(there)  # (a breaker with nothing to forget is not reset: its failure makes one)
    assert there_store.sync()
    with cell._sending:
        for _ in range(6):
            there.call(ok)
        here_store = RedisStore.from_url(url)
        CircuitBreaker("svc", {"failure_threshold": 3}, storage=here_store, clock=clock).reset()
        snap = there.snapshot  # (bound now; the call below is the first script call since)
    found = snap()
    assert (found.successes, found.failures, found.window_calls) == (0, 0, 0)
    for _ in range(2):
        there.call(ok)
    there_store.flush()
    assert there.snapshot().successes == 2
    here_store.close()


def used_rate_breaker(url: str, clock: FakeClock) -> tuple[CircuitBreaker, RedisStore, RedisCell]:
    """A failure-rate breaker (half of at least 5 calls) on a store of ``idle_ttl=60``,
    called once and its count sent."""
    policy = {"failure_threshold": None, "failure_rate_threshold": 0.5, "count_window": 20, "minimum_calls": 5}
    there, there_store, cell = live_breaker(f"{url}&idle_ttl=60", policy, clock)
    there.call(ok)
    there_store.flush()
    return there, there_store, cell


def counted_as_the_new_breaker(there: CircuitBreaker, there_store: RedisStore) -> None:
    """8 successes and 5 failures after the breaker's keys expired, sent: all counted by the
    breaker made again, which stays CLOSED (dropped, the successes left 5 failures of 5)."""
    for _ in range(8):
        there.call(ok)
    for _ in range(5):
        fail(there)
    there_store.flush()
    snap = there.snapshot()
    assert (snap.successes, snap.failures, snap.window_calls, snap.window_failures) == (8, 5, 13, 5)
    assert snap.state is State.CLOSED


def test_counts_made_after_an_idle_breaker_expired_are_the_new_ones(url: str, server: redis.Redis) -> None:
    # A worker keeps its breaker, and its view, for its whole life, and a key that expires
    # tells nobody. After a breaker sat idle past idle_ttl, its first second's successes were
    # sent under the expired incarnation and dropped: the window held the failures alone,
    # and a healthy breaker tripped (5 failures of 13 calls read as 5 of 5).
    clock = FakeClock()
    there, there_store, cell = used_rate_breaker(url, clock)
    server.delete(*cell._keys)  # (the keys expire: nothing is published)
    cell._seen -= 61.0  # (nothing read or heard of the breaker for longer than idle_ttl)
    clock.advance(61.0)
    counted_as_the_new_breaker(there, there_store)


def test_counts_made_after_keys_expired_sooner_than_idle_ttl_after_the_last_read_are_the_new_ones(
    url: str, server: redis.Redis
) -> None:
    # A script gives the keys idle_ttl again only once a tenth of it (at most a minute)
    # has run down (common.lua save()), so keys read last with 54.5 s of 60 left expired
    # while this process's view was younger than idle_ttl: its first counts went under
    # the expired incarnation, were dropped, and a healthy breaker tripped on its failures
    # alone (5 of 13 calls read as 5 of 5), as before decision 87's idle-expiry fix.
    clock = FakeClock()
    there, there_store, cell = used_rate_breaker(url, clock)
    for key in server.keys(cell.state_key[: -len(":s")].replace("{", "\\{").replace("}", "\\}") + "*"):
        server.pexpire(key, 54_500)  # (their TTL refreshed 5.5 s ago)
    cell.refresh(clock.monotonic())  # this process's last read of the breaker ...
    assert 0 < server.pttl(cell.state_key) <= 54_500  # ... leaves their TTL as it was
    server.delete(*cell._keys)  # (54.5 s later they expire: nothing is published)
    cell._seen -= 55.0
    clock.advance(55.0)
    counted_as_the_new_breaker(there, there_store)


def test_a_success_admitted_before_a_reset_drops_only_itself(url: str) -> None:
    # A call admitted before a reset finished long after it, in the same send as rejections
    # and deferrals counted since the breaker tripped again: its old generation took the
    # whole send for one from before the reset, and they were dropped with it.
    clock = FakeClock()
    there, there_store, cell = live_breaker(url, {"failure_threshold": 2}, clock)
    fail(there)  # (a breaker with something to forget)
    held = HeldCall(there)
    here_store = RedisStore.from_url(url)
    CircuitBreaker("svc", {"failure_threshold": 2}, storage=here_store).reset()
    assert there_store.sync()
    fail(there, 2)
    assert state_of(there) is State.OPEN
    with cell._sending:
        for _ in range(5):
            with pytest.raises(CircuitOpenError):
                there.call(ok)
        for _ in range(3):
            there.note_deferral()
        held.succeed()  # (admitted before the reset: the reset breaker's)
    there_store.flush()
    snap = there.snapshot()
    assert (snap.rejections, snap.deferrals, snap.successes, snap.failures) == (5, 3, 0, 2)
    here_store.close()


def test_counts_of_a_dropped_breaker_object_do_not_undo_a_reset(url: str) -> None:
    # Code that makes a breaker object per call leaves its counts to the store when the
    # last object goes (RedisCell.__del__); they were sent under a fresh cell's view, so a
    # reset between counting and sending was undone by them (30 rejections, 30 deferrals).
    store = RedisStore.from_url(url)
    breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=store)
    breaker.force_open()
    cell = store._cells[("svc", None)]
    with store._sending_orphans, cell._sending:  # (held: the reset comes before they are sent)
        for _ in range(5):
            with pytest.raises(CircuitOpenError):
                breaker.call(ok)
            breaker.note_deferral()
        cell.__del__()  # (what the garbage collector runs when the last breaker object goes)
        del store._cells[("svc", None)]  # (and the store forgets the cell: the next is a new one)
        assert len(store.orphans) == 1
        here_store = RedisStore.from_url(url)
        operator = CircuitBreaker("svc", {"failure_threshold": 1}, storage=here_store)
        operator.reset()
    store.flush()
    snap = operator.snapshot()
    assert (snap.state, snap.rejections, snap.deferrals) == (State.CLOSED, 0, 0)
    store.close()
    here_store.close()
