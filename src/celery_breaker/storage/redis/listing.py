"""Listing every breaker of a Redis store (``RedisStore.snapshots``): one SCAN, then the
snapshot script over what it found, pipelined; or reading one (``RedisStore.find``) alike.

One bad breaker never fails the listing, and a listing writes nothing (decision 107). A
breaker whose stored state holds what no script writes is listed as unreadable
(``Listing.unreadable``: what is wrong, and the state its hash names if any), its keys left
as they are for an operator to see, with one WARNING naming it: the next call through it
(a worker's) or an operator's move repairs it, as before. A snapshot script that fails
with a WRONGTYPE is run again on its own, checking its key types (still writing nothing);
one that fails on its data otherwise is unreadable as it stands. Keys that belong to no
breaker of this store (another app's under a colliding prefix, an earlier release's) are
left out with one WARNING naming them. Only a store that cannot be read at all (no
connection, a failing server) raises ``StorageError``. On a Cluster each primary is
listed on its own: with some down (``cluster-require-full-coverage no``), the listing
holds what the others hold and names those it could not read (``Listing.unreached``),
with one WARNING.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ...clock import Clock
from ...core import BreakerSnapshot, State
from ...errors import StorageError
from ...labels import breaker_label, shown_label
from ..contract import Listing, UnreadableBreaker
from ..masking import MaskedText, masked_in_text
from .client import CLIENT_ERRORS, is_cluster, node_of
from .damage import CHECK_TYPES, classify, error_text, failure, text
from .keys import breaker_of, glob_escape
from .replies import decode_absent, decode_reply, decode_snapshot

if TYPE_CHECKING:
    from ..contract import Selected
    from .store import RedisStore

__all__ = ["list_snapshots", "read_snapshots"]

logger = logging.getLogger("celery_breaker")

#: Seconds between two WARNINGs that a store was listed in part; when each was told, by store.
TELL_EVERY = 60.0
_TOLD: dict[str, float] = {}
#: When each unreadable breaker was last told, by store and breaker label; at most about
#: this many are remembered.
_TOLD_UNREADABLE: dict[tuple[str, str], float] = {}
_MOST_TOLD = 10_000


def list_snapshots(
    store: RedisStore, clock: Clock, suffixes: tuple[str, ...], where: Selected | None = None
) -> Listing[BreakerSnapshot]:
    """Every breaker under ``store``'s key prefix, or those ``where`` picks by name and
    key (a key naming no breaker of the store: none); ``suffixes`` are a breaker's key
    suffixes, state first."""
    pattern = "{" + glob_escape(store.quoted_prefix) + ":*}" + suffixes[0]
    state_keys, unreached = _scan(store, pattern)
    if where is not None:
        stem = len(suffixes[0])
        state_keys = [key for key in state_keys if _picked(store, key, stem, where)]
    found, unreadable = read_snapshots(store, clock, suffixes, state_keys)
    return Listing(found, unreached, _stranded(store, unreached), unreadable)


def _stranded(store: RedisStore, unreached: list[str]) -> Selected | None:
    """Whether a breaker's keys live on one of the Cluster primaries ``unreached`` (told
    from the client's slot map, without asking the Cluster)."""
    if not unreached:
        return None
    client: Any = store.client()
    down = set(unreached)

    def stranded(name: str, key: str | None) -> bool:
        node = node_of(client, store.keys_for(name, key)[0])
        return node is None or node in down  # (a slot no node serves now: as good as down)

    return stranded


