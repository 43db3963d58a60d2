"""breaker_on_storage_error: what breakers do while their Redis store is down, and rejoining it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import redis

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, ConfigurationError, State, TooManyRequests
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.core import Transition
from celery_breaker.errors import StorageError
from celery_breaker.storage import FallbackStore
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock

from ..servers import RedisServer
from ..unit.support import HeldCall, down, fail, ok, state_of
from .conftest import unique_prefix


def dead_store(password: str | None = None) -> RedisStore:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    credentials = "" if password is None else f":{password}@"
    return RedisStore.from_url(f"redis://{credentials}127.0.0.1:{port}?time=client")


def block_of(breaker: CircuitBreaker) -> Callable[[], None]:
    def block() -> None:
        with breaker:
            pass

    return block


def test_local_mode_keeps_a_working_breaker_of_this_process(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="celery_breaker")
    clock = FakeClock()
    breaker = CircuitBreaker("svc", {"failure_threshold": 2}, storage=dead_store(), clock=clock)
    assert breaker.call(ok) == "ok"
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN  # it still protects the downstream
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per call (the stand-in's trip says it too, as its own)
    assert "breaker_on_storage_error=local" in warnings[0].getMessage()


def test_a_stand_in_parks_nothing_so_a_fresh_runs_429_opens_it() -> None:
    """``finish_refusal`` on the stand-in of an outage: no release is under way there (it
    parks nothing), so a 429 met by a run that was not released opens it for the Retry-After."""
    breaker = CircuitBreaker("svc", {"failure_threshold": 5}, storage=dead_store(), clock=FakeClock())
    run = breaker.begin_run(lambda e: e)
    with run:
        run.settle(TooManyRequests(7))
    assert run.refused_for is None
    assert state_of(breaker) is State.OPEN


def test_allow_mode_lets_every_call_through_and_never_trips() -> None:
    breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=dead_store(), clock=FakeClock(),
                             on_storage_error="allow")  # fmt: skip
    for _ in range(3):
        with pytest.raises(ConnectionError):
            breaker.call(down)
    assert breaker.call(ok) == "ok"


def test_deny_mode_rejects_every_call_saying_the_store_is_down_not_an_operator() -> None:
    store = dead_store("s3cret-pw")
    breaker = CircuitBreaker("svc", storage=store, clock=FakeClock(), on_storage_error="deny")
    for guarded in (lambda: breaker.call(ok), breaker(ok), block_of(breaker)):
        with pytest.raises(CircuitOpenError) as info:
            guarded()
        assert info.value.state is State.FORCED_OPEN
        text = str(info.value)  # (the deferral's reason, in Flower and the worker's log, carries it)
        assert "cannot be reached (breaker_on_storage_error='deny'" in text, text
        assert "s3cret-pw" not in text
        assert "s3cret-pw" not in repr(breaker)
    assert "store unreachable: breaker_on_storage_error='deny'" in repr(breaker)


@pytest.mark.parametrize("mode", ["local", "allow"])
def test_other_modes_say_nothing_of_the_store_in_their_rejections(mode: str) -> None:
    breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=dead_store(), clock=FakeClock(),
                             on_storage_error=mode)  # fmt: skip
    with contextlib.suppress(ConnectionError):
        breaker.call(down)  # (local: opens its stand-in; allow: passes)
    if mode == "local":
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(ok)
        assert str(info.value).startswith("breaker 'svc' open, next probe in"), str(info.value)
    assert "store unreachable" not in repr(breaker)


def test_once_rejoined_a_deny_breaker_forced_open_by_an_operator_says_only_that(
    restartable_redis: RedisServer,
) -> None:
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=deny"
    breaker = CircuitBreaker("svc", storage=url, clock=clock, on_storage_error="deny")
    assert breaker.call(ok) == "ok"
    restartable_redis.stop()
    heard_redis_go(breaker)
    with contextlib.suppress(CircuitOpenError):
        breaker.call(ok)  # (the success that finds Redis gone)
    with pytest.raises(CircuitOpenError, match="cannot be reached"):
        breaker.call(ok)

    restartable_redis.start()
    CircuitBreaker("svc", storage=f"{url}&socket_timeout=0.6", clock=clock).force_open()  # an operator
    clock.advance(6)  # past the retry interval: the next call asks Redis again
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert state_of(breaker) is State.FORCED_OPEN  # rejoined: the operator's
    assert str(info.value) == "breaker 'svc' forced_open"
    assert "store unreachable" not in repr(breaker)


def test_an_unknown_mode_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="breaker_on_storage_error must be one of local, allow, deny"):
        CircuitBreaker("svc", storage=dead_store(), on_storage_error="panic")


@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def heard_redis_go(breaker: CircuitBreaker) -> None:
    """Wait until the store's agent has heard Redis go. While it still follows transitions,
    a success is counted here and asks nothing, so the next failure's admission is the
    shared breaker's, and its outcome on the stand-in counts as stale, judged by no rule
    (by design): a test counting failures on the stand-in must start after this."""
    primary = cast(RedisStore, cast(FallbackStore, breaker.store).primary)
    deadline = time.monotonic() + 10.0
    while primary.live:  # (a real thread's progress, with a deadline)
        assert time.monotonic() < deadline, "the store's agent did not hear Redis go"
        time.sleep(0.01)


def view_expired(breaker: CircuitBreaker) -> None:
    """Wait until this process's rejecting view of the breaker is too old to reject calls
    by (``VIEW_TTL`` of real time with no transitions heard): its next call asks the store."""
    primary = cast(RedisStore, cast(FallbackStore, breaker.store).primary)
    cell = primary.cell(breaker.name, breaker.key, breaker.policy, FakeClock(), read=False)
    deadline = time.monotonic() + 10.0
    while not cell.evicted:  # (a real clock's progress, with a deadline)
        assert time.monotonic() < deadline, "the view did not expire"
        time.sleep(0.01)


def test_a_store_outage_falls_back_and_the_breaker_rejoins_when_redis_returns(restartable_redis: RedisServer) -> None:
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=fallback"
    breaker = CircuitBreaker("svc", {"failure_threshold": 2}, storage=url, clock=clock)
    assert isinstance(cast(object, breaker.store), FallbackStore)
    assert breaker.call(ok) == "ok"  # on the shared breaker

    restartable_redis.stop()
    heard_redis_go(breaker)
    # Recording that success fails: the stand-in takes over, and calls keep flowing.
    assert breaker.call(ok) == "ok"
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN  # the stand-in protects the downstream meanwhile

    restartable_redis.start()  # a fresh, empty Redis on the same port
    other = CircuitBreaker("svc", {"failure_threshold": 2}, storage=f"{url}&socket_timeout=0.6", clock=clock)
    other.force_open()  # written to the new Redis by another "process"
    clock.advance(6)  # past the retry interval: the next call asks Redis again
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    assert state_of(breaker) is State.FORCED_OPEN  # rejoined the shared state


def test_what_the_stand_in_counted_reaches_the_shared_breaker_when_it_rejoins(
    restartable_redis: RedisServer,
) -> None:
    # Dropped with the stand-in, an outage's successes, rejections and deferrals were
    # missing for good from every surface (20 of 50 successes, 40 of 62 deferrals in a
    # review's run), while Flower had counted every deferral event.
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=standin-counts"
    breaker = CircuitBreaker("svc", {"failure_threshold": 2}, storage=url, clock=clock)
    assert breaker.call(ok) == "ok"
    restartable_redis.stop()
    heard_redis_go(breaker)
    for _ in range(4):
        assert breaker.call(ok) == "ok"  # (on the stand-in once the first found Redis gone)
    breaker.note_deferral()
    fail(breaker, 2)  # (the stand-in opens)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)

    restartable_redis.start()  # (empty: what it holds now is what was sent since)
    clock.advance(6)  # past the retry interval: the next call asks Redis again
    assert breaker.call(ok) == "ok"
    breaker.store.flush()
    found = CircuitBreaker("svc", {"failure_threshold": 2}, storage=url, clock=clock).snapshot()
    assert found.successes >= 4  # (the stand-in's, and the call that rejoined)
    assert found.rejections >= 1
    assert found.deferrals == 1


def test_a_stand_ins_moves_are_told_as_its_own_and_so_is_the_way_back(restartable_redis: RedisServer) -> None:
    # The stand-in's trip went out as the breaker's (a `breaker-opened` event with no
    # word of the outage, one per process), and nothing was told when it rejoined: an
    # event consumer (Flower) showed the breaker open for good while the store had it closed.
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=standin-moves"
    breaker = CircuitBreaker("svc", {"failure_threshold": 2, "reset_timeout": 30.0}, storage=url, clock=clock)
    told: list[Transition] = []
    breaker.add_listener(told.append)
    assert breaker.call(ok) == "ok"
    restartable_redis.stop()
    heard_redis_go(breaker)
    assert breaker.call(ok) == "ok"  # (the stand-in takes over)
    fail(breaker, 2)
    ((source, target, reason),) = [(t.source, t.target, t.reason) for t in told]
    assert (source, target) == (State.CLOSED, State.OPEN)
    assert reason.endswith("; this process's stand-in while redis://127.0.0.1:" + str(restartable_redis.port)
                           + "?time=client&key_prefix=standin-moves cannot be reached"), reason  # fmt: skip

    restartable_redis.start()  # (empty: the shared breaker is CLOSED)
    clock.advance(6)  # past the retry interval
    assert breaker.call(ok) == "ok"
    back = told[1]
    assert (back.source, back.target) == (State.OPEN, State.CLOSED)
    assert back.reason.startswith("rejoined the shared breaker in redis://")
    assert len(told) == 2  # (told once)


def test_each_outage_starts_with_a_fresh_stand_in(restartable_redis: RedisServer) -> None:
    """The stand-in of one outage is dropped when the breaker rejoins Redis: the next
    outage starts CLOSED, not where the last one left off (OPEN, its windows full)."""
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=fresh-stand-in"
    breaker = CircuitBreaker("svc", {"failure_threshold": 2, "reset_timeout": 30.0}, storage=url, clock=clock)
    assert breaker.call(ok) == "ok"
    restartable_redis.stop()
    heard_redis_go(breaker)
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN  # (the stand-in of the first outage tripped)
    restartable_redis.start()
    clock.advance(6)  # (past the retry interval)
    assert breaker.call(ok) == "ok"  # rejoined: the shared breaker is CLOSED
    restartable_redis.stop()
    fail(breaker)  # (the second outage: on a stand-in again)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED


def test_a_stand_in_starts_where_the_shared_breaker_was_last_seen(restartable_redis: RedisServer) -> None:
    """An OPEN shared breaker's stand-in is OPEN until the same time, then half-opens: one
    probe, not every call, and one failure reopens it. A fresh CLOSED stand-in let
    ``failure_threshold`` failures per process through to a downstream every process knew
    was down (decision 105)."""
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=seen-open"
    policy = {"failure_threshold": 3, "reset_timeout": 30.0, "half_open_max_calls": 1}
    breaker = CircuitBreaker("svc", policy, storage=url, clock=clock)
    fail(breaker, 3)
    assert state_of(breaker) is State.OPEN  # (the shared breaker)
    restartable_redis.stop()
    heard_redis_go(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)  # (still the shared breaker's open time: 20 s left)
    clock.advance(21)
    probe = HeldCall(breaker)  # the stand-in's: its time is up
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)  # one probe at a time, as the policy says
    probe.fail()
    assert state_of(breaker) is State.OPEN  # one failure reopens it
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)


@pytest.mark.parametrize("operator", [State.FORCED_OPEN, State.DISABLED])
def test_a_stand_in_keeps_what_an_operator_set(restartable_redis: RedisServer, operator: State) -> None:
    """An operator's FORCED_OPEN (a partner asked to be left alone) holds every call while
    the store is down, however long, and DISABLED passes every call: a fresh CLOSED
    stand-in called the downstream an operator had closed off. Rejoining an empty store
    (the shared breaker CLOSED) is told as the way back."""
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=seen-{operator.value}"
    breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=url, clock=clock)
    told: list[Transition] = []
    breaker.add_listener(told.append)
    breaker.force_open() if operator is State.FORCED_OPEN else breaker.disable()
    restartable_redis.stop()
    heard_redis_go(breaker)
    if operator is State.FORCED_OPEN:
        view_expired(breaker)  # (then the next call asks the store, and finds it down)
    # (a DISABLED view is not trusted once the channel is lost: the next call asks already)
    clock.advance(3_600)
    for _ in range(3):
        if operator is State.FORCED_OPEN:
            with pytest.raises(CircuitOpenError):
                breaker.call(ok)
        else:
            fail(breaker)  # (passed, and trips nothing)
    assert state_of(breaker) is operator
    restartable_redis.start()  # (empty: the shared breaker is CLOSED)
    clock.advance(6)  # past the retry interval
    assert breaker.call(ok) == "ok"
    assert [(t.source, t.target) for t in told[1:]] == [(operator, State.CLOSED)]
    assert told[1].reason.startswith("rejoined the shared breaker in redis://")


@pytest.mark.parametrize(
    ("held", "fix"),
    [
        (State.FORCED_OPEN, "; if the operator's forced_open must hold, set it again: celery breaker open svc"),
        (State.DISABLED, "; if the operator's disabled must hold, set it again: celery breaker disable svc"),
        (State.OPEN, "; it trips again on the next failures"),
    ],
)
def test_a_state_lost_with_a_store_restarted_empty_is_said_with_the_fix(
    restartable_redis: RedisServer, held: State, fix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis restarted empty (no persistence) between two calls, each process still
    holding the breaker's view: it came back CLOSED, and the downstream an operator had
    held off (or that had tripped it) was called again, with no word in any process."""
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=lost-{held.value}"
    breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=url, clock=clock)
    if held is State.OPEN:
        fail(breaker)
    else:
        breaker.force_open() if held is State.FORCED_OPEN else breaker.disable()
    assert state_of(breaker) is held
    primary = cast(RedisStore, cast(FallbackStore, breaker.store).primary)
    losses = primary.losses
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        restartable_redis.stop()
        restartable_redis.start()  # (empty: the breaker's keys are gone)
        deadline = time.monotonic() + 10.0
        while not (primary.losses > losses and primary.live and primary.settled):  # (a real thread's progress)
            assert time.monotonic() < deadline, "the store's agent did not hear Redis again"
            time.sleep(0.01)
        assert breaker.call(ok) == "ok"  # (as documented: a store that lost it has a fresh breaker)
    lost = [r.getMessage() for r in caplog.records if "is gone from" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]
    assert f"breaker svc: its {held.value} state is gone from redis://" in lost[0]
    assert lost[0].endswith(f"it is closed now{fix}")


