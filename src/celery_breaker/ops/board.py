"""The breakers as ``celery breaker web``'s page shows them: a ``Board`` reads the store every interval.

One reader thread, whatever the number of open pages; ``watch.Watch`` follows the
readings (rates, time in state, recent changes) and the board adds how fast each parked
backlog drains. For an app whose deferred tasks wait in RabbitMQ's delay queues, a
second thread counts them (``delayed.py``), so a broker that does not answer holds up
no reading of the store, nor a store that does not answer a count. ``web`` serves
``Board.view()`` as JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import StorageError
from ..labels import shown_label, visible
from ..monitoring.status import BreakerStatus
from ..storage import UnreadableBreaker
from ..storage.masking import MaskedText
from .console import (
    STATE_STYLES,
    UNREADABLE,
    clock_time,
    duration,
    failure_rate_text,
    open_until_text,
    release_text,
    repair_command,
    unreadable_text,
)
from .delayed import DelayCount, delay_view
from .selection import unreached_words
from .watch import PAUSE_PER_READ, Change, Watch, WatchRow

__all__ = ["HISTORY", "Board"]

logger = logging.getLogger("celery_breaker")

#: Recent changes the page keeps listing (``--history``).
HISTORY = 20

_Ident = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class _Backlog:
    """A breaker's parked and claimed ``tasks`` at one reading (``at``, monotonic), and the most
    seen since it was last empty (``peak``: what the release progress counts from)."""

    at: float
    tasks: int
    peak: int


def _change(change: Change) -> dict[str, Any]:
    source, target = change.source, change.target
    return {"at": clock_time(change.at), "label": shown_label(change.label), "reason": change.reason,
            "source": source.value if source else None, "target": target.value if target else None}  # fmt: skip


def _unreadable(found: UnreadableBreaker) -> dict[str, Any]:
    """An unreadable breaker as the page names it: the line ``status`` prints, and its parts."""
    return {"label": found.label, "shown": shown_label(found.label), "name": found.name, "key": found.key,
            "problem": found.problem, "repair": repair_command(found), "line": unreadable_text(found),
            "stored_state": None if found.stored_state is None else found.stored_state.value,
            "parked": found.parked, "claimed": found.claimed}  # fmt: skip


class Board:
    """What the page shows: the store read every ``interval`` seconds by one thread (less
    often when a reading takes long: ``pause``).

    One reader whatever the number of open pages, so every page sees the same rates and
    the store is read once per interval. A reading that fails keeps the last view with
    the error; the next reading tries again. ``view()`` is safe from any thread.

    ``delays``, if given, counts the app's delay queues (``DelayCounter.count``,
    which never raises), every ``interval`` seconds in ``run_delay_counts``, a thread of
    its own: the view's ``delay_queues`` (``delayed.delay_view``). ``elsewhere``, if
    given instead, is that field for good: where an app's deferred tasks wait when nothing
    counts them (``delayed.elsewhere_view``: countdown messages).
    """

    def __init__(
        self,
        read: Callable[[], Sequence[BreakerStatus]],
        *,
        store: str,
        interval: float,
        history: int = HISTORY,
        clock: Clock = SYSTEM_CLOCK,
        delays: Callable[[], DelayCount] | None = None,
        elsewhere: dict[str, Any] | None = None,
    ) -> None:
        self._read = read
        self._delays = delays
        self.interval = interval
        self._clock = clock
        self._watch = Watch(clock, history=history)
        self._backlogs: dict[_Ident, _Backlog] = {}
        self._view: dict[str, Any] = {"store": store, "interval": interval, "error": None, "read_at": None,
                                      "breakers": [], "summary": [], "unreadable": [], "changes": [],
                                      "delay_queues": elsewhere}  # fmt: skip
        self.pause = interval
        """Seconds ``run`` waits between two readings: ``interval``, or ``PAUSE_PER_READ``
        times as long as the last reading took, if longer (a store of many breakers)."""
        self._encoded: tuple[dict[str, Any], str, bytes] | None = None  # (view, its ETag, its JSON)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()

    def view(self) -> dict[str, Any]:
        """The latest view, JSON-ready (never changed once made: readers need no copy)."""
        with self._lock:
            return self._view

    def encoded(self) -> tuple[str, bytes]:
        """The latest view as JSON, and an ETag naming it: encoded once per view, however
        many pages ask (40,000 breakers are 19 MB, ~0.2 s to encode), so an unchanged
        view can be answered "304 Not Modified" without sending it again."""
        with self._lock:
            view, encoded = self._view, self._encoded
        if encoded is not None and encoded[0] is view:
            return encoded[1], encoded[2]
        body = json.dumps(view).encode()
        tag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        with self._lock:
            if self._view is view:
                self._encoded = (view, tag, body)
        return tag, body

    def refresh(self, *, raising: bool = False) -> None:
        """Read the store once. A failure is kept for the page, or raised if ``raising``
        (the first reading: the command then exits as ``watch`` does)."""
        started = self._clock.monotonic()
        try:
            observed = self._watch.observe(self._read())
        except Exception as exc:
            if raising:
                raise
            self._failed(exc)
            return
        finally:
            self.pause = max(self.interval, PAUSE_PER_READ * (self._clock.monotonic() - started))
        now = self._clock.time()
        rows = [self._row(row, now) for row in observed]
        self._backlogs = {ident: self._backlogs[ident] for ident in (self._ident(row) for row in observed)}
        counts = dict.fromkeys(STATE_STYLES, 0)
        for row in observed:
            counts[row.status.snapshot.state] += 1
        error = None
        if self._watch.unreached:  # (a Redis Cluster with a primary down: the others' breakers were read)
            words = unreached_words(self._watch.unreached, kept=True)
            error = f"part of the store unreachable at {clock_time(now)}: {words}; retrying"
        unreadable = self._watch.unreadable  # (rows of their own would show numbers none could read)
        summary = [{"state": UNREADABLE, "count": len(unreadable)}] if unreadable else []
        summary += [{"state": state.value, "count": n} for state, n in counts.items() if n]
        read = {"error": error, "read_at": clock_time(now), "breakers": rows, "summary": summary,
                "unreadable": [_unreadable(found) for found in unreadable],
                "changes": [_change(change) for change in self._watch.changes]}  # fmt: skip
        with self._lock:  # (the view of now: the delay count may have changed it since this reading began)
            self._view = {**self._view, **read}

    def count_delays(self) -> None:
        """Count the delay queues once (``delays``); a count that changes what the page
        says makes a new view (an unchanged one keeps its ETag)."""
        if self._delays is None:
            return
        try:
            shown = delay_view(self._delays())
        except Exception:  # a bug: the log has the traceback, the page its last count
            logger.exception("celery-breaker web: counting RabbitMQ's delay queues failed")
            return
        with self._lock:
            if self._view["delay_queues"] != shown:
                self._view = {**self._view, "delay_queues": shown}

    def _failed(self, exc: Exception) -> None:
        at = clock_time(self._clock.time())
        if isinstance(exc, StorageError):
            error = f"store unreachable at {at}: {MaskedText(exc)}; showing the last reading, retrying"
        else:  # a bug: the page says so, the log has the traceback, the reader goes on
            logger.exception("celery-breaker web: reading the breakers failed")
            error = f"reading the breakers failed at {at}: {type(exc).__name__}: {MaskedText(exc)}; retrying"
        with self._lock:
            self._view = {**self._view, "error": error}

    @staticmethod
    def _ident(row: WatchRow) -> _Ident:
        return row.status.snapshot.name, row.status.snapshot.key

    def _row(self, row: WatchRow, now: float) -> dict[str, Any]:
        status, snapshot, rates = row.status, row.status.snapshot, row.rates
        mono, tasks = self._clock.monotonic(), status.parked + status.claimed
        before = self._backlogs.get(self._ident(row))
        released = None
        if before is not None and mono > before.at:  # what left the parking since the last reading
            released = max(0, before.tasks - tasks) / (mono - before.at)
        peak = max(tasks, before.peak if before is not None else 0) if tasks else 0
        self._backlogs[self._ident(row)] = _Backlog(mono, tasks, peak)
        if row.since is not None:
            in_state = duration(now - row.since)
        else:  # in this state since before the first reading: at least as long as we have watched (as `watch`)
            watched = now - self._watch.started
            in_state = f">= {duration(watched)}" if watched >= 0.05 else "-"
        return {
            "label": snapshot.label, "name": snapshot.name, "key": snapshot.key, "state": snapshot.state.value,
            # (as status shows them: a key from a task's arguments may hold control characters, and a
            # name a character that prints as nothing, which would read as another name)
            "shown": shown_label(snapshot.label), "name_shown": visible(snapshot.name),
            "key_shown": None if snapshot.key is None else visible(snapshot.key),
            "in_state": in_state, "open_until": open_until_text(snapshot), "retry_after": snapshot.retry_after,
            "failure_rate": failure_rate_text(snapshot), "window_calls": snapshot.window_calls,
            "window_failures": snapshot.window_failures, "calls_per_s": rates.calls if rates else None,
            "rejections_per_s": rates.rejections if rates else None,
            "deferrals_per_s": rates.deferrals if rates else None,
            "parked": status.parked, "claimed": status.claimed, "released_per_s": released, "backlog_peak": peak,
            "release": None if status.release is None else release_text(status.release),
            "trips": snapshot.trips, "deferrals": snapshot.deferrals, "rejections": snapshot.rejections,
        }  # fmt: skip

    def run(self) -> None:
        """Read every ``pause`` seconds until ``stop()``; ``wake()`` reads at once."""
        while not self._stopped.is_set():
            self._wake.wait(self.pause)
            self._wake.clear()
            if not self._stopped.is_set():
                self.refresh()

    @property
    def counts_delays(self) -> bool:
        """Whether it counts the delay queues (``run_delay_counts`` has work to do)."""
        return self._delays is not None

    def run_delay_counts(self) -> None:
        """Count the delay queues now, then every ``interval`` seconds until ``stop()``."""
        while True:
            self.count_delays()
            if self._stopped.wait(self.interval):
                return

    def wake(self) -> None:
        """Read now (an action changed a breaker)."""
        self._wake.set()

    def stop(self) -> None:
        """End ``run()`` (at once: it is woken) and ``run_delay_counts()`` (once a count under way ends)."""
        self._stopped.set()
        self._wake.set()
