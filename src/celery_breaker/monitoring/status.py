"""What every breaker in a store is doing now: the rows behind ``celery inspect breakers``,
the ``celery breaker`` CLI and the Prometheus collector.

``collect_metrics`` is the seed's ``collectCircuitMetrics``: one call, every breaker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..core import BreakerSnapshot, State
from ..errors import StorageError
from ..integration.settings import get_settings
from ..storage import Listing, Parking, ReleasePace, Selected, Store, UnreadableBreaker, resolve_store

__all__ = ["BreakerStatus", "app_store", "collect_metrics", "is_app", "new_breaker", "store_of"]


@dataclass(frozen=True)
class BreakerStatus:
    """One breaker's snapshot, with the tasks parked behind it (Redis stores)."""

    snapshot: BreakerSnapshot
    parked: int = 0
    """Deferred tasks waiting in the breaker's parking."""
    claimed: int = 0
    """Parked tasks a releaser has claimed and is publishing again."""
    release: ReleasePace | None = None
    """The adaptive release's pace while it releases this breaker's parked tasks (the
    breaker admits calls, tasks are parked, and the pace began since it last closed);
    ``None`` otherwise, and under ``breaker_release_pace="fixed"``."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the snapshot's fields (``BreakerSnapshot.as_dict``), ``parked``,
        ``claimed``, and the release's ``release_rate``, ``release_limit``,
        ``release_held_for`` and ``release_usual_bad_share`` (each ``None`` without a
        release under way)."""
        release = self.release
        return {
            **self.snapshot.as_dict(), "parked": self.parked, "claimed": self.claimed,
            "release_rate": None if release is None else release.rate,
            "release_limit": None if release is None else release.limit,
            "release_held_for": None if release is None else release.held_for,
            "release_usual_bad_share": None if release is None else release.usual_bad_share,
        }  # fmt: skip


def app_store(app: Any) -> Store:
    """The store an app's breakers use (``breaker_storage_url``, validated)."""
    return resolve_store(get_settings(app).storage_url)


def is_app(source: Any) -> bool:
    """Whether ``source`` is a Celery app (not a store URL or a store object)."""
    return not (isinstance(source, str) or hasattr(source, "snapshots"))


def store_of(source: Any) -> Store:
    """The store ``source`` names: a Celery app (its ``breaker_storage_url``), a store URL or a store."""
    return app_store(source) if is_app(source) else resolve_store(source)


