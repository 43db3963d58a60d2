"""Recovery at the downstream's pace: a parked backlog released at the fixed pace and at the adaptive one.

Real parts only: a redis-server on a free loopback port (broker db 0, breaker store db 1,
the tasks' own records db 2; ``--broker rabbitmq``: a rabbitmq-server started here is the
broker instead, with ``breaker_park`` on), two ``celery -A recovery worker -P prefork
-c 6`` processes per run (this module is also their Celery app, configured from the
environment), and an HTTP downstream in this process
(``http_downstream.LimitedDownstream``): capacity C requests per second, slower from 85 %
of it (up to +400 ms at C), ``429`` with ``Retry-After: 1`` above it (``--retry-after``). The task
GETs it under a ``BreakerTask`` breaker whose policy counts a call of 100 ms or more as slow;
a 429 is raised as urllib's ``HTTPError``, as it would be in production: met by a released
task it is a refusal (the task is parked again, the pace is cut and waits the Retry-After;
decision 47), met by any other task its Retry-After reopens the breaker.

Each run, with ``breaker_release_pace`` fixed (50/s reached after 30 s, the defaults of
0.1.0) or adaptive:

1. The downstream goes down (503); a few tasks fail and trip the breaker.
2. N tasks are published; every one is parked. The downstream comes back.
3. The breaker half-opens, its probes succeed, it closes: time 0 of the drain. The
   bench samples, every 100 ms, the breaker (state, trips, parked, claimed) and the
   adaptive pace (the ``rate`` in the store), until every parked task has run.

Measured per run: the drain time after the breaker closed against the bound N / C; the
share of the release's downstream calls refused with 429; task failures and breaker
reopenings during the drain. Runs: a downstream with C = 150/s (fixed, adaptive) and
one with no limit (fixed, adaptive, and the workers' own speed: N tasks run with the
breaker closed, nothing parked).

    python bench/recovery.py                 # N = 3000, C = 150/s: ~4 minutes
    python bench/recovery.py --quick         # N = 600, C = 60/s, capacity runs only: a CI smoke run
    python bench/recovery.py --burst 0.5     # no limit, but every call refused for 0.5 s at the close
    python bench/recovery.py --latency 2.5 --tasks 1000  # no limit, but every call takes 2.5 s (thread pools)
    python bench/recovery.py --capacity 150 --broker rabbitmq  # the same on RabbitMQ (confirmed publishes)
    python bench/recovery.py --json out.json # then: python bench/recovery.py --plot out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.signals import task_failure, worker_ready

from celery_breaker import BreakerTask

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BREAKER = "downstream"
TASK = "bench.recovery.call_downstream"
#: The queue the tasks are sent to (Celery's default), read on the Redis broker for what waits there.
QUEUE = "celery"
POLICY: dict[str, Any] = {
    "failure_threshold": 5,
    "reset_timeout": 3.0,
    "backoff_multiplier": 1.0,
    "half_open_max_calls": 3,
    "success_threshold": 2,
    # A call of 100 ms or more is slow: the adaptive pace's early warning. The rule itself
    # trips only if every call in a minute's window is slow.
    "slow_call_duration": 0.1,
    "slow_call_rate_threshold": 1.0,
}
WORKERS = 2
CONCURRENCY = 6  # pool processes per worker: a slow downstream's calls wait in them
#: Threads per worker with ``--latency``: calls that take seconds need more slots than processes.
LATENCY_CONCURRENCY = 50
SAMPLE_S = 0.1
TIMEOUT_S = 5.0  # the task's HTTP client


# -- the Celery app the workers run (configured from the environment) --------------------

app = Celery("bench_recovery", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    breaker_storage_url=os.environ.get("BENCH_BREAKER_URL", "redis://127.0.0.1:6379/1?key_prefix=bench-recovery"),
    breaker_default_policy=POLICY,
    breaker_defer_spread=0,
    breaker_on_storage_error="deny",
)
app.conf.update(json.loads(os.environ.get("BENCH_EXTRA_CONF", "{}")))
NS = os.environ.get("BENCH_NS", "bench-recovery")


#: Where the tasks record what ran (a Redis of the bench's own, whatever the broker).
COUNTER_URL = os.environ.get("BENCH_COUNTER_URL", "redis://127.0.0.1:6379/2")


@functools.cache
def counter() -> redis.Redis:
    """One client per worker process, made on first use (after the fork)."""
    return redis.Redis.from_url(COUNTER_URL, socket_timeout=5, socket_connect_timeout=5)


class DownstreamError(Exception):
    """The downstream answered 503, or not at all."""


def call_downstream(url: str, n: int) -> None:
    """One GET under the task's breaker; a 429 propagates as urllib's HTTPError (a refusal, or a Retry-After)."""
    try:
        with urllib.request.urlopen(f"{url}/call?n={n}", timeout=TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            raise
        raise DownstreamError(f"downstream answered {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise DownstreamError(f"downstream did not answer: {exc}") from None
    counter().rpush(f"{NS}:done", f"{n} {time.time():.4f}")


def _count_failure(sender: Any = None, args: Any = None, **kwargs: Any) -> None:
    n = args[1] if isinstance(args, (list, tuple)) and len(args) > 1 else -1
    counter().rpush(f"{NS}:failed", f"{n} {time.time():.4f}")


def _announce_ready(sender: Any = None, **kwargs: Any) -> None:
    redis.Redis.from_url(COUNTER_URL).incr(f"{NS}:ready")


task_failure.connect(_count_failure, weak=False)
worker_ready.connect(_announce_ready, weak=False)
app.task(name=TASK, base=BreakerTask, breaker=BREAKER, acks_late=True, max_retries=0)(call_downstream)


# -- one run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One run: a release pace against a downstream."""

    name: str
    pace: str  # breaker_release_pace
    capacity: float | None  # the downstream's C (None: no limit)
    tasks: int  # N, parked by the outage
    slow_from: float = 0.85  # the share of C from which the downstream slows (1: it answers 429 without warning)
    burst: float = 0.0  # seconds after the breaker closed in which the downstream answers every call 429
    usual_slow: float = 0.0  # the share of calls slow (150 ms) whatever the load
    retry_after: float = 1.0  # the seconds a 429 asks to wait
    latency: float = 0.0  # seconds every call takes on top (then: thread pools, LATENCY_CONCURRENCY each)
    prefetch: int = 1  # the workers' worker_prefetch_multiplier


