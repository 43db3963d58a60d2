"""How fast a trip in one process reaches every other process's local view (Redis store).

N observer processes each hold the same breaker on a Redis store and record when their
view hears each transition; the driver (this process) trips the breaker, waits until
every observer has heard it, closes it, and repeats. Latency = when an observer's view
changed minus when the driver *started* the tripping call (so it includes the driver's
own round trip). Reports p50/p99/max over every (trip, observer) pair.

    python bench/propagation.py [--observers 8] [--trips 100] [--url redis://...]

Without ``--url`` it starts its own redis-server on a free loopback port.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import statistics
import sys
import time
from contextlib import suppress
from multiprocessing.synchronize import Event
from typing import Any

from redis_meter import RedisServer

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.storage.redis import RedisStore

NAME = "propagation"


def _observe(url: str, heard: multiprocessing.Queue[Any], stop: Event) -> None:
    store = RedisStore.from_url(url)
    breaker = CircuitBreaker(NAME, {"failure_threshold": 1, "reset_timeout": 60.0}, storage=store)
    original = store.hear

    def hear(data: Any) -> None:  # the view has changed once this returns
        original(data)
        cell = store._cells.get((NAME, None))
        if cell is not None:
            heard.put((os.getpid(), cell.generation, cell.state.value, time.time()))

    store.hear = hear  # type: ignore[method-assign]
    deadline = time.monotonic() + 30
    while not store.live and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the agent's subscription, not waiting for time to pass
    breaker.call(int)  # read the view since subscribing: it passes calls from here on
    heard.put((os.getpid(), -1, "ready", time.time()))
    stop.wait()


def measure(url: str, observers: int = 8, trips: int = 100, timeout: float = 10.0) -> dict[str, Any]:
    """Trip and close ``trips`` times; return latencies (seconds) and what was missed."""
    context = multiprocessing.get_context("spawn")
    heard: multiprocessing.Queue[Any] = context.Queue()
    stop = context.Event()
    processes = [context.Process(target=_observe, args=(url, heard, stop), daemon=True) for _ in range(observers)]
    for process in processes:
        process.start()
    latencies: list[float] = []
    missed = 0
    try:
        ready = 0
        while ready < observers:
            if heard.get(timeout=60)[2] == "ready":
                ready += 1
        breaker = CircuitBreaker(NAME, {"failure_threshold": 1, "reset_timeout": 60.0}, storage=url)

        def boom() -> None:
            raise ConnectionError("partner down")

        for _ in range(trips):
            for target in (State.OPEN, State.CLOSED):
                started = time.time()
                if target is State.OPEN:
                    with suppress(ConnectionError, CircuitOpenError):
                        breaker.call(boom)
                else:
                    breaker.close()
                generation = breaker.snapshot().generation
                waiting = {process.pid for process in processes}
                deadline = time.monotonic() + timeout
                while waiting and time.monotonic() < deadline:
                    try:
                        pid, seen, _state, at = heard.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if seen >= generation and pid in waiting:
                        waiting.discard(pid)
                        if target is State.OPEN:
                            latencies.append(at - started)
                missed += len(waiting)
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    ordered = sorted(latencies)
    return {
        "observers": observers,
        "trips": trips,
        "samples": len(latencies),
        "missed": missed,
        "p50_ms": statistics.median(ordered) * 1000 if ordered else None,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000 if ordered else None,
        "max_ms": ordered[-1] * 1000 if ordered else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observers", type=int, default=8)
    parser.add_argument("--trips", type=int, default=100)
    parser.add_argument("--url", help="a Redis URL (default: start a redis-server)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    logging.getLogger("celery_breaker").setLevel(logging.ERROR)  # every trip is logged otherwise

    def run(url: str) -> dict[str, Any]:
        return measure(f"{url}{'&' if '?' in url else '?'}key_prefix=bench-{os.getpid()}", args.observers, args.trips)

    if args.url:
        result = run(args.url)
    else:
        with RedisServer() as server:
            result = run(server.url())
    print(
        f"trip propagation to {result['observers']} processes over {result['trips']} trips "
        f"({result['samples']} samples, {result['missed']} missed): "
        f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, max {result['max_ms']:.2f} ms"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 0 if result["missed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
