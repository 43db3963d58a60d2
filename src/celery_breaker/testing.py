"""Helpers for testing code that uses celery-breaker: a fake clock and fresh stores."""

from __future__ import annotations

import threading
from typing import Any

from .clock import Clock
from .integration.registry import registry_for
from .storage import MemoryStore
from .storage.memory import DEFAULT_IDLE_TTL, DEFAULT_MAX_BREAKERS

__all__ = ["FakeClock", "fresh_store", "use_clock"]


class FakeClock:
    """A clock that moves only when told to: ``advance(seconds)`` or ``set(t)``.

    ``monotonic()`` starts at ``start``; ``time()`` is the same reading shifted to
    ``epoch`` so timestamps in snapshots look like real epoch seconds.
    """

    __slots__ = ("_now", "_epoch", "_lock")

    def __init__(self, start: float = 1000.0, *, epoch: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._epoch = float(epoch) - float(start)
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._epoch

    def advance(self, seconds: float) -> float:
        """Move forward ``seconds`` (never backwards) and return the new reading."""
        if seconds < 0:
            raise ValueError(f"FakeClock.advance: a clock never goes backwards, got {seconds!r}")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        """Jump to ``now`` (not earlier than the current reading)."""
        if now < self._now:
            raise ValueError(f"FakeClock.set: {now!r} is earlier than the current reading {self._now!r}")
        self._now = float(now)

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"


def fresh_store(*, max_breakers: int = DEFAULT_MAX_BREAKERS, idle_ttl: float = DEFAULT_IDLE_TTL) -> MemoryStore:
    """A private in-memory store, so a test's breakers share nothing with other tests."""
    return MemoryStore("memory://test", max_breakers=max_breakers, idle_ttl=idle_ttl)


def use_clock(app: Any, clock: Clock) -> None:
    """Make every task breaker of ``app`` read ``clock`` from now on."""
    registry_for(app).use_clock(clock)