def _scan(store: RedisStore, pattern: str) -> tuple[list[bytes], list[str]]:
    """The state keys matching ``pattern`` (bytes: a key that is not UTF-8 is still read,
    and left out later), and the Cluster primaries that could not be scanned."""
    client: Any = store.client()  # a Redis or a RedisCluster
    doing = "listing breakers"
    if not is_cluster(client):
        try:
            return list(dict.fromkeys(client.scan_iter(match=pattern, count=500))), []
        except CLIENT_ERRORS as exc:
            raise StorageError(failure(store.label, doing, exc)) from exc
    try:
        primaries = client.get_primaries()
    except CLIENT_ERRORS as exc:
        raise StorageError(failure(store.label, doing, exc)) from exc
    if not primaries:
        # redis-py 5.1 forgets every node it knew once none answered (a blip of the whole
        # Cluster), and finds none again: it listed an empty store for good, and the watch
        # had every breaker leave it. A listing of no primary is none; the next reading
        # connects afresh, from the URL.
        store.forget_client(client)
        raise StorageError(f"redis store {store.label}: {doing} failed: the cluster client knows no primary")
    keys: dict[bytes, None] = {}
    failed: list[tuple[str, BaseException]] = []
    for node in primaries:
        try:
            keys.update(dict.fromkeys(client.scan_iter(match=pattern, count=500, target_nodes=node)))
        except CLIENT_ERRORS as exc:
            failed.append((node.name, exc))
    if failed and len(failed) == len(primaries):
        raise StorageError(failure(store.label, doing, failed[0][1])) from failed[0][1]
    if not failed:
        _TOLD.pop(store.label, None)  # (the next partial listing is told at once)
        return list(keys), []
    # (once a minute, at DEBUG between: a watch or a page lists every few seconds)
    now = time.monotonic()
    told = now - _TOLD.get(store.label, -TELL_EVERY) >= TELL_EVERY
    if told:
        _TOLD[store.label] = now
    level = logging.WARNING if told else logging.DEBUG
    if logger.isEnabledFor(level):  # (masked only for a line emitted; a str, which PrintableLog sees)
        logger.log(
            level,
            "redis store %s: listed the breakers of %d of %d cluster primaries; left out those stored on %s",
            store.label, len(primaries) - len(failed), len(primaries),
            masked_in_text(", ".join(f"{name} ({exc})" for name, exc in failed)),
        )  # fmt: skip
    return list(keys), [name for name, _ in failed]


def _picked(store: RedisStore, state_key: bytes, stem: int, where: Selected) -> bool:
    found = breaker_of(text(state_key)[:-stem], store.quoted_prefix)
    return found is not None and where(*found)


def read_snapshots(
    store: RedisStore, clock: Clock, suffixes: tuple[str, ...], state_keys: list[bytes]
) -> tuple[list[BreakerSnapshot], list[UnreadableBreaker]]:
    """The breakers whose state keys are ``state_keys``, as the listing reads them, and
    those it found unreadable: one that is absent, or left out, is in neither."""
    now = clock.monotonic()
    offset = clock.time() - now if store.client_time else 0.0
    head = [repr(now) if store.client_time else "", store.ttl_ms]
    tail = ["", "", "", ""]  # no policy, name, key or channel: a listing creates no breaker
    stem = len(suffixes[0])
    calls = [([key[:-stem] + suffix.encode() for suffix in suffixes], [*head, "0", *tail]) for key in state_keys]
    found: list[BreakerSnapshot] = []
    unreadable: list[UnreadableBreaker] = []
    for state_key, (keys, _), outcome in zip(state_keys, calls, store.run_many("snapshot", calls), strict=True):
        label = _label(store, state_key, stem)
        ident = breaker_of(text(state_key)[:-stem], store.quoted_prefix)
        raw = outcome
        if isinstance(raw, StorageError) and classify(raw.__cause__) == "types":
            try:  # (the types checked: a listing's check reports, and writes nothing)
                raw = store.run("snapshot", keys, [*head, f"0;0;0;0;0;{CHECK_TYPES}", *tail])
            except StorageError as exc:
                if classify(exc.__cause__) == "store":
                    raise
                raw = exc
        if isinstance(raw, StorageError):
            if classify(raw.__cause__) != "data" or ident is None:
                _left_out(store, label, raw)
                continue
            # (a failure no check foresaw: a call resets the breaker, a listing shows it)
            cause = raw.__cause__
            said = masked_in_text(error_text(cause or raw))
            shown = _unreadable(store, *ident, f"a script failed on its data: {said}", "")
            unreadable.append(shown)
            continue
        snapshot = _read(store, label, ident, state_key, raw, offset)
        if isinstance(snapshot, UnreadableBreaker):
            unreadable.append(snapshot)
        elif snapshot is not None:
            found.append(snapshot)
    return found, unreadable


