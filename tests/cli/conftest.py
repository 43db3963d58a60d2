"""CLI test helpers: a store of the test's own in a real Redis, and ``celery ... breaker`` run in-process."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest
from celery.bin.celery import celery as celery_main
from click.testing import CliRunner, Result

from celery_breaker import CircuitBreaker
from celery_breaker.clock import Clock
from celery_breaker.core import BreakerSnapshot
from celery_breaker.storage import flush_stores
from celery_breaker.storage.redis import RedisStore

from . import cliproj

APP = "tests.cli.cliproj:app"
_PREFIXES = itertools.count()


@pytest.fixture
def store_url(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the session's Redis; the test app uses it."""
    url = f"{redis_url}/0?key_prefix=cli{os.getpid()}-{next(_PREFIXES)}"
    cliproj.use_store(url)
    yield url
    cliproj.use_store("memory://")


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> list[RedisStore]:
    """Every Redis store listed whole (``RedisStore.snapshots``) from here on, in order."""
    listed: list[RedisStore] = []
    listing = RedisStore.snapshots

    def counted(store: RedisStore, clock: Clock) -> list[BreakerSnapshot]:
        listed.append(store)
        return listing(store, clock)

    monkeypatch.setattr(RedisStore, "snapshots", counted)
    return listed


def run(*args: str) -> Result:
    """``celery -A tests.cli.cliproj:app breaker <args>`` through Celery's own main command."""
    return CliRunner().invoke(celery_main, ["-A", APP, "breaker", *args], catch_exceptions=False)


def breaker(url: str, name: str, key: str | None = None, policy: dict[str, Any] | None = None) -> CircuitBreaker:
    """A breaker of the test app's store, as a worker would hold it."""
    return CircuitBreaker(name, policy or cliproj.POLICY, storage=url, key=key)


def stored(url: str, name: str, key: str | None = None, policy: dict[str, Any] | None = None) -> BreakerSnapshot:
    """The breaker as a fresh ``CircuitBreaker`` on a store object of its own (as another
    process would) reads it from Redis: nothing cached in this process takes part."""
    flush_stores()
    fresh = CircuitBreaker(name, policy or cliproj.POLICY, storage=RedisStore.from_url(url), key=key,
                           on_storage_error="deny")  # fmt: skip
    return fresh.snapshot()


def trip(breaker: CircuitBreaker) -> None:
    """One failure: enough for the test policies (failure_threshold=1)."""
    with contextlib.suppress(ConnectionError):
        breaker.call(_down)


def _down() -> None:
    raise ConnectionError("down")
