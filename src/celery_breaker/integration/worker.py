"""The worker's steps: check the configuration before any task runs, and release parked tasks.

Named in ``plugin.WORKER_STEPS``; Celery imports this module when it builds a worker (in
its main process, before a prefork pool forks), which also connects the pool processes'
signal handlers below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from billiard import common as billiard_common
from celery import bootsteps
from celery.apps.worker import Worker as CliWorker
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.signals import task_received, worker_process_init, worker_process_shutdown, worker_shutdown

from ..errors import ConfigurationError
from ..health import abandon_pending_checks, await_pending_checks
from ..storage import describe_url, flush_stores, is_shared_url, resolve_store
from ..storage.masking import MaskedText
from . import events
from .broker import REDIS, broker_kind, broker_url
from .deferral.backlog import WorkerBacklog
from .deferral.broker_delay import forget_delay_deaths, note_delivery_queue, show_queue_delivery
from .deferral.countdown import note_received
from .deferral.parking import ParkInStore
from .deferral.plan import WORKER_SOFT_TIME_LIMIT_ATTR, WORKER_TIME_LIMIT_ATTR
from .deferral.release import Releaser
from .deferral.selection import deferral_strategies
from .deferral.strategy import note_content_type
from .inventory import check_app, near_misses
from .registry import registry_for
from .routes import apply_routes
from .settings import get_settings, reload_settings
from .task_limits import SOFT_TIME_LIMITS_ENFORCED_ATTR, TIME_LIMITS_ENFORCED_ATTR

__all__ = ["EXIT_CONFIG", "BreakerStep", "ReleaserStep", "unseen_breakers"]

logger = logging.getLogger("celery_breaker")

_EVENTS_LISTENING = "_celery_breaker_events_listening"


#: sysexits' EX_CONFIG: what ``celery worker`` exits with when celery-breaker's settings cannot work.
EXIT_CONFIG = 78


class BreakerStep(bootsteps.Step):  # type: ignore[misc]
    """Validates celery-breaker's configuration when a worker starts, before any task runs;
    applies ``breaker_routes``; turns on breaker events as configured.

    A ``celery worker`` whose settings or task options cannot work stops here: one block
    lists every problem (each naming the setting, the bad value and the fix), without a
    traceback unless the log level is DEBUG, and the worker exits with ``EXIT_CONFIG``. A
    worker started in-process (``start_worker``, tests) gets the ``ConfigurationError``.
    """

    label = "celery-breaker"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        try:
            self._check(worker)
        except ConfigurationError as exc:
            if not isinstance(worker, CliWorker):
                raise
            debug = getattr(worker, "loglevel", logging.INFO) <= logging.DEBUG
            logger.critical(
                "celery-breaker: the worker cannot start (ConfigurationError):\n%s\n%s", exc,
                "" if debug else "(start it with -l debug to see where each problem was found)",
                exc_info=debug,
            )  # fmt: skip
            raise SystemExit(EXIT_CONFIG) from None
        super().__init__(worker, **kwargs)

    def _check(self, worker: Any) -> None:
        app = worker.app
        # The worker's own time limits (--time-limit, --soft-time-limit, which Celery keeps on the worker,
        # not in app.conf), for tasks that run a health check at their admission.
        setattr(app, WORKER_TIME_LIMIT_ATTR, getattr(worker, "time_limit", None))
        setattr(app, WORKER_SOFT_TIME_LIMIT_ATTR, getattr(worker, "soft_time_limit", None))
        setattr(app, TIME_LIMITS_ENFORCED_ATTR, _pool_enforces_time_limits(worker))
        setattr(app, SOFT_TIME_LIMITS_ENFORCED_ATTR, _pool_enforces_time_limits(worker, soft=True))
        settings = reload_settings(app)  # the worker's final config, not an import-time read
        resolve_store(settings.storage_url)  # a store URL with bad options fails here, not on a task
        routed = apply_routes(app)
        breakers = check_app(app)
        for slip in near_misses(app, breakers):
            logger.warning("celery-breaker: %s", slip)
        # Events: breaker_send_events when set, else the worker's own -E (which Celery
        # does not write back into worker_send_task_events).
        explicit = app.conf.get("breaker_send_events", None)
        events.configure(
            enabled=bool(explicit) if explicit is not None else bool(getattr(worker, "task_events", False)),
            nodename=getattr(worker, "hostname", None),
            follows_remote=explicit is None,  # (then `celery control enable_events`, as Flower sends, too)
        )
        if not getattr(app, _EVENTS_LISTENING, False):
            setattr(app, _EVENTS_LISTENING, True)
            registry_for(app).add_listener(events.TransitionEvents(app))
        logger.info(
            "celery-breaker: breakers stored in %s%s; %d breaker(s) on %d task(s)%s",
            describe_url(settings.storage_url),
            "" if app.conf.get("breaker_storage_url") else " (the default: the broker's Redis, else memory://)",
            len(breakers), sum(len(v) for v in breakers.values()),
            f" ({len(routed)} by breaker_routes)" if routed else "",
        )  # fmt: skip
        strategies = deferral_strategies(app)
        logger.info(
            "celery-breaker: deferring tasks by %s (broker %s)",
            " then ".join(strategy.name for strategy in strategies), broker_kind(app.conf),
        )  # fmt: skip
        concurrency = getattr(worker, "concurrency", None)
        apart = unseen_breakers(worker, "a breaker")
        if apart is not None and isinstance(concurrency, int) and concurrency > 1 and breakers:
            # (the default on any broker but Redis: each child trips on its own)
            logger.warning(
                "celery-breaker: breakers stored in %s are each pool process's own: with %d processes, a "
                "breaker lets up to %d times its failures reach the downstream before all of them trip, and each "
                "process probes on its own. Set breaker_storage_url to a redis:// URL to share them, or run the "
                "worker with -P threads or gevent",
                describe_url(settings.storage_url), concurrency, concurrency,
            )  # fmt: skip
        recycled = _recycled_by(worker)
        if apart is not None and recycled and breakers:
            # (`-c 1 --max-tasks-per-child 1` said nothing above, and its breakers never tripped)
            logger.warning(
                "celery-breaker: breakers stored in %s are each pool process's own, and this worker replaces its "
                "pool processes (%s): each new process forgets its breakers, an open one included, and with fewer "
                "tasks per process than a policy's failure_threshold a breaker never trips. Set breaker_storage_url "
                "to a redis:// URL to keep them, or run the worker with -P threads or gevent",
                describe_url(settings.storage_url), recycled,
            )  # fmt: skip
        if any(isinstance(strategy, ParkInStore) for strategy in strategies) and broker_kind(app.conf) != REDIS:
            logger.warning(
                "celery-breaker: parked tasks live in the breaker store %s, while queued tasks live in the broker "
                "%s: a store restarted without its data loses every parked task, which the broker would have kept. "
                "Unset breaker_park (deferred tasks then wait in the broker itself), or keep that Redis persistent",
                describe_url(settings.storage_url), describe_url(broker_url(app.conf)),
            )  # fmt: skip


def _recycled_by(worker: Any) -> str:
    """What makes the worker replace its pool processes (``--max-tasks-per-child``,
    ``worker_max_memory_per_child``), as the settings and their values; empty for none."""
    found = []
    for option in ("max_tasks_per_child", "max_memory_per_child"):
        value = getattr(worker, option, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append(f"worker_{option}={value}")
    return ", ".join(found)


def _pool_enforces_time_limits(worker: Any, *, soft: bool = False) -> bool:
    """Whether the worker's pool stops a task at its (``soft``) time limit: prefork (and
    its async pool) and gevent do at the hard one, only prefork at the soft one (gevent's
    ``on_apply`` drops it); eventlet (its ``on_apply`` takes no timeout), threads and
    solo at neither."""
    pool = getattr(worker, "pool_cls", None)
    where = f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', '')}" if pool is not None else ""
    kinds = ("prefork", "asynpool") if soft else ("prefork", "asynpool", "gevent")
    return any(kind in where for kind in kinds)


def unseen_breakers(worker: Any, what: str) -> str | None:
    """Why ``what``, run in the worker's main process (remote control, the metrics
    endpoint), cannot see the breakers the worker's tasks use, or ``None`` when it can.

    It cannot under a store of one process (``memory://``) with a prefork pool: each
    child runs its tasks on breakers of its own, and the main process's are ones no task
    uses. With solo, threads, gevent or eventlet the tasks run in the main process.
    """
    url = get_settings(worker.app).storage_url
    pool = getattr(worker, "pool_cls", None)
    if is_shared_url(url) or not (isinstance(pool, type) and issubclass(pool, PreforkPool)):
        return None
    return (
        f"breaker_storage_url is {describe_url(url)!r}: a memory store holds only the breakers of the process "
        f"that uses it, and this worker's prefork pool runs its tasks in child processes, each on breakers of "
        f"its own, so {what} would reach only the main process's, which no task uses; set "
        "breaker_storage_url to a redis:// URL to share them (a Redis broker's server is the default), or run the "
        "worker with -P solo, threads or gevent (its tasks then run in the main process)"
    )


class ReleaserStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the worker's releaser of parked tasks (``deferral.release``), started once
    the pool exists, so a prefork parent forks its children without the thread."""

    label = "celery-breaker releaser"
    requires = ("celery.worker.components:Pool",)

    def create(self, worker: Any) -> Releaser | None:
        # Run even under breaker_park=False: tasks parked by workers that did park (before a
        # change of settings, or beside this one) are released by no one else.
        settings = get_settings(worker.app)
        parking = resolve_store(settings.storage_url).parking
        if parking is None:
            return None
        law = settings.release_law()
        if law is None:
            pace = f"at {settings.release_rate:g} per second per breaker (fixed)"
        else:
            ceiling = "no ceiling" if law.ceiling is None else f"at most {law.ceiling:g} per second"
            pace = f"at an adaptive pace from {law.start:g} per second per breaker ({ceiling})"
        if any(isinstance(strategy, ParkInStore) for strategy in deferral_strategies(worker.app)):
            logger.info(
                "celery-breaker: parking deferred tasks in %s; releasing them %s",
                describe_url(settings.storage_url), pace,
            )  # fmt: skip
        else:  # (breaker_park=False, or "auto" on RabbitMQ: tasks wait in the broker; other workers may park)
            logger.info(
                "celery-breaker: releasing any tasks parked in %s %s (this worker defers in the broker)",
                describe_url(settings.storage_url), pace,
            )  # fmt: skip
        return Releaser(
            worker.app, parking, rate=settings.release_rate, ramp=settings.release_ramp, law=law,
            backlog=_backlog_of(worker),
        )  # fmt: skip


def _backlog_of(worker: Any) -> Callable[[], int | None] | None:
    """How many tasks the worker's pool will take, asked by its releaser once a pass (the
    adaptive release publishes no more: ``WorkerBacklog``); ``None`` where Celery's worker
    state cannot be read (the release goes as before: a worker never fails to start on it)."""
    prefetch = getattr(worker, "prefetch_multiplier", None)
    if not isinstance(prefetch, int):
        prefetch = worker.app.conf.get("worker_prefetch_multiplier")
    try:
        return WorkerBacklog(_pool_slots(worker), prefetch=prefetch if isinstance(prefetch, int) else 4).room
    except Exception as exc:
        logger.warning(
            "celery-breaker: cannot read this worker's own task counts (%s); the adaptive release is not bounded "
            "by what its pool takes",
            MaskedText(exc),
        )
        return None


def _pool_slots(worker: Any) -> int:
    """The worker's pool slots: its concurrency (an autoscaler's most), else one; one for
    the solo pool, which runs one task at a time whatever its ``concurrency`` (the CPU
    count by default, which Celery still multiplies into its prefetch)."""
    pool = getattr(worker, "pool_cls", None)
    if isinstance(pool, type) and issubclass(pool, SoloPool):
        return 1
    slots = getattr(worker, "max_concurrency", None) if getattr(worker, "autoscale", None) else None
    if not (isinstance(slots, int) and slots > 0):
        slots = getattr(worker, "concurrency", None)
    return slots if isinstance(slots, int) and slots > 0 else 1


# Each received task's queue, noted where the consumer is (RabbitMQ's broker-delay needs it),
# and the content type its message came in (a deferral publishes it again in that).
task_received.connect(note_delivery_queue, weak=False)
task_received.connect(show_queue_delivery, weak=False)  # (after it: a run back from broker-delay shows its queue)
task_received.connect(note_content_type, weak=False)
task_received.connect(note_received, weak=False)  # (when: a countdown held too long is sent again before its run)
task_received.connect(forget_delay_deaths, weak=False)  # (the run sees the headers its caller sent)


@worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_process_init(sender: Any = None, **_: Any) -> None:
    # A prefork child: the sender is the worker's node name.
    if isinstance(sender, str):
        events.configure(nodename=sender)


@worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_shutdown(**_: Any) -> None:
    # Solo, threads, gevent, eventlet: the tasks ran in this process; the slots of the health
    # checks they stopped waiting for are freed now, not when their leases run out.
    abandon_pending_checks()


@worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_process_shutdown(**_: Any) -> None:
    # A prefork child leaves through os._exit (no atexit): send what it counted first, and
    # settle the health checks its runs stopped waiting for. One leaving in order (recycled
    # by --max-tasks-per-child or worker_max_memory_per_child, a warm shutdown) waits for
    # their verdicts, each at most until its time is up; one terminated by a signal (a cold
    # shutdown, its hard time limit) frees their probe slots at once.
    try:
        if not _terminated():
            await_pending_checks()
    finally:  # (also when a cold shutdown's signal ends the wait)
        abandon_pending_checks()
        flush_stores()


def _terminated() -> bool:
    """Whether this pool process is leaving because billiard's terminating signal handler
    ran in it (a cold shutdown, a hard time limit, a terminating revoke); ``True`` where
    billiard cannot say (the checks are abandoned at once, as they always were)."""
    fired = getattr(billiard_common, "terminate_handler_fired", None)
    return True if fired is None else bool(fired())
