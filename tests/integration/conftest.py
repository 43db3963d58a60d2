"""The ``partner_broker`` fixture: the one broker database of ``partner_proj``'s app; and
``downstream``, ``proj``'s downstream for the modules that run its worker.

The app builds its connection and producer pools, and its result backend, on first use
and keeps them, so once a test module has published, pointing ``broker_url`` somewhere
else would not move them. Every module that uses the app therefore shares one
database, and empties it before and after its own tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.conftest import emptied
from tests.integration import partner_proj, proj
from tests.servers import RedisServer

PARTNER_DB = 4


@pytest.fixture(scope="session")
def partner_url(redis_url: str) -> str:
    url = f"{redis_url}/{PARTNER_DB}"
    partner_proj.app.conf.update(broker_url=url, result_backend=url)
    return url


@pytest.fixture(scope="module")
def partner_broker(partner_url: str) -> Iterator[str]:
    """``partner_proj``'s broker (and result backend), empty for this module."""
    with emptied(partner_url) as url:
        yield url


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the module's own: db 0 a Redis broker, db 1 the store, db 2 counters, db 3 results."""
    with RedisServer() as started:
        started.start()
        yield started


@pytest.fixture
def downstream(broker: str) -> Iterator[redis.Redis]:
    """``tests.integration.proj``'s downstream (in the module's ``broker``): up, its call
    count at zero, and up again after the test."""
    client = redis.Redis.from_url(broker)
    client.delete(proj.DOWN_KEY, proj.CALLS_KEY)
    yield client
    client.delete(proj.DOWN_KEY)
