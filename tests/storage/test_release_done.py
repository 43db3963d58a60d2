"""A releaser whose ``done`` the store did not take publishes nothing twice (real Redis, in-memory broker).

The releaser claims parked tasks under a lease, publishes them, then tells the store
they are done. When the store failed just then (a blip, a failover), the published
entries stayed claimed: their lease ran out, and the next claim published each again.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from celery import Celery

from celery_breaker.errors import StorageError
from celery_breaker.integration.deferral import release
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.storage.redis import RedisStore

from .conftest import unique_prefix


def test_entries_published_when_the_store_failed_to_forget_them_are_not_published_again(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a breaker whose store failed is asked again after at most UNREACHABLE_MOST: still
    # within the claims' lease, so what it published is forgotten before it is claimed again)
    assert release.UNREACHABLE_MOST < release.LEASE
    monkeypatch.setattr(release, "LEASE", 0.2)  # (seconds a claim holds an entry: shortened)
    monkeypatch.setattr(release, "UNREACHABLE_FIRST", 0.05)  # (and the wait after the failure, with it)
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    parking = store.parking
    assert parking is not None
    app = Celery("undone", set_as_current=False, broker="memory://")
    app.conf.update(task_default_queue="undone-queue")
    entries = [f"t-{n}:0:1" for n in range(3)]
    for n, entry in enumerate(entries):
        body = dict(app.signature("a.charge", args=(n,)))
        parking.park("svc", None, entry, float(n), encode_message(body, "json"), None)
    tag = parking.tag("svc", None)
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)

    published: Counter[str] = Counter()
    publish = releaser._publish

    def counted(tag: str, claimed: list[tuple[str, str]]) -> list[str]:
        sent = publish(tag, claimed)
        published.update(sent)
        return sent

    monkeypatch.setattr(releaser, "_publish", counted)
    done = parking.done
    failures = iter([StorageError("redis store: connection reset while forgetting released entries")])

    def failing_once(tag: str, found: list[str]) -> Any:
        failure = next(failures, None) if found else None  # (the first batch that published anything)
        if failure is not None:
            raise failure
        return done(tag, found)

    monkeypatch.setattr(parking, "done", failing_once)
    for _ in range(50):  # (until every entry is claimed and published: the first batch's done fails)
        releaser.release_once()
        if len(published) == len(entries):
            break
        time.sleep(0.06)  # (past the wait after the failure: UNREACHABLE_FIRST, shortened above)
    assert sorted(published) == entries
    time.sleep(0.3)  # (their lease has run out)
    for _ in range(5):
        releaser.release_once()
    assert published == dict.fromkeys(entries, 1)  # (each once)
    assert parking.count(tag) == (0, 0)
