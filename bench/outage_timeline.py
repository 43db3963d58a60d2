"""One outage of a real HTTP downstream, end to end, recorded as time series (the performance page's plot).

Real parts only: a redis-server on a free loopback port (broker db 0, breaker store db 1),
two ``celery -A outage_app worker -P prefork -c 2`` processes, and an HTTP downstream
(``http_downstream.py``) in this process. The task (``outage_app.py``) GETs the
downstream under a ``BreakerTask`` breaker, with the Redis store, parking on (the
default with Redis), parked tasks released at the fixed pace (``breaker_release_pace=
"fixed"``, as the published figures were taken), and ``breaker_send_events=True``.

The scenario:

1. The workers start; once both are ready, this process publishes tasks at a steady
   rate (``--rate``) until the end. Time 0 is the first publish.
2. After ``warm_s`` the downstream goes down: requests get 503 and hang (no answer for
   2 s; the task's client gives up after 0.5 s) in turn. After ``outage_s`` it is healthy again.
3. The run goes on until the breaker has closed, nothing is parked, and every task
   published before the recovery has run (*drained*), then ``tail_s`` more. Publishing
   stops, and the bench waits for every published task to have completed or failed.

Recorded:

* every request the downstream received (its own log: time, phase, answer);
* every task completion and failure (the task's own record, with the time);
* every ``task-breaker-deferred`` event and every transition event (``breaker-opened``,
  ``breaker-half-opened``, ``breaker-closed``), from an event receiver in this process;
* every ~100 ms, the breaker's row from ``celery_breaker.monitoring.collect_metrics``
  (state, trips, counters, tasks parked) and the broker queue's length.

``--json out.json`` writes all of it, with the same series counted in 1-second bins;
``bench/plot_outage.py`` draws the figure from that file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
from backlog_memory import Worker
from http_downstream import Downstream
from redis_meter import RedisServer

from celery_breaker.monitoring import collect_metrics

BENCH = Path(__file__).resolve().parent
QUEUE = "celery"
SAMPLE_S = 0.1  # between two samples of the breaker
BIN_S = 1.0  # the width of a bin of the per-second series
WORKERS = 2
CONCURRENCY = 2  # pool processes per worker (backlog_memory.Worker runs -c 2)
#: Seconds the drain may take beyond the outage's end before the bench gives up: this
#: plus three times the outage.
SLACK_S = 60.0
EVENT_TYPES = ("task-breaker-deferred", "breaker-opened", "breaker-half-opened", "breaker-closed")


@dataclass(frozen=True)
class Scenario:
    """The parameters of one run."""

    rate: float  # tasks published per second
    warm_s: float  # healthy seconds before the outage
    outage_s: float
    tail_s: float  # seconds recorded after the backlog drained
    failure_threshold: int
    reset_timeout: float
    half_open_max_calls: int
    release_rate: float  # breaker_release_rate
    release_ramp: float  # breaker_release_ramp

    @property
    def policy(self) -> dict[str, Any]:
        return {
            "failure_threshold": self.failure_threshold,
            "reset_timeout": self.reset_timeout,
            "half_open_max_calls": self.half_open_max_calls,
        }

    @property
    def extra_conf(self) -> dict[str, Any]:
        # The fixed pace, as 0.1.0 released: docs/performance.md's "One outage" figures
        # were taken at it. The default is now the adaptive pace, under which
        # breaker_release_rate is only a ceiling and breaker_release_ramp is unused
        # (bench/recovery.py compares the two).
        return {
            "breaker_release_pace": "fixed",
            "breaker_release_rate": self.release_rate,
            "breaker_release_ramp": self.release_ramp,
        }


#: The fixed pace at its defaults (50 tasks/s, reached 30 s after closing).
DEFAULT = Scenario(
    rate=40,
    warm_s=10,
    outage_s=30,
    tail_s=5,
    failure_threshold=5,
    reset_timeout=5,
    half_open_max_calls=3,
    release_rate=50,
    release_ramp=30,
)
QUICK = Scenario(
    rate=20,
    warm_s=3,
    outage_s=6,
    tail_s=1,
    failure_threshold=5,
    reset_timeout=2,
    half_open_max_calls=3,
    release_rate=50,
    release_ramp=3,
)


@dataclass
class Sample:
    """The breaker's row in the store at one moment (``t``: seconds since time 0)."""

    t: float
    state: str
    trips: int
    deferrals: int
    failures: int
    successes: int
    parked: int
    claimed: int
    queued: int  # messages waiting in the broker queue


