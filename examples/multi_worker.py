"""Two prefork workers share one breaker in Redis: one trip stops the calls of every process.

    python examples/multi_worker.py

Uses ``$REDIS_URL`` when set (broker, results and breaker store; the run keeps to keys
and a queue named ``multi-worker-demo-<pid>``), otherwise starts its own ``redis-server``
(on PATH) on a free loopback port in a temporary directory, stopped at exit. Then it
starts two real workers, ``celery -A multi_worker_app worker -P prefork -c 2 -n w1@%h``
and ``w2``, an "inventory API" (a small HTTP server in this process, answering 503
from second 1 to second 3.5 of the run) and sends ``check_stock`` tasks throughout.

Three failures in any process open the ``inventory-api`` breaker for all four
processes; each half-open period admits one probe cluster-wide; deferred tasks wait
parked in Redis and run once a probe finds the API back. The script prints the
timeline, the API calls made during the outage, the deferrals and completions per
worker, and exits non-zero unless every task completed, both workers deferred tasks
after the first trip and before any probe, and the outage saw only a handful of calls.
Workers are stopped with SIGTERM (a warm shutdown) at the end, on Ctrl-C and on error.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import TimeoutError as ResultTimeout

from celery_breaker.storage import close_stores

HERE = Path(__file__).resolve().parent
WORKERS = ("w1", "w2")
CONCURRENCY = 2  # pool processes per worker
OUTAGE = (1.0, 3.5)  # seconds after the first task: the inventory API answers 503 in between
TASKS = 80
SEND_EVERY = 0.05  # seconds between tasks: 20 a second, through the outage
FAILURE_THRESHOLD = 3  # as in multi_worker_app's policy


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """``$REDIS_URL``, or a redis-server of our own for the length of the block."""
    given = os.environ.get("REDIS_URL")
    if given:
        print(f"redis: {given} ($REDIS_URL)")
        yield given
        return
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not on PATH: install Redis, or set REDIS_URL=redis://host:port/db")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="multi-worker-redis-") as directory:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
             "--save", "", "--appendonly", "no", "--logfile", str(Path(directory) / "redis.log")],
            start_new_session=True,  # Ctrl-C reaches this script only: it stops Redis last, itself
        )  # fmt: skip
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.05)  # redis-server is starting
            client.close()
            print(f"redis: started redis-server on 127.0.0.1:{port} (stopped at exit)")
            yield url
        finally:
            server.terminate()
            server.wait(timeout=10)


class InventoryAPI:
    """The downstream: 503 during the outage, 200 otherwise; counts calls per phase."""

    def __init__(self) -> None:
        self.start: float | None = None  # time.time() of the first task; the outage is relative to it
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def down(self) -> bool:
        return self.start is not None and OUTAGE[0] <= time.time() - self.start < OUTAGE[1]

    def _answer(self) -> int:
        down = self.down()
        with self._lock:
            self.calls["during outage" if down else "while healthy"] += 1
        return 503 if down else 200

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status = api._answer()
                body = b"in stock" if status == 200 else b"unavailable"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        return Handler

    @contextlib.contextmanager
    def serving(self) -> Iterator[InventoryAPI]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


def short(worker: str) -> str:
    return worker.split("@", 1)[0]


@contextlib.contextmanager
def celery_workers(env: dict[str, str], logs: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``celery worker`` processes; SIGTERM (warm shutdown) and wait for them on leaving."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name in WORKERS:
            with (logs / f"{name}.log").open("wb") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "multi_worker_app", "worker", "-P", "prefork",
                     "-c", str(CONCURRENCY), "-n", f"{name}@%h", "--loglevel", "WARNING",
                     "--without-gossip", "--without-mingle"],
                    cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # stopped by this script (SIGTERM), not by the Ctrl-C
                ))  # fmt: skip
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(app: Any, processes: list[subprocess.Popen[bytes]], logs: Path, timeout: float = 60) -> list[str]:
    """Ping until every worker answers; the node names that did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in zip(WORKERS, processes, strict=True):
            if process.poll() is not None:
                log = (logs / f"{name}.log").read_text(errors="replace")
                raise RuntimeError(f"worker {name} exited with {process.returncode}:\n{log}")
        # (only ours: other workers on a shared $REDIS_URL answer the broadcast ping too)
        replies = app.control.ping(timeout=0.5)
        answered = sorted(node for reply in replies for node in reply if node.partition("@")[0] in WORKERS)
        if len(answered) == len(WORKERS):
            return answered
    raise RuntimeError(f"workers not ready after {timeout} s")


