"""Parked tasks: deferred messages kept in Redis, per breaker, until the breaker lets them run.

A deferred task held by a worker as a countdown (ETA) message costs ~8.8 KB of worker
RAM and is redelivered if held past the broker's ``visibility_timeout``; a parked one is
a hash field and a sorted-set member next to its breaker's keys (same hash tag), held by
nobody. Entries keep the order of their first deferral; each is claimed under a lease
before it is published again, and deleted only once published, so a releaser that dies
midway loses nothing (the entry is released again: a duplicate, never a loss).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.commands.core import Script

from ..base import StorageError
from .client import CLIENT_ERRORS

if TYPE_CHECKING:
    from .store import RedisStore

__all__ = ["PARKING_SUFFIXES", "Parking"]

#: queue (zset), messages (hash), claims (zset), deadlines (zset), pacing (hash)
PARKING_SUFFIXES = (":q", ":m", ":c", ":d", ":p")


def _source(name: str) -> str:
    return resources.files("celery_breaker.storage").joinpath("lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


_PARK = _source("park")
_RELEASE = _source("release")
_PURGE = _source("purge")
#: Entries one purge script call discards: bounded, so Redis is never blocked for long.
PURGE_CHUNK = 1000


class Parking:
    """The parked tasks of every breaker in one Redis store (this process's view)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.index = f"{store.key_prefix}:parked"
        """A set of the hash tags of breakers that may hold parked entries."""
        self._client: Any = None
        self._scripts: dict[str, Script] = {}

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        client = self.store.client()
        if client is not self._client:  # (a new client after a fork)
            self._scripts = {name: Script(client, source) for name, source in
                             (("park", _PARK), ("release", _RELEASE), ("purge", _PURGE))}  # fmt: skip
            self._client = client
        return self._scripts[script](keys, args, client=client)

    def tag(self, name: str, key: str | None) -> str:
        """The hash-tagged key stem of a breaker, ``{prefix:name[:key]}``, that its parking keys share."""
        return self.store.keys_for(name, key)[0][: -len(":s")]

    def park(self, name: str, key: str | None, entry: str, order: float, payload: str, deadline: float | None) -> int:
        """Keep ``payload`` (a task message) until released; return how many are parked."""
        tag = self.tag(name, key)
        try:
            count = self._run(
                "park", [tag + ":q", tag + ":m", tag + ":d"], [entry, repr(order), payload, _opt(deadline)]
            )
            self.store.client().sadd(self.index, tag)  # after the entry exists: see forget()
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: parking {entry} failed: {exc}") from exc
        return int(count)

    def release(
        self, tag: str, *, most: int, pace: float, ramp: float, lease: float, now: float | None = None
    ) -> list[tuple[str, str]]:
        """Claim what the breaker of ``tag`` lets run now (see release.lua). ``now`` is
        for stores on the ``time=client`` test seam (the breaker's times are the caller's)."""
        keys = [tag + ":s", *(tag + suffix for suffix in PARKING_SUFFIXES)]
        now_arg = _opt(now) if self.store.client_time else ""
        try:
            reply = self._run("release", keys, [most, repr(pace), repr(ramp), repr(lease), now_arg])
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: releasing {tag} failed: {exc}") from exc
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
        discarded = 0
        try:
            wanted = int(self.store.client().zcard(keys[0]))
            while discarded < wanted:
                removed = int(self._run("purge", keys, [min(PURGE_CHUNK, wanted - discarded)]))
                if not removed:
                    break
                discarded += removed
        except CLIENT_ERRORS as exc:
            raise StorageError(f"redis store {self.store.label}: purging {tag} failed: {exc}") from exc
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
