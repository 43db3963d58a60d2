"""Frozen records a breaker hands out: its transitions and its metrics snapshot."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..labels import breaker_label
from .state import State

__all__ = ["BreakerSnapshot", "Probe", "Transition"]


class Probe(NamedTuple):
    """The ticket of a call admitted as a HALF_OPEN probe: a lease in one generation.

    ``check``: the lease was spent on the breaker's health check, not a real call (the
    transition a check causes says so). ``incarnation``: the breaker that issued the
    lease, where a store keeps breakers that outlive a process's cell (Redis: a breaker
    deleted or expired and made afresh restarts its generations and leases, so both
    numbers alone cannot tell its probes from the old one's); ``""`` where the cell
    itself tells them (memory: an old ticket lands on the evicted cell)."""

    generation: int
    lease: int
    check: bool = False
    incarnation: str = ""


@dataclass(frozen=True, slots=True)
class Transition:
    """One move of one breaker, as its listeners and logs see it."""

    name: str
    key: str | None
    source: State
    target: State
    reason: str
    generation: int
    at: float
    """Epoch seconds (wall clock) when it happened."""
    open_until: float | None
    """Epoch seconds when an OPEN breaker may half-open; ``None`` otherwise."""
    failures: int
    """Failures in the window when it happened."""
    calls: int
    """Calls in the window when it happened (0 when the policy keeps no rate window)."""
    trips: int

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``: the breaker as people read it."""
        return breaker_label(self.name, self.key)


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's state and metrics at one moment: the seed's ``getMetrics()`` and more.

    Times are epoch seconds (``None`` when it never happened); counters are lifetime
    totals since the breaker was created or last reset.
    """

    name: str
    key: str | None
    state: State
    generation: int
    failures: int
    successes: int
    rejections: int
    deferrals: int
    trips: int
    last_failure: float | None
    last_success: float | None
    opened_at: float | None
    open_until: float | None
    retry_after: float | None
    """Seconds until the breaker may admit a probe (0 when it admits calls now)."""
    window_calls: int
    window_failures: int
    window_slow_calls: int
    probes_in_flight: int
    streak: int = 0
    """Consecutive trips (a failed probe adds one; closing resets it to 0)."""
    open_duration: float | None = None
    """Seconds the current (or, while HALF_OPEN, the latest) open period lasts; ``None`` when not tripped."""

    @property
    def failure_rate(self) -> float | None:
        """Failures / calls in the window, or ``None`` before any call was counted."""
        if not self.window_calls:
            return None
        return self.window_failures / self.window_calls

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``: the breaker as people read it."""
        return breaker_label(self.name, self.key)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the state as its string value, plus ``failure_rate``."""
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        data["failure_rate"] = self.failure_rate
        return data
