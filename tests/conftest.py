"""Fixtures shared by every test: real Redis servers (standalone, Cluster, Sentinel) started once per session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import redis

from .servers import RedisCluster, RedisSentinel, RedisServer, ServerError


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
