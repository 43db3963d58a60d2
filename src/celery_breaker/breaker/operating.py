"""Observing and operating a breaker: its state, snapshot and listeners, and an operator's moves."""

from __future__ import annotations

from ..core import BreakerSnapshot, State
from ..storage import describe_url, forced_why
from .steps import GuardSteps, TransitionListener

__all__ = ["Operating"]


class Operating(GuardSteps):
    """What a breaker says of itself (``state``, ``snapshot``, ``repr``), who hears of its
    transitions, and the moves an operator makes (``force_open``, ``disable``, ``close``, ``reset``)."""

    __slots__ = ()

    @property
    def state(self) -> State:
        """The stored state (an OPEN breaker whose time is up half-opens on its next call)."""
        cell = self._cell if not self._cell.evicted else self._refresh()
        return cell.state

    def snapshot(self) -> BreakerSnapshot:
        """State and metrics now: failures, successes, last failure/success, trips, ..."""
        cell = self._cell if not self._cell.evicted else self._refresh()
        return cell.snapshot(self._now())

    @property
    def listeners(self) -> tuple[TransitionListener, ...]:
        """What ``add_listener`` added, in order."""
        return tuple(self._listeners)

    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener(transition)`` after every transition this breaker object causes."""
        self._listeners.append(listener)

    def remove_listener(self, listener: TransitionListener) -> None:
        """Stop calling ``listener``; ``ValueError`` if it was never added."""
        self._listeners.remove(listener)

    def force_open(self) -> None:
        """Reject every call until an operator closes, resets or disables the breaker."""
        self._operate(State.FORCED_OPEN)

    def disable(self) -> None:
        """Admit every call and never trip, until an operator closes or resets it."""
        self._operate(State.DISABLED)

    force_closed = disable

    def close(self) -> None:
        """Move to CLOSED now (windows cleared, lifetime counters kept)."""
        self._operate(State.CLOSED)

    def reset(self) -> None:
        """Forget everything: a fresh CLOSED breaker with zeroed counters."""
        cell = self._cell if not self._cell.evicted else self._refresh()
        self._announce(cell.reset(self.policy, self._now()))

    def note_deferral(self) -> None:
        """Count a task deferred because this breaker rejected it."""
        cell = self._cell if not self._cell.evicted else self._refresh()
        cell.note_deferral()

    def _operate(self, target: State) -> None:
        # A memory store's sweep may drop the cell between the check and the move, which
        # would then land on a forgotten copy: an operator's move is made again on the
        # new cell. (A sweep never drops a cell once it holds an operator's state.)
        while True:
            cell = self._cell if not self._cell.evicted else self._refresh()
            moves = cell.force(target, self.policy, self._now())
            if not cell.evicted:
                break
        self._announce(moves)

    def __repr__(self) -> str:
        shown = self.state.value
        if forced_why(self._cell):
            shown += " (store unreachable: breaker_on_storage_error='deny')"
        return f"<CircuitBreaker {self.label!r} {shown} on {describe_url(self.store.url)}>"
