"""Celery no-op throughput (section 3 of bench/redis_store.py): real prefork workers, plain task against breakers.

Each run publishes every task first (no worker running), then starts
``celery -A celery_app worker -P prefork -c 2`` and polls a done-counter that each
task increments. Tasks/s, and the CPU the worker processes and redis-server spend,
are measured from the first 2 % of tasks done to the last, so start-up is left out.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis_meter import RedisServer, process_tree_cpu, server_stats

from celery_breaker import CircuitBreaker

__all__ = [
    "CELERY_VARIANTS",
    "CeleryResults",
    "WorkerRun",
    "measure_celery",
    "median_cpu",
    "median_rate",
    "paired_ratios",
]

BENCH = Path(__file__).resolve().parent


@dataclass
class WorkerRun:
    variant: str
    round: int
    tasks: int
    publish_s: float
    startup_s: float  # worker started -> first 2 % done
    measured_tasks: int
    measured_s: float
    worker_cpu_s: float | None  # the worker and its pool processes, over the measured tasks
    redis_cpu_s: float  # redis-server (broker, breaker store, done-counter), same span

    @property
    def tasks_per_s(self) -> float:
        return self.measured_tasks / self.measured_s

    @property
    def cpu_ms_per_task(self) -> float | None:
        """Worker + redis-server CPU per task: what the machine spends, whatever else runs on it."""
        if self.worker_cpu_s is None:
            return None
        return (self.worker_cpu_s + self.redis_cpu_s) * 1000 / self.measured_tasks


CELERY_VARIANTS = {  # key: (label, task name in celery_app)
    "plain": ("plain task", "bench.noop_plain"),
    "breaker": ("BreakerTask, Redis store", "bench.noop_breaker"),
    "pybreaker": ("pybreaker+Redis in the body", "bench.noop_pybreaker"),
}


def _celery_env(server: RedisServer, prefix: str) -> dict[str, str]:
    """What bench/celery_app.py reads from the environment."""
    return {
        "BENCH_BROKER": server.url(0),
        "BENCH_BREAKER_URL": f"{server.url(1)}?key_prefix={prefix}-celery",
        "BENCH_PYBREAKER_REDIS": server.url(1),
    }


def _worker(server: RedisServer, prefix: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **_celery_env(server, prefix),
        "PYTHONPATH": str(BENCH) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "-P", "prefork", "-c", "2",
             "-n", f"bench-{os.getpid()}@%h", "--loglevel", "WARNING", "--without-gossip",
             "--without-mingle", "--without-heartbeat"],
            cwd=BENCH, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def one_worker_run(server: RedisServer, variant: str, round_: int, tasks: int, prefix: str, log: Path) -> WorkerRun:
    os.environ.update(_celery_env(server, prefix))
    import celery_app  # after the environment is set: the app reads it on import

    broker = redis.Redis.from_url(server.url(0))
    done_key = f"{prefix}:done:{variant}:{round_}"
    task_name = CELERY_VARIANTS[variant][1]
    start = time.monotonic()
    with celery_app.app.producer_or_acquire() as producer:
        for _ in range(tasks):
            celery_app.app.send_task(task_name, args=(done_key,), producer=producer)
    publish_s = time.monotonic() - start
    queued = broker.llen("celery")
    if queued != tasks:
        raise SystemExit(f"bench/redis_store.py: {queued} messages queued, expected {tasks}")

    warm = max(1, tasks // 50)
    deadline = time.monotonic() + 60 + tasks / 50
    worker = _worker(server, prefix, log)
    started = time.monotonic()
    first: tuple[float, int, float | None, float] | None = None  # when, done, worker CPU, redis CPU
    try:
        while True:
            done = int(broker.get(done_key) or 0)
            now = time.monotonic()
            if first is None and done >= warm:
                first = (now, done, process_tree_cpu(worker.pid), server_stats(broker)[1])
            if done >= tasks:
                end = now
                worker_cpu, redis_cpu = process_tree_cpu(worker.pid), server_stats(broker)[1]
                break
            if worker.poll() is not None or now > deadline:
                raise SystemExit(
                    f"bench/redis_store.py: worker ({variant}) stopped or stalled at {done}/{tasks}; see {log}"
                )
            time.sleep(0.01)  # polling the done-counter
    finally:
        _stop(worker)
    assert first is not None
    start_cpu = first[2]
    return WorkerRun(
        variant, round_, tasks, publish_s, first[0] - started, tasks - first[1], end - first[0],
        None if worker_cpu is None or start_cpu is None else worker_cpu - start_cpu, redis_cpu - first[3],
    )  # fmt: skip


@dataclass
class CeleryResults:
    runs: list[WorkerRun]
    breaker_successes: int  # what the breaker's snapshot() says after every run
    breaker_tasks: int  # tasks run under BreakerTask


def measure_celery(server: RedisServer, tasks: int, rounds: int, prefix: str) -> CeleryResults:
    handle, name = tempfile.mkstemp(prefix="bench-celery-", suffix=".log")
    os.close(handle)
    log = Path(name)
    variants = list(CELERY_VARIANTS)
    runs: list[WorkerRun] = []
    for round_ in range(rounds):
        for i in range(len(variants)):
            variant = variants[(round_ + i) % len(variants)]
            runs.append(one_worker_run(server, variant, round_, tasks, prefix, log))
    log.unlink()  # kept only when a run fails, for its worker's log
    import celery_app

    snapshot = CircuitBreaker(
        celery_app.BREAKER_NAME, celery_app.POLICY, storage=_celery_env(server, prefix)["BENCH_BREAKER_URL"]
    ).snapshot()
    return CeleryResults(runs, snapshot.successes, tasks * rounds)


def median_rate(runs: list[WorkerRun], variant: str) -> float:
    return statistics.median(r.tasks_per_s for r in runs if r.variant == variant)


def median_cpu(runs: list[WorkerRun], variant: str) -> float | None:
    """Median worker + redis-server CPU ms per task (None without /proc)."""
    found = [r.cpu_ms_per_task for r in runs if r.variant == variant]
    known = [cpu for cpu in found if cpu is not None]
    return statistics.median(known) if known and len(known) == len(found) else None


def paired_ratios(runs: list[WorkerRun], variant: str, figure: str) -> list[float]:
    """``variant``'s ``figure`` (``tasks_per_s`` or ``cpu_ms_per_task``) over plain's, round by round."""
    by_round = {(r.round, r.variant): getattr(r, figure) for r in runs}
    rounds = sorted({r.round for r in runs})
    return [by_round[(i, variant)] / by_round[(i, "plain")] for i in rounds]
