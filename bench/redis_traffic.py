"""Redis traffic per breaker call (section 1 of bench/redis_store.py): celery-breaker and pybreaker side by side.

Each scenario's calls run inside a measured span: ``RoundTripMeter`` counts what
redis-py did per thread (the calling thread apart from any other), and the server's
``INFO commandstats`` and ``INFO cpu`` are read before and after. A span ends once
threads other than the caller have made no Redis call for ``settle`` seconds, so
work a breaker hands to a background thread is counted with the calls that caused it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pybreaker
import redis
from redis_meter import RoundTripMeter, Tally, server_stats

from celery_breaker import CircuitBreaker, CircuitOpenError

__all__ = [
    "LONG",
    "SCENARIOS",
    "THRESHOLD",
    "Call",
    "DownstreamError",
    "Library",
    "cb_breaker",
    "fail",
    "fail_times",
    "libraries",
    "measure_traffic",
    "noop",
    "raises",
]

THRESHOLD = 5  # failures that trip: celery-breaker failure_threshold, pybreaker fail_max
LONG = 3600.0  # seconds an open breaker stays open: longer than any run
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
SCENARIOS = {
    "success": "closed success",
    "reject": "open reject",
    "failure": "failure, not tripping",
    "trip": "failure that trips",
}


def noop() -> None:
    """The guarded function: does nothing, so a variant's cost is the breaker's."""


class DownstreamError(RuntimeError):
    """What ``fail`` raises."""


def fail() -> None:
    raise DownstreamError("down")


Call = Callable[[Callable[[], object]], object]


@dataclass(frozen=True)
class Library:
    """One of the two libraries: how to build a breaker (its bound ``call``) by name."""

    key: str
    label: str
    build: Callable[[str], Call]
    rejected: type[BaseException]


def cb_breaker(url: str, prefix: str, name: str) -> CircuitBreaker:
    """A celery-breaker breaker on the Redis at ``url``, keys under ``prefix``."""
    # deny: should the store fail, calls are rejected loudly rather than served by a
    # process-local breaker that makes no Redis traffic at all.
    policy = {"failure_threshold": THRESHOLD, "reset_timeout": LONG}
    return CircuitBreaker(name, policy, storage=f"{url}?key_prefix={prefix}-cb", on_storage_error="deny")


def libraries(url: str, prefix: str) -> tuple[Library, Library]:
    """(celery-breaker, pybreaker), both on the Redis at ``url``."""
    client = redis.Redis.from_url(url)  # one client for every pybreaker breaker, as an app would

    def py_breaker(name: str) -> Call:
        storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace=f"{prefix}-pb:{name}")
        return pybreaker.CircuitBreaker(fail_max=THRESHOLD, reset_timeout=LONG, state_storage=storage, name=name).call

    return (
        Library("cb", "celery-breaker", lambda name: cb_breaker(url, prefix, name).call, CircuitOpenError),
        Library("pb", "pybreaker+Redis", py_breaker, pybreaker.CircuitBreakerError),
    )


def raises(fn: Callable[[], object], error: type[BaseException]) -> bool:
    try:
        fn()
    except error:
        return True
    return False


def fail_times(call: Call, times: int, *tolerated: type[BaseException]) -> None:
    for _ in range(times):
        with contextlib.suppress(DownstreamError, *tolerated):
            call(fail)


# -- measuring ------------------------------------------------------------------


@dataclass
class Traffic:
    """Counts summed over every measured span of one scenario."""

    calls: int = 0
    sync: Tally = field(default_factory=Tally)
    background: Tally = field(default_factory=Tally)
    server: Counter[str] = field(default_factory=Counter)
    server_cpu_s: float = 0.0
    spans: int = 0
    threads: set[str] = field(default_factory=set)

    def per_call(self, span_cpu_s: float) -> dict[str, Any]:
        """Averages per call; ``span_cpu_s`` is the server CPU an empty span costs (our INFO calls)."""
        n = max(1, self.calls)
        client_commands = self.sync.commands + self.background.commands
        server_total = sum(self.server.values())
        scripts = sum(self.server[name] for name in SCRIPT_COMMANDS)
        return {
            "calls": self.calls,
            "sync_round_trips": self.sync.round_trips / n,
            "sync_commands": self.sync.commands / n,
            "background_round_trips": self.background.round_trips / n,
            "background_commands": self.background.commands / n,
            "pushes": (self.sync.pushes + self.background.pushes) / n,
            "server_commands": server_total / n,
            "server_script_calls": scripts / n,
            # The server runs what clients send plus what scripts call: the difference.
            "server_commands_inside_scripts": (server_total - client_commands) / n,
            "server_cpu_us": (self.server_cpu_s - self.spans * span_cpu_s) * 1e6 / n,
            "server_by_command": {name: count / n for name, count in self.server.most_common()},
            "background_threads": sorted(self.threads),
        }


@dataclass
class Meters:
    meter: RoundTripMeter
    admin: redis.Redis  # reads INFO commandstats, uncounted
    settle: float  # seconds of background quiet that end a bulk span
    caller: int = field(default_factory=threading.get_ident)
    span_cpu_s: float = 0.0  # server CPU of an empty span, set by calibrate()

    def calibrate(self, spans: int = 50) -> None:
        """Measure what an empty span costs the server (the two INFO calls, mostly)."""
        empty = Traffic()
        for _ in range(spans):
            self.span(empty, 0, lambda: None, 0.003)
        self.span_cpu_s = empty.server_cpu_s / spans

    def span(self, into: Traffic, calls: int, body: Callable[[], object], quiet: float) -> None:
        """Run ``body`` (``calls`` breaker calls) and add its traffic to ``into``."""
        meter = self.meter
        with meter.paused():
            server_before, cpu_before = server_stats(self.admin)
        before = meter.snapshot()
        body()
        meter.settle(self.caller, quiet, limit=max(10 * quiet, 0.05))
        after = meter.snapshot()
        with meter.paused():
            server_after, cpu_after = server_stats(self.admin)
        into.calls += calls
        into.spans += 1
        into.server_cpu_s += cpu_after - cpu_before
        into.sync += meter.split(after, self.caller)[0] - meter.split(before, self.caller)[0]
        into.background += meter.split(after, self.caller)[1] - meter.split(before, self.caller)[1]
        server = server_after - server_before
        del server["info"]  # our own reading
        into.server.update(server)
        for ident, tally in after.items():
            if ident != self.caller and tally != before.get(ident, Tally()):
                into.threads.add(meter.thread_name(ident))


def traffic_for(lib: Library, m: Meters, calls: int, tag: str) -> dict[str, Traffic]:
    """The four scenarios for one library; every breaker is fresh."""
    out = {key: Traffic() for key in SCENARIOS}

    success = lib.build(f"{tag}-success")
    for _ in range(20):  # warm-up: connection made, scripts loaded
        success(noop)

    def successes() -> None:
        for _ in range(calls):
            success(noop)

    m.span(out["success"], calls, successes, m.settle)

    reject = lib.build(f"{tag}-reject")
    fail_times(reject, THRESHOLD, lib.rejected)
    if not raises(lambda: reject(noop), lib.rejected):
        raise SystemExit(f"{lib.label}: the breaker did not open after {THRESHOLD} failures")
    for _ in range(20):
        with contextlib.suppress(lib.rejected):
            reject(noop)

    def rejects() -> None:
        error = lib.rejected
        for _ in range(calls):
            try:  # noqa: SIM105 - as in the timed loops
                reject(noop)
            except error:
                pass

    m.span(out["reject"], calls, rejects, m.settle)

    # Failures: fresh breakers; in each, THRESHOLD - 1 failures that do not trip, then
    # the one that does, each group in its own span. The first breaker is a warm-up.
    cycles = max(1, -(-calls // (THRESHOLD - 1)))
    quiet = min(m.settle, 0.003)
    for cycle in range(cycles + 1):
        breaker = lib.build(f"{tag}-trip-{cycle}")
        fails, trips = (Traffic(), Traffic()) if cycle == 0 else (out["failure"], out["trip"])
        m.span(fails, THRESHOLD - 1, functools.partial(fail_times, breaker, THRESHOLD - 1), quiet)
        m.span(trips, 1, functools.partial(fail_times, breaker, 1, lib.rejected), quiet)
        if not raises(functools.partial(breaker, noop), lib.rejected):
            raise SystemExit(f"{lib.label}: breaker {cycle} did not open after {THRESHOLD} failures")
    return out


def idle_background(m: Meters, seconds: float) -> dict[str, float]:
    """Background redis-py traffic per second while no breaker is called."""
    before = m.meter.split(m.meter.snapshot(), m.caller)[1]
    time.sleep(seconds)
    after = m.meter.split(m.meter.snapshot(), m.caller)[1]
    diff = after - before
    return {
        "seconds": seconds,
        "round_trips_per_s": diff.round_trips / seconds,
        "commands_per_s": diff.commands / seconds,
    }


def measure_traffic(url: str, calls: int, settle: float, prefix: str) -> dict[str, Any]:
    cb, pb = libraries(url, prefix)
    admin = redis.Redis.from_url(url)
    with RoundTripMeter() as meter:
        m = Meters(meter, admin, settle)
        m.calibrate()
        # pybreaker first: it starts no thread, so nothing else runs during its spans.
        pb_traffic = traffic_for(pb, m, calls, "traffic")
        cb_breaker(url, prefix, "traffic-idle").call(noop)  # the store is open: any thread of its started
        idle = idle_background(m, max(settle, 0.2))
        cb_traffic = traffic_for(cb, m, calls, "traffic")
        meter.settle(m.caller, settle, 10 * settle)
        with meter.paused():
            recorded = cb_breaker(url, prefix, "traffic-success").snapshot()
    return {
        "calls": calls,
        "threshold": THRESHOLD,
        "settle_s": settle,
        "empty_span_server_cpu_us": m.span_cpu_s * 1e6,
        "idle_background": idle,
        "celery_breaker_successes_in_redis": {"expected": calls + 20, "snapshot": recorded.successes},
        "rows": {
            lib.key: {scenario: traffic[scenario].per_call(m.span_cpu_s) for scenario in SCENARIOS}
            for lib, traffic in ((cb, cb_traffic), (pb, pb_traffic))
        },
    }
