"""A Redis that answers but refuses the store's calls for a reason of its own says what to fix.

A read-only replica given as the store URL, a Redis full under ``noeviction``, an ACL
user without ``EVALSHA`` or without the transitions channel: each made every breaker
fall back with a WARNING calling the store "unreachable" and quoting Redis's error,
which named neither the setting nor the fix.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import pytest
import redis

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.errors import StorageError
from celery_breaker.storage import close_stores
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis.damage import advice
from celery_breaker.testing import FakeClock

from ..proxies import LoopbackProxy
from ..servers import RedisServer
from ..unit.support import down, fail, ok, state_of
from .conftest import unique_prefix


def as_replica(server: RedisServer, master: RedisServer) -> str:
    server.admin().replicaof(*master.address)
    return server.url


def full(server: RedisServer, master: RedisServer) -> str:
    server.admin().config_set("maxmemory", "1")  # (noeviction, the default: every write refused)
    return server.url


def short_of_replicas(server: RedisServer, master: RedisServer) -> str:
    server.admin().config_set("min-replicas-to-write", "1")  # (it has none)
    return server.url


def no_such_db(server: RedisServer, master: RedisServer) -> str:
    return f"{server.url}/16"  # (a server has databases 0 to 15 unless configured otherwise)


def spaced_client_name(server: RedisServer, master: RedisServer) -> str:
    return f"{server.url}/0?client_name=celery%20worker"


def user_without(*commands: str, channels: tuple[str, ...] = ("*",)) -> Callable[[RedisServer, RedisServer], str]:
    def made(server: RedisServer, master: RedisServer) -> str:
        server.admin().acl_setuser(
            "app", enabled=True, passwords=["+pw"], keys=["*"], channels=list(channels),
            commands=["+@all", *(f"-{command}" for command in commands)],
        )  # fmt: skip
        return server.url.replace("redis://", "redis://app:pw@", 1)

    return made


@pytest.fixture
def servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    with RedisServer() as server, RedisServer() as master:
        server.start()
        master.start()
        yield server, master
    close_stores()


ACL_FIX = "the store URL's ACL user may not run a command, or use a key or channel"


@pytest.mark.parametrize(
    ("refusal", "fix", "parks"),
    [
        (
            as_replica,
            "the store URL names a replica, which takes no writes: point breaker_storage_url at the master",
            False,
        ),
        (full, "Redis is full (maxmemory): give it more memory or free some", False),
        (short_of_replicas, "until min-replicas-to-write replicas are connected: bring a replica back", False),
        (user_without("evalsha"), ACL_FIX, False),
        (user_without(channels=()), ACL_FIX, True),  # (parking publishes nothing)
        # (Both quoted Redis's error alone: the worker ran on for good with every breaker
        # fallen back, as through an outage, with nothing said about the URL.)
        (no_such_db, "the store URL names a database this Redis does not have", False),
        (spaced_client_name, "the store URL's client_name holds a space", False),
    ],
    ids=["replica", "full", "no-replicas", "no-evalsha", "no-channel", "no-such-db", "client-name"],
)
def test_a_refusing_redis_names_the_fix_in_the_outage_warning_and_the_park_error(
    servers: tuple[RedisServer, RedisServer],
    caplog: pytest.LogCaptureFixture,
    refusal: Callable[[RedisServer, RedisServer], str],
    fix: str,
    parks: bool,
) -> None:
    base = refusal(*servers)
    url = f"{base}{'&' if '?' in base else '?'}key_prefix={unique_prefix()}"
    # (Made inside the block too: the store may fail as the breaker first reads it, and a
    # Celery app set up by an earlier test leaves the root logger above WARNING.)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=url)
        with pytest.raises(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)  # (a failure: a write, and a trip to publish)
    outage = [r.getMessage() for r in caplog.records if "breakers follow breaker_on_storage_error" in r.getMessage()]
    assert len(outage) == 1
    assert fix in outage[0]
    store = RedisStore.from_url(url)
    try:
        if parks:
            assert store.parking.park("svc", None, "e1", 1.0, "{}", None) == 1
            return
        with pytest.raises(StorageError, match="parking e1 failed") as parked:
            store.parking.park("svc", None, "e1", 1.0, "{}", None)
    finally:
        store.close()
    assert fix in str(parked.value)


@pytest.mark.parametrize(
    "error",
    [
        redis.AuthenticationError("invalid username-password pair or user is disabled."),
        redis.ResponseError("NOAUTH Authentication required."),
        redis.AuthenticationError("HELLO must be called with the client already authenticated, otherwise ..."),
    ],
)
def test_a_missing_or_wrong_password_gets_the_fix(error: Exception) -> None:
    assert advice(error).startswith("Redis wants a password, or another one")


def test_an_outage_or_a_data_error_gets_no_fix() -> None:
    assert advice(redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")) == ""
    assert advice(redis.TimeoutError("Timeout reading from socket")) == ""
    assert advice(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")) == ""
    assert advice(None) == ""


@pytest.mark.parametrize("pool", ["", "&max_connections=8"], ids=["pool", "waiting-pool"])
def test_a_master_demoted_behind_its_address_is_left_for_the_new_one(
    servers: tuple[RedisServer, RedisServer], pool: str
) -> None:
    # A failover behind one address (a DNS name or a virtual IP moved to the new master:
    # a managed Redis's primary endpoint, a Kubernetes service): the old master, demoted
    # to a replica, keeps the connections already open to it and answers every write
    # READONLY. redis-py keeps a connection that got an error reply, so every retry went
    # to the replica again, and every breaker stayed on its stand-in until the worker
    # restarted.
    old, new = servers
    new.admin().replicaof(*old.address)
    with LoopbackProxy(old.address) as address:
        url = f"redis://127.0.0.1:{address.port}?key_prefix={unique_prefix()}&time=client{pool}"
        clock = FakeClock()
        breaker = CircuitBreaker("svc", {"failure_threshold": 2}, storage=url, clock=clock, on_storage_error="deny")
        assert breaker.call(ok) == "ok"
        new.admin().replicaof("no", "one")
        old.admin().replicaof(*new.address)  # (demoted: it answers writes READONLY)
        address.target = new.address  # (the name now points to the new master)
        with contextlib.suppress(CircuitOpenError, ConnectionError):
            breaker.call(down)  # (a write: it meets READONLY, and the stand-in takes the call)
        for _ in range(2):
            clock.advance(6)  # (past the retry interval: the next call asks Redis again)
            with contextlib.suppress(CircuitOpenError):
                breaker.call(ok)
        fail(breaker, 2)
        assert state_of(breaker) is State.OPEN
        found = new.admin().hget(RedisStore.from_url(url).keys_for("svc", None)[0], "st")
        assert found == "open"
        close_stores()
