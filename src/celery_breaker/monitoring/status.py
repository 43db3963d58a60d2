"""What every breaker in a store is doing now: the rows behind ``celery inspect breakers``,
the ``celery breaker`` CLI and the Prometheus collector.

``collect_metrics`` is the seed's ``collectCircuitMetrics``: one call, every breaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..core import BreakerSnapshot
from ..integration.settings import get_settings
from ..storage import Store, resolve_store

__all__ = ["BreakerStatus", "app_store", "collect_metrics", "is_app", "store_of"]


@dataclass(frozen=True)
class BreakerStatus:
    """One breaker's snapshot, with the tasks parked behind it (Redis stores)."""

    snapshot: BreakerSnapshot
    parked: int = 0
    """Deferred tasks waiting in the breaker's parking."""
    claimed: int = 0
    """Parked tasks a releaser has claimed and is publishing again."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the snapshot's fields (``BreakerSnapshot.as_dict``), ``parked`` and ``claimed``."""
        return {**self.snapshot.as_dict(), "parked": self.parked, "claimed": self.claimed}


def app_store(app: Any) -> Store:
    """The store an app's breakers use (``breaker_storage_url``, validated)."""
    return resolve_store(get_settings(app).storage_url)


def is_app(source: Any) -> bool:
    """Whether ``source`` is a Celery app (not a store URL or a store object)."""
    return not (isinstance(source, str) or hasattr(source, "snapshots"))


def store_of(source: Any) -> Store:
    """The store ``source`` names: a Celery app (its ``breaker_storage_url``), a store URL or a store."""
    return app_store(source) if is_app(source) else resolve_store(source)


def collect_metrics(source: Any, *, clock: Clock | None = None) -> list[BreakerStatus]:
    """Every breaker ``source`` holds, sorted by name and key.

    ``source`` is a Celery app (its ``breaker_storage_url``), a store URL or a store. A
    ``memory://`` store holds only this process's breakers; a Redis store holds every
    process's. Raises ``StorageError`` when the store cannot be read.
    """
    store = store_of(source)
    snapshots = store.snapshots(clock or SYSTEM_CLOCK)
    parking = store.parking
    counts: dict[str, tuple[int, int]] = {}
    if parking is not None:
        for tag in parking.tags():
            counts[tag] = parking.count(tag)
    rows = []
    for snapshot in snapshots:
        parked, claimed = counts.get(parking.tag(snapshot.name, snapshot.key), (0, 0)) if parking else (0, 0)
        rows.append(BreakerStatus(snapshot, parked, claimed))
    return sorted(rows, key=lambda row: (row.snapshot.name, row.snapshot.key or ""))
