"""The ``store`` fixture: every contract test runs once per store (memory, Redis, Redis Cluster, Redis Sentinel)."""

from __future__ import annotations

import itertools
import os

import pytest

from celery_breaker.storage import Store
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock, fresh_store

_PREFIXES = itertools.count()


def unique_prefix() -> str:
    """A key prefix no other test (or test run against the same server) uses."""
    return f"t{os.getpid()}-{next(_PREFIXES)}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def store(request: pytest.FixtureRequest) -> Store:
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
    return RedisStore.from_url(f"{url}?time=client&key_prefix={unique_prefix()}")
