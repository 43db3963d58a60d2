"""TLS stores against real TLS servers: standalone ``rediss://``, ``rediss+cluster://`` and ``rediss+sentinel://``.

Every server here speaks TLS only (no plain port) and requires a client certificate
(``tls-auth-clients yes``); the session's throwaway CA signed both sides
(``tests/tls.py``). A breaker call that works therefore went over TLS, with our
certificate checked by the server and the server's by us.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster as RedisPyCluster
from redis.connection import Connection, SSLConnection
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, ConfigurationError, State
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.errors import StorageError
from celery_breaker.integration.settings import build_settings
from celery_breaker.storage import describe_url, store_from_url
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis.client import CLIENT_ERRORS, check_url

from ..servers import RedisCluster, RedisSentinel, RedisServer
from ..tls import Certificates
from ..unit.support import fail, ok, state_of
from .conftest import Closing, unique_prefix
from .test_redis_hot_path import wait_for

TRIP_AT_TWO = {"failure_threshold": 2}
TOPOLOGIES = ["standalone", "cluster", "sentinel"]


def with_query(url: str, *options: str) -> str:
    return url + ("&" if "?" in url else "?") + "&".join(option for option in options if option)


@pytest.fixture
def tls_url(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """The session's TLS server of a topology (started on first use), as a store URL without TLS options."""

    def url(topology: str) -> str:
        fixture = {"standalone": "redis_tls", "cluster": "redis_tls_cluster", "sentinel": "redis_tls_sentinel"}
        server = cast(RedisServer | RedisCluster | RedisSentinel, request.getfixturevalue(fixture[topology]))
        return server.url

    return url


# -- breakers over TLS ---------------------------------------------------------------


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_a_breaker_trips_and_another_store_sees_it_over_tls(
    topology: str, tls_url: Callable[[str], str], tls_certificates: Certificates
) -> None:
    url = with_query(tls_url(topology), f"key_prefix={unique_prefix()}", tls_certificates.query())
    first, second = RedisStore.from_url(url), RedisStore.from_url(url)  # two clients, as two processes have
    tripping = CircuitBreaker("payments", TRIP_AT_TWO, storage=first, on_storage_error="deny")
    watching = CircuitBreaker("payments", TRIP_AT_TWO, storage=second, on_storage_error="deny")
    assert watching.call(ok) == "ok"
    wait_for(lambda: second.live)  # subscribed to the transitions channel, over TLS too
    fail(tripping, 2)
    wait_for(lambda: state_of(watching) is State.OPEN)  # the trip heard on the channel
    with pytest.raises(CircuitOpenError):
        watching.call(ok)
    later = CircuitBreaker("payments", TRIP_AT_TWO, storage=RedisStore.from_url(url), on_storage_error="deny")
    assert state_of(later) is State.OPEN  # and read from the stored state


def test_plain_sentinels_can_point_to_a_tls_master(
    redis_tls_sentinel: RedisSentinel, tls_certificates: Certificates
) -> None:
    # sentinel_ssl=false: the Sentinel's plain port is asked, the master is spoken to over TLS.
    prefix = f"key_prefix={unique_prefix()}"
    plain = RedisStore.from_url(with_query(redis_tls_sentinel.plain_sentinels_url, prefix, tls_certificates.query()))
    tls = RedisStore.from_url(with_query(redis_tls_sentinel.url, prefix, tls_certificates.query()))
    fail(CircuitBreaker("payments", TRIP_AT_TWO, storage=plain, on_storage_error="deny"), 2)
    assert state_of(CircuitBreaker("payments", TRIP_AT_TWO, storage=tls, on_storage_error="deny")) is State.OPEN


def test_the_tls_servers_take_no_plain_connections(redis_tls: RedisServer) -> None:
    # What makes the tests above proof of TLS: the port they used speaks nothing else.
    plain = redis.Redis(
        port=redis_tls.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        plain.ping()


# -- certificates that do not do: store outages, never crashes --------------------------


def failing_store(url: str, closing: Closing) -> RedisStore:
    """A store whose first use fails with StorageError, caused by a redis-py error (a TLS
    one); closed when the test ends (its agent would retry for the rest of the session)."""
    store = closing(RedisStore.from_url(url))  # configured without complaint: nothing connects yet
    with pytest.raises(StorageError) as info:
        store.cell("svc", None, BreakerPolicy(), SYSTEM_CLOCK)
    assert isinstance(info.value.__cause__, CLIENT_ERRORS)
    return store


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_without_a_client_certificate_the_store_is_unreachable(
    topology: str, tls_url: Callable[[str], str], tls_certificates: Certificates, closing: Closing
) -> None:
    store = failing_store(with_query(tls_url(topology), tls_certificates.query(client_certificate=False)), closing)
    breaker = CircuitBreaker("svc", TRIP_AT_TWO, storage=store, on_storage_error="allow")
    assert breaker.call(ok) == "ok"  # breaker_on_storage_error applies
    assert state_of(breaker) is State.DISABLED


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_a_wrong_ca_is_a_storage_error(
    topology: str, tls_url: Callable[[str], str], tls_certificates: Certificates, closing: Closing
) -> None:
    url = with_query(tls_url(topology), tls_certificates.query(ca=tls_certificates.other_ca))
    store = failing_store(url, closing)
    breaker = CircuitBreaker("svc", TRIP_AT_TWO, storage=store, on_storage_error="deny")
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)