class BreakerWatch(threading.Thread):
    """Polls the shared breaker and notes each change of state (with its trip count)."""

    def __init__(self, breaker: Any, start: float) -> None:
        super().__init__(daemon=True)
        self.breaker = breaker
        self.start_at = start
        self.changes: list[tuple[float, str]] = []
        self.trip_times: dict[int, float] = {}  # trip number -> when it opened (epoch s)
        self.stopping = threading.Event()

    def run(self) -> None:
        seen = None
        while not self.stopping.wait(0.02):
            snapshot = self.breaker.snapshot()
            if snapshot.trips and snapshot.opened_at and snapshot.trips not in self.trip_times:
                self.trip_times[snapshot.trips] = snapshot.opened_at
            current = (snapshot.state.value, snapshot.trips)
            if current not in (seen, ("closed", 0)):
                seen = current
                when = snapshot.opened_at if current[0] == "open" and snapshot.opened_at else time.time()
                self.changes.append((when - self.start_at, describe(*current)))


def describe(state: str, trips: int) -> str:
    if state == "open":
        return "breaker opens (trip 1)" if trips == 1 else f"a probe fails: breaker opens again (trip {trips})"
    if state == "closed":
        return "a probe succeeds: breaker closed"
    return f"breaker {state}"


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on SIGTERM as on Ctrl-C
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    began = time.monotonic()
    api = InventoryAPI()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_url())
        stack.callback(close_stores)  # done with Redis before it stops: no lost-channel warnings
        prefix = "multi-worker-demo" if not os.environ.get("REDIS_URL") else f"multi-worker-demo-{os.getpid()}"
        os.environ.update(DEMO_REDIS_URL=url, DEMO_DOWNSTREAM_URL=api.url, DEMO_PREFIX=prefix)
        # Imported now: the module reads the environment just set (the workers read theirs).
        demo: Any = importlib.import_module("multi_worker_app")

        stack.callback(cleanup, url, prefix)
        stack.enter_context(api.serving())
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="multi-worker-logs-")))
        env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        processes = stack.enter_context(celery_workers(env, logs))
        nodes = wait_ready(demo.app, processes, logs)
        print(f"workers: {', '.join(nodes)} (prefork, {CONCURRENCY} processes each), "
              f"ready {time.monotonic() - began:.1f} s after start")  # fmt: skip

        api.start = start = time.time()
        watch = BreakerWatch(demo.check_stock.breaker, start)
        watch.start()
        results: list[Any] = []
        # Drop their subscriptions and stored results while Redis is up (an interrupted run too).
        stack.callback(lambda: [result.forget() for result in results])
        for item in range(TASKS):
            results.append(demo.check_stock.delay(item))
            time.sleep(SEND_EVERY)  # a steady stream of tasks, through the outage
        values, failed, lost = [], 0, 0
        for result in results:
            try:
                values.append(result.get(timeout=30))
            except ResultTimeout:  # still waiting somewhere: lost, as far as this run can tell
                lost += 1
                print(f"task {result.id} never completed")
            except Exception as exc:  # report, don't hide
                failed += 1
                print(f"task {result.id} failed: {exc!r}")
        watch.stopping.set()
        watch.join()
        snapshot = demo.check_stock.breaker.snapshot()
        stats = demo.stats()
        deferrals = {short(k.decode()): int(v) for k, v in stats.hgetall(demo.DEFERRALS_KEY).items()}
        firsts = {short(k.decode()): float(v) - start for k, v in stats.hgetall(demo.FIRST_DEFERRAL_KEY).items()}
    return report(api, watch, start, values, failed, lost, deferrals, firsts, snapshot, time.monotonic() - began)