@dataclass
class Run:
    """What one run recorded; times are seconds since the breaker closed after the recovery."""

    case: Case
    closed_at: float = 0.0  # epoch seconds
    drained_s: float | None = None
    worker_speed: float | None = None  # tasks/s with the breaker closed (healthy case only)
    samples: list[dict[str, Any]] = field(default_factory=list)
    answers: list[tuple[float, str, float]] = field(default_factory=list)  # (t, answer, delay) after closing
    completed: list[float] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)
    trips_at_close: int = 0

    def summary(self) -> dict[str, Any]:
        capacity, n = self.case.capacity, self.case.tasks
        bound = None if capacity is None else n / capacity
        calls = len(self.answers)
        refused = sum(1 for _, answer, _ in self.answers if answer == "429")
        trips = max((s["trips"] for s in self.samples), default=self.trips_at_close)
        return {
            "case": self.case.name,
            "pace": self.case.pace,
            "capacity": capacity,
            "tasks": n,
            "drain_s": None if self.drained_s is None else round(self.drained_s, 1),
            "bound_s": None if bound is None else round(bound, 1),
            "drain_over_bound": None if bound is None or self.drained_s is None else round(self.drained_s / bound, 2),
            "drain_rate": None if not self.drained_s else round(n / self.drained_s, 1),
            "worker_speed": None if self.worker_speed is None else round(self.worker_speed, 1),
            "release_calls": calls,
            "refused_429": refused,
            "refused_share": round(refused / calls, 4) if calls else 0.0,
            "slow_calls": sum(
                1 for _, answer, delay in self.answers if answer == "ok" and delay >= self.case.latency + 0.095
            ),
            "task_failures": len(self.failed),
            "reopenings": trips - self.trips_at_close,
            "peak_rate": max((s["rate"] or 0.0 for s in self.samples), default=0.0),
            "most_queued": max((s["queued"] for s in self.samples if s.get("queued") is not None), default=None),
        }