def test_a_wrong_ca_names_the_certificate_check(
    redis_tls: RedisServer, tls_certificates: Certificates, closing: Closing
) -> None:
    url = with_query(redis_tls.url, tls_certificates.query(ca=tls_certificates.other_ca))
    store = closing(RedisStore.from_url(url))
    with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):
        store.cell("svc", None, BreakerPolicy(), SYSTEM_CLOCK)


# -- what redis-py is given -------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["rediss+sentinel", "valkeys+sentinel"])
def test_tls_options_reach_the_sentinels_and_the_master(scheme: str, tmp_path: Path) -> None:
    for name in ("ca.pem", "c.crt", "c.key"):  # (files that exist: the client refuses others)
        (tmp_path / name).write_text("")
    (tmp_path / "cas").mkdir()
    url = (
        f"{scheme}://h1:26379,h2/mymaster?ssl_ca_certs={tmp_path}/ca.pem&ssl_certfile={tmp_path}/c.crt"
        f"&ssl_keyfile={tmp_path}/c.key&ssl_cert_reqs=CERT_REQUIRED&ssl_check_hostname=false&ssl_password=pw"
        f"&ssl_ca_path={tmp_path}/cas"
    )
    expected = {
        "ssl_ca_certs": f"{tmp_path}/ca.pem", "ssl_certfile": f"{tmp_path}/c.crt",
        "ssl_keyfile": f"{tmp_path}/c.key", "ssl_cert_reqs": "required", "ssl_check_hostname": False,
        "ssl_password": "pw", "ssl_ca_path": f"{tmp_path}/cas",
    }  # fmt: skip
    pool = cast(SentinelConnectionPool, RedisStore.from_url(url).client().connection_pool)  # no connection made
    assert pool.connection_class is SentinelManagedSSLConnection
    assert {name: pool.connection_kwargs.get(name) for name in expected} == expected
    for sentinel in pool.sentinel_manager.sentinels:
        assert sentinel.connection_pool.connection_class is SSLConnection
        assert {name: sentinel.connection_pool.connection_kwargs.get(name) for name in expected} == expected

    plain = cast(SentinelConnectionPool, RedisStore.from_url(url + "&sentinel_ssl=false").client().connection_pool)
    assert plain.connection_class is SentinelManagedSSLConnection
    for sentinel in plain.sentinel_manager.sentinels:
        assert sentinel.connection_pool.connection_class is Connection
        assert not any(name.startswith("ssl") for name in sentinel.connection_pool.connection_kwargs)


@pytest.mark.parametrize("option", ["ssl_ca_certs", "ssl_certfile", "ssl_ca_path"])
def test_a_tls_file_that_does_not_exist_is_an_outage_that_names_it(option: str, closing: Closing) -> None:
    # redis-py's own error read "Error 2 connecting to 127.0.0.1:6380. No such file or
    # directory", like a unix socket's, naming neither the option nor the file. Checked
    # when the client is made (the file may exist only where the workers run), as an
    # outage: breaker_on_storage_error applies, and the log line says what to fix.
    url = f"rediss://:s3cret@127.0.0.1:6380/0?{option}=/nowhere/ca.pem"
    store = closing(RedisStore.from_url(url))  # (the configuration is fine)
    with pytest.raises(StorageError) as info:
        store.cell("svc", None, BreakerPolicy(), SYSTEM_CLOCK)
    assert f"{option} names '/nowhere/ca.pem', which does not exist here" in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("option", ["retry_on_timeout", "socket_keepalive"])