# -- the parts this process runs -----------------------------------------------------


class Publisher:
    """Publishes ``call_downstream(url, n)`` at a steady rate from a thread, ``n`` = 0, 1, 2, …"""

    def __init__(self, app: Any, task: str, url: str, rate: float) -> None:
        self.app, self.task, self.url, self.rate = app, task, url, rate
        self.sent: list[float] = []  # epoch seconds of each publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    @property
    def count(self) -> int:
        return len(self.sent)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def _run(self) -> None:
        with self.app.producer_or_acquire() as producer:
            while not self._stop.is_set():
                due = self.t0 + len(self.sent) / self.rate
                if self._stop.wait(max(0.0, due - time.time())):  # pacing the stream
                    return
                self.app.send_task(self.task, args=(self.url, len(self.sent)), producer=producer)
                self.sent.append(time.time())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class EventLog:
    """The breaker's Celery events, received in a thread: deferrals and transitions."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.deferred: list[dict[str, Any]] = []
        self.transitions: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "task-breaker-deferred":
            self.deferred.append(
                {"at": event["timestamp"], "deferral": event.get("deferral"), "parked": event.get("parked")}
            )
        elif kind in EVENT_TYPES:
            self.transitions.append(
                {
                    "at": event["timestamp"],
                    "state": event.get("state"),
                    "previous": event.get("previous"),
                    "reason": event.get("reason"),
                    "trips": event.get("trips"),
                }
            )

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            consume_ready = self._receiver.on_consume_ready

            def ready(*args: Any, **kwargs: Any) -> None:
                consume_ready(*args, **kwargs)
                self._ready.set()

            self._receiver.on_consume_ready = ready
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise SystemExit("outage_timeline: the event receiver did not start")

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)


class Outcomes:
    """The tasks' own records of completions and failures (lists in Redis), read as they grow."""

    def __init__(self, client: redis.Redis, done_key: str, failed_key: str) -> None:
        self.client = client
        self.keys = {"done": done_key, "failed": failed_key}
        self.entries: dict[str, list[tuple[int, float]]] = {"done": [], "failed": []}
        self.accounted: set[int] = set()

    def read(self) -> None:
        for kind, key in self.keys.items():
            seen = self.entries[kind]
            for raw in self.client.lrange(key, len(seen), -1):
                n, at = (raw.decode() if isinstance(raw, bytes) else str(raw)).split()
                seen.append((int(n), float(at)))
                self.accounted.add(int(n))

    def all_below(self, count: int) -> bool:
        """Whether every task ``n < count`` has completed or failed."""
        return len(self.accounted) >= count and all(n in self.accounted for n in range(count))


@contextlib.contextmanager
def workers(env: dict[str, str], log_dir: Path) -> Iterator[list[Worker]]:
    """Both workers, started at once (start-ups overlap); SIGTERMed together on leaving."""
    started = [Worker(env, log_dir / f"worker{i}.log", app="outage_app", name=f"outage{i}") for i in range(WORKERS)]
    try:
        yield started
    finally:
        for worker in started:
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        for worker in started:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


def check_alive(started: list[Worker]) -> None:
    for worker in started:
        if not worker.alive():
            raise SystemExit(f"outage_timeline: a worker exited:\n{worker.log_tail()}")