def report(
    api: InventoryAPI,
    watch: BreakerWatch,
    start: float,
    values: list[dict[str, Any]],
    failed: int,
    lost: int,
    deferrals: dict[str, int],
    firsts: dict[str, float],
    snapshot: Any,
    took: float,
) -> int:
    timeline = [*watch.changes, (OUTAGE[0], "inventory API goes DOWN"), (OUTAGE[1], "inventory API comes back UP")]
    timeline += [(at, f"{worker} defers its first task") for worker, at in firsts.items()]
    print("timeline (seconds after the first task)")
    for at, text in sorted(timeline):
        print(f"  {at:5.2f} s  {text}")
    print()
    first_trip = watch.trip_times.get(1, float("inf")) - start
    second_trip = watch.trip_times.get(2, float("inf")) - start
    # Every worker deferred tasks after trip 1 and before any probe could trip it again
    # (0.1 s of slack: opened_at is the store's clock, the deferral times the workers').
    one_trip = len(firsts) == len(WORKERS) and all(first_trip - 0.1 <= at < second_trip for at in firsts.values())
    after = ", ".join(f"{worker} {at - first_trip:+.2f} s" for worker, at in sorted(firsts.items()))
    print(f"one trip opened the breaker in every worker: {one_trip} "
          f"(first deferral after trip 1: {after or 'none'})")  # fmt: skip
    during = api.calls["during outage"]
    sent_during = int((OUTAGE[1] - OUTAGE[0]) / SEND_EVERY)
    # Calls that trip it (with a few in flight in the other processes), then one probe per half-open period.
    allowed = FAILURE_THRESHOLD + len(WORKERS) * CONCURRENCY + snapshot.trips
    print(f"inventory API calls during the outage: {during} (tasks sent during it: about {sent_during}; "
          f"trips {snapshot.trips}, one probe at a time across {len(WORKERS) * CONCURRENCY} processes)")  # fmt: skip
    completed = Counter(short(v["worker"]) for v in values)
    print(f"tasks sent {TASKS}, completed {len(values)} "
          f"({', '.join(f'{w} {n}' for w, n in sorted(completed.items()))}), failed {failed}, "
          f"lost {lost}")  # fmt: skip
    print(f"deferrals per worker: {', '.join(f'{w} {n}' for w, n in sorted(deferrals.items())) or 'none'}; "
          f"tasks deferred {sum(1 for v in values if v['deferrals'])}, "
          f"retries spent {sum(v['retries'] for v in values)}")  # fmt: skip
    print(f"breaker now {snapshot.state.value}: trips {snapshot.trips}, rejections {snapshot.rejections}, "
          f"deferrals {snapshot.deferrals}; run took {took:.1f} s")  # fmt: skip
    shown = one_trip and during <= allowed and len(values) == TASKS
    return 0 if shown else 1


def cleanup(url: str, prefix: str) -> None:
    """Delete this run's keys from the Redis: breaker state and parked tasks (``{prefix:...}``),
    the demo's counters, and the queue's bindings."""
    client = redis.Redis.from_url(url)
    with contextlib.suppress(redis.RedisError):
        for pattern in (
            f"{{{prefix}:*",
            f"{prefix}:*",
            f"_kombu.binding.{prefix}",
            f"_kombu.binding_permanent.{prefix}",
        ):
            for key in client.scan_iter(match=pattern, count=500):
                client.delete(key)
    client.close()


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # (workers and Redis were stopped on the way out)
        print("interrupted")
        raise SystemExit(130) from None
