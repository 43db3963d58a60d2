"""Breakers as Prometheus metrics: a collector read on each scrape, its registration, a worker's endpoint.

Needs ``prometheus-client`` (``pip install 'celery-breaker[prometheus]'``); nothing else
in celery-breaker imports it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

try:
    from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.exposition import ThreadingWSGIServer
    from prometheus_client.registry import Collector
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a test by hiding the package
    if exc.name is None or exc.name.partition(".")[0] != "prometheus_client":
        raise
    raise ImportError(
        "celery_breaker.prometheus needs prometheus-client, which is not installed: "
        "pip install 'celery-breaker[prometheus]'"
    ) from None

from ..clock import SYSTEM_CLOCK, Clock
from ..core import State
from ..errors import ConfigurationError
from ..integration.deferral.selection import uses_delay_queues
from ..integration.settings import get_settings
from ..labels import visible
from ..storage import Listing, Store, describe_url
from ..storage.masking import MaskedText
from .delay_gauge import DelayDepthReader
from .serving import QUIET_FOR, Deadlined, Guarded
from .status import BreakerStatus, collect_metrics, is_app, store_of

__all__ = [
    "LOG_INTERVAL",
    "PREFIX",
    "BreakerCollector",
    "MetricsServer",
    "register",
    "start_metrics_server",
    "unregister",
]

logger = logging.getLogger("celery_breaker")

#: Every metric's name starts with this.
PREFIX = "celery_breaker"
#: Seconds between two log lines about a store that scrapes cannot read.
LOG_INTERVAL = 60.0
_LABELS = ("breaker", "key")

#: (name, help, value of a row): counters, exposed as ``<name>_total``.
_COUNTERS: tuple[tuple[str, str, Callable[[BreakerStatus], float]], ...] = (
    ("trips", "Times the breaker opened (tripped, or a probe failed)", lambda row: row.snapshot.trips),
    ("rejections", "Calls the breaker rejected", lambda row: row.snapshot.rejections),
    (
        "deferrals",
        "Tasks deferred behind the breaker (rejected, failed as it opened, or refused on release)",
        lambda row: row.snapshot.deferrals,
    ),
    ("successes", "Guarded calls that succeeded", lambda row: row.snapshot.successes),
    ("failures", "Guarded calls that failed (recorded exceptions)", lambda row: row.snapshot.failures),
)

#: (name, help, value of a row or None for no sample): gauges.
_GAUGES: tuple[tuple[str, str, Callable[[BreakerStatus], float | None]], ...] = (
    (
        "open_until_timestamp_seconds",
        "While OPEN: when the breaker may admit a probe (epoch seconds)",
        lambda row: row.snapshot.open_until if row.snapshot.state is State.OPEN else None,
    ),
    ("opened_at_timestamp_seconds", "When the breaker last opened (epoch seconds)", lambda row: row.snapshot.opened_at),
    (
        "last_failure_timestamp_seconds",
        "When the breaker last recorded a failure (epoch seconds)",
        lambda row: row.snapshot.last_failure,
    ),
    (
        "last_success_timestamp_seconds",
        "When the breaker last recorded a success (epoch seconds)",
        lambda row: row.snapshot.last_success,
    ),
    ("parked_tasks", "Deferred tasks parked in the store, waiting for the breaker", lambda row: row.parked),
    ("claimed_tasks", "Parked tasks claimed by a releaser and being published again", lambda row: row.claimed),
    (
        "release_rate_per_second",
        "While parked tasks are released: the adaptive release's pace (tasks per second)",
        lambda row: None if row.release is None else row.release.rate,
    ),
    (
        "release_limit_per_second",
        "While parked tasks are released: the pace's limit, from the rate the downstream last refused (429)",
        lambda row: None if row.release is None else row.release.limit,
    ),
    (
        "release_held_seconds",
        "While parked tasks are released: seconds the release still waits after a refusal (Retry-After)",
        lambda row: None if row.release is None else row.release.held_for,
    ),
    (
        "release_usual_bad_share",
        "While parked tasks are released: the share of failed or slow calls the pace learnt as "
        "the downstream's usual, which does not cut it (0 to 1)",
        lambda row: None if row.release is None else row.release.usual_bad_share,
    ),
    ("window_calls", "Calls counted in the breaker's current window", lambda row: row.snapshot.window_calls),
    ("window_failures", "Failures counted in the breaker's current window", lambda row: row.snapshot.window_failures),
    (
        "window_failure_rate",
        "Failures / calls in the current window (0 to 1; no sample before any call)",
        lambda row: row.snapshot.failure_rate,
    ),
    ("probes_in_flight", "HALF_OPEN probes admitted and not yet reported", lambda row: row.snapshot.probes_in_flight),
)

#: (name, help): gauges of an app that defers into RabbitMQ's delay queues, without labels.
_BROKER_GAUGES = (
    (
        "broker_delayed_tasks",
        "Deferred tasks waiting in RabbitMQ's delay queues (celery_breaker_delayed_*) for their delay: every "
        "breaker's, of every app deferring on the vhost",
    ),
    (
        "broker_unroutable_tasks",
        "Deferred tasks in celery_breaker_delayed_unroutable: their queue was gone when they came due; they wait "
        "for an operator",
    ),
    ("broker_delay_up", "1 when the last scrape could count RabbitMQ's delay queues, else 0"),
)


class BreakerCollector(Collector):
    """A Prometheus collector that reads every breaker of one store on each scrape.

    ``source`` is a Celery app (its ``breaker_storage_url``), a store URL or a store; it
    is resolved now, so a bad URL fails where the collector is made. Each scrape calls
    ``collect_metrics`` and exposes one sample per breaker (labels ``breaker`` and
    ``key``, ``""`` for none) for each metric in ``docs/metrics.md``, plus
    ``celery_breaker_store_up``. A scrape whose store read fails never raises: it
    exposes ``celery_breaker_store_up 0`` and no breaker samples, and the failure is
    logged at most once per ``log_interval`` seconds (on ``clock``).

    For an app that defers into RabbitMQ's delay queues, first or when its store does not
    take a run (``breaker_park=True`` on RabbitMQ: every run while the store is down),
    each scrape also counts what waits there (``delay_gauge.DelayDepthReader``: one kept
    connection, bounded reads): ``celery_breaker_broker_delayed_tasks``,
    ``celery_breaker_broker_unroutable_tasks`` and ``celery_breaker_broker_delay_up``.
    ``close()`` closes that connection.
    """

    def __init__(self, source: Any, *, clock: Clock | None = None, log_interval: float = LOG_INTERVAL) -> None:
        self.store: Store = store_of(source)
        self.clock = clock or SYSTEM_CLOCK
        self.log_interval = log_interval
        # (the tasks of such an app wait in RabbitMQ, where the store's counts never see
        # them; a gauge, unlike a view's line, says 0 for a parking app without noise, and
        # an alert on it is how an outage of the store that sent runs there is seen)
        self.delays = (
            DelayDepthReader(source, clock=self.clock, log_interval=log_interval)
            if is_app(source) and uses_delay_queues(source)
            else None
        )
        self._lock = threading.Lock()  # the outage bookkeeping (scrapes may run in parallel)
        self._failing_since: float | None = None
        self._last_log = float("-inf")

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples: lets a registry check names without reading the store."""
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        """Read every breaker now and yield its metric families (never raises for the store)."""
        families = self._families()
        rows = self._read()
        for row in rows or ():
            # (no key: ""; an empty key: '""', so the two are two series, not one twice; the name
            # as `status` shows it too: one holding a character that prints as nothing read as another)
            key = row.snapshot.key
            labels = [visible(row.snapshot.name), "" if key is None else visible(key)]
            for state in State:
                families["state"].add_metric([*labels, state.value], 1.0 if row.snapshot.state is state else 0.0)
            for name, _, value in _COUNTERS:
                families[name].add_metric(labels, float(value(row)))
            for name, _, reading in _GAUGES:
                found = reading(row)
                if found is not None:
                    families[name].add_metric(labels, float(found))
        families["store_up"].add_metric([], 0.0 if rows is None else 1.0)
        if rows is not None:  # (a store not read at all is store_up 0 alone)
            families["store_unreached_servers"].add_metric([], float(len(rows.unreached)))
            families["store_unreadable_breakers"].add_metric([], float(len(rows.unreadable)))
            for unread in rows.unreadable:  # (no series of its state: nothing of it could be read)
                stored = "" if unread.stored_state is None else unread.stored_state.value
                key = "" if unread.key is None else visible(unread.key)
                name = visible(unread.name)
                families["unreadable"].add_metric([name, key, stored], 1.0)
                # (its parking is read apart: a backlog behind it still waits, and is counted)
                families["parked_tasks"].add_metric([name, key], float(unread.parked))
                families["claimed_tasks"].add_metric([name, key], float(unread.claimed))
        if self.delays is not None:
            depth = self.delays.read().depth
            families["broker_delay_up"].add_metric([], 0.0 if depth is None else 1.0)
            if depth is not None:  # (not counted: no sample, never a 0 that says "none wait")
                families["broker_delayed_tasks"].add_metric([], float(depth.delayed))
                families["broker_unroutable_tasks"].add_metric([], float(depth.unroutable))
        yield from families.values()

    def close(self) -> None:
        """Close the connection kept to count RabbitMQ's delay queues, if any (a later scrape opens another)."""
        if self.delays is not None:
            self.delays.close()

    def _families(self) -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "state": GaugeMetricFamily(
                f"{PREFIX}_state",
                "1 for the state the breaker is in, 0 for the others",
                labels=[*_LABELS, "state"],
            ),
        }
        for name, documentation, _ in _COUNTERS:
            families[name] = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=_LABELS)
        for name, documentation, _ in _GAUGES:
            families[name] = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=_LABELS)
        families["store_up"] = GaugeMetricFamily(
            f"{PREFIX}_store_up", "1 when the last scrape could read the breaker store, else 0", labels=[]
        )
        families["store_unreached_servers"] = GaugeMetricFamily(
            f"{PREFIX}_store_unreached_servers",
            "Servers of the breaker store the last scrape could not read while the others answered (a Redis "
            "Cluster's primaries down): the series of the breakers stored there are missing",
            labels=[],
        )
        families["store_unreadable_breakers"] = GaugeMetricFamily(
            f"{PREFIX}_store_unreadable_breakers",
            "Breakers whose stored state the last scrape found unreadable (values no script writes): they have no "
            "other series; each is left as it is until a call through it or an operator repairs it",
            labels=[],
        )
        families["unreadable"] = GaugeMetricFamily(
            f"{PREFIX}_unreadable",
            "1 for each breaker whose stored state the last scrape found unreadable; stored_state: the state its "
            "hash still names ('' when that too is unreadable)",
            labels=[*_LABELS, "stored_state"],
        )
        if self.delays is not None:
            for name, documentation in _BROKER_GAUGES:
                families[name] = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=[])
        return families

    def _read(self) -> Listing[BreakerStatus] | None:
        try:
            rows = collect_metrics(self.store, clock=self.clock)
        except Exception as exc:  # anything: an exporter must keep serving
            self._failed(exc)
            return None
        self._answered()
        return rows

    def _failed(self, exc: Exception) -> None:
        now = self.clock.monotonic()
        with self._lock:
            if self._failing_since is None:
                self._failing_since = now
            elif now - self._last_log < self.log_interval:
                return
            self._last_log = now
            since = now - self._failing_since
        logger.warning(
            "celery-breaker metrics: cannot read breakers from %s%s: %s; exporting %s_store_up 0",
            describe_url(self.store.url), f" (failing for {since:.0f} s)" if since else "", MaskedText(exc), PREFIX,
        )  # fmt: skip

    def _answered(self) -> None:
        with self._lock:
            since, self._failing_since = self._failing_since, None
            self._last_log = float("-inf")
        if since is not None:
            logger.info(
                "celery-breaker metrics: %s answers again after %.0f s",
                describe_url(self.store.url), self.clock.monotonic() - since,
            )  # fmt: skip

    def __repr__(self) -> str:
        return f"BreakerCollector({describe_url(self.store.url)!r})"


