"""Following every transition an app's breakers make in this process, per-key breakers included."""

from __future__ import annotations

from typing import Any

from ..breaker import TransitionListener
from ..integration.registry import registry_for

__all__ = ["add_transition_listener"]


def add_transition_listener(app: Any, listener: TransitionListener) -> None:
    """Call ``listener(transition)`` after every transition that a task of ``app`` causes
    in this process (a ``celery_breaker.core.Transition``: breaker, key, source, target,
    reason, times, counts). A listener that raises is logged and changes nothing.

    Transitions made elsewhere (other processes, operators) reach Celery events and the
    log, not this listener: follow them with ``celery -A proj events`` or ``celery breaker watch``.
    """
    registry_for(app).add_listener(listener)
