"""How celery-breaker gets into a worker: its worker steps, named here and nowhere else.

A worker builds its blueprint from ``app.steps["worker"]`` right after it sends
``worker_init``. The hook below (connected when ``celery_breaker`` is imported: the
``celery breaker`` entry point imports it into every ``celery`` command, and an app that
uses ``BreakerTask`` imports it itself) adds the steps by name, and the worker loads
them: ``worker.BreakerStep`` (settings, routes, tasks checked before any task runs;
events), ``worker.ReleaserStep`` (parked tasks), the remote-control commands
(``ops.control``) and the metrics endpoint (``monitoring.endpoint``), and two consumer
steps (``deferral.topology``: broker-delay's bindings, on every connection;
``deferral.handover``: a held countdown due while the pool is busy is handed back). Everything
the plugin does in a worker starts in one of those steps.

Outside workers, ``breaker_routes`` apply when an app finalizes (so eager and direct
calls of a routed task are guarded too): the second hook below, Celery's
``connect_on_app_finalize`` (what ``@shared_task`` uses), reaches every app. ``install(app)``
(``install.py``) does both for one app ahead of time. Importing it also has Celery mask
the store URL's password where it shows the settings (``censor_store_urls``). This module
stays light: every ``celery`` command imports it, so the routes load only for an app
that sets some.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from celery._state import connect_on_app_finalize
from celery.app import utils as celery_app_utils
from celery.signals import worker_init

from ..errors import ConfigurationError

__all__ = [
    "CONSUMER_STEPS", "WORKER_STEPS", "add_worker_steps", "apply_routes_when_finalized", "censor_store_urls",
    "route_plain_tasks",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")

#: The worker bootsteps, by name: Celery imports each when it builds the worker.
WORKER_STEPS = (
    "celery_breaker.integration.worker:BreakerStep",
    "celery_breaker.integration.worker:ReleaserStep",
    "celery_breaker.ops.control:ControlStep",
    "celery_breaker.monitoring.endpoint:MetricsStep",
)
#: The consumer bootsteps, by name (started again on every connection restart).
CONSUMER_STEPS = (
    "celery_breaker.integration.deferral.topology:DelayTopologyStep",
    "celery_breaker.integration.deferral.handover:HandOverStep",
)


def add_worker_steps(app: Any) -> None:
    """Add celery-breaker's steps to the workers ``app`` will start (idempotent)."""
    app.steps["worker"].update(WORKER_STEPS)
    app.steps["consumer"].update(CONSUMER_STEPS)


@worker_init.connect(weak=False, dispatch_uid="celery_breaker.worker_init")  # type: ignore[untyped-decorator]
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Sent before the worker builds its blueprint from app.steps["worker"].
    app = getattr(sender, "app", None)
    if app is not None:
        add_worker_steps(app)


def apply_routes_when_finalized(app: Any) -> None:
    """Apply ``breaker_routes`` to ``app`` once its tasks exist (when finalizing ends)."""
    app.on_after_finalize.connect(route_plain_tasks, weak=False)


def route_plain_tasks(sender: Any = None, **_: Any) -> None:
    """Apply ``breaker_routes`` to app ``sender``'s tasks now; a bad setting is logged
    (the worker's step raises it)."""
    if not sender.conf.get("breaker_routes"):
        return  # (most apps: nothing to load)
    routes = importlib.import_module(".routes", __package__)  # import cost: see the module docstring
    try:
        routes.apply_routes(sender)
    except ConfigurationError as exc:
        logger.error("celery-breaker: breaker_routes not applied: %s", exc)


connect_on_app_finalize(apply_routes_when_finalized)


def censor_store_urls() -> None:
    """Have Celery mask the password of ``breaker_storage_url`` wherever it shows the
    settings censored (``celery inspect conf``, ``celery report``): Celery masks only
    settings named like a secret (``...PASS...``, ``...KEY...``) and its own broker and
    backend URLs, and showed the store URL whole. Idempotent; a Celery without the hook
    is left alone."""
    original = getattr(celery_app_utils, "filter_hidden_settings", None)
    if original is None or getattr(original, "_celery_breaker", False):
        return

    def filter_hidden_settings(conf: Any) -> Any:
        censored = original(conf)
        for key, value in censored.items():
            if isinstance(key, str) and isinstance(value, str) and key.lower().endswith(_STORE_URL_SETTING):
                censored[key] = importlib.import_module("..storage.urls", __package__).describe_url(value)
        return censored

    filter_hidden_settings._celery_breaker = True  # type: ignore[attr-defined]
    filter_hidden_settings.__doc__ = original.__doc__
    celery_app_utils.filter_hidden_settings = filter_hidden_settings


#: The setting ``censor_store_urls`` masks (any namespace: Django's ``CELERY_BREAKER_STORAGE_URL``).
_STORE_URL_SETTING = "breaker_storage_url"

censor_store_urls()
