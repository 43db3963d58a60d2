"""Real prefork workers sharing one breaker in Redis: a partner outage, and the breaker's own Redis dying.

Figures (calls, trips, seconds) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.exceptions import TimeLimitExceeded
from celery.result import AsyncResult

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.breaker import CHECK_LEASE_MARGIN
from celery_breaker.storage.redis import RedisStore
from tests.integration.partner_proj import (
    BREAKER,
    call_partner,
    calls_key,
    down_key,
    hang_in_block,
    hang_while_probing,
    hung_key,
)
from tests.integration.workers import WorkerProcess, wait_for
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

APP = "tests.integration.partner_proj"

CONCURRENCY = 2  # pool processes per worker
THRESHOLD = 3
PROBES = 1
POLICY = {"failure_threshold": THRESHOLD, "reset_timeout": 1.0, "half_open_max_calls": PROBES, "success_threshold": 1}


@pytest.fixture(scope="module")
def broker(partner_broker: str) -> str:
    return partner_broker


@pytest.fixture
def ns() -> str:
    """This test's namespace: the breaker's key prefix and the partner's keys."""
    return f"shared-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def workers(broker: str, confs: dict[str, dict[str, Any]], *, per_queue: bool = False) -> Iterator[list[WorkerProcess]]:
    """Start a worker per name in ``confs`` at once (their start-ups overlap), then wait
    until each is ready; with ``per_queue`` each consumes only its queue ``q-<name>``."""
    with contextlib.ExitStack() as stack:
        started = []
        for name, conf in confs.items():
            process = WorkerProcess(broker, concurrency=CONCURRENCY, extra_conf=json.dumps(conf), name=name,
                                    app=APP, queues=f"q-{name}" if per_queue else None)  # fmt: skip
            started.append(stack.enter_context(process))
        for process in started:
            process.wait_ready()
        yield started


def exception_name(result: AsyncResult) -> str:
    return type(result.info).__name__


def settled(results: list[AsyncResult]) -> bool:
    """Every task ran at least once: deferred (RETRY) or done."""
    return all(r.state in ("RETRY", "SUCCESS") for r in results)


def partner_log(client: redis.Redis, ns: str) -> list[dict[str, Any]]:
    return [json.loads(entry) for entry in client.lrange(calls_key(ns), 0, -1)]


# -- 1. a partner outage ---------------------------------------------------------


TASKS = 40
WORKERS = 2
#: Calls admitted while the breaker was CLOSED but still running when it tripped: at
#: most one per pool process other than the one whose failure tripped it.
IN_FLIGHT_SLACK = WORKERS * CONCURRENCY - 1
#: Half-open periods the outage must last, so a broken probe cap would show.
MIN_TRIPS = 4