class Progress:
    """The tasks' own records of completions and failures (lists in Redis), read as they grow."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.client, self.ns = client, ns
        self.done: list[tuple[int, float]] = []
        self.failed: list[tuple[int, float]] = []

    def read(self) -> None:
        for kind, seen in (("done", self.done), ("failed", self.failed)):
            for raw in self.client.lrange(f"{self.ns}:{kind}", len(seen), -1):
                n, at = (raw.decode() if isinstance(raw, bytes) else str(raw)).split()
                seen.append((int(n), float(at)))

    def settled(self, below: int, start: int = 0) -> int:
        """How many tasks ``start <= n < below`` have completed or failed."""
        return len({n for n, _ in self.done + self.failed if start <= n < below})


def pool_of(case: Case) -> tuple[str, int]:
    """The workers' pool and concurrency for ``case``: threads when every call takes
    seconds (calls wait in them), else prefork processes."""
    return ("threads", LATENCY_CONCURRENCY) if case.latency else ("prefork", CONCURRENCY)


def where(capacity: float | None) -> str:
    """The downstream's limit, as a case's name says it."""
    return "no limit" if capacity is None else f"C={capacity:g}/s"


@contextlib.contextmanager
def workers(
    env: dict[str, str], log_dir: Path, pool: tuple[str, int] = ("prefork", CONCURRENCY)
) -> Iterator[list[subprocess.Popen[bytes]]]:
    full = {**os.environ, **env, "PYTHONPATH": str(BENCH) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = []
    for i in range(WORKERS):
        with (log_dir / f"worker{i}.log").open("ab") as out:
            started.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "recovery", "worker", "-P", pool[0], "-c", str(pool[1]),
                 "-n", f"recovery{i}-{os.getpid()}@%h", "--loglevel", "WARNING", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=BENCH, env=full, stdout=out, stderr=subprocess.STDOUT,
            ))  # fmt: skip
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(predicate: Any, seconds: float, what: str, started: list[subprocess.Popen[bytes]], log_dir: Path) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if any(process.poll() is not None for process in started):
            raise SystemExit(f"recovery: a worker exited while waiting for {what}; logs in {log_dir}")
        if time.monotonic() > deadline:
            raise SystemExit(f"recovery: timed out waiting for {what}; logs in {log_dir}")
        time.sleep(SAMPLE_S)  # polling real processes


def run(case: Case, server: Any, log_dir: Path, broker_url: str | None = None) -> Run:
    """One case, end to end (its own workers, key prefix and breaker); ``broker_url``:
    another broker than the Redis server's db 0 (RabbitMQ: ``--broker rabbitmq``)."""
    from http_downstream import LimitedDownstream

    from celery_breaker.monitoring import collect_metrics
    from celery_breaker.storage.redis import RedisStore

    ns = f"bench-recovery-{uuid.uuid4().hex[:6]}"
    store_url = f"{server.url(1)}?key_prefix={ns}"
    extra: dict[str, Any] = {"breaker_release_pace": case.pace}
    if broker_url is not None:  # (RabbitMQ: tasks park in the store, as they do by default on Redis)
        extra["breaker_park"] = True
    if case.latency:  # (every call takes seconds: slow only beyond that)
        extra["breaker_default_policy"] = {**POLICY, "slow_call_duration": case.latency + 0.1}
    if case.prefetch != 1:
        extra["worker_prefetch_multiplier"] = case.prefetch
    # (released tasks waiting in the broker: the Redis broker's queue; not read on RabbitMQ)
    queue = redis.Redis.from_url(server.url(0)) if broker_url is None else None
    broker_url = broker_url or server.url(0)
    env = {"BENCH_BROKER": broker_url, "BENCH_BREAKER_URL": store_url, "BENCH_NS": ns,
           "BENCH_COUNTER_URL": server.url(2), "BENCH_EXTRA_CONF": json.dumps(extra)}  # fmt: skip
    sender = Celery("bench_recovery_sender", broker=broker_url)
    broker = redis.Redis.from_url(server.url(2))
    store = RedisStore.from_url(store_url)
    tag = store.parking.tag(BREAKER, None)
    progress = Progress(broker, ns)
    result = Run(case)

    def row() -> Any:
        return next((r for r in collect_metrics(store_url) if r.snapshot.name == BREAKER), None)

    def state() -> str | None:
        found = row()
        return None if found is None else str(found.snapshot.state.value)

    def publish(url: str, numbers: range) -> None:
        with sender.producer_or_acquire() as producer:
            for n in numbers:
                sender.send_task(TASK, args=(url, n), producer=producer)

    downstream_of_case = LimitedDownstream(
        case.capacity,
        slow_from=case.slow_from,
        usual_slow=case.usual_slow,
        retry_after=case.retry_after,
        latency=case.latency,
    )
    with downstream_of_case as downstream, workers(env, log_dir, pool_of(case)) as started:
        wait_for(lambda: int(broker.get(f"{ns}:ready") or 0) >= WORKERS, 90, "the workers", started, log_dir)
        n = case.tasks
        base = 10 * n  # the numbers of the tasks that are not the backlog
        if case.capacity is None and case.pace == "adaptive" and not case.usual_slow:  # the workers' own speed
            began = time.monotonic()
            publish(downstream.url, range(2 * base, 2 * base + n))

            def direct_done() -> bool:
                progress.read()
                return progress.settled(2 * base + n, 2 * base) >= n

            wait_for(direct_done, 120, "the direct run", started, log_dir)
            result.worker_speed = n / (time.monotonic() - began)
        downstream.down(True)
        publish(downstream.url, range(base, base + 10))
        wait_for(lambda: state() == "open", 60, "the trip", started, log_dir)
        publish(downstream.url, range(n))
        wait_for(lambda: sum(store.parking.count(tag)) >= n, 120, "the backlog parked", started, log_dir)
        downstream.down(False)

        wait_for(lambda: state() == "closed", 120, "the breaker to close", started, log_dir)
        if case.burst:
            downstream.refuse_for(case.burst)
        result.closed_at = time.time()
        r = row()
        result.trips_at_close = r.snapshot.trips if r is not None else 0
        deadline = time.monotonic() + 300
        while True:
            time.sleep(SAMPLE_S)  # the sampling period
            r = row()
            progress.read()
            pace = store.parking.pace(tag)
            result.samples.append({
                "t": time.time() - result.closed_at,
                "state": r.snapshot.state.value if r else "closed",
                "trips": r.snapshot.trips if r else 0,
                "parked": r.parked if r else 0,
                "claimed": r.claimed if r else 0,
                "rate": float(pace["rate"]) if pace.get("rate") else None,
                "queued": None if queue is None else int(queue.llen(QUEUE)),
            })  # fmt: skip
            if progress.settled(n) >= n and r is not None and r.parked == 0 and r.claimed == 0:
                result.drained_s = max(at for k, at in progress.done + progress.failed if k < n) - result.closed_at
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                print(f"recovery: {case.name} not drained ({progress.settled(n)} of {n} ran); logs in {log_dir}")
                break
        result.answers = [(at - result.closed_at, a, d) for at, a, d in downstream.requests() if at >= result.closed_at]
        result.completed = [at - result.closed_at for k, at in progress.done if k < n]
        result.failed = [at - result.closed_at for k, at in progress.failed if k < n and at >= result.closed_at]
    store.close()
    return result


