"""Memory of a deferred backlog: a real prefork worker holding N deferred tasks, countdown deferral against parking.

Run ``python bench/backlog_memory.py`` (100,000 tasks per mode, several minutes),
``--quick`` for a CI smoke run (2,000 tasks, under 60 s), ``--json PATH`` to also write
every figure. A benchmark, not a test: it reports, it never fails on a figure.

For each mode, in one run and on one redis-server the bench starts on a free loopback
port (broker on db 0, breaker store on db 1):

1. The breaker is forced open (``CircuitBreaker(name, storage=url).force_open()``)
   before the worker starts, so every task is deferred and none runs.
2. ``celery -A backlog_app worker -P prefork -c 2`` starts; once it is ready (and its
   pool children are up) the worker's RSS (main process, pool children; ``/proc``) and
   Redis ``used_memory`` are read: *before*.
3. N tasks are published (``--publish pipeline``: one message built by Celery, then
   copied with fresh ids and LPUSHed in pipelines; ``apply_async``: Celery's own
   publishing in a loop with one producer).
4. The bench polls until the breaker's ``snapshot().deferrals`` reaches N (every task
   deferred once; with reset_timeout 600 s none comes back during the run) and the
   broker queue is empty (every message a deferral published has been taken); RSS is
   sampled at every poll (the peak is reported). Then RSS and ``used_memory``: *after*.
5. SIGTERM, and the time until the worker has exited. Then the messages back on the
   queue (a warm shutdown gives held ETA messages back to the broker).

Modes: ``naive`` (``breaker_park=False`` once that setting exists; before parking it is
the only deferral there is: a countdown message the worker holds in RAM) and ``park``
(``breaker_park=True``; skipped with a message while the setting is unknown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
from redis_meter import RedisServer, TreeRss, process_tree_cpu, process_tree_rss

from celery_breaker import CircuitBreaker
from celery_breaker.integration.settings import SETTINGS

BENCH = Path(__file__).resolve().parent
QUEUE = "celery"
MODES = ("naive", "park")
#: Messages per pipeline when pushing pre-built messages.
PIPELINE_BATCH = 2_000
POLL_S = 0.2  # between polls of the worker's progress


def mode_conf(mode: str) -> tuple[dict[str, Any] | None, str | None]:
    """(extra settings for the worker, or None with the reason the mode cannot run)."""
    known = "breaker_park" in SETTINGS
    if mode == "naive":
        return ({"breaker_park": False} if known else {}), None
    if not known:
        return None, "breaker_park is not a setting of this celery_breaker yet (parking not merged): skipped"
    return {"breaker_park": True}, None


@dataclass
class ModeRun:
    mode: str
    tasks: int
    skipped: str | None = None
    publish: str = ""
    publish_s: float = 0.0
    settle_s: float = 0.0  # publishing started -> every task deferred once, queue empty
    deferrals: int = 0
    held_unacked: int = 0  # messages the worker holds unacknowledged (the broker's unacked hash)
    before: TreeRss | None = None
    after: TreeRss | None = None
    peak_main: int = 0
    peak_total: int = 0
    worker_cpu_s: float | None = None  # the worker and its pool children, publish -> settled
    redis_before: int = 0  # used_memory, bytes
    redis_after: int = 0
    shutdown_s: float = 0.0
    exit_code: int | None = None
    queued_after_shutdown: int = 0
    extra_conf: dict[str, Any] = field(default_factory=dict)

    @property
    def main_growth(self) -> int:
        return 0 if self.before is None or self.after is None else self.after.main - self.before.main

    @property
    def children_growth(self) -> int:
        return 0 if self.before is None or self.after is None else self.after.children - self.before.children

    @property
    def redis_growth(self) -> int:
        return self.redis_after - self.redis_before

    def per_1k(self, value: int) -> float:
        return value / self.tasks * 1000


class Worker:
    """``celery -A <app> worker -P prefork -c 2`` (``backlog_app`` by default) in a subprocess, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path, *, app: str = "backlog_app", name: str = "backlog") -> None:
        full = {**os.environ, **env, "PYTHONPATH": str(BENCH) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork", "-c", "2",
                 "-n", f"{name}-{os.getpid()}@%h", "--loglevel", "WARNING", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=BENCH, env=full, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def terminate(self) -> tuple[float, int]:
        """SIGTERM (a warm shutdown); (seconds until it exited, its exit code)."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return time.monotonic() - start, code

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()


def until(predicate: Callable[[], bool], deadline: float, what: str, worker: Worker) -> None:
    """Poll ``predicate`` (a real process getting somewhere) until it holds."""
    while not predicate():
        if not worker.alive():
            raise SystemExit(f"backlog_memory: the worker exited while waiting for {what}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"backlog_memory: timed out waiting for {what}; worker log {worker.log}")
        time.sleep(POLL_S)  # polling a real process's progress


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


# -- publishing -------------------------------------------------------------------


def template_message(server: RedisServer, args: tuple[str, str]) -> dict[str, Any]:
    """One message exactly as Celery publishes it, taken from a scratch db (2)."""
    import backlog_app

    scratch = server.url(2)
    with backlog_app.app.connection_for_write(scratch) as connection:
        producer = backlog_app.app.amqp.Producer(connection, auto_declare=True)
        backlog_app.app.send_task(backlog_app.TASK, args=args, producer=producer)
    raw = redis.Redis.from_url(scratch).rpop(QUEUE)
    if not isinstance(raw, bytes):
        raise SystemExit("backlog_memory: could not capture a template message")
    message: dict[str, Any] = json.loads(raw)
    redis.Redis.from_url(scratch).flushdb()
    return message


def publish_pipeline(server: RedisServer, broker: redis.Redis, tasks: int, args: tuple[str, str]) -> None:
    """Copies of one Celery-built message, each with its own task id and delivery tag."""
    template = template_message(server, args)
    headers, properties = template["headers"], template["properties"]
    pipe = broker.pipeline(transaction=False)
    for n in range(tasks):
        task_id = str(uuid.uuid4())
        message = {
            **template,
            "headers": {**headers, "id": task_id, "root_id": task_id},
            "properties": {**properties, "correlation_id": task_id, "delivery_tag": str(uuid.uuid4())},
        }
        pipe.lpush(QUEUE, json.dumps(message))
        if (n + 1) % PIPELINE_BATCH == 0:
            pipe.execute()
    pipe.execute()


def publish_apply_async(tasks: int, args: tuple[str, str]) -> None:
    import backlog_app

    with backlog_app.app.producer_or_acquire() as producer:
        for _ in range(tasks):
            backlog_app.app.send_task(backlog_app.TASK, args=args, producer=producer)


# -- one mode ---------------------------------------------------------------------


def run_mode(server: RedisServer, mode: str, tasks: int, publish: str, payload: int, log: Path) -> ModeRun:
    extra, skipped = mode_conf(mode)
    run = ModeRun(mode, tasks, skipped=skipped, publish=publish)
    if extra is None:
        return run
    run.extra_conf = extra
    broker = redis.Redis.from_url(server.url(0))
    broker.flushall()
    prefix = f"bench-backlog-{mode}-{uuid.uuid4().hex[:6]}"
    store_url = f"{server.url(1)}?key_prefix={prefix}"
    ready_key = f"bench:backlog:ready:{mode}"
    env = {"BENCH_BROKER": server.url(0), "BENCH_BREAKER_URL": store_url,
           "BENCH_EXTRA_CONF": json.dumps(extra), "BENCH_READY_KEY": ready_key}  # fmt: skip
    os.environ.update(env)
    import backlog_app

    backlog_app.app.conf.update(broker_url=server.url(0), breaker_storage_url=store_url)
    observer = CircuitBreaker(backlog_app.BREAKER_NAME, backlog_app.POLICY, storage=store_url)
    observer.force_open()
    worker = Worker(env, log)
    try:
        deadline = time.monotonic() + 60

        def ready() -> bool:
            rss = process_tree_rss(worker.process.pid)
            return broker.exists(ready_key) == 1 and rss is not None and rss.child_count >= 2

        until(ready, deadline, "the worker to be ready", worker)
        run.before = process_tree_rss(worker.process.pid)
        run.redis_before = used_memory(broker)
        args = (f"{prefix}:done", "x" * payload)
        cpu_before = process_tree_cpu(worker.process.pid)
        began = time.monotonic()
        if publish == "pipeline":
            publish_pipeline(server, broker, tasks, args)
        else:
            publish_apply_async(tasks, args)
        run.publish_s = time.monotonic() - began

        def settled() -> bool:
            rss = process_tree_rss(worker.process.pid)
            if rss is not None:
                run.peak_main = max(run.peak_main, rss.main)
                run.peak_total = max(run.peak_total, rss.total)
            run.deferrals = observer.snapshot().deferrals
            return run.deferrals >= tasks and broker.llen(QUEUE) == 0

        until(settled, time.monotonic() + 120 + tasks / 50, f"{tasks} deferrals and an empty queue", worker)
        run.settle_s = time.monotonic() - began
        cpu_after = process_tree_cpu(worker.process.pid)
        if cpu_before is not None and cpu_after is not None:
            run.worker_cpu_s = cpu_after - cpu_before
        run.after = process_tree_rss(worker.process.pid)
        run.redis_after = used_memory(broker)
        run.held_unacked = int(broker.hlen("unacked"))
        done = int(broker.get(f"{prefix}:done") or 0)
        if done:
            raise SystemExit(f"backlog_memory: {done} tasks ran although the breaker was forced open")
        run.shutdown_s, run.exit_code = worker.terminate()
        run.queued_after_shutdown = int(broker.llen(QUEUE))
    finally:
        worker.kill()
        observer.reset()
    return run


# -- report -----------------------------------------------------------------------


def mb(value: int) -> str:
    return f"{value / 1e6:,.1f}"


def growth(run: ModeRun, value: int) -> str:
    return f"{mb(value)} MB ({run.per_1k(value) / 1e3:,.0f} KB per 1k tasks)"


def cpu_per_task(run: ModeRun) -> str:
    return "?" if run.worker_cpu_s is None else f"{run.worker_cpu_s * 1000 / run.tasks:.2f} ms"


def report(runs: list[ModeRun]) -> str:
    done = [r for r in runs if r.skipped is None]
    lines = []
    if done:
        header = "| figure | " + " | ".join(r.mode for r in done) + " |"
        lines += [header, "|---|" + "---|" * len(done)]
        rows: list[tuple[str, Callable[[ModeRun], str]]] = [
            ("tasks published", lambda r: f"{r.tasks:,} ({r.publish}, {r.tasks / r.publish_s:,.0f}/s)"),
            ("publish → all deferred once, queue empty", lambda r: f"{r.settle_s:.1f} s"),
            ("deferrals counted (snapshot)", lambda r: f"{r.deferrals:,}"),
            ("worker CPU per deferred task", cpu_per_task),
            ("messages held unacked by the worker", lambda r: f"{r.held_unacked:,}"),
            ("main RSS before → after (MB)", lambda r: f"{mb(r.before.main if r.before else 0)} → "
                                                      f"{mb(r.after.main if r.after else 0)}"),
            ("main RSS growth", lambda r: growth(r, r.main_growth)),
            ("pool children RSS growth (both)", lambda r: growth(r, r.children_growth)),
            ("peak RSS: main / whole worker (MB)", lambda r: f"{mb(r.peak_main)} / {mb(r.peak_total)}"),
            ("Redis used_memory growth", lambda r: growth(r, r.redis_growth)),
            ("SIGTERM → exited", lambda r: f"{r.shutdown_s:.1f} s (exit {r.exit_code})"),
            ("messages back on the queue after shutdown", lambda r: f"{r.queued_after_shutdown:,}"),
        ]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(cell(r) for r in done) + " |" for name, cell in rows]
    lines += [f"{r.mode}: {r.skipped}" for r in runs if r.skipped is not None]
    return "\n".join(lines)


def as_json(runs: list[ModeRun], meta: dict[str, Any]) -> dict[str, Any]:
    out = []
    for run in runs:
        entry = asdict(run)
        entry.update(main_growth=run.main_growth, children_growth=run.children_growth, redis_growth=run.redis_growth)
        out.append(entry)
    return {"meta": meta, "runs": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=None, help="tasks per mode (default 100,000; --quick 2,000)")
    parser.add_argument("--quick", action="store_true", help="2,000 tasks per mode: a smoke run under 60 s")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: naive,park")
    parser.add_argument("--publish", choices=("pipeline", "apply_async"), default="pipeline")
    parser.add_argument("--payload", type=int, default=0, help="bytes of string argument per task")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    options = parser.parse_args()
    tasks = options.tasks or (2_000 if options.quick else 100_000)
    modes = [m for m in options.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    sys.path.insert(0, str(BENCH))
    handle, name = tempfile.mkstemp(prefix="bench-backlog-", suffix=".log")
    os.close(handle)
    log = Path(name)
    started = time.monotonic()
    with RedisServer() as server:
        redis_version = server.version()
        runs = [run_mode(server, mode, tasks, options.publish, options.payload, log) for mode in modes]
    meta = {
        "python": platform.python_version(), "celery": version("celery"), "kombu": version("kombu"),
        "redis-py": version("redis"), "redis-server": redis_version, "cpus": os.cpu_count(),
        "tasks": tasks, "payload": options.payload, "wall_s": round(time.monotonic() - started, 1),
    }  # fmt: skip
    print(f"Deferred backlog, forced-open breaker, prefork -c 2 ({', '.join(f'{k} {v}' for k, v in meta.items())})")
    print(report(runs))
    log.unlink()
    if options.json is not None:
        options.json.write_text(json.dumps(as_json(runs, meta), indent=2, default=str))


if __name__ == "__main__":
    main()
