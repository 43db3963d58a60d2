"""Whether the Redis a store uses may drop its keys: evicted when full (``maxmemory-policy``), or lost in a failover.

Parked tasks live in keys without a TTL and breakers' state in keys with one. Under an
``allkeys-*`` policy a full Redis evicts either: parked tasks vanish (no script, no
releaser sees them go) and an OPEN breaker comes back CLOSED. Under a ``volatile-*``
policy only keys with a TTL go: a breaker's state and its release pace, never its parked
tasks. Under ``noeviction`` (Redis's default) a full Redis refuses writes instead, which
every caller sees as a store failure and falls back from: nothing goes silently.

Behind Sentinel, the old master keeps taking writes for about a second after a failover
promoted its replica (until Sentinel reconfigures it), and those writes are dropped when
it becomes a replica: parks that succeeded then are lost without a word (245 of 869 parks
made during a ``SENTINEL FAILOVER`` in a run). With ``min-replicas-to-write 1`` the old
master refuses them once its replica is gone (``min-replicas-max-lag``): the parks fail,
and the tasks are deferred by countdown instead (none lost in the same run).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import SentinelConnectionPool

from ..contract import EvictionCheck
from ..masking import masked_in_text
from .client import is_cluster
from .damage import text

__all__ = ["check_eviction"]

#: ``maxmemory-policy`` values that evict keys without a TTL (parked tasks) too.
_EVICTS_ANY_KEY = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def check_eviction(client: Any, label: str) -> EvictionCheck:
    """Read ``maxmemory`` and ``maxmemory-policy`` from every server holding the store's
    keys (each primary of a Cluster), and a Sentinel master's ``min-replicas-to-write``.
    A server that refuses ``CONFIG GET`` (an ACL user without it, a renamed command, a
    managed Redis) makes the answer ``unknown``, never an error; the client's error is
    raised only when the store cannot be reached."""
    servers = [(node.name, node) for node in client.get_primaries()] if is_cluster(client) else [("", None)]
    evicting: dict[str, list[str]] = {}
    settings: dict[str, str] = {}
    for name, node in servers:
        options = {} if node is None else {"target_nodes": node}
        try:
            found = {**client.config_get("maxmemory", **options), **client.config_get("maxmemory-policy", **options)}
            if node is None and isinstance(client.connection_pool, SentinelConnectionPool):
                found.update(client.config_get("min-replicas-to-write"))
        except redis.ResponseError as exc:  # (NOPERM, an unknown command: the server will not say)
            return EvictionCheck(unknown=f"redis store {label}: {masked_in_text(str(exc))}")
        settings = {text(option): text(value) for option, value in found.items()}
        policy = settings.get("maxmemory-policy", "noeviction")
        if policy != "noeviction" and settings.get("maxmemory", "0") not in ("0", ""):
            evicting.setdefault(policy, []).append(name)
    failover = None
    if settings.get("min-replicas-to-write", "") == "0":
        failover = (
            f"redis store {label} is a Sentinel master with min-replicas-to-write 0: in a failover it takes writes "
            "for about a second after its replica was promoted: tasks parked then are lost without a word, and "
            "tasks released then may run twice. "
            "Set min-replicas-to-write 1 and min-replicas-max-lag 1 on every server of the service (a park the "
            "master then refuses is deferred by countdown instead; while no replica is in sync, breakers fall back)"
        )
    if not evicting:
        return EvictionCheck(failover=failover)
    where = ", ".join(
        f"maxmemory-policy {policy}" + (f" (on {', '.join(names)})" if any(names) else "")
        for policy, names in sorted(evicting.items())
    )
    if any(policy in _EVICTS_ANY_KEY for policy in evicting):
        what = "parked tasks (lost without a word) and breakers' state (an open breaker comes back closed)"
    else:
        what = "breakers' state, whose keys have a TTL (an open breaker comes back closed and releases its tasks)"
    return EvictionCheck(
        risk=f"redis store {label} has {where} and a maxmemory: once full, it evicts {what}", failover=failover
    )
