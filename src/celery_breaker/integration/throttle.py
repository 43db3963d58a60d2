"""A WARNING at most once a minute per subject: a broker or store problem that every
deferral (or every tick) meets is logged once, not thousands of times in an outage."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["EVERY", "Throttle"]

#: Seconds between two WARNINGs about one subject.
EVERY = 60.0


class Throttle:
    """Remembers when each subject was last told about and how often it was kept quiet since."""

    def __init__(self, every: float = EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._told: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def due(self, subject: str) -> int | None:
        """``None`` if a WARNING about ``subject`` was made less than ``every`` seconds ago
        (this one is counted as kept quiet); else how many were kept quiet since the last,
        and this one is noted as made."""
        now = self._clock()
        last = self._told.get(subject)
        if last is not None and now - last < self.every:
            self._quiet[subject] = self._quiet.get(subject, 0) + 1
            return None
        self._told[subject] = now
        return self._quiet.pop(subject, 0)

    def forget(self, subject: str) -> None:
        """The problem is over: the next one about ``subject`` is told at once."""
        self._told.pop(subject, None)
        self._quiet.pop(subject, None)
