"""A store whose Redis may evict keys when full (``maxmemory-policy``) is named when the releaser starts.

Under ``allkeys-lru`` a Redis short of memory evicted 110 of 500 parked tasks with no
WARNING and no ERROR: the parking's epoch, read every second, stayed in memory, so the
releaser's loss watch saw nothing. Nothing said so when the worker started either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.storage.redis import RedisStore

from ..servers import RedisSentinel, RedisServer, poll
from .conftest import unique_prefix

#: What the Cluster test sets on one primary (and puts back).
OPTIONS = ("maxmemory-policy", "maxmemory")


def releaser(url: str) -> tuple[Releaser, RedisStore]:
    store = RedisStore.from_url(f"{url}?key_prefix={unique_prefix()}")
    app = Celery("eviction", broker="memory://", set_as_current=False)
    return Releaser(app, store.parking, rate=10.0, ramp=0.0, tick=0.01), store


def checked(url: str, caplog: pytest.LogCaptureFixture) -> str:
    """One releaser's start-up check of the store at ``url``, its lines in ``caplog`` (from
    INFO); the store's label."""
    checker, store = releaser(url)
    try:
        with caplog.at_level(logging.INFO, logger="celery_breaker"):
            checker.check_eviction()
    finally:
        store.close()
    return store.label


def told(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The releaser's lines about the store's policy (not those about an outage) at ``level``."""
    marks = ("has maxmemory-policy", "could not read the maxmemory-policy")
    return [r.getMessage() for r in caplog.records if r.levelno == level and any(m in r.getMessage() for m in marks)]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        server.start()
        yield server


@pytest.mark.parametrize(
    ("policy", "maxmemory", "named"),
    [
        ("allkeys-lru", "100mb", "parked tasks (lost without a word)"),
        ("allkeys-random", "100mb", "parked tasks (lost without a word)"),
        ("volatile-lru", "100mb", "breakers' state, whose keys have a TTL"),
        ("noeviction", "100mb", None),  # (refuses writes: every caller falls back)
        ("allkeys-lru", "0", None),  # (no limit: nothing is evicted)
    ],
)
def test_a_store_that_may_evict_is_named_once_at_a_warning(
    server: RedisServer, caplog: pytest.LogCaptureFixture, policy: str, maxmemory: str, named: str | None
) -> None:
    server.admin().config_set("maxmemory", maxmemory)
    server.admin().config_set("maxmemory-policy", policy)
    label = checked(server.url, caplog)
    warnings = told(caplog, logging.WARNING)
    if named is None:
        assert warnings == []
        return
    assert len(warnings) == 1
    assert f"redis store {label} has maxmemory-policy {policy}" in warnings[0]
    assert named in warnings[0]
    assert "Set maxmemory-policy noeviction" in warnings[0]
    assert ("parked tasks" in warnings[0].split("Set ")[0]) == policy.startswith("allkeys")


@pytest.mark.parametrize("refusal", ["acl", "renamed"])
def test_a_store_that_will_not_tell_its_policy_is_said_so_without_an_error(
    caplog: pytest.LogCaptureFixture, refusal: str
) -> None:
    """Managed Redis often refuses CONFIG (an ACL user without it, a renamed command): the
    releaser says so at INFO and goes on, releasing as usual."""
    options = ("--rename-command", "CONFIG", "") if refusal == "renamed" else ()
    with RedisServer("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru", *options) as server:
        server.start()
        url = server.url
        if refusal == "acl":
            server.admin().acl_setuser(
                "app", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-config"]
            )
            url = url.replace("redis://", "redis://app:pw@", 1)
        checker, store = releaser(url)
        try:
            with caplog.at_level(logging.INFO, logger="celery_breaker"):
                checker.check_eviction()
                assert checker.release_once() == 0  # (the releaser goes on)
        finally:
            store.close()
    assert told(caplog, logging.WARNING) == []
    assert len(told(caplog, logging.INFO)) == 1
    assert "could not read the maxmemory-policy" in told(caplog, logging.INFO)[0]
    assert "config" in told(caplog, logging.INFO)[0].lower()


def test_the_running_releaser_checks_once_when_the_store_first_answers(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisServer("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lfu") as server:
        server.start()
        run_releaser(server, caplog, monkeypatch)
    assert len(told(caplog, logging.WARNING)) == 1
    assert "has maxmemory-policy allkeys-lfu" in told(caplog, logging.WARNING)[0]


def run_releaser(server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a releaser thread that starts while ``server`` is down, then twenty passes with it up."""
    checker, store = releaser(server.url)
    passes: list[int] = []
    release_once = checker.release_once

    def counted() -> int:
        passes.append(1)
        return release_once()

    monkeypatch.setattr(checker, "release_once", counted)
    server.stop()  # (the first passes find no store: the check waits for it)
    try:
        with caplog.at_level(logging.INFO, logger="celery_breaker"):
            checker.start()
            poll(lambda: "parked tasks wait until it answers" in caplog.text, "the releaser to meet the outage")
            server.start()
            poll(lambda: len(passes) >= 20, "twenty passes of the releaser")
    finally:
        checker.stop()
        store.close()


def test_each_evicting_primary_of_a_cluster_is_named(redis_cluster_url: str, caplog: pytest.LogCaptureFixture) -> None:
    checker, store = releaser(redis_cluster_url)
    client: Any = store.client()  # (redis-py leaves much of RedisCluster untyped)
    primary = client.get_primaries()[1]
    before = {option: client.config_get(option, target_nodes=primary)[option] for option in OPTIONS}
    client.config_set("maxmemory", "100mb", target_nodes=primary)
    client.config_set("maxmemory-policy", "allkeys-lru", target_nodes=primary)
    try:
        with caplog.at_level(logging.INFO, logger="celery_breaker"):
            checker.check_eviction()
    finally:
        for option in reversed(OPTIONS):
            client.config_set(option, before[option], target_nodes=primary)
        store.close()
    warnings = told(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert f"maxmemory-policy allkeys-lru (on {primary.name})" in warnings[0]
    assert "parked tasks" in warnings[0]


def test_a_sentinel_master_that_takes_writes_no_replica_took_is_named(
    redis_sentinel: RedisSentinel, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``SENTINEL FAILOVER`` while tasks were parked: the old master took parks for about a
    second after its replica was promoted, and 245 of 869 parks that had succeeded were
    gone. With ``min-replicas-to-write 1`` (and ``min-replicas-max-lag 1``) none was: the
    old master refused them, and they went by countdown. Nothing said so."""
    checker, store = releaser(redis_sentinel.url)
    master = redis_sentinel.master().admin()
    try:
        with caplog.at_level(logging.INFO, logger="celery_breaker"):
            checker.check_eviction()  # (stock settings: min-replicas-to-write 0)
            told_before = [r.getMessage() for r in caplog.records if "min-replicas-to-write" in r.getMessage()]
            master.config_set("min-replicas-to-write", "1")
            caplog.clear()
            checker.check_eviction()
    finally:
        master.config_set("min-replicas-to-write", "0")
        store.close()
    assert len(told_before) == 1
    assert f"redis store {store.label} is a Sentinel master with min-replicas-to-write 0" in told_before[0]
    assert "Set min-replicas-to-write 1 and min-replicas-max-lag 1" in told_before[0]
    assert not [r for r in caplog.records if "min-replicas-to-write" in r.getMessage()]


def test_a_plain_redis_has_no_failover_to_name(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    checked(server.url, caplog)
    assert "min-replicas-to-write" not in caplog.text
