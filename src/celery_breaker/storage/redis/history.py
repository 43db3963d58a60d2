"""Stored metrics snapshots: one sorted set per breaker, next to its keys, trimmed to a TTL.

Each entry is a JSON object (the snapshot, with ``"at"``: epoch seconds, on Redis's clock
unless the store is on the ``time=client`` test seam) scored by ``at``. An append is one
script: add, drop entries older than the TTL, and set the key's TTL, so a breaker that is
no longer recorded leaves no history behind once the TTL has passed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from ...errors import StorageError
from ...labels import breaker_label, shown_label
from .client import CLIENT_ERRORS
from .damage import classify, failure, finite, text

if TYPE_CHECKING:
    from .store import RedisStore

__all__ = ["HISTORY_SUFFIX", "RedisHistory"]

logger = logging.getLogger("celery_breaker")

#: After the breaker's hash tag; the breaker and parking keys use s f r b l q m c d.
HISTORY_SUFFIX = ":h"


class RedisHistory:
    """The metrics history of every breaker in one Redis store (this process's view)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def key(self, name: str, key: str | None) -> str:
        """The history key of a breaker: its hash tag (so one Cluster slot holds both) and ``:h``."""
        return self.store.keys_for(name, key)[0][: -len(":s")] + HISTORY_SUFFIX

    def append(self, name: str, key: str | None, snapshot: str, *, ttl: float, now: float | None = None) -> float:
        """Store ``snapshot`` (a JSON object) in the breaker's history; return its time.

        ``now`` (epoch seconds) is used only by a store on the ``time=client`` test seam;
        otherwise the time is Redis's, like every other time the store keeps.
        """
        history_key = self.key(name, key)
        now_arg = repr(now) if now is not None and self.store.client_time else ""
        doing = f"recording metrics of {name!r}"
        reply = self.store.eval("history", [history_key], [now_arg, snapshot, repr(ttl)], doing=doing)
        try:
            at, _, foreign = reply
            when = finite(float(at))
        except (TypeError, ValueError) as exc:
            raise StorageError(f"redis store {self.store.label}: {doing}: history answered {reply!r}") from exc
        if foreign:
            logger.warning("breaker %s: %s held a %s, not a history; replaced it",
                           shown_label(breaker_label(name, key)), history_key, text(foreign))  # fmt: skip
        return when

    def read(self, name: str, key: str | None, *, since: float | None = None, until: float | None = None) -> list[str]:
        """The breaker's stored snapshots with ``since <= at <= until``, oldest first."""
        history_key = self.key(name, key)
        low = "-inf" if since is None else repr(since)
        high = "+inf" if until is None else repr(until)
        client = self.store.client()
        try:
            try:
                entries = client.zrangebyscore(history_key, low, high)
            except ResponseError as exc:
                if classify(exc) != "types":
                    raise
                # A foreign value: no history, left for the next append to replace (its
                # warning says so again then).
                logger.warning(
                    "breaker %s: %s held a %s, not a history; none read (the next record replaces it)",
                    shown_label(breaker_label(name, key)), history_key, text(client.type(history_key)),
                )  # fmt: skip
                return []
        except CLIENT_ERRORS as exc:
            raise StorageError(failure(self.store.label, f"reading metrics of {name!r}", exc)) from exc
        return [text(entry) for entry in entries]  # (each a JSON object, read by monitoring.history)