_LOCK = threading.Lock()
_REGISTERED: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, BreakerCollector]] = weakref.WeakKeyDictionary()


def register(source: Any, registry: CollectorRegistry = REGISTRY, *, clock: Clock | None = None) -> BreakerCollector:
    """Register a ``BreakerCollector`` for ``source`` with ``registry`` (default: the
    process's ``prometheus_client.REGISTRY``) and return it.

    Idempotent per store: an app, its store URL and its store are the same source, and
    registering one again returns the collector already registered. A registry holds
    one store's breakers: registering a second store in it raises ConfigurationError.
    """
    store = store_of(source)
    with _LOCK:
        collectors = _REGISTERED.setdefault(registry, {})
        found = collectors.get(store.url)
        if found is not None:
            return found
        collector = BreakerCollector(source if is_app(source) else store, clock=clock)
        try:
            registry.register(collector)
        except ValueError as exc:  # prometheus_client: "Duplicated timeseries in CollectorRegistry"
            others = ", ".join(describe_url(url) for url in collectors) or "another collector"
            raise ConfigurationError(
                f"cannot register the breakers of {describe_url(store.url)!r}: this Prometheus registry already "
                f"exports celery_breaker_* metrics ({others}); use one store per registry, or give "
                f"register() a registry of its own ({exc})"
            ) from None
        collectors[store.url] = collector
        return collector


