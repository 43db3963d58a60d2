"""Breaker states and the one table of legal transitions between them."""

from __future__ import annotations

import enum

__all__ = ["TRANSITIONS", "IllegalTransition", "State", "check_transition"]


class State(str, enum.Enum):
    """Where a breaker is. ``str`` so it serialises as its value everywhere."""

    CLOSED = "closed"
    """Calls pass; outcomes are counted against the policy."""
    OPEN = "open"
    """Calls are rejected until the open duration has passed."""
    HALF_OPEN = "half_open"
    """A bounded number of probes may pass; their outcomes decide the next state."""
    FORCED_OPEN = "forced_open"
    """Set by an operator: every call is rejected until an operator says otherwise."""
    DISABLED = "disabled"
    """Set by an operator: every call passes and nothing trips the breaker."""

    def __str__(self) -> str:
        return self.value


_OPERATOR_TARGETS = (State.CLOSED, State.FORCED_OPEN, State.DISABLED)

#: Every legal move, with the reason it happens. Anything else is a bug.
TRANSITIONS: dict[tuple[State, State], str] = {
    # Operators may move any state to CLOSED, FORCED_OPEN or DISABLED
    # (CLOSED -> CLOSED is a reset) ...
    **{(source, target): "operator" for source in State for target in _OPERATOR_TARGETS},
    # ... and the policy makes these moves (HALF_OPEN -> CLOSED is both).
    (State.CLOSED, State.OPEN): "trip",
    (State.OPEN, State.HALF_OPEN): "open duration over",
    (State.HALF_OPEN, State.OPEN): "probe failed",
    (State.HALF_OPEN, State.CLOSED): "probes succeeded",
}


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in celery-breaker, never user error."""


def check_transition(source: State, target: State) -> str:
    """Return why ``source -> target`` happens, or raise ``IllegalTransition``."""
    try:
        return TRANSITIONS[(source, target)]
    except KeyError:
        raise IllegalTransition(f"no transition from {source} to {target}") from None
