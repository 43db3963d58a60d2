"""Releasing parked tasks (``parking.py``) in order, at a pace, when their breakers let them run.

Each worker runs one ``Releaser`` thread (in its main process, after the pool has forked) that asks
the store, every ``TICK`` seconds and for every breaker with parked tasks, which may run
now (see ``storage/lua/release.lua``): the probes when the breaker may half-open, then,
once it has closed, the rest at a ramp (``breaker_release_rate`` tasks per second
cluster-wide, reached after ``breaker_release_ramp`` seconds), oldest first. Released
tasks are published again exactly as they were; one that meets an open breaker again
is parked again, keeping its place.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ...errors import StorageError
from ...storage import Parking
from .parking import decode_message

__all__ = ["LEASE", "MOST_PER_TICK", "TICK", "Releaser"]

logger = logging.getLogger("celery_breaker")

#: Seconds between two looks at the parked tasks.
TICK = 0.2
#: Seconds a claimed entry may take to be published before it is released again.
LEASE = 30.0
#: Most entries one breaker releases per tick (the pace decides, this only bounds a tick).
MOST_PER_TICK = 500


class Releaser(threading.Thread):
    """Publishes parked tasks again when their breakers let them run (one per worker)."""

    def __init__(self, app: Any, parking: Parking, *, rate: float, ramp: float, tick: float = TICK) -> None:
        super().__init__(name="celery-breaker releaser", daemon=True)
        self.app = app
        self.parking = parking
        self.rate = rate
        self.ramp = ramp
        self.tick = tick
        self.released = 0
        self._stop_event = threading.Event()
        self._failing_since: float | None = None

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the releaser to stop and wait up to ``timeout`` seconds for it."""
        self._stop_event.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)

    terminate = stop  # (the worker's bootstep calls either)

    def run(self) -> None:
        while not self._stop_event.wait(self.tick):
            try:
                self.release_once()
                if self._failing_since is not None:
                    logger.info("celery-breaker releaser: the store answers again")
                    self._failing_since = None
            except StorageError as exc:
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                    logger.warning("celery-breaker releaser: %s; parked tasks wait until it answers", exc)
            except Exception:  # the thread must outlive anything it meets
                logger.exception("celery-breaker releaser: unexpected error; trying again")

    def release_once(self) -> int:
        """One pass over every breaker with parked tasks; return how many were published."""
        published = 0
        most = max(1, min(MOST_PER_TICK, int(self.rate * self.tick * 4) + 1))
        for tag in self.parking.tags():
            if self._stop_event.is_set():
                break
            claimed = self.parking.release(tag, most=most, pace=self.rate, ramp=self.ramp, lease=LEASE)
            done = []
            for entry, payload in claimed:
                if self._publish(tag, entry, payload):
                    done.append(entry)
            self.parking.done(tag, done)
            published += len(done)
            if not claimed:
                self.parking.forget(tag)
        self.released += published
        return published

    def _publish(self, tag: str, entry: str, payload: str) -> bool:
        try:
            signature = decode_message(payload)
        except ValueError as exc:
            # Never publishable: dropping it is the only way forward; say so loudly.
            logger.error("celery-breaker releaser: dropped parked entry %s of %s: %s", entry, tag, exc)
            return True
        try:
            self.app.signature(signature).apply_async()
        except Exception as exc:
            # Left claimed: the lease runs out and it is released again.
            logger.warning("celery-breaker releaser: could not publish %s (%r); it stays parked", entry, exc)
            return False
        return True
