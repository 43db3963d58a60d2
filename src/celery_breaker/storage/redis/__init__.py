"""The Redis store: breakers shared by every process and host through one Redis (standalone, Sentinel or Cluster)."""

from __future__ import annotations

from .cell import VIEW_TTL, RedisCell, policy_text
from .client import DEFAULT_SOCKET_CONNECT_TIMEOUT, DEFAULT_SOCKET_TIMEOUT, SCHEMES
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
