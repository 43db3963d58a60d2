"""The clock seam: every decision reads time through a ``Clock``, so tests never sleep."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Two readings of time: one for intervals, one for people."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; used for every decision."""
        ...

    def time(self) -> float:
        """Seconds since the Unix epoch; used only for timestamps shown to people."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``time.time``."""

    __slots__ = ()

    # Bound straight to the C functions: no Python frame on the hot path.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