def test_a_breaker_deleted_by_the_process_holding_it_is_not_said_lost(
    restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Its own delete is heard through its subscription only once the agent hears it: the
    # process that deleted a breaker whose operator state it held took its next read for a
    # state lost in Redis.
    restartable_redis.start()
    store = RedisStore.from_url(f"{restartable_redis.url}?key_prefix=deleted-here")
    try:
        breaker = CircuitBreaker("svc", storage=store)
        breaker.force_open()
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            assert store.delete("svc", None)
            assert breaker.call(ok) == "ok"  # (afresh, closed)
            store.flush()
    finally:
        store.close()
    assert not [r.getMessage() for r in caplog.records if "is gone from" in r.getMessage()]


def _leases(store: RedisStore, name: str) -> dict[bytes, bytes]:
    client = store.client()
    return cast(dict[bytes, bytes], client.hgetall(store.keys_for(name, None)[4]))


def test_a_breaker_deleted_elsewhere_is_not_said_lost_by_a_count_flush_that_beat_the_delete(
    restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A count flush that reaches Redis after another process's `celery breaker delete`,
    # before this process's agent has heard the delete (it was busy: flushing other cells,
    # or, here, another message), found the breaker gone: the operator's delete was
    # logged as a forced_open state lost by the store.
    restartable_redis.start()
    url = f"{restartable_redis.url}?key_prefix={unique_prefix()}"
    store, elsewhere = RedisStore.from_url(url), RedisStore.from_url(url)
    busy, done = threading.Event(), threading.Event()

    def stall(state_key: str) -> None:  # (the agent, hearing a transition, waits here)
        if state_key == store.keys_for("other", None)[0]:
            busy.set()
            done.wait(10.0)

    try:
        breaker, other = CircuitBreaker("svc", storage=store), CircuitBreaker("other", storage=store)
        breaker.force_open()
        assert other.call(ok) == "ok"
        deadline = time.monotonic() + 10.0
        while not (store.live and store.settled):  # (a real thread's progress)
            assert time.monotonic() < deadline, "the store's agent did not hear Redis"
            time.sleep(0.01)
        with pytest.raises(CircuitOpenError):
            breaker.call(ok)  # (a rejection counted here, sent by the next flush)
        store.watch(stall)
        elsewhere.cell("other", None, BreakerPolicy(), SYSTEM_CLOCK).force(
            State.FORCED_OPEN, BreakerPolicy(), SYSTEM_CLOCK.monotonic()
        )
        assert busy.wait(10.0)
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            assert elsewhere.delete("svc", None)
            store.flush()  # (before the agent hears the delete)
            done.set()
            assert store.sync()  # (the delete heard)
            assert breaker.call(ok) == "ok"  # (afresh, closed)
    finally:
        done.set()
        store.close()
        elsewhere.close()
    assert not [r.getMessage() for r in caplog.records if "is gone from" in r.getMessage()]


def test_a_new_breaker_on_a_server_that_just_did_not_answer_is_not_asked_at_once(
    restartable_redis: RedisServer,
) -> None:
    # A breaker made while the store is down asks it when the process still hears its
    # transitions (meant for a Cluster with another primary down): a single server that
    # hangs is heard for up to 1.5 s more (the agent's heartbeat), and each new per-key
    # breaker made meanwhile waited out the socket timeout again, where a store that is
    # down gave its stand-in at once. As on a Cluster's node, it fails at once.
    restartable_redis.start()
    store = RedisStore.from_url(f"{restartable_redis.url}?key_prefix={unique_prefix()}")
    try:
        first = store.cell("svc", None, BreakerPolicy(), SYSTEM_CLOCK)
        with restartable_redis.paused():
            with pytest.raises(StorageError, match="Timeout"):
                first.refresh(SYSTEM_CLOCK.monotonic())
            with pytest.raises(StorageError, match="did not answer another breaker's call"):
                store.cell("crm", "t1", BreakerPolicy(), SYSTEM_CLOCK)
        first.refresh(SYSTEM_CLOCK.monotonic())  # (answered: new breakers are asked again)
        assert store.cell("crm", "t1", BreakerPolicy(), SYSTEM_CLOCK).state is State.CLOSED
    finally:
        store.close()


@pytest.mark.parametrize("outcome", ["ignored", "success", "failure"])
def test_a_probe_the_stand_in_admitted_is_never_judged_by_the_shared_breaker(
    restartable_redis: RedisServer, outcome: str
) -> None:
    # The stand-in and the shared breaker both count generations and leases from 0: a probe
    # the stand-in admitted, finished once the breaker had rejoined Redis, freed another
    # process's lease (a third probe with half_open_max_calls=2), counted towards closing
    # it, or reopened it.
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=stand-in-ticket"
    policy = {"failure_threshold": 1, "reset_timeout": 10, "half_open_max_calls": 2, "ignore_exceptions": (KeyError,)}
    here = CircuitBreaker("crm", policy, storage=FallbackStore(RedisStore.from_url(url), "local"), clock=clock)
    assert here.call(ok) == "ok"
    restartable_redis.kill()
    fail(here)  # on the stand-in: it trips
    clock.advance(10)
    probe = HeldCall(here)  # the stand-in's probe: generation 2, lease 0
    restartable_redis.start()  # back, empty
    there_store = RedisStore.from_url(url)
    there = CircuitBreaker("crm", policy, storage=there_store, clock=clock)
    fail(there)
    clock.advance(10)
    others = [HeldCall(there), HeldCall(there)]  # the shared HALF_OPEN breaker: generation 2, leases 0 and 1
    held = _leases(there_store, "crm")
    assert len(held) == 2
    clock.advance(5)  # the stand-in's retry is due: the probe ends on the shared breaker
    if outcome == "ignored":
        probe.fail(KeyError("neutral"))
    elif outcome == "success":
        probe.succeed()
    else:
        probe.fail()
    assert _leases(there_store, "crm") == held  # no lease freed
    assert state_of(there) is State.HALF_OPEN  # neither reopened nor closed by it
    with pytest.raises(CircuitOpenError):
        there.call(ok)  # still two probes in flight: a third is refused
    for other in others:
        other.succeed()
    assert state_of(there) is State.CLOSED
    there_store.close()
    here.store.close()


def test_a_call_the_shared_breaker_admitted_is_never_judged_by_the_stand_in(restartable_redis: RedisServer) -> None:
    # The other way round: admitted by Redis (generation 0), finished on the stand-in of an
    # outage that began meanwhile (which also starts at generation 0): counted, judged by
    # no rule of the stand-in.
    restartable_redis.start()
    clock = FakeClock()
    url = f"{restartable_redis.url}?time=client&key_prefix=shared-ticket"
    here = CircuitBreaker(
        "crm", {"failure_threshold": 1}, storage=FallbackStore(RedisStore.from_url(url), "local"), clock=clock
    )
    assert here.call(ok) == "ok"
    late = HeldCall(here)  # admitted by the shared breaker
    restartable_redis.kill()
    assert here.call(ok) == "ok"  # the stand-in takes over (fresh, CLOSED, generation 0)
    late.fail()  # admitted under Redis's generation 0, failed: one failure would trip it
    assert state_of(here) is State.CLOSED  # counted, not judged
    assert here.snapshot().failures == 1
    here.store.close()


def test_a_child_forked_while_a_breaker_is_being_made_makes_its_own(restartable_redis: RedisServer) -> None:
    # A prefork worker's main process makes breakers in its releaser thread while it forks
    # pool children. A new breaker's cell asks the shared store while holding the cell
    # map's lock: a child forked then inherited the lock held, and its first new breaker
    # on that store waited forever.
    restartable_redis.start()
    url = f"{restartable_redis.url}?key_prefix=forked-mid-make"
    store = FallbackStore(RedisStore.from_url(url), "local")
    assert CircuitBreaker("warm", storage=store).call(ok) == "ok"  # (connected; its agent runs)
    admin = restartable_redis.admin()
    admin.client_pause(3000, all=True)  # the next round trip waits
    try:
        making = threading.Thread(target=CircuitBreaker, args=("tenant",), kwargs={"storage": store, "key": "parent"})
        making.start()
        deadline = time.monotonic() + 10
        while not store._cells_lock.locked():  # (polling a thread that is getting there)
            assert time.monotonic() < deadline, "the thread never started making its breaker"
            time.sleep(0.01)
        pid = os.fork()
        if pid == 0:  # the child: its first breaker for a new key, then out
            code = 1
            try:
                CircuitBreaker("tenant", storage=store, key="child")
                code = 0
            finally:
                os._exit(code)
        assert exit_code_within(pid, 15) == 0, "the child deadlocked making its breaker"
    finally:
        with contextlib.suppress(redis.TimeoutError):  # (redis-py 5.1's unpause waits out the pause itself)
            admin.client_unpause()
    making.join(10)
    store.close()


def exit_code_within(pid: int, seconds: float) -> int | None:
    """The exit code of child ``pid``, or ``None`` (and it is killed) if it has not ended
    within ``seconds``."""
    deadline = time.monotonic() + seconds
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)  # (polling the child, which talks to Redis)
    return os.waitstatus_to_exitcode(done[1])


def test_a_child_forked_while_a_stand_in_is_busy_uses_it() -> None:
    # While the store is down a breaker runs on its stand-in, a memory cell whose lock
    # each step holds: a child forked while another thread was in one (a prefork
    # worker's releaser, say) inherited the lock held, and hung on its next call there.
    store = FallbackStore(dead_store(), "local")
    breaker = CircuitBreaker("svc", {"failure_threshold": 5}, storage=store)
    assert breaker.call(ok) == "ok"  # (on the stand-in)
    stand_in = store._cells["svc", None]._local
    assert stand_in is not None
    with stand_in.lock:  # (as a thread recording a call's outcome holds it)
        pid = os.fork()
        if pid == 0:  # the child: a failure to record, then out
            code = 1
            try:
                fail(breaker)
                code = 0
            finally:
                os._exit(code)
    assert exit_code_within(pid, 15) == 0, "the child hung on the stand-in's lock"
    store.close()
