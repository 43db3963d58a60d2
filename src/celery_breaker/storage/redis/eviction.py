"""Whether the Redis a store uses may evict its keys when full (``maxmemory-policy``).

Parked tasks live in keys without a TTL and breakers' state in keys with one. Under an
``allkeys-*`` policy a full Redis evicts either: parked tasks vanish (no script, no
releaser sees them go) and an OPEN breaker comes back CLOSED. Under a ``volatile-*``
policy only keys with a TTL go: a breaker's state and its release pace, never its parked
tasks. Under ``noeviction`` (Redis's default) a full Redis refuses writes instead, which
every caller sees as a store failure and falls back from: nothing goes silently.
"""

from __future__ import annotations

from typing import Any

import redis

from ..contract import EvictionCheck
from .client import is_cluster
from .damage import text

__all__ = ["check_eviction"]

#: ``maxmemory-policy`` values that evict keys without a TTL (parked tasks) too.
_EVICTS_ANY_KEY = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def check_eviction(client: Any, label: str) -> EvictionCheck:
    """Read ``maxmemory`` and ``maxmemory-policy`` from every server holding the store's
    keys (each primary of a Cluster). A server that refuses ``CONFIG GET`` (an ACL user
    without it, a renamed command, a managed Redis) makes the answer ``unknown``, never an
    error; the client's error is raised only when the store cannot be reached."""
    servers = [(node.name, node) for node in client.get_primaries()] if is_cluster(client) else [("", None)]
    evicting: dict[str, list[str]] = {}
    for name, node in servers:
        options = {} if node is None else {"target_nodes": node}
        try:
            found = {**client.config_get("maxmemory", **options), **client.config_get("maxmemory-policy", **options)}
        except redis.ResponseError as exc:  # (NOPERM, an unknown command: the server will not say)
            return EvictionCheck(unknown=f"redis store {label}: {exc}")
        settings = {text(option): text(value) for option, value in found.items()}
        policy = settings.get("maxmemory-policy", "noeviction")
        if policy != "noeviction" and settings.get("maxmemory", "0") not in ("0", ""):
            evicting.setdefault(policy, []).append(name)
    if not evicting:
        return EvictionCheck()
    where = ", ".join(
        f"maxmemory-policy {policy}" + (f" (on {', '.join(names)})" if any(names) else "")
        for policy, names in sorted(evicting.items())
    )
    if any(policy in _EVICTS_ANY_KEY for policy in evicting):
        what = "parked tasks (lost without a word) and breakers' state (an open breaker comes back closed)"
    else:
        what = "breakers' state, whose keys have a TTL (an open breaker comes back closed and releases its tasks)"
    return EvictionCheck(risk=f"redis store {label} has {where} and a maxmemory: once full, it evicts {what}")
