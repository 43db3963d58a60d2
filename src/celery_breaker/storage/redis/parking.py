"""Parked tasks: deferred messages kept in Redis, per breaker, until the breaker lets them run.

A deferred task held by a worker as a countdown (ETA) message costs ~8.8 KB of worker
RAM and is redelivered if held past the broker's ``visibility_timeout``; a parked one is
a hash field and a sorted-set member next to its breaker's keys (same hash tag), held by
nobody. Entries keep the order of their first deferral; each is claimed under a lease
before it is published again, and deleted only once published, so a releaser that dies
midway loses nothing (the entry is released again: a duplicate, never a loss).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ...errors import StorageError
from ...labels import breaker_label
from .client import CLIENT_ERRORS

if TYPE_CHECKING:
    from .store import RedisStore

__all__ = ["PARKING_SUFFIXES", "PURGE_CHUNK", "RedisParking"]

#: queue (zset), messages (hash), claims (zset), deadlines (zset), pacing (hash)
PARKING_SUFFIXES = (":q", ":m", ":c", ":d", ":p")

#: Entries one purge script call discards: bounded, so Redis is never blocked for long.
PURGE_CHUNK = 1000


class RedisParking:
    """The parked tasks of every breaker in one Redis store (this process's view)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.index = f"{store.key_prefix}:parked"
        """A set of the hash tags of breakers that may hold parked entries."""
        self.marker = f"{store.key_prefix}:parking"
        """A hash whose ``epoch`` names this parking's life: written with the first entry
        parked, gone when the store loses its data (restarted empty, flushed)."""
        self._epoch = uuid.uuid4().hex

    def label(self, tag: str) -> str:
        """The breaker a tag belongs to, as people write it (``crm[tenant-7]``)."""
        inner = tag.strip("{}")
        prefix = self.store.key_prefix + ":"
        if not inner.startswith(prefix):
            return tag
        name, sep, key = inner[len(prefix) :].partition(":")
        return breaker_label(unquote(name), unquote(key) if sep else None)

    def tag(self, name: str, key: str | None) -> str:
        """The hash-tagged key stem of a breaker, ``{prefix:name[:key]}``, that its parking keys share."""
        return self.store.keys_for(name, key)[0][: -len(":s")]

    def park(self, name: str, key: str | None, entry: str, order: float, payload: str, deadline: float | None) -> int:
        """Keep ``payload`` (a task message) until released; return how many are parked."""
        tag = self.tag(name, key)
        doing = f"parking {entry}"
        count = self.store.eval(
            "park", [tag + ":q", tag + ":m", tag + ":d"], [entry, repr(order), payload, _opt(deadline)], doing=doing
        )
        try:
            pipe = self.store.client().pipeline(transaction=False)
            pipe.sadd(self.index, tag)  # after the entry exists: see forget()
            pipe.hsetnx(self.marker, "epoch", self._epoch)
            pipe.execute()
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: {doing} failed: {exc}") from exc
        return int(count)

    def epoch(self) -> str | None:
        """The current life of this parking (``None``: nothing was parked since the store
        started empty). A releaser that saw one epoch with entries parked and then sees
        another, or none, knows the store lost them."""
        try:
            found = self.store.client().hget(self.marker, "epoch")
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: reading the parking's epoch failed: {exc}") from exc
        return None if found is None else _text(found)

    def counts(self, tags: list[str]) -> dict[str, tuple[int, int]]:
        """``count`` for many breakers, in one round trip (a Cluster splits it per node)."""
        if not tags:
            return {}
        try:
            pipe = self.store.client().pipeline(transaction=False)
            for tag in tags:
                pipe.zcard(tag + ":q")
                pipe.zcard(tag + ":c")
            found = pipe.execute()
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: counting parked entries failed: {exc}") from exc
        return {tag: (int(found[2 * i]), int(found[2 * i + 1])) for i, tag in enumerate(tags)}

    def release(
        self, tag: str, *, most: int, pace: float, ramp: float, lease: float, now: float | None = None
    ) -> list[tuple[str, str]]:
        """Claim what the breaker of ``tag`` lets run now (see release.lua). ``now`` is
        for stores on the ``time=client`` test seam (the breaker's times are the caller's)."""
        keys = [tag + ":s", *(tag + suffix for suffix in PARKING_SUFFIXES)]
        now_arg = _opt(now) if self.store.client_time else ""
        args = [most, repr(pace), repr(ramp), repr(lease), now_arg]
        reply = self.store.eval("release", keys, args, doing=f"releasing {tag}")
        pairs = []
        for i in range(0, len(reply) - 1, 2):
            entry, payload = reply[i], reply[i + 1]
            pairs.append((_text(entry), _text(payload)))
        return pairs

    def done(self, tag: str, entries: list[str]) -> None:
        """Forget entries that were published again."""
        if not entries:
            return
        try:
            pipe = self.store.client().pipeline(transaction=False)
            pipe.zrem(tag + ":c", *entries)
            pipe.hdel(tag + ":m", *entries)
            pipe.execute()
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: forgetting released entries failed: {exc}") from exc

    def purge(self, tag: str) -> int:
        """Discard as many entries of breaker ``tag`` as were parked when the call began,
        oldest first, in chunks of ``PURGE_CHUNK``; return how many. Claimed entries
        (being published) are kept."""
        keys = [tag + ":q", tag + ":m", tag + ":d"]
        doing = f"purging {tag}"
        try:
            wanted = int(self.store.client().zcard(keys[0]))
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: {doing} failed: {exc}") from exc
        discarded = 0
        while discarded < wanted:
            removed = int(self.store.eval("purge", keys, [min(PURGE_CHUNK, wanted - discarded)], doing=doing))
            if not removed:
                break
            discarded += removed
        return discarded

    def tags(self) -> list[str]:
        """Hash tags of breakers that may hold parked entries."""
        try:
            return sorted(_text(tag) for tag in self.store.client().smembers(self.index))
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: listing parked breakers failed: {exc}") from exc

    def count(self, tag: str) -> tuple[int, int]:
        """(parked, claimed and not yet published) entries of one breaker."""
        try:
            client = self.store.client()
            return int(client.zcard(tag + ":q")), int(client.zcard(tag + ":c"))
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: counting parked entries failed: {exc}") from exc

    def forget(self, tag: str) -> None:
        """Drop ``tag`` from the index if it holds nothing (re-adding it if an entry arrived meanwhile)."""
        client = self.store.client()
        try:
            if client.exists(tag + ":q", tag + ":c"):
                return
            client.srem(self.index, tag)
            if client.exists(tag + ":q", tag + ":c"):  # parked between the check and the SREM
                client.sadd(self.index, tag)
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: updating the parked index failed: {exc}") from exc


def _opt(value: float | None) -> str:
    return "" if value is None else repr(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
