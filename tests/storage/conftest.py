"""The ``store`` fixture: every contract test runs once per store (memory, then real Redis)."""

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


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "memory":
        return fresh_store()
    redis_url: str = request.getfixturevalue("redis_url")
    # time=client: the scripts read the test's FakeClock instead of Redis TIME.
    return RedisStore.from_url(f"{redis_url}?time=client&key_prefix={unique_prefix()}")
