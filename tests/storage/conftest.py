"""The ``store`` fixture: every contract test runs once per store (memory, Redis, Redis Cluster, Redis Sentinel)."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from celery_breaker.storage import Store
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis.parking import PARKING_SUFFIXES
from celery_breaker.testing import FakeClock, fresh_store

_PREFIXES = itertools.count()


def unique_prefix() -> str:
    """A key prefix no other test (or test run against the same server) uses."""
    return f"t{os.getpid()}-{next(_PREFIXES)}"


@pytest.fixture(autouse=True)
def _breaker_logs_reach_caplog(request: pytest.FixtureRequest) -> Iterator[None]:
    """For a test that reads ``caplog``: the ``celery_breaker`` logger hands its records to
    caplog's handler itself, not through the root logger. A Celery worker started in this
    process (tests/celery's) replaces the root's handlers when its logging is set up,
    which dropped caplog's once, while a test ran: a WARNING it asserted was not seen."""
    if "caplog" not in request.fixturenames:
        yield
        return
    caplog: pytest.LogCaptureFixture = request.getfixturevalue("caplog")
    logger = logging.getLogger("celery_breaker")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False  # (once, not twice through the root as well)
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(caplog.handler)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def url(redis_url: str) -> str:
    """A Redis store URL of the test's own: its keys under a prefix no other test uses, its
    times the caller's (``time=client``: a test's ``FakeClock``, so that expiries and
    windows are testable without waiting)."""
    return f"{redis_url}?time=client&key_prefix={unique_prefix()}"


@pytest.fixture
def server(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the test's Redis, to read or damage keys behind a store's back."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


#: The idle TTL of ``idle_store``: a Redis key's TTL, a memory breaker's idleness before
#: a sweep. Long enough that no key expires by itself during a test (tests simulate it).
IDLE_TTL = 30.0
#: ``max_breakers`` of the memory ``idle_store``: creating this many breakers sweeps it.
IDLE_MAX_BREAKERS = 4


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def store(request: pytest.FixtureRequest) -> Store:
    return _store(request)


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def idle_store(request: pytest.FixtureRequest) -> Store:
    """``store`` with a short idle TTL (``IDLE_TTL``), and for memory a small bound."""
    if request.param == "memory":
        return fresh_store(max_breakers=IDLE_MAX_BREAKERS, idle_ttl=IDLE_TTL)
    return _store(request, f"&idle_ttl={IDLE_TTL:g}")


def _store(request: pytest.FixtureRequest, options: str = "") -> Store:
    if request.param == "memory":
        return fresh_store()
    url: str
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
    elif request.param == "sentinel":
        url = request.getfixturevalue("redis_sentinel").url
    else:
        url = request.getfixturevalue("redis_url")
    # time=client: the scripts read the test's FakeClock instead of Redis TIME.
    return RedisStore.from_url(f"{url}?time=client&key_prefix={unique_prefix()}{options}")


#: ``closing(store)``: the store, closed when the test ends (the ``closing`` fixture).
Closing = Callable[[RedisStore], RedisStore]


@pytest.fixture
def closing() -> Iterator[Closing]:
    """``closing(store)`` returns the store and closes it when the test ends: for a store
    that cannot reach its server (stopped, silent, refusing its TLS handshake).

    Such a store's agent thread keeps trying to subscribe until the store is closed or
    garbage, and garbage may come only at a later collection, under a later test. On a
    Cluster each try builds a new redis-py client, which shuffles its startup nodes with
    the global ``random``, and Hypothesis then warns that a later test changed
    ``random``'s state. (The thread once held the store while it waited to try again, so
    such a store was never garbage: ``tests/storage/test_redis.py`` covers that.)
    """
    stores: list[RedisStore] = []

    def close_at_the_end(store: RedisStore) -> RedisStore:
        stores.append(store)
        return store

    yield close_at_the_end
    for store in stores:
        store.close()


def breaker_keys(store: RedisStore, name: str, key: str | None = None) -> list[str]:
    """Every Redis key of one breaker: its state keys and its parking keys."""
    tag = store.parking.tag(name, key)
    return store.keys_for(name, key) + [tag + suffix for suffix in PARKING_SUFFIXES]


def key_ttls(store: RedisStore, name: str, key: str | None = None) -> dict[str, int]:
    """The PTTL of each existing key of one breaker (-1: the key never expires)."""
    client = store.client()
    found = {k: int(client.pttl(k)) for k in breaker_keys(store, name, key)}
    return {k: ttl for k, ttl in found.items() if ttl != -2}


def expire_now(store: RedisStore, name: str, key: str | None = None, *, after: float | None = None) -> None:
    """What Redis does once a breaker's idle TTL has passed, without waiting for it:
    every key of the breaker that has a TTL is gone (``after``: only those whose TTL runs
    out within that many seconds)."""
    client = store.client()
    for k, ttl in key_ttls(store, name, key).items():
        if ttl >= 0 and (after is None or ttl <= after * 1000):
            client.delete(k)


def following(store: Store, timeout: float = 10.0) -> None:
    """Return once a Redis store's agent has subscribed (and so re-read every view it holds,
    and hears every transition from then on); at once for any other store. Polls a real
    thread's progress, with a deadline."""
    deadline = time.monotonic() + timeout
    while isinstance(store, RedisStore) and not (store.live and store.settled):
        if time.monotonic() > deadline:
            raise AssertionError(f"{store!r} did not subscribe within {timeout} s")
        time.sleep(0.01)


def replace(server: redis.Redis, key: str, kind: str) -> None:
    """Put a value of type ``kind`` (``string``, ``list``, ``set``, ``zset``, ``hash``) where ``key`` is."""
    server.delete(key)
    if kind == "string":
        server.set(key, "junk")
    elif kind == "list":
        server.rpush(key, "junk")
    elif kind == "set":
        server.sadd(key, "junk")
    elif kind == "zset":
        server.zadd(key, {"junk": 1.0})
    else:
        server.hset(key, "junk", "1")
