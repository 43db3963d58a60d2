"""Real processes on one Redis breaker: HALF_OPEN never admits more probes than allowed."""

from __future__ import annotations

import collections
import gc
import importlib
import multiprocessing
import random
import sys
import time
from pathlib import Path

import redis

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.core import Outcome, Probe
from celery_breaker.storage.redis import RedisStore

from ..unit.support import fail
from .conftest import unique_prefix

WORKERS = 8
HAMMER_SECONDS = 2.0
POLICY = BreakerPolicy(
    failure_threshold=1, reset_timeout=0.02, half_open_max_calls=2, success_threshold=2, half_open_max_wait=5
)


def hammer(store: RedisStore, probes_key: str, barrier: multiprocessing.synchronize.Barrier, seed: int) -> None:
    """Take tickets as fast as possible; log every probe admitted; fail half the calls."""
    pick = random.Random(seed)
    log = redis.Redis.from_url(store.url.partition("?")[0])
    barrier.wait(timeout=10)
    # The store (and its client) came from the parent through fork: it must reconnect.
    cell = store.cell("svc", None, POLICY, SYSTEM_CLOCK)
    deadline = time.monotonic() + HAMMER_SECONDS
    while time.monotonic() < deadline:
        now = time.monotonic()
        try:
            ticket, _ = cell.acquire(POLICY, now)
        except CircuitOpenError:
            continue
        if isinstance(ticket, Probe):
            log.rpush(probes_key, f"{ticket.generation}:{ticket.lease}")
        outcome = Outcome.FAILURE if pick.random() < 0.5 else Outcome.SUCCESS
        cell.finish(ticket, outcome, 0.0, POLICY, time.monotonic())


def test_half_open_admits_at_most_max_calls_probes_across_processes(redis_url: str) -> None:
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    breaker = CircuitBreaker("svc", POLICY, storage=store)
    fail(breaker)  # OPEN; the parent's client now exists, so children inherit it
    probes_key = f"{store.key_prefix}:probes"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(WORKERS)
    workers = [
        context.Process(target=hammer, args=(store, probes_key, barrier, seed), daemon=True) for seed in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=15)
    assert [worker.exitcode for worker in workers] == [0] * WORKERS

    entries = redis.Redis.from_url(redis_url).lrange(probes_key, 0, -1)
    admitted = [entry.decode() if isinstance(entry, bytes) else entry for entry in entries]
    per_generation = collections.Counter(entry.split(":")[0] for entry in admitted)
    shape = collections.Counter(per_generation.values())
    print(f"{len(per_generation)} half-open periods across {WORKERS} processes; probes per period: {dict(shape)}")
    assert len(admitted) == len(set(admitted)), "a lease was handed out twice"
    assert len(per_generation) >= 5, f"too few half-open periods to prove anything: {per_generation}"
    assert max(per_generation.values()) <= POLICY.half_open_max_calls, per_generation


def test_a_trip_reaches_every_other_process_within_milliseconds(redis_url: str) -> None:
    # bench/propagation.py measures it; here 8 processes must hear every one of 20 trips
    # (the figures are printed, not asserted: the machine is shared).
    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))  # spawned observers import the module by name, too
    try:
        propagation = importlib.import_module("propagation")
        result = propagation.measure(f"{redis_url}?key_prefix={unique_prefix()}", observers=8, trips=20)
    finally:
        sys.path.remove(str(bench))
    print(f"trip propagation: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms over {result['samples']}")
    assert (result["samples"], result["missed"]) == (8 * 20, 0)


def _child_calls(stores: list[RedisStore]) -> None:
    """A forked child that uses the stores it inherited: connects, and flushes."""
    for store in stores:
        CircuitBreaker("other", POLICY, storage=store).call(lambda: None)
        store.flush()


def test_counts_are_sent_once_across_a_fork(redis_url: str) -> None:
    """What the parent counted is the parent's to send, a forked child that connects and
    flushes sends none of it: counts of breaker objects dropped before the fork (waiting
    for the next flush), and counts made after the store was closed."""
    dropped_url, closed_url = (f"{redis_url}?key_prefix={unique_prefix()}" for _ in range(2))
    dropped, closed = RedisStore.from_url(dropped_url), RedisStore.from_url(closed_url)
    for _ in range(5):
        CircuitBreaker("svc", POLICY, storage=dropped).call(lambda: None)  # (made, used and dropped)
    gc.collect()
    kept = CircuitBreaker("svc", POLICY, storage=closed)
    kept.call(lambda: None)
    closed.close(timeout=0)  # (sends that one)
    kept.call(lambda: None)  # (counted after the close)
    child = multiprocessing.get_context("fork").Process(target=_child_calls, args=([dropped, closed],))
    child.start()
    child.join(timeout=15)
    assert child.exitcode == 0
    kept.call(lambda: None)  # (connects the parent again)
    dropped.flush()
    closed.flush()
    for url, successes in ((dropped_url, 5), (closed_url, 3)):
        seen = {s.name: s.successes for s in RedisStore.from_url(url).snapshots(SYSTEM_CLOCK)}
        assert seen == {"svc": successes, "other": 1}


def _succeed_and_return(url: str) -> None:
    """A ``multiprocessing`` child's whole work: successes, counted locally, then return."""
    breaker = CircuitBreaker("svc", POLICY, storage=url)
    for _ in range(50):
        breaker.call(lambda: None)


def test_a_multiprocessing_child_sends_its_counts_when_it_returns(redis_url: str) -> None:
    # A child started by fork leaves through os._exit, which runs no atexit hook: the
    # successes it counted in its last second (all of them, here) were never sent.
    url = f"{redis_url}?key_prefix={unique_prefix()}"
    children = [
        multiprocessing.get_context("fork").Process(target=_succeed_and_return, args=(url,)),
        multiprocessing.get_context("forkserver").Process(target=_succeed_and_return, args=(url,)),
        multiprocessing.get_context("spawn").Process(target=_succeed_and_return, args=(url,)),
    ]
    for child in children:
        child.start()
        child.join(timeout=30)
        assert child.exitcode == 0
    seen = {s.name: s.successes for s in RedisStore.from_url(url).snapshots(SYSTEM_CLOCK)}
    assert seen == {"svc": 150}