def sample(store_url: str, broker: redis.Redis, breaker: str, t0: float) -> Sample:
    rows = [row for row in collect_metrics(store_url) if row.snapshot.name == breaker]
    queued = int(broker.llen(QUEUE))
    if not rows:  # before the first call reaches the store
        return Sample(time.time() - t0, "closed", 0, 0, 0, 0, 0, 0, queued)
    row = rows[0]
    snap = row.snapshot
    return Sample(
        t=time.time() - t0,
        state=snap.state.value,
        trips=snap.trips,
        deferrals=snap.deferrals,
        failures=snap.failures,
        successes=snap.successes,
        parked=row.parked,
        claimed=row.claimed,
        queued=queued,
    )


# -- one run ---------------------------------------------------------------------------


@dataclass
class Timeline:
    """Everything one run recorded; times are seconds since time 0 (the first publish)."""

    scenario: Scenario
    t0: float = 0.0
    outage_start: float = 0.0
    outage_end: float = 0.0
    published_at_recovery: int = 0
    closed_at: float | None = None  # the breaker-closed event after the recovery
    drained_at: float | None = None
    end: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    requests: list[tuple[float, str, str]] = field(default_factory=list)  # (t, phase, answer)
    published: list[float] = field(default_factory=list)
    completed: list[tuple[int, float]] = field(default_factory=list)
    failed: list[tuple[int, float]] = field(default_factory=list)
    deferred: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)


def run(scenario: Scenario, server: RedisServer, log_dir: Path) -> Timeline:
    ns = f"bench-outage-{uuid.uuid4().hex[:6]}"
    store_url = f"{server.url(1)}?key_prefix={ns}"
    env = {
        "BENCH_BROKER": server.url(0),
        "BENCH_BREAKER_URL": store_url,
        "BENCH_NS": ns,
        "BENCH_POLICY": json.dumps(scenario.policy),
        "BENCH_EXTRA_CONF": json.dumps(scenario.extra_conf),
    }
    os.environ.update(env)  # before outage_app is imported here: it reads them at import
    import outage_app

    broker = redis.Redis.from_url(server.url(0))
    outcomes = Outcomes(broker, outage_app.done_key(ns), outage_app.failed_key(ns))
    line = Timeline(scenario)
    with Downstream() as downstream:
        events = EventLog(outage_app.app)
        events.start()
        try:
            with workers(env, log_dir) as started:
                deadline = time.monotonic() + 90
                while int(broker.get(outage_app.ready_key(ns)) or 0) < WORKERS:
                    check_alive(started)
                    if time.monotonic() > deadline:
                        raise SystemExit(f"outage_timeline: workers not ready; logs in {log_dir}")
                    time.sleep(SAMPLE_S)  # polling starting processes
                publisher = Publisher(outage_app.app, outage_app.TASK, downstream.url, scenario.rate)
                line.t0 = time.time()
                publisher.start(line.t0)
                try:
                    drive(
                        scenario,
                        line,
                        downstream,
                        publisher,
                        outcomes,
                        started,
                        lambda: sample(store_url, broker, outage_app.BREAKER_NAME, line.t0),
                    )
                finally:
                    publisher.stop()
                line.published = [at - line.t0 for at in publisher.sent]
                finish(line, outcomes, started, publisher.count)
        finally:
            events.stop()
        line.requests = [(r.at - line.t0, r.phase, r.answer) for r in downstream.requests()]
    line.completed = [(n, at - line.t0) for n, at in outcomes.entries["done"]]
    line.failed = [(n, at - line.t0) for n, at in outcomes.entries["failed"]]
    line.deferred = [{**d, "at": d["at"] - line.t0} for d in events.deferred]
    line.transitions = [{**t, "at": t["at"] - line.t0} for t in events.transitions]
    line.closed_at = next(
        (t["at"] for t in line.transitions if t["state"] == "closed" and t["at"] >= line.outage_end), None
    )
    return line