def test_a_flag_redis_py_would_read_as_true_is_refused_on_a_plain_url(option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{option}='maybe' must be true or false"):
        RedisStore.from_url(f"redis://127.0.0.1:6379/0?{option}=maybe")


def test_tls_options_reach_every_cluster_node(redis_tls_cluster: RedisCluster, tls_certificates: Certificates) -> None:
    url = with_query(redis_tls_cluster.url, tls_certificates.query(), "ssl_cert_reqs=CERT_REQUIRED")
    client: Any = RedisStore.from_url(url).client()  # reads the slot map over TLS (redis-py leaves it untyped)
    primaries = client.get_primaries()
    assert sorted(node.port for node in primaries) == sorted(node.port for node in redis_tls_cluster.nodes)
    for node in primaries:
        pool = client.get_redis_connection(node).connection_pool
        assert pool.connection_class is SSLConnection
        assert pool.connection_kwargs["ssl_ca_certs"] == str(tls_certificates.ca)
        assert pool.connection_kwargs["ssl_certfile"] == str(tls_certificates.client_cert)
        assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    assert isinstance(client, RedisPyCluster)


# -- configuration errors, before anything connects -------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("rediss+cluster://h1:7000?ssl_cert_reqs=sometimes", "ssl_cert_reqs='sometimes' must be required, optional"),
        ("rediss+sentinel://h1/m?ssl_check_hostname=maybe", "ssl_check_hostname='maybe' must be true or false"),
        ("rediss+sentinel://h1/m?sentinel_ssl=maybe", "sentinel_ssl='maybe' must be true or false"),
        ("rediss+cluster://h1:7000?ssl_certfil=/c.crt", "unknown option(s) ssl_certfil"),
        ("rediss+cluster://h1:7000?sentinel_ssl=false", "unknown option(s) sentinel_ssl"),
        # redis-py's cluster client would drop these silently, so they are refused.
        ("rediss+cluster://h1:7000?ssl_min_version=3", "unknown option(s) ssl_min_version"),
        ("valkeys+sentinel://h1/m?ssl_ciphers=ALL", "unknown option(s) ssl_ciphers"),
        ("redis+cluster://h1:7000?ssl_ca_certs=/ca.pem", "ssl_ca_certs only apply over TLS; write rediss+cluster://"),
        ("valkey+sentinel://h1/m?sentinel_ssl=true", "sentinel_ssl only apply over TLS; write valkeys+sentinel://"),
        ("rediss+sentinel://h1/m?ssl_keyfile=/c.key", "ssl_keyfile needs ssl_certfile"),
    ],
)
def test_bad_tls_options_are_configuration_errors(url: str, named: str) -> None:
    parts = urlsplit(url)
    with pytest.raises(ConfigurationError, match=re.escape(named)):
        check_url(url, parts, parse_qsl(parts.query))
    with pytest.raises(ConfigurationError, match=re.escape(named)):
        store_from_url(url)  # what a worker does at start: h1 is never looked up


def test_the_ssl_password_is_masked() -> None:
    url = "rediss+sentinel://:pw@h1/m?ssl_certfile=/c.crt&ssl_password=hunter2&sentinel_ssl=maybe"
    assert describe_url(url) == "rediss+sentinel://:***@h1/m?ssl_certfile=/c.crt&ssl_password=***&sentinel_ssl=maybe"
    with pytest.raises(ConfigurationError) as info:
        store_from_url(url)
    assert "hunter2" not in str(info.value)
    assert describe_url("rediss://cache?ssl_password=hunter2") == "rediss://cache?ssl_password=***"


# -- the default store of a TLS Sentinel broker ----------------------------------------


def test_a_tls_sentinel_broker_keeps_its_breakers_in_its_tls_master(
    redis_tls_sentinel: RedisSentinel, tls_certificates: Certificates
) -> None:
    # kombu's default with broker_use_ssl: plain Sentinels (here the Sentinel's plain
    # port), TLS to the master. The broker itself connects so, and the derived store too.
    sentinel = redis_tls_sentinel.sentinels[0]
    app = Celery("tls-sentinel", broker=f"sentinel://127.0.0.1:{sentinel.plain_port}", set_as_current=False)
    app.conf.update(
        broker_transport_options={"master_name": redis_tls_sentinel.service},
        broker_use_ssl={
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": str(tls_certificates.ca),
            "ssl_certfile": str(tls_certificates.client_cert),
            "ssl_keyfile": str(tls_certificates.client_key),
        },
        breaker_key_prefix=unique_prefix(),
    )
    with app.connection_for_write() as connection:
        assert connection.default_channel.client.ping()
    url = build_settings(app.conf).storage_url
    assert url.startswith(f"rediss+sentinel://127.0.0.1:{sentinel.plain_port}/{redis_tls_sentinel.service}?")
    assert "sentinel_ssl=false" in url
    derived = RedisStore.from_url(url)
    fail(CircuitBreaker("payments", TRIP_AT_TWO, storage=derived, on_storage_error="deny"), 2)
    prefix = f"key_prefix={derived.key_prefix}"
    direct = RedisStore.from_url(with_query(redis_tls_sentinel.url, prefix, tls_certificates.query()))
    assert state_of(CircuitBreaker("payments", TRIP_AT_TWO, storage=direct)) is State.OPEN
