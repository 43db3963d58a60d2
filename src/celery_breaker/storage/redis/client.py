"""Redis clients from store URLs: one place knows every topology (standalone, TLS, unix socket)."""

from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult, urlencode

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...errors import ConfigurationError

__all__ = ["DEFAULT_SOCKET_CONNECT_TIMEOUT", "DEFAULT_SOCKET_TIMEOUT", "SCHEMES", "describe", "make_client"]

#: Our schemes, and the topology each names (valkey speaks the same protocol).
SCHEMES = {
    "redis": "standalone",
    "rediss": "tls",
    "redis+unix": "unix",
    "valkey": "standalone",
    "valkeys": "tls",
    "valkey+unix": "unix",
}
_REDIS_PY_SCHEMES = {"standalone": "redis", "tls": "rediss", "unix": "unix"}

#: A breaker must never make a call wait on a dead store for long: both timeouts are
#: always set (redis-py's own default would be 5 s, or none for connecting).
DEFAULT_SOCKET_TIMEOUT = 0.5
DEFAULT_SOCKET_CONNECT_TIMEOUT = 0.5


def _retry() -> Retry:
    # One immediate retry heals a pooled connection the server closed; a timeout is not
    # retried (redis-py's default would retry 10 times).
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def make_client(
    url: str,
    parts: SplitResult,
    passed: list[tuple[str, str]],
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
) -> Any:
    """A redis-py client for store URL ``url`` (already split into ``parts``); ``passed``
    are the query options that are redis-py's own (``db``, ``password``, ``ssl_*``...).

    Raises ``ConfigurationError`` naming the URL when redis-py rejects it. Connecting
    happens on first use, never here.
    """
    topology = SCHEMES[parts.scheme.lower()]
    # Not urlunsplit: it drops the empty host of unix:///path, which redis-py requires.
    query = urlencode(passed)
    target = f"{_REDIS_PY_SCHEMES[topology]}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    try:
        return redis.Redis.from_url(
            target,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=_retry(),
        )
    except ValueError as exc:
        raise ConfigurationError(f"redis store URL {url!r}: {exc}") from None


def describe(url: str) -> str:
    """``url`` with any password masked, for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    credentials, _, host = rest.partition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else f"{scheme}://***@{host}"
