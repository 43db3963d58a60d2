"""Wiring into Celery: ``install(app)``, the worker bootstep that validates settings, and ``breaker_routes``."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from . import events
from .errors import ConfigurationError
from .parking import Releaser, parking_of
from .registry import registry_for
from .settings import get_settings, reload_settings
from .storage import describe_url, flush_stores, resolve_store
from .task import BreakerTask, prepare_task_class
from .task_options import task_breaker_config

__all__ = ["BreakerStep", "apply_routes", "check_app", "install"]

logger = logging.getLogger("celery_breaker")

_INSTALLED = "_celery_breaker_installed"


def install(app: Any) -> None:
    """Wire celery-breaker into ``app`` (idempotent).

    Subclassing ``BreakerTask`` calls this for you; call it yourself when tasks are
    put under breakers by ``breaker_routes`` alone. It adds a worker bootstep that
    validates every ``breaker_*`` setting and task option at worker start (a bad one
    stops the worker with a ConfigurationError) and applies ``breaker_routes``.
    """
    if getattr(app, _INSTALLED, False):
        return
    setattr(app, _INSTALLED, True)
    from . import control  # noqa: F401  (registers the inspect/control commands)

    registry_for(app).add_listener(events.TransitionEvents(app))
    app.steps["worker"].add(BreakerStep)
    app.steps["worker"].add(ReleaserStep)
    app.steps["worker"].add(MetricsStep)
    # Routes also apply outside workers (eager mode, direct calls), once tasks exist:
    # now for an app already finalized, and when finalizing ends (BreakerTask.bind
    # runs in the middle of it, before every task is registered).
    app.on_after_finalize.connect(_apply_routes_quietly, weak=False)
    if app.finalized:
        _apply_routes_quietly(app)


class BreakerStep(bootsteps.Step):  # type: ignore[misc]
    """Validates celery-breaker's configuration when a worker starts, before any task runs."""

    name = "celery_breaker.signals.BreakerStep"
    label = "celery-breaker"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        app = worker.app
        settings = reload_settings(app)  # the worker's final config, not an import-time read
        resolve_store(settings.storage_url)  # a store URL with bad options fails here, not on a task
        routed = apply_routes(app)
        breakers = check_app(app)
        # Events: breaker_send_events when set, else the worker's own -E (which Celery
        # does not write back into worker_send_task_events).
        explicit = app.conf.get("breaker_send_events", None)
        events.configure(
            enabled=bool(explicit) if explicit is not None else bool(getattr(worker, "task_events", False)),
            nodename=getattr(worker, "hostname", None),
        )
        logger.info(
            "celery-breaker: breakers stored in %s%s; %d breaker(s) on %d task(s)%s",
            describe_url(settings.storage_url),
            "" if app.conf.get("breaker_storage_url") else " (the default: the broker's Redis, else memory://)",
            len(breakers), sum(len(v) for v in breakers.values()),
            f" ({len(routed)} by breaker_routes)" if routed else "",
        )  # fmt: skip
        super().__init__(worker, **kwargs)


class ReleaserStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the worker's releaser of parked tasks (``celery_breaker.parking``), started
    once the pool exists, so a prefork parent forks its children without the thread."""

    name = "celery_breaker.signals.ReleaserStep"
    label = "celery-breaker releaser"
    requires = ("celery.worker.components:Pool",)

    def create(self, worker: Any) -> Releaser | None:
        settings = get_settings(worker.app)
        if settings.park is False:
            return None
        store = resolve_store(settings.storage_url)
        if parking_of(store) is None:
            return None
        logger.info(
            "celery-breaker: parking deferred tasks in %s; releasing up to %g per second per breaker",
            describe_url(settings.storage_url), settings.release_rate,
        )  # fmt: skip
        return Releaser(worker.app, store, rate=settings.release_rate, ramp=settings.release_ramp)


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Serves the breakers' Prometheus metrics from the worker's main process when
    ``breaker_metrics_port`` is set (on ``breaker_metrics_address``, loopback by default).
    Started after the pool forks, so no child holds the listening socket."""

    name = "celery_breaker.signals.MetricsStep"
    label = "celery-breaker metrics"
    requires = ("celery.worker.components:Pool",)

    def create(self, worker: Any) -> Any:
        if get_settings(worker.app).metrics_port is None:
            return None
        try:
            from .prometheus import start_metrics_server
        except ImportError as exc:
            raise ConfigurationError(
                f"breaker_metrics_port is set but prometheus-client is missing ({exc}): "
                "pip install 'celery-breaker[prometheus]', or unset breaker_metrics_port"
            ) from None
        return _MetricsService(worker.app, start_metrics_server)


class _MetricsService:
    """The StartStopStep's object: the endpoint starts and stops with the worker."""

    def __init__(self, app: Any, start: Any) -> None:
        self.app, self._start = app, start
        self.server: Any = None

    def start(self) -> None:
        self.server = self._start(self.app)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def apply_routes(app: Any) -> list[str]:
    """Put plain tasks matching ``breaker_routes`` under their breakers; return their names."""
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
        prepare_task_class(guarded)
        task.__class__ = guarded  # same instance, same registration: only its behaviour changes
        routed.append(name)
    return routed


def _apply_routes_quietly(sender: Any = None, **_: Any) -> None:
    # At finalize time a bad setting is only logged: the worker's bootstep raises it.
    try:
        apply_routes(sender)
    except ConfigurationError as exc:
        logger.error("celery-breaker: breaker_routes not applied: %s", exc)


def check_app(app: Any) -> dict[str, list[str]]:
    """Resolve every BreakerTask's options; raise ConfigurationError on any bad one, or
    when tasks sharing a breaker disagree on its policy. Returns breaker -> task names."""
    by_breaker: dict[str, list[str]] = {}
    policies: dict[str, Any] = {}
    for name, task in list(app.tasks.items()):
        if not isinstance(task, BreakerTask):
            continue
        prepare_task_class(type(task))
        config = task_breaker_config(task)
        seen = policies.setdefault(config.name, (name, config.policy))
        if seen[1] != config.policy:
            raise ConfigurationError(
                f"tasks {seen[0]!r} and {name!r} share breaker {config.name!r} but give it different "
                f"policies; set the policy once in breaker_policies[{config.name!r}] instead of per task"
            )
        by_breaker.setdefault(config.name, []).append(name)
    return by_breaker


@worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Sent before the worker builds its bootsteps: installing here covers apps that
    # use breaker_routes without ever binding a BreakerTask.
    app = getattr(sender, "app", None)
    if app is not None:
        install(app)


@worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_process_init(sender: Any = None, **_: Any) -> None:
    # A prefork child: the sender is the worker's node name.
    if isinstance(sender, str):
        events.configure(nodename=sender)


@worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_process_shutdown(**_: Any) -> None:
    # A prefork child leaves through os._exit (no atexit): send what it counted first.
    flush_stores()
