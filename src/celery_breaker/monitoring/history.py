"""Breakers' stored history: ``record_metrics`` stores ``collect_metrics``'s rows in the
shared store with a TTL (from a periodic task: ``install_metrics_task``), and
``metrics_history`` reads one breaker's back, to chart it.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timedelta
from typing import Any

from celery import Task

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ConfigurationError
from ..integration import values
from ..integration.settings import SETTINGS, get_settings
from ..labels import breaker_label, shown_label
from ..storage import History, Store, describe_url
from .status import collect_metrics, is_app, store_of

__all__ = [
    "DEFAULT_METRICS_TTL",
    "METRICS_TASK_NAME",
    "install_metrics_task",
    "metrics_history",
    "record_metrics",
]

logger = logging.getLogger("celery_breaker")

#: Seconds a stored snapshot is kept when neither ``ttl`` nor ``breaker_metrics_ttl`` says.
DEFAULT_METRICS_TTL: float = SETTINGS["breaker_metrics_ttl"]
#: The name of the periodic task ``install_metrics_task`` registers.
METRICS_TASK_NAME = "celery_breaker.record_metrics"
#: Version of the stored JSON (``"v"``), bumped if a field changes meaning.
_HISTORY_FORMAT = 1
_METRICS_TASK = "_celery_breaker_metrics_task"


def _history_of(store: Store) -> History:
    """The history of ``store``; a ConfigurationError for a store that keeps none (only
    this process sees it)."""
    history = store.history
    if history is None:
        raise ConfigurationError(
            f"metrics history needs a shared store, and {describe_url(store.url)!r} keeps breakers in "
            f"this process only; set breaker_storage_url (or pass a store URL) to a Redis URL such as "
            f"'redis://localhost:6379/0'"
        )
    return history


def record_metrics(source: Any, *, ttl: float | timedelta | None = None, clock: Clock | None = None) -> int:
    """Store a snapshot of every breaker ``source`` holds (``collect_metrics``) in its
    history; return how many breakers were recorded.

    Each breaker's history is a Redis sorted set next to its keys (same hash tag, so
    Redis Cluster keeps both on one slot), holding ``BreakerStatus.as_dict()`` plus
    ``"at"`` (epoch seconds, Redis's clock) and ``"v"`` (the format). Entries older than
    ``ttl`` seconds are dropped on each record, and the set expires ``ttl`` after the
    last one. ``ttl`` defaults to the app's ``breaker_metrics_ttl`` (a URL or store:
    ``DEFAULT_METRICS_TTL``, one day).

    ``source`` is a Celery app, a store URL or a store, which must be shared (Redis): a
    ``memory://`` store raises ``ConfigurationError``. Raises ``StorageError`` when the
    store cannot be read or written.
    """
    if ttl is not None:
        seconds = values.duration("record_metrics: ttl", ttl)
    else:
        seconds = get_settings(source).metrics_ttl if is_app(source) else DEFAULT_METRICS_TTL
    store = store_of(source)
    history = _history_of(store)
    clock = clock or SYSTEM_CLOCK
    rows = collect_metrics(store, clock=clock)
    for row in rows:
        snapshot = json.dumps({"v": _HISTORY_FORMAT, **row.as_dict()}, separators=(",", ":"))
        history.append(row.snapshot.name, row.snapshot.key, snapshot, ttl=seconds, now=clock.time())
    return len(rows)


def metrics_history(
    source: Any,
    name: str,
    key: str | None = None,
    *,
    since: float | datetime | None = None,
    until: float | datetime | None = None,
) -> list[dict[str, Any]]:
    """The snapshots ``record_metrics`` stored for breaker ``name`` (and ``key``), oldest
    first, each a dict: ``at`` (epoch seconds), ``v``, and the fields of
    ``BreakerStatus.as_dict()``. ``since``/``until`` (epoch seconds, or aware ``datetime``s;
    inclusive) narrow it.

    Entries that are not readable JSON objects are skipped with a warning. An unknown
    breaker has no history: ``[]``. ``source`` as for ``record_metrics``.
    """
    since, until = _moment("since", since), _moment("until", until)
    history = _history_of(store_of(source))
    records = []
    unreadable = 0
    for entry in history.read(name, key, since=since, until=until):
        try:
            record = json.loads(entry)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("at"), (int, float)):
            records.append(record)
        else:
            unreadable += 1
    if unreadable:
        label = shown_label(breaker_label(name, key))
        logger.warning("celery-breaker: skipped %d unreadable entries in the metrics history of %s", unreadable, label)
    return records


def install_metrics_task(app: Any, *, interval: float | timedelta | None = None) -> Any:
    """Register the task ``celery_breaker.record_metrics`` on ``app`` (idempotent) and return it.

    The task calls ``record_metrics(app)``. Schedule it with Celery beat, either here,
    ``interval`` seconds apart (each run expires after one interval, so runs do not pile
    up while no worker consumes them), or in ``beat_schedule`` yourself. The task is a
    plain ``celery.Task`` (never a ``BreakerTask``, whatever ``task_cls`` says): it must
    record while breakers are open.
    """
    task = getattr(app, _METRICS_TASK, None)
    if task is None:

        def record_breaker_metrics() -> int:
            """Store a snapshot of every breaker (``celery_breaker.monitoring.record_metrics``)."""
            return record_metrics(app)

        task = app.task(name=METRICS_TASK_NAME, base=Task, ignore_result=True, shared=False)(record_breaker_metrics)
        setattr(app, _METRICS_TASK, task)
    if interval is not None:
        seconds = values.duration("install_metrics_task: interval", interval)
        app.add_periodic_task(seconds, task.s(), name=METRICS_TASK_NAME, expires=seconds)
    return task


def _moment(argument: str, value: Any) -> float | None:
    """``since``/``until`` as epoch seconds: a finite number, an aware ``datetime``, or ``None``."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(
                f"metrics_history: {argument}={value!r} has no time zone; give an aware datetime "
                f"(datetime.now(timezone.utc)) or epoch seconds (time.time())"
            )
        return value.timestamp()
    try:
        found = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        found = math.inf
    if not math.isfinite(found):
        raise ValueError(
            f"metrics_history: {argument} must be epoch seconds (a number, as time.time() gives) or an aware "
            f"datetime, got {value!r:.100}"
        )
    return found
