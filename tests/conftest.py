"""Fixtures shared by every test: real Redis servers (standalone, Cluster, Sentinel, TLS) and a real RabbitMQ,
started once per session (when first asked for)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import redis

from .rabbitmq import CONSUMER_TIMEOUT_S, RabbitMQServer
from .servers import RedisCluster, RedisSentinel, RedisServer, ServerError
from .tls import Certificates, make_certificates


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a worker of their own (``celery_worker``) run after every other.

    Celery's test worker is stopped by setting ``celery.worker.state.should_terminate``,
    which is process-wide: stopping one in-process worker stops them all, tests/celery's
    session worker too. Run before a tests/celery module (a random order), the guide's
    worker test left every later test that needed that worker timing out (57 failed).
    A stable sort: the others keep their order, random or not."""
    items.sort(key=lambda item: "celery_worker" in getattr(item, "fixturenames", ()))


def _started(server: RedisServer | RedisCluster | RedisSentinel) -> None:
    try:
        server.start()
    except ServerError as exc:
        pytest.fail(str(exc))  # the fixture's ``with`` stops whatever did start


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server started for this test session, bound to 127.0.0.1 only."""
    with RedisServer() as server:
        _started(server)
        yield server.url


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQServer]:
    """A real RabbitMQ (Debian's), its ``consumer_timeout`` short: ``CONSUMER_TIMEOUT_S``, checked every second.
    One for the session, whichever directory's tests ask for it (the web page's too)."""
    with RabbitMQServer(consumer_timeout_ms=CONSUMER_TIMEOUT_S * 1000) as server:
        server.start()
        yield server


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A ``redis+cluster://`` URL of a 3-primary Redis Cluster started for this session (when first asked for)."""
    with RedisCluster() as cluster:
        _started(cluster)
        yield cluster.url


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A master, a replica and a Sentinel started for this session: ``.url`` is our
    ``redis+sentinel://`` URL, ``.failover()`` switches master and replica."""
    with RedisSentinel() as sentinel:
        _started(sentinel)
        yield sentinel


@pytest.fixture(scope="session")
def tls_certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA, the server and client certificates it signed, and an unrelated CA."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def redis_tls(tls_certificates: Certificates) -> Iterator[RedisServer]:
    """A redis-server speaking TLS only and requiring a client certificate (``.url`` is ``rediss://``)."""
    with RedisServer(tls=tls_certificates) as server:
        _started(server)
        yield server


@pytest.fixture(scope="session")
def redis_tls_cluster(tls_certificates: Certificates) -> Iterator[RedisCluster]:
    """A 3-primary Redis Cluster speaking TLS only, its bus too (``.url`` is ``rediss+cluster://``)."""
    with RedisCluster(tls=tls_certificates) as cluster:
        _started(cluster)
        yield cluster


@pytest.fixture(scope="session")
def redis_tls_sentinel(tls_certificates: Certificates) -> Iterator[RedisSentinel]:
    """A TLS-only master and replica and a Sentinel answering TLS (``.url``, ``rediss+sentinel://``)
    and plain connections (``.plain_sentinels_url``)."""
    with RedisSentinel(tls=tls_certificates) as sentinel:
        _started(sentinel)
        yield sentinel


@contextlib.contextmanager
def emptied(url: str) -> Iterator[str]:
    """A Redis database emptied before and after use (a test module's broker)."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()


#: The database of ``tests.integration.proj``'s broker and result backend.
PROJ_DB = 3


@pytest.fixture(scope="session")
def proj_url(redis_url: str) -> str:
    """``tests.integration.proj``'s broker (and result backend), set once per session.

    A Celery app builds its connection and producer pools, and its result backend, on
    first use and keeps them: pointing ``broker_url`` elsewhere later would not move
    them. Every test module that publishes with this app shares this database, and
    empties what it uses.
    """
    from tests.integration import proj

    url = f"{redis_url}/{PROJ_DB}"
    proj.app.conf.update(broker_url=url, result_backend=url)
    return url