def test_an_outage_trips_one_shared_breaker_and_the_probe_cap_holds_across_both_workers(
    broker: str, redis_url: str, ns: str
) -> None:
    store_url = f"{redis_url}/5?key_prefix={ns}"
    partner = redis.Redis.from_url(broker)
    conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY}
    began = time.monotonic()
    with workers(broker, {"w1": conf, "w2": conf}) as (w1, w2):
        started = time.monotonic() - began
        observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)  # the shared breaker, read from outside
        partner.set(down_key(ns), 1)
        results = [call_partner.delay(ns, n) for n in range(TASKS)]

        def outage_well_under_way() -> bool:
            states = [r.state for r in results]
            assert "FAILURE" not in states, [(r.id, r.info) for r in results if r.state == "FAILURE"]
            if states.count("RETRY") < TASKS or any(exception_name(r) != "CircuitOpenError" for r in results):
                return False
            return observer.snapshot().trips >= MIN_TRIPS

        # Every task is deferred (none fails, though max_retries=1), and the breaker keeps
        # reopening on failed probes: each half-open period is a chance to break the cap.
        outage = wait_for(outage_well_under_way, 90, f"all {TASKS} tasks deferred and {MIN_TRIPS} trips")
        during = observer.snapshot()
        assert during.state is not State.CLOSED

        partner.delete(down_key(ns))
        recovered = time.monotonic()
        values: list[dict[str, Any]] = [r.get(timeout=90) for r in results]
        recovery = time.monotonic() - recovered
        final = observer.snapshot()
        assert w1.process.poll() is None
        assert w2.process.poll() is None

    # Every task completed, under its own id, none lost.
    assert [v["n"] for v in values] == list(range(TASKS))
    assert [v["id"] for v in values] == [r.id for r in results]
    assert all(v["deferrals"] is not None and int(v["deferrals"]) >= 1 for v in values)
    # Deferrals never spend the retry budget: only a failure seen while the breaker was
    # still CLOSED (before the trip) spent the one real retry (max_retries=1).
    retried = [v["n"] for v in values if v["retries"]]
    assert {v["retries"] for v in values} <= {0, 1}
    assert len(retried) <= THRESHOLD - 1, retried

    # The partner's own log: what reached it while it was down.
    calls = partner_log(partner, ns)
    down = [c for c in calls if c["down"]]
    probes = [c for c in down if c["kind"] == "probe"]
    admitted_closed = [c for c in down if c["kind"] != "probe"]
    per_period = collections.Counter(c["generation"] for c in probes)
    bound = THRESHOLD + IN_FLIGHT_SLACK + final.trips * PROBES
    print(
        f"\n[outage] workers ready in {started:.1f} s; outage {outage:.1f} s; recovery {recovery:.1f} s; "
        f"trips {final.trips}; deferrals {final.deferrals}; rejections {final.rejections}\n"
        f"[outage] partner calls while down: {len(down)} (bound {bound} = threshold {THRESHOLD} + "
        f"in-flight slack {IN_FLIGHT_SLACK} + trips {final.trips} x half_open_max_calls {PROBES}); "
        f"admitted while closed {len(admitted_closed)}, probes {len(probes)} over {len(per_period)} half-open "
        f"periods, largest period {max(per_period.values(), default=0)}; calls in total {len(calls)}; "
        f"retried before the trip {retried}\n"
        f"[outage] calls while down per node: {dict(collections.Counter(c['node'] for c in down))}; "
        f"probes per node: {dict(collections.Counter(c['node'] for c in probes))}"
    )
    assert {c["node"].partition("@")[0] for c in calls} == {"w1", "w2"}  # both workers took part
    assert final.trips >= MIN_TRIPS
    assert final.state is State.CLOSED
    # The cap, cluster-wide: every downstream call during the outage is accounted for.
    assert len(down) <= bound
    assert len(admitted_closed) <= THRESHOLD + IN_FLIGHT_SLACK
    assert len({c["generation"] for c in admitted_closed}) == 1  # all before the first trip
    assert max(per_period.values()) <= PROBES, per_period  # per half-open period, across both workers
    # Every trip after the first reopened a half-open period on its one failed probe.
    assert len(probes) == final.trips - 1, (len(probes), final.trips)


def test_a_probe_killed_at_its_hard_time_limit_holds_its_slot_for_the_limit_not_half_open_max_wait(
    broker: str, redis_url: str, ns: str
) -> None:
    # A real task admitted as the probe of a half-open breaker (no health check) hangs, and
    # its prefork pool process is SIGKILLed at its hard time limit (deaf to the SIGTERM
    # before it, as a process stuck in C code is): no verdict ever comes. Its slot was
    # leased for half_open_max_wait (60 s), and with half_open_max_calls=1 no other probe
    # could go meanwhile; it is now leased for the limit and CHECK_LEASE_MARGIN.
    limit = 2.0
    policy = {"failure_threshold": 1, "reset_timeout": 1.0, "half_open_max_calls": 1, "success_threshold": 1,
              "half_open_max_wait": 60.0}  # fmt: skip
    store_url = f"{redis_url}/5?key_prefix={ns}"
    partner = redis.Redis.from_url(broker)
    store = RedisStore.from_url(store_url)
    leases_key = store.keys_for(BREAKER, None)[4]
    with workers(broker, {"w1": {"breaker_storage_url": store_url, "breaker_default_policy": policy}}) as (w1,):
        observer = CircuitBreaker(BREAKER, policy, storage=store)
        with pytest.raises(ConnectionError):
            observer.call(functools.partial(_raise, ConnectionError("partner down")))
        wait_for(lambda: observer.snapshot().retry_after == 0.0, 10, "the breaker may half-open")
        hung = hang_while_probing.apply_async((ns, 30.0), time_limit=limit)
        wait_for(lambda: partner.llen(hung_key(ns)) > 0, 30, "the hung task admitted")
        admitted = time.monotonic()
        logged = partner.lindex(hung_key(ns), 0)
        assert isinstance(logged, bytes)
        assert json.loads(logged)["kind"] == "probe"
        # Its lease, read in Redis: the limit and the margin from now, not 60 s.
        seconds, micros = store.client().time()
        now = seconds + micros / 1e6
        expiries = [float(v) for v in store.client().hvals(leases_key)]
        assert len(expiries) == 1
        assert expiries[0] - now <= limit + CHECK_LEASE_MARGIN
        # The pool kills it at its limit, and once the lease is over another probe goes
        # (the observer's, in this process) and closes the breaker: long before 60 s.
        with pytest.raises(TimeLimitExceeded):
            hung.get(timeout=30, propagate=True)
        wait_for(lambda: not _alive(hung_pid(partner, ns)), 10, "the hung probe's process killed")
        seconds, micros = store.client().time()
        if seconds + micros / 1e6 < expiries[0] - 0.5:  # (a slow machine may have reaped it later)
            with pytest.raises(CircuitOpenError):
                observer.call(lambda: None)  # the slot is still the dead probe's: its lease frees it

        def probe_admitted() -> bool:
            with contextlib.suppress(CircuitOpenError):
                observer.call(lambda: None)
            return observer.snapshot().state is State.CLOSED

        wait_for(probe_admitted, 30, "a probe admitted once the killed probe's lease ended")
        freed = time.monotonic() - admitted
        assert w1.process.poll() is None
    print(f"\n[killed probe] slot free again {freed:.1f} s after the probe was admitted "
          f"(lease {limit + CHECK_LEASE_MARGIN:.0f} s; half_open_max_wait 60 s)")  # fmt: skip