def drive(
    scenario: Scenario,
    line: Timeline,
    downstream: Downstream,
    publisher: Publisher,
    outcomes: Outcomes,
    started: list[Worker],
    take: Callable[[], Sample],
) -> None:
    """Sample every ~100 ms; start and end the outage on time; stop ``tail_s`` after the drain."""
    planned = scenario.warm_s + scenario.outage_s
    phase = "before"
    tick = time.time()
    while True:
        tick += SAMPLE_S
        time.sleep(max(0.0, tick - time.time()))  # the sampling period
        check_alive(started)
        now = time.time() - line.t0
        if phase == "before" and now >= scenario.warm_s:
            downstream.outage(True)
            line.outage_start, phase = time.time() - line.t0, "outage"
        elif phase == "outage" and now >= planned:
            downstream.outage(False)
            line.outage_end, phase = time.time() - line.t0, "after"
            line.published_at_recovery = publisher.count
        snap = take()
        line.samples.append(snap)
        outcomes.read()
        if phase == "after" and line.drained_at is None and drained(snap, outcomes, line.published_at_recovery):
            line.drained_at = snap.t
        if line.drained_at is not None and now >= line.drained_at + scenario.tail_s:
            return
        if now > planned + SLACK_S + 3 * scenario.outage_s:
            raise SystemExit(f"outage_timeline: not drained in time after the outage; last sample {snap}")


def drained(snap: Sample, outcomes: Outcomes, published_before_recovery: int) -> bool:
    return (
        snap.state == "closed"
        and snap.parked == 0
        and snap.claimed == 0
        and outcomes.all_below(published_before_recovery)
    )


def finish(line: Timeline, outcomes: Outcomes, started: list[Worker], published: int) -> None:
    """Wait until every published task has completed or failed (the stream has stopped)."""
    deadline = time.monotonic() + 60
    while True:
        outcomes.read()
        if outcomes.all_below(published):
            break
        check_alive(started)
        if time.monotonic() > deadline:
            missing = published - len(outcomes.accounted)
            print(f"outage_timeline: {missing} published task(s) neither completed nor failed after 60 s")
            break
        time.sleep(SAMPLE_S)  # polling the workers' progress
    line.end = time.time() - line.t0


# -- figures --------------------------------------------------------------------------


def binned(times: list[float], end: float) -> list[int]:
    """How many of ``times`` fall in each ``BIN_S`` bin from 0 to ``end``."""
    counts = [0] * (int(end / BIN_S) + 1)
    for at in times:
        if 0 <= at <= end:
            counts[int(at / BIN_S)] += 1
    return counts


def series(line: Timeline) -> dict[str, Any]:
    end = line.end
    calls_ok = [t for t, _, answer in line.requests if answer == "ok"]
    calls_failed = [t for t, _, answer in line.requests if answer != "ok"]
    return {
        "bin_s": BIN_S,
        "t": [i * BIN_S for i in range(int(end / BIN_S) + 1)],
        "downstream_ok": binned(calls_ok, end),
        "downstream_failed": binned(calls_failed, end),
        "deferrals": binned([d["at"] for d in line.deferred], end),
        "completions": binned([at for _, at in line.completed], end),
        "failures": binned([at for _, at in line.failed], end),
        "published": binned(line.published, end),
    }


def summary(line: Timeline) -> dict[str, Any]:
    scenario = line.scenario
    in_outage = [r for r in line.requests if r[1] == "outage"]
    trips = max((s.trips for s in line.samples), default=0)
    slack = WORKERS * CONCURRENCY - 1
    done_ids = [n for n, _ in line.completed]
    failed_ids = {n for n, _ in line.failed}
    published = len(line.published)
    in_window = sum(1 for t in line.published if line.outage_start <= t < line.outage_end)
    return {
        "outage_s": round(line.outage_end - line.outage_start, 2),
        "published": published,
        "published_during_outage": in_window,
        "downstream_calls_during_outage": len(in_outage),
        "downstream_calls_bound": scenario.failure_threshold + slack + trips * scenario.half_open_max_calls,
        "bound_formula": f"failure_threshold {scenario.failure_threshold} + in-flight slack {slack} "
        f"+ trips {trips} x half_open_max_calls {scenario.half_open_max_calls}",
        "ok_answers_during_outage": sum(1 for r in in_outage if r[2] == "ok"),
        "trips": trips,
        "deferrals": len(line.deferred),
        "deferred_again": sum(1 for d in line.deferred if (d.get("deferral") or 1) > 1),
        "peak_parked": max((s.parked for s in line.samples), default=0),
        "close_after_recovery_s": None if line.closed_at is None else round(line.closed_at - line.outage_end, 2),
        "drain_after_recovery_s": None if line.drained_at is None else round(line.drained_at - line.outage_end, 2),
        "completed": len(set(done_ids)),
        "failed": len(failed_ids),
        "duplicates": len(done_ids) - len(set(done_ids)),
        "lost": published - len(set(done_ids) | failed_ids),
        "run_s": round(line.end, 1),
    }