def collect_metrics(
    source: Any,
    *,
    clock: Clock | None = None,
    only: Sequence[tuple[str, str | None]] | None = None,
    where: Selected | None = None,
) -> Listing[BreakerStatus]:
    """Every breaker ``source`` holds, sorted by name and key.

    ``source`` is a Celery app (its ``breaker_storage_url``), a store URL or a store. A
    ``memory://`` store holds only this process's breakers; a Redis store holds every
    process's. ``only``: just these ``(name, key)`` breakers, each looked up alone
    (``Store.find``) instead of listing the store. ``where``: only the breakers for
    which ``where(name, key)`` is true, picked before any is read. Raises
    ``StorageError`` when the store cannot be read. A Redis Cluster with primaries down
    is listed in part: the rows of the breakers the others hold, their parked tasks
    counted, and ``unreached`` naming those down (``Listing``). Breakers the store holds
    but cannot read are in no row: ``unreadable`` names them (``Listing``), with the tasks
    parked behind them counted, and nothing is written to them.
    """
    clock = clock or SYSTEM_CLOCK
    store = store_of(source)
    wanted = None if only is None else list(dict.fromkeys(only))
    unreadable: list[UnreadableBreaker] = []
    if wanted is None:
        listing = store.snapshots(clock) if where is None else store.snapshots(clock, where)
        partial = listing if isinstance(listing, Listing) and listing.unreached else None
        snapshots = list(listing)
        if isinstance(listing, Listing):
            unreadable.extend(listing.unreadable)
    else:
        partial = None
        snapshots = []
        for wanted_ident in wanted:
            hit = store.find(*wanted_ident, clock)
            if isinstance(hit, UnreadableBreaker):
                unreadable.append(hit)
            elif hit is not None:
                snapshots.append(hit)
    parking = store.parking
    if parking is None:
        rows = [BreakerStatus(snapshot) for snapshot in snapshots]
    else:
        # (one round trip, however many; with ``where``, only the tags of breakers it picks)
        if wanted is not None:
            counted = [parking.tag(*ident) for ident in wanted]
        elif partial is not None:
            counted = _reachable_tags(parking, snapshots, partial, where)
        else:
            counted = parking.tags()
            if where is not None:
                counted = [tag for tag in counted if (ident := parking.breaker(tag)) is not None and where(*ident)]
        counts = parking.counts(counted)
        tags = [parking.tag(snapshot.name, snapshot.key) for snapshot in snapshots]
        # Tasks parked behind a breaker whose state the store no longer holds (its idle
        # TTL ran out, or an operator deleted it): they are released as a new,
        # closed breaker's would be, so the breaker is listed as one, not left out.
        listed = {*tags, *(parking.tag(found.name, found.key) for found in unreadable)}  # (held, not new)
        for tag, held in counts.items():
            found = None if tag in listed or not any(held) else parking.breaker(tag)
            if found is not None:
                snapshots.append(new_breaker(*found))
                tags.append(tag)
        releasing = [tag for tag, snapshot in zip(tags, snapshots, strict=True)
                     if snapshot.state in _RELEASING and any(counts.get(tag, (0, 0)))]  # fmt: skip
        paces = parking.release_paces(releasing, clock.monotonic())
        # (their parking is read apart from their state: a backlog behind one still waits)
        unreadable = [
            replace(found, parked=held[0], claimed=held[1])
            if any(held := counts.get(parking.tag(found.name, found.key), (0, 0)))
            else found
            for found in unreadable
        ]
        rows = []
        for tag, snapshot in zip(tags, snapshots, strict=True):
            release = paces.get(tag)
            if release is not None and release.generation != snapshot.generation:
                release = None  # (the breaker moved on between the two reads)
            rows.append(BreakerStatus(snapshot, *counts.get(tag, (0, 0)), release))
    rows.sort(key=lambda row: (row.snapshot.name, row.snapshot.key or ""))
    return Listing(rows, unreadable=unreadable) if partial is None else partial.like(rows, unreadable)


def _reachable_tags(
    parking: Parking, snapshots: list[BreakerSnapshot], partial: Listing[BreakerSnapshot], where: Selected | None
) -> list[str]:
    """The tags to count parked tasks of, in a listing that left some servers out: those of
    the breakers listed, and those the parking's index names (if its server answers) of
    breakers stored on a server that answered: a breaker with only parked tasks left is
    listed as a new one, as in a whole listing. Tags stored on a server down are not asked
    about: one of them failed the whole count."""
    counted = [parking.tag(snapshot.name, snapshot.key) for snapshot in snapshots]
    try:
        indexed = parking.tags()
    except StorageError:
        return counted  # (the index's own server is down: the listed breakers alone)
    stranded = partial.stranded
    for tag in indexed:
        ident = parking.breaker(tag)
        if ident is not None and not (stranded is not None and stranded(*ident)) and (where is None or where(*ident)):
            counted.append(tag)
    return list(dict.fromkeys(counted))


#: States in which parked tasks are released at the pace (HALF_OPEN releases probes only).
_RELEASING = (State.CLOSED, State.DISABLED)


def new_breaker(name: str, key: str | None) -> BreakerSnapshot:
    """The snapshot of a breaker the store holds no state for: closed, generation 0,
    nothing counted (what the store's scripts take it for)."""
    return BreakerSnapshot(
        name=name, key=key, state=State.CLOSED, generation=0, failures=0, successes=0, rejections=0,
        deferrals=0, trips=0, last_failure=None, last_success=None, opened_at=None, open_until=None,
        retry_after=0.0, window_calls=0, window_failures=0, window_slow_calls=0, probes_in_flight=0,
    )  # fmt: skip
