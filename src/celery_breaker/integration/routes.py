"""``breaker_routes``: put plain tasks (not subclassing ``BreakerTask``) under a breaker by settings alone."""

from __future__ import annotations

from typing import Any

from .settings import get_settings
from .task import BreakerTask

__all__ = ["apply_routes"]


def apply_routes(app: Any) -> list[str]:
    """Put plain tasks matching ``breaker_routes`` under their breakers; return their names.

    Each matching task keeps its instance and registration: only its class changes, to a
    subclass of its own class and ``BreakerTask`` carrying the route's breaker name.
    """
    settings = get_settings(app)
    if not settings.routes:
        return []
    routed = []
    for name, task in list(app.tasks.items()):
        if name.startswith(("celery.", "celery_breaker.")) or isinstance(task, BreakerTask):
            continue
        breaker = settings.route_for(name)
        if breaker is None:
            continue
        cls = type(task)
        guarded = type(
            cls.__name__,
            (cls, BreakerTask),
            {"breaker": breaker or None, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
        task.__class__ = guarded  # same instance, same registration: only its behaviour changes
        routed.append(name)
    return routed