def unregister(source: Any, registry: CollectorRegistry = REGISTRY) -> bool:
    """Remove the collector ``register`` added for ``source``; False if there was none."""
    store = store_of(source)
    with _LOCK:
        collector = _REGISTERED.get(registry, {}).pop(store.url, None)
        if collector is None:
            return False
        registry.unregister(collector)
    collector.close()
    return True


@dataclass
class MetricsServer:
    """A worker's Prometheus endpoint (``start_metrics_server``): ``url`` serves ``/metrics``."""

    address: str
    port: int
    collector: BreakerCollector
    _httpd: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    pid: int = field(default_factory=os.getpid)

    @property
    def url(self) -> str:
        """``http://address:port/metrics``."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and free the port (idempotent)."""
        with _LOCK:
            if _SERVERS.get(self.pid) is self:
                del _SERVERS[self.pid]
        if self.pid != os.getpid():
            return  # inherited through fork: the socket is already closed here, no thread runs
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout)
        self._httpd.server_close()
        self.collector.close()  # (a worker that stops says goodbye to RabbitMQ, not a dropped connection)


_SERVERS: dict[int, MetricsServer] = {}
_START_LOCK = threading.Lock()


def _bind_fix(exc: OSError) -> str:
    """What to change when the endpoint cannot bind: the port when it is taken (or
    privileged), else the address (no interface of this host has it, or it resolves to
    nothing): a port changed then fails the same way."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return (
            "Set breaker_metrics_address to an address of this host: '127.0.0.1' (this host only) or '0.0.0.0' "
            "(every interface)"
        )
    if exc.errno == errno.EACCES:
        return "Set breaker_metrics_port to a free port from 1024 up (lower ones need privileges)"
    return "Set breaker_metrics_port to a free port: each worker on a host needs its own"


def start_metrics_server(app: Any, registry: CollectorRegistry = REGISTRY) -> MetricsServer | None:
    """Serve ``registry`` (with the app's ``BreakerCollector`` registered) on
    ``breaker_metrics_address``:``breaker_metrics_port``, once per process.

    Returns None when ``breaker_metrics_port`` is None (the default: no endpoint), or when
    the port cannot be bound (logged as an ERROR: the worker runs on without it). A
    second call in the same process returns the server already running. Call it in a
    worker's main process once its pool exists: a process forked later closes its copy
    of the listening socket, so only the main process holds the port.
    """
    settings = get_settings(app)
    port, address = settings.metrics_port, settings.metrics_address
    if port is None:
        return None
    with _START_LOCK:  # two threads starting at once: one binds, the other gets its server
        running = _SERVERS.get(os.getpid())
        if running is not None:
            return running
        collector = register(app, registry)
        try:
            httpd, thread = _serve(address, port, registry)
        except OSError as exc:
            logger.error(
                "celery-breaker: cannot serve Prometheus metrics on %s:%d (%s); the worker runs without its "
                "metrics endpoint. %s", address, port, exc, _bind_fix(exc),
            )  # fmt: skip
            return None
        server = MetricsServer(address, port, collector, httpd, thread)
        with _LOCK:
            _SERVERS[server.pid] = server
    logger.info("celery-breaker: Prometheus metrics of %s on %s", describe_url(collector.store.url), server.url)
    return server


class _QuietHandler(Deadlined, WSGIRequestHandler):
    """Logs no request (a scrape every few seconds), and closes a connection silent for
    ``QUIET_FOR`` seconds, or whose request has not arrived ``REQUEST_WITHIN`` seconds
    after it was accepted: a client that never sends its request holds nothing for long."""

    timeout = QUIET_FOR

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged."""


def _serve(address: str, port: int, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread]:
    """``prometheus_client.start_http_server``'s server and thread, guarded (``serving.Guarded``):
    its own spawns a thread per connection without limit and waits for a request forever,
    in the worker's main process, whose file descriptors a flood of idle connections then
    exhausted (the worker stopped: "Too many open files")."""
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(Guarded, ThreadingWSGIServer):
        address_family = family

    httpd = make_server(address, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="celery-breaker metrics", daemon=True)
    thread.start()
    return httpd, thread


def _close_inherited_servers() -> None:
    # A forked process (a prefork pool child) inherits the listening socket but not the
    # thread serving it: close its copy, so only the process that started the server
    # holds the port (and a new worker can bind it once that process has gone). Locks
    # another thread held at fork time would stay held here forever: new ones.
    global _LOCK, _START_LOCK
    _LOCK, _START_LOCK = threading.Lock(), threading.Lock()
    for server in list(_SERVERS.values()):
        server._httpd.socket.close()
    _SERVERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_servers)
