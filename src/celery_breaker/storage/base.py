"""The contract every breaker store keeps: intention-level atomic operations, never raw get/set."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Protocol

from ..clock import Clock
from ..core import BreakerPolicy, BreakerSnapshot, Outcome, State, Ticket, Transition

__all__ = ["Cell", "StorageError", "Store"]


class StorageError(Exception):
    """The store could not be reached or answered nonsense; the breaker falls back."""


class Cell(Protocol):
    """One breaker inside a store. Each method is one atomic step across every process
    that shares the store."""

    state: State
    policy: BreakerPolicy
    """The policy the breaker was created with (``reset`` replaces it)."""
    generation: int
    """Increments on every transition; tickets carry it so stale outcomes are fenced."""
    open_until: float | None
    """While OPEN: when (on the caller's monotonic clock) a probe may be admitted."""
    passing: bool
    """True while calls pass without asking the store: CLOSED or DISABLED, not evicted.
    Callers may then admit with ``generation`` as the ticket and skip ``acquire``."""
    last_used: float
    """When the cell was last used, on the caller's clock (rejections refresh it)."""
    rejection_tally: itertools.count[int]
    """Calls rejected from the local view: callers count them with one ``next()``."""
    evicted: bool
    """Set when the store dropped this cell; its holder must ask the store again."""
    events: deque[Transition]
    """Transitions this process caused, waiting to be logged and announced."""

    def acquire(self, policy: BreakerPolicy, now: float) -> Ticket:
        """Admit a call or raise ``CircuitOpenError``; may half-open an OPEN breaker."""
        ...

    def finish(
        self,
        ticket: Ticket,
        outcome: Outcome,
        duration: float,
        policy: BreakerPolicy,
        now: float,
        *,
        open_for: float | None = None,
    ) -> None:
        """Record a call's outcome and apply any transition it causes. ``open_for`` (a
        failure's Retry-After, seconds) opens a CLOSED or HALF_OPEN breaker at once for
        that long, capped by the policy's ``max_reset_timeout``."""
        ...

    def record_success(self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float) -> None:
        """``finish`` for a success: the hot path, kept separate so stores can make it cheap."""
        ...

    def force(self, target: State, policy: BreakerPolicy, now: float) -> None:
        """Operator move to CLOSED, FORCED_OPEN or DISABLED."""
        ...

    def reset(self, policy: BreakerPolicy, now: float) -> None:
        """Forget everything: a fresh CLOSED breaker."""
        ...

    def note_deferral(self) -> None:
        """Count one task deferred because this breaker rejected it."""
        ...

    def snapshot(self, now: float) -> BreakerSnapshot:
        """The breaker as of ``now`` (the caller's monotonic clock): state, window totals and counters."""
        ...


class Store(Protocol):
    """Where breakers live. The same (name, key) on the same store is the same breaker."""

    url: str

    def cell(self, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> Cell:
        """The cell of breaker ``name``/``key``, created CLOSED on first use."""
        ...

    def snapshots(self, clock: Clock) -> list[BreakerSnapshot]:
        """Every breaker the store currently holds."""
        ...

    def sync(self, timeout: float = 5.0) -> bool:
        """Return once this process's views reflect every transition made (anywhere)
        before the call; False if that could not be established within ``timeout``."""
        ...
