"""``install(app)``: wire celery-breaker into an app ahead of any worker, ``breaker_routes`` included."""

from __future__ import annotations

from typing import Any

from .plugin import add_worker_steps, apply_routes_when_finalized, route_plain_tasks

__all__ = ["install"]


def install(app: Any) -> None:
    """Wire celery-breaker into ``app`` ahead of time (idempotent).

    Workers do this for themselves, and ``breaker_routes`` apply when an app finalizes;
    call it for an app that finalized before ``celery_breaker`` was imported. It adds the
    worker steps (they validate every ``breaker_*`` setting and task option at worker
    start) and applies ``breaker_routes`` to the app's tasks (a bad one is logged here;
    the worker refuses to start on it).
    """
    add_worker_steps(app)
    if app.finalized:
        route_plain_tasks(app)
    else:
        apply_routes_when_finalized(app)
