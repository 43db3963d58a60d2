"""The Redis store: breakers shared by every process and host through one Redis (standalone, Sentinel or Cluster).

Importing this package registers the Redis and Valkey URL schemes and nothing more:
redis-py is imported when a store is first opened (it is the optional ``redis`` extra),
and the store's names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ...errors import ConfigurationError
from ..contract import Store
from ..registry import register_scheme
from ..urls import describe_url
from .schemes import SCHEMES

if TYPE_CHECKING:
    from .cell import VIEW_TTL, RedisCell
    from .client import DEFAULT_SOCKET_CONNECT_TIMEOUT, DEFAULT_SOCKET_TIMEOUT
    from .replies import policy_text
    from .store import DEFAULT_IDLE_TTL, DEFAULT_KEY_PREFIX, RedisStore

__all__ = [
    "DEFAULT_IDLE_TTL",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_SOCKET_CONNECT_TIMEOUT",
    "DEFAULT_SOCKET_TIMEOUT",
    "SCHEMES",
    "VIEW_TTL",
    "RedisCell",
    "RedisStore",
    "policy_text",
]

_HOMES = {
    "DEFAULT_IDLE_TTL": ".store",
    "DEFAULT_KEY_PREFIX": ".store",
    "DEFAULT_SOCKET_CONNECT_TIMEOUT": ".client",
    "DEFAULT_SOCKET_TIMEOUT": ".client",
    "VIEW_TTL": ".cell",
    "RedisCell": ".cell",
    "RedisStore": ".store",
    "policy_text": ".replies",
}


@register_scheme(*SCHEMES, shared=True)
def open_store(url: str) -> Store:
    """The Redis store for ``url`` (the factory the registry calls)."""
    try:
        store_module = importlib.import_module(".store", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != "redis":
            raise
        raise ConfigurationError(
            f"{describe_url(url)!r} needs redis-py, which is not installed: pip install 'celery-breaker[redis]'"
        ) from None
    store: Store = store_module.RedisStore.from_url(url)
    return store


if not TYPE_CHECKING:  # (a module __getattr__ a type checker sees makes any name pass, as Any)

    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home, __name__), name)
        globals()[name] = value
        return value