def _read(
    store: RedisStore, label: str, ident: tuple[str, str | None] | None, state_key: bytes, raw: list[Any], offset: float
) -> BreakerSnapshot | UnreadableBreaker | None:
    """The snapshot a script answered, the breaker it found unreadable, or None (logged)
    for a breaker to leave out."""
    try:
        absent = decode_absent(raw)
        if absent is not None and absent.unreadable and ident is not None:
            return _unreadable(store, *ident, absent.unreadable, absent.stored)
        if absent is not None:
            if absent.warnings:
                logger.warning("breaker %s: reset unreadable state in Redis (%s)", shown_label(label), absent.warnings)
            if absent.foreign:
                logger.warning(
                    "redis store %s: left %s out of the listing: not a breaker of this store's (%s)",
                    store.label, text(state_key), absent.foreign,
                )  # fmt: skip
            return None  # (else: expired since the scan saw it)
        reply = decode_reply(raw)
        if reply is None:
            return None
        if reply.warnings:
            logger.warning("breaker %s: reset unreadable state in Redis (%s)", shown_label(label), reply.warnings)
        snapshot = decode_snapshot(reply, offset)
    except (ValueError, LookupError, TypeError) as exc:
        _left_out(store, label, StorageError(f"snapshot answered {raw!r}: {exc}"))
        return None
    if store.keys_for(snapshot.name, snapshot.key)[0].encode() != state_key:  # (never, unless Lua and Python disagree)
        _left_out(store, label, StorageError(f"its state names {breaker_label(snapshot.name, snapshot.key)}"))
        return None
    return snapshot


def _unreadable(store: RedisStore, name: str, key: str | None, problem: str, stored: str) -> UnreadableBreaker:
    """The breaker as the listing shows it unreadable, told at WARNING once a minute per
    store and breaker (DEBUG between: a page or a scrape lists every few seconds, and the
    breaker stays unreadable until something repairs it)."""
    state = next((state for state in State if state.value == stored), None)
    held = f"; it holds {state.value}" if state is not None else ""
    label = breaker_label(name, key)
    now = time.monotonic()
    told = now - _TOLD_UNREADABLE.get((store.label, label), -TELL_EVERY) >= TELL_EVERY
    if told:
        if len(_TOLD_UNREADABLE) >= _MOST_TOLD:  # (forget those told over a minute ago)
            for old in [seen for seen, at in _TOLD_UNREADABLE.items() if now - at >= TELL_EVERY]:
                del _TOLD_UNREADABLE[old]
        _TOLD_UNREADABLE[store.label, label] = now
    logger.log(
        logging.WARNING if told else logging.DEBUG,
        "breaker %s: unreadable state in Redis (%s%s); a listing leaves it as it is: the next call through it, or "
        "an operator's move, repairs it", shown_label(label), problem, held, extra={"breaker_label": label},
    )  # fmt: skip
    return UnreadableBreaker(name, key, problem, state)


def _label(store: RedisStore, state_key: bytes, stem: int) -> str:
    tag = text(state_key)[:-stem]
    found = breaker_of(tag, store.quoted_prefix)
    return tag if found is None else breaker_label(*found)


def _left_out(store: RedisStore, label: str, exc: StorageError) -> None:
    logger.warning(
        "redis store %s: left breaker %s out of the listing: %s", store.label, shown_label(label), MaskedText(exc),
        extra={"breaker_label": label},
    )  # fmt: skip