CASES = [
    Case("C=150/s, fixed", "fixed", 150.0, 3000),
    Case("C=150/s, adaptive", "adaptive", 150.0, 3000),
    Case("no limit, fixed", "fixed", None, 3000),
    Case("no limit, adaptive", "adaptive", None, 3000),
]
QUICK = [Case("C=60/s, fixed", "fixed", 60.0, 600), Case("C=60/s, adaptive", "adaptive", 60.0, 600)]


def report(runs: list[Run]) -> str:
    lines = [
        "| case | drain after close | N / C | ratio | drain rate | 429s of release calls | failures | reopenings "
        "| most in the broker |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r.summary()
        bound = "—" if s["bound_s"] is None else f"{s['bound_s']:.1f} s"
        ratio = "—" if s["drain_over_bound"] is None else f"{s['drain_over_bound']:.2f}x"
        drain = "not drained" if s["drain_s"] is None else f"{s['drain_s']:.1f} s"
        rate = "—" if s["drain_rate"] is None else f"{s['drain_rate']:.0f}/s"
        lines.append(
            f"| {s['case']} | {drain} | {bound} | {ratio} | {rate} | {s['refused_429']} of {s['release_calls']} "
            f"({100 * s['refused_share']:.1f} %) | {s['task_failures']} | {s['reopenings']} "
            f"| {'—' if s['most_queued'] is None else s['most_queued']} |"
        )
    speed = next((r.worker_speed for r in runs if r.worker_speed), None)
    if speed:
        lines.append(f"\nthe workers' own speed (N tasks, breaker closed, nothing parked): {speed:.0f} tasks/s")
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> None:
    """The release rate and the downstream's answers per second, one column per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    runs = data["runs"]
    figure = Figure(figsize=(4.2 * len(runs), 5.4), layout="constrained")
    axes = figure.subplots(2, len(runs), sharex="col", squeeze=False)
    for column, run_data in enumerate(runs):
        top, bottom = axes[0][column], axes[1][column]
        summary = run_data["summary"]
        end = max([s["t"] for s in run_data["samples"]] + [1.0])
        bins = int(end) + 1
        ok = [0] * bins
        refused = [0] * bins
        for t, answer, _ in run_data["answers"]:
            if 0 <= t < bins:
                (ok if answer == "ok" else refused)[int(t)] += 1
        ticks = [i + 0.5 for i in range(bins)]
        top.bar(ticks, ok, width=0.9, color="#5b8db8", label="200")
        top.bar(ticks, refused, width=0.9, bottom=ok, color="#c0392b", label="429")
        if summary["capacity"]:
            top.axhline(summary["capacity"], color="0.3", ls="--", lw=1, label="capacity C")
        top.set_title(summary["case"], fontsize=10)
        top.set_ylabel("downstream calls/s")
        top.legend(loc="upper right", fontsize=7, frameon=False)
        t = [s["t"] for s in run_data["samples"]]
        bottom.plot(t, [s["parked"] + s["claimed"] for s in run_data["samples"]], color="0.3", label="parked")
        bottom.set_ylabel("tasks parked")
        bottom.set_xlabel("seconds after the breaker closed")
        if summary["pace"] == "adaptive":
            twin = bottom.twinx()
            twin.plot(t, [s["rate"] or 0 for s in run_data["samples"]], color="#e67e22", label="adaptive rate")
            twin.set_ylabel("release rate (tasks/s)", color="#e67e22")
        if summary["drain_s"] is not None:
            for ax in (top, bottom):
                ax.axvline(summary["drain_s"], color="0.35", ls=":", lw=1)
        if summary["bound_s"] is not None:
            for ax in (top, bottom):
                ax.axvline(summary["bound_s"], color="#27ae60", ls="--", lw=1)
    figure.suptitle("Releasing a parked backlog: fixed pace against adaptive (dotted: drained; green: N / C)",
                    fontsize=11)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 600, C = 60/s, the capacity runs only")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="run fixed and adaptive against a downstream of this capacity C (tasks/s) only",
    )
    parser.add_argument("--tasks", type=int, default=3000, help="with --capacity: N, the tasks parked")
    parser.add_argument(
        "--slow-from",
        type=float,
        default=0.85,
        help="with --capacity: the share of C from which the downstream slows down (1: none, only 429s)",
    )
    parser.add_argument(
        "--burst",
        type=float,
        default=None,
        help="run fixed and adaptive against a downstream (of --capacity, else with no limit) that answers every "
        "call 429 for this many seconds once the breaker has closed: a moment's refusal, not its capacity",
    )
    parser.add_argument(
        "--usual-slow",
        type=float,
        default=None,
        help="run fixed and adaptive against a downstream (of --capacity, else with no limit) whose calls are slow "
        "(150 ms, over the policy's 100 ms) at this share whatever the load: slowness the release does not cause",
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=None,
        help="with --capacity: the seconds the downstream's 429s ask to wait (default 1)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=None,
        help="run fixed and adaptive against a downstream (of --capacity, else with no limit) whose every call "
        f"takes this many seconds more, on thread pools of {LATENCY_CONCURRENCY} (a slow downstream, not a loaded one)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="the workers' worker_prefetch_multiplier (default 1; Celery's own default is 4): with 2 or more, a "
        "worker holds back the adaptive release while the tasks it took and has not started cover its pool; with "
        "1, it bounds each pass by its free slots and what it started (half that for long calls) while its pool is at "
        "least half busy",
    )
    parser.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        default="redis",
        help="the workers' broker: the bench's redis-server, or a rabbitmq-server started here (parking on)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every series here")
    parser.add_argument("--plot", type=Path, default=None, help="draw a --json file into docs/img/recovery.png")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "recovery.png")
    options = parser.parse_args()
    if options.plot is not None:
        plot(json.loads(options.plot.read_text()), options.out)
        print(f"wrote {options.out}")
        return
    sys.path.insert(0, str(BENCH))
    from redis_meter import RedisServer

    cases = QUICK if options.quick else CASES
    if options.capacity is not None:
        if options.capacity <= 0 or options.tasks <= 0 or not 0 < options.slow_from <= 1:
            parser.error("--capacity and --tasks must be > 0, --slow-from in (0, 1]")
        c, n, slow = options.capacity, options.tasks, options.slow_from
        zone = "" if slow == 0.85 else (", no slow zone" if slow == 1 else f", slow from {slow:g} C")
        cases = [Case(f"C={c:g}/s{zone}, {pace}", pace, c, n, slow) for pace in ("fixed", "adaptive")]
    if options.burst is not None:
        if not 0 < options.burst <= 60 or options.tasks <= 0:
            parser.error("--burst must be in (0, 60] seconds, --tasks > 0")
        c, b = options.capacity, options.burst
        cases = [Case(f"{where(c)}, 429s for {b:g} s, {pace}", pace, c, options.tasks, options.slow_from, b)
                 for pace in ("fixed", "adaptive")]  # fmt: skip
    if options.usual_slow is not None:
        if not 0 < options.usual_slow < 1 or options.tasks <= 0:
            parser.error("--usual-slow must be in (0, 1), --tasks > 0")
        c, share = options.capacity, options.usual_slow
        cases = [Case(f"{where(c)}, {share:.0%} of calls slow, {pace}", pace, c, options.tasks, options.slow_from,
                      usual_slow=share) for pace in ("fixed", "adaptive")]  # fmt: skip
    if options.retry_after is not None:
        if not 0 < options.retry_after <= 60 or options.capacity is None:
            parser.error("--retry-after must be in (0, 60] seconds, with --capacity")
        cases = [dataclasses.replace(case, name=f"{case.name}, Retry-After {options.retry_after:g} s",
                                     retry_after=options.retry_after) for case in cases]  # fmt: skip
    if options.latency is not None:
        if not 0 < options.latency <= TIMEOUT_S - 1 or options.tasks <= 0:
            parser.error(
                f"--latency must be in (0, {TIMEOUT_S - 1:g}] seconds (the task's HTTP timeout is {TIMEOUT_S:g} s)"
            )
        c, lat = options.capacity, options.latency
        cases = [Case(f"{where(c)}, {lat:g} s a call, {pace}", pace, c, options.tasks, options.slow_from, latency=lat)
                 for pace in ("fixed", "adaptive")]  # fmt: skip
    if options.prefetch is not None:
        if not 1 <= options.prefetch <= 64:
            parser.error("--prefetch must be in [1, 64]")
        cases = [dataclasses.replace(case, name=f"{case.name}, prefetch {options.prefetch}",
                                     prefetch=options.prefetch) for case in cases]  # fmt: skip
    if options.only:
        cases = [case for case in cases if options.only in case.name]
    began = time.monotonic()
    runs = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-recovery-"))
        server = stack.enter_context(RedisServer())
        redis_version = server.version()
        broker_url = None
        if options.broker == "rabbitmq":
            sys.path.insert(0, str(ROOT))
            from tests.rabbitmq import RabbitMQServer

            rabbitmq = RabbitMQServer().start()
            stack.callback(rabbitmq.stop)
            broker_url = rabbitmq.url
        for case in cases:
            log_dir = Path(tmp) / case.name.replace("/", "").replace(" ", "").replace(",", "-")
            log_dir.mkdir()
            runs.append(run(case, server, log_dir, broker_url))
            print(f"{case.name}: {runs[-1].summary()}", flush=True)
    meta = {
        "python": platform.python_version(),
        "celery": version("celery"),
        "redis-server": redis_version,
        "broker": options.broker,
        "cpus": os.cpu_count(),
        "workers": ", ".join(sorted({f"{WORKERS} x {pool} -c {count}" for pool, count in map(pool_of, cases)})),
        "wall_s": round(time.monotonic() - began, 1),
    }
    print(f"Recovery at the downstream's pace ({', '.join(f'{k} {v}' for k, v in meta.items())})")
    print(report(runs))
    if options.json is not None:
        data = {
            "meta": meta,
            "policy": POLICY,
            "runs": [
                {"case": asdict(r.case), "summary": r.summary(), "samples": r.samples, "answers": r.answers}
                for r in runs
            ],
        }
        options.json.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