def test_runs_killed_at_their_hard_time_limit_count_as_failures_and_trip_the_breaker(
    broker: str, redis_url: str, ns: str
) -> None:
    # A partner that never answers, called in a guarded block until the prefork pool kills
    # the run at its hard time limit: the exit the pool's SIGTERM raises was neutral, so
    # every later task spent its whole limit on the hung partner and the breaker never
    # opened (gevent's timeout, raised in the run, did open it). Now each such run is a
    # TimeLimitExceeded: two of them trip a breaker of threshold 2, and the next task waits.
    limit = 2.0
    policy = {"failure_threshold": 2, "window": 120.0, "reset_timeout": 60.0}
    store_url = f"{redis_url}/5?key_prefix={ns}"
    partner = redis.Redis.from_url(broker)
    store = RedisStore.from_url(store_url)
    config = {"breaker_storage_url": store_url, "breaker_default_policy": policy}
    with workers(broker, {"w1": config}) as (w1,):
        observer = CircuitBreaker(BREAKER, policy, storage=store)
        for _ in range(2):
            hung = hang_in_block.apply_async((ns, 30.0), time_limit=limit)
            with pytest.raises(TimeLimitExceeded):
                hung.get(timeout=30, propagate=True)
        wait_for(lambda: observer.snapshot().state is State.OPEN, 10, "the breaker open after two killed runs")
        snapshot = observer.snapshot()
        assert (snapshot.failures, snapshot.trips) == (2, 1)
        waiting = hang_in_block.apply_async((ns, 30.0), time_limit=limit)
        wait_for(lambda: waiting.state == "RETRY", 10, "the next task deferred, not sent to the hung partner")
        assert partner.llen(hung_key(ns)) == 2  # only the two killed runs reached the partner
        assert w1.process.poll() is None
        waiting.revoke()


def _raise(exc: BaseException) -> None:
    raise exc