def as_json(line: Timeline, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "scenario": {**asdict(line.scenario), "policy": line.scenario.policy},
        "phases": {
            "outage_start": line.outage_start,
            "outage_end": line.outage_end,
            "closed": line.closed_at,
            "drained": line.drained_at,
            "end": line.end,
        },
        "summary": summary(line),
        "series": series(line),
        "samples": {name: [getattr(s, name) for s in line.samples] for name in Sample.__dataclass_fields__},
        "transitions": line.transitions,
        "raw": {
            "downstream": line.requests,
            "published": line.published,
            "completed": line.completed,
            "failed": line.failed,
            "deferred": line.deferred,
        },
    }


def report(line: Timeline) -> str:
    s = summary(line)
    close = "never" if s["close_after_recovery_s"] is None else f"{s['close_after_recovery_s']:.1f} s"
    drain = "never" if s["drain_after_recovery_s"] is None else f"{s['drain_after_recovery_s']:.1f} s"
    calls, bound = s["downstream_calls_during_outage"], s["downstream_calls_bound"]
    return "\n".join(
        [
            f"outage {s['outage_s']:.1f} s; {s['published_during_outage']:,} tasks published during it",
            f"downstream calls during the outage: {calls} (bound {bound} = {s['bound_formula']});"
            f" 200s during it: {s['ok_answers_during_outage']}",
            f"trips {s['trips']}; deferrals {s['deferrals']:,} (a task's second or later: {s['deferred_again']});"
            f" peak parked {s['peak_parked']:,}",
            f"recovery -> breaker closed: {close}; recovery -> drained (nothing parked, every task published"
            f" before the recovery run): {drain}",
            f"tasks: published {s['published']:,}, completed {s['completed']:,}, failed {s['failed']} (their call"
            f" failed while the breaker was closed), lost {s['lost']}, run twice {s['duplicates']};"
            f" recorded {s['run_s']:.1f} s",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 6 s outage at 20 tasks/s: a ~30 s smoke run")
    parser.add_argument("--rate", type=float, default=None, help="tasks published per second")
    parser.add_argument("--outage", type=float, default=None, help="seconds the downstream is down")
    parser.add_argument("--json", type=Path, default=None, help="write every series here")
    options = parser.parse_args()
    scenario = QUICK if options.quick else DEFAULT
    if options.rate is not None:
        scenario = Scenario(**{**asdict(scenario), "rate": options.rate})
    if options.outage is not None:
        scenario = Scenario(**{**asdict(scenario), "outage_s": options.outage})
    sys.path.insert(0, str(BENCH))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp, RedisServer() as server:
        redis_version = server.version()
        line = run(scenario, server, Path(tmp))
    meta = {
        "python": platform.python_version(),
        "celery": version("celery"),
        "kombu": version("kombu"),
        "redis-py": version("redis"),
        "redis-server": redis_version,
        "cpus": os.cpu_count(),
        "workers": f"{WORKERS} x prefork -c {CONCURRENCY}",
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(f"One outage, end to end ({', '.join(f'{k} {v}' for k, v in meta.items())})")
    print(f"scenario: {asdict(scenario)}")
    print(report(line))
    if options.json is not None:
        options.json.write_text(json.dumps(as_json(line, meta), indent=1))


if __name__ == "__main__":
    main()
