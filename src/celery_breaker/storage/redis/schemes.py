"""The URL schemes of the Redis store and the topology each names: text only, no redis-py."""

from __future__ import annotations

__all__ = ["SCHEMES", "TLS_SCHEMES"]

#: Our schemes, and the topology each names (valkey speaks the same protocol).
SCHEMES = {
    "redis": "standalone",
    "rediss": "tls",
    "redis+unix": "unix",
    "redis+sentinel": "sentinel",
    "rediss+sentinel": "sentinel",
    "redis+cluster": "cluster",
    "rediss+cluster": "cluster",
    "valkey": "standalone",
    "valkeys": "tls",
    "valkey+unix": "unix",
    "valkey+sentinel": "sentinel",
    "valkeys+sentinel": "sentinel",
    "valkey+cluster": "cluster",
    "valkeys+cluster": "cluster",
}
#: The Sentinel and Cluster schemes whose connections speak TLS, to every node.
TLS_SCHEMES = frozenset({"rediss+sentinel", "rediss+cluster", "valkeys+sentinel", "valkeys+cluster"})