def hung_pid(partner: redis.Redis, ns: str) -> int:
    logged = partner.lindex(hung_key(ns), 0)
    assert isinstance(logged, bytes)
    return int(json.loads(logged)["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- 2. the breaker's Redis dies mid-run -------------------------------------------

MODES = ("local", "allow", "deny")
BATCH = 10


def test_the_breaker_store_killed_and_restarted_mid_run_loses_nothing_and_is_rejoined(broker: str, ns: str) -> None:
    """One worker per ``breaker_on_storage_error`` mode (each on its own queue), all on one
    breaker in a Redis of the test's own; the broker stays up on the session server."""
    partner = redis.Redis.from_url(broker)
    counter = iter(range(10_000))

    def publish(mode: str, count: int) -> list[AsyncResult]:
        return [call_partner.apply_async((ns, next(counter)), queue=f"q-{mode}") for _ in range(count)]

    with RedisServer() as store_server:
        store_server.start()
        store_url = f"{store_server.url}/0?key_prefix={ns}"
        conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY}
        began = time.monotonic()
        confs = {mode: {**conf, "breaker_on_storage_error": mode} for mode in MODES}
        with workers(broker, confs, per_queue=True) as started:
            procs = dict(zip(MODES, started, strict=True))
            ready = time.monotonic() - began
            for mode in MODES:  # warm-up: every worker has run tasks on the shared breaker
                assert all(v["deferrals"] is None for v in (r.get(timeout=60) for r in publish(mode, 4)))

            # Tasks are flowing when the store is killed; more arrive while it is down.
            flowing = {mode: publish(mode, BATCH) for mode in MODES}
            store_server.kill()
            killed = time.monotonic()
            done_at_kill = sum(r.ready() for batch in flowing.values() for r in batch)
            while_down = {mode: publish(mode, BATCH) for mode in MODES}

            # local (a fresh CLOSED stand-in per process) and allow: everything runs, no
            # task hangs on the dead store, none is deferred.
            for mode in ("local", "allow"):
                values = [r.get(timeout=60) for r in flowing[mode] + while_down[mode]]
                assert all(v["deferrals"] is None for v in values), (mode, values)
            local_allow_done = time.monotonic() - killed
            # deny: every task that arrived while the store was down is deferred.
            wait_for(
                lambda: all(r.state == "RETRY" for r in while_down["deny"]), 60, "deny's tasks deferred while down"
            )
            assert all(exception_name(r) == "CircuitOpenError" for r in while_down["deny"])
            # (their reason, as Flower shows it, says why: no operator forced anything open)
            why = "cannot be reached (breaker_on_storage_error='deny'"
            assert all(why in str(r.result) for r in while_down["deny"])

            store_server.start()  # the same port, empty
            restarted = time.monotonic()
            # deny's tasks run again once its processes rejoin the store (their stand-in rejects all).
            deny_values = [r.get(timeout=60) for r in flowing["deny"] + while_down["deny"]]
            assert all(int(v["deferrals"] or 0) >= 1 for v in deny_values[BATCH:]), deny_values
            deny_done = time.monotonic() - restarted

            # The shared state is rejoined: a trip made through a fresh store, after the
            # restart, reaches every worker: their next tasks are deferred.
            operator = CircuitBreaker(BREAKER, POLICY, storage=RedisStore.from_url(store_url))
            operator.force_open()
            after_trip: list[AsyncResult] = []
            rejoined: set[str] = set()

            def every_worker_defers() -> bool:
                for mode in set(MODES) - rejoined:
                    batch = publish(mode, CONCURRENCY * 2)
                    after_trip.extend(batch)
                    wait_for(functools.partial(settled, batch), 60, f"{mode}'s tasks to run")
                    if all(r.state == "RETRY" and "forced_open" in str(r.info) for r in batch):
                        rejoined.add(mode)
                return rejoined == set(MODES)

            rejoin = wait_for(every_worker_defers, 60, "every worker deferring after the trip made after the restart")
            operator.close()
            closed = time.monotonic()
            after_values = [r.get(timeout=60) for r in after_trip]
            after_close = time.monotonic() - closed
            shared = operator.snapshot()
            for mode, process in procs.items():
                assert process.process.poll() is None, f"the {mode} worker died:\n{process.log()}"
            logs = {mode: process.log() for mode, process in procs.items()}

    everything = [r for batch in (*flowing.values(), *while_down.values()) for r in batch] + after_trip
    assert all(r.state == "SUCCESS" for r in everything)  # none lost, none failed
    assert [v["id"] for v in after_values] == [r.id for r in after_trip]
    outage_lines = {mode: [line for line in log.splitlines() if "unreachable" in line] for mode, log in logs.items()}
    # A deferral made while the store is down publishes a countdown message at once: it
    # neither waits out Redis's timeouts to park nor logs per task.
    park_lines = {mode: [line for line in log.splitlines() if "cannot park" in line] for mode, log in logs.items()}
    rejoin_lines = {mode: log.count("answers again:") for mode, log in logs.items()}
    print(
        f"\n[store] workers ready in {ready:.1f} s; {done_at_kill}/{BATCH * len(MODES)} flowing tasks done at the "
        f"kill; local+allow done {local_allow_done:.1f} s after it; deny done {deny_done:.1f} s after the restart; "
        f"every worker deferring {rejoin:.1f} s after the trip; after-trip tasks ({len(after_trip)}) done "
        f"{after_close:.1f} s after the close; tasks in total {len(everything)}; "
        f"partner calls {partner.llen(calls_key(ns))}; successes in the restarted store {shared.successes}\n"
        f"[store] outage logged per worker: { {m: len(lines) for m, lines in outage_lines.items()} }; "
        f"rejoin logged: {rejoin_lines}; parking refused: { {m: len(lines) for m, lines in park_lines.items()} }"
    )
    assert not any(park_lines.values()), park_lines
    for mode, lines in outage_lines.items():
        # Once per pool process for this outage (each has its own client), never per task.
        assert 1 <= len(lines) <= CONCURRENCY, (mode, lines)
        assert all(f"breaker_on_storage_error={mode}" in line for line in lines), lines
        assert rejoin_lines[mode] <= CONCURRENCY, (mode, rejoin_lines)
