"""Many workers, many parked per-key breakers: what the releasers cost Redis while nothing can go.

Run ``python bench/idle_releasers.py`` (about a minute), ``--keys N`` for another number
of breakers, ``--workers 1,4,8`` for other fleet sizes, ``--quick`` for a smoke run.
This is a benchmark, not a timed test: it reports, it never fails on a figure.

It starts its own ``redis-server`` (``redis_meter.RedisServer``), makes ``--keys``
per-key breakers of one name, forces each open and parks one task behind each (an
outage that tripped every tenant's breaker). Then, for each fleet size W, it runs W
``Releaser`` threads (each on its own ``RedisStore``, as W workers would be) for
``--seconds`` (once the first pass of each, which asks every breaker, is over) and
reports what Redis did meanwhile: its CPU time per second (user +
system, networking included), and the commands per second behind it (the loss watch's
``ZCARD`` and ``GET``, the listing's ``SMEMBERS``, the release script's ``EVALSHA``).

Figures come from one run on a shared machine: compare the fleet sizes with each other.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import redis
from celery import Celery

from celery_breaker import CircuitBreaker
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.storage.redis import RedisStore

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from redis_meter import RedisServer, server_stats  # noqa: E402  (beside this file)

SHOWN = ("zcard", "get", "smembers", "scard", "evalsha")


def populate(url: str, keys: int) -> None:
    """``keys`` breakers ``crm[tenant-N]``, each forced open with one task parked behind it."""
    app = Celery("idle", broker="memory://", set_as_current=False)
    payload = encode_message(dict(app.signature("crm.sync", args=(1,))), "json")
    store = RedisStore.from_url(url)
    logging.getLogger("celery_breaker").setLevel(logging.ERROR)  # (a WARNING per breaker forced open)
    for n in range(keys):
        CircuitBreaker("crm", storage=store, key=f"tenant-{n}").force_open()
        store.parking.park("crm", f"tenant-{n}", f"task-{n}:0", float(n), payload, None)
    store.close()
    logging.getLogger("celery_breaker").setLevel(logging.NOTSET)


def measure(url: str, keys: int, workers: int, seconds: float, warmup: float) -> dict[str, float]:
    """Run ``workers`` releasers; return Redis's CPU share and commands per second after ``warmup``."""
    app = Celery("idle", broker="memory://", set_as_current=False)
    stores = [RedisStore.from_url(url) for _ in range(workers)]
    releasers = [Releaser(app, store.parking, rate=100.0, ramp=0.0) for store in stores]
    for releaser in releasers:
        releaser.start()
    client = redis.Redis.from_url(url)
    try:
        # Each releaser's first pass asks every breaker (W x keys release calls, seconds for
        # a fleet run in one process): the steady state after it is what is measured.
        time.sleep(warmup)
        settle_by = time.monotonic() + 90.0
        before = server_stats(client)[0]["evalsha"]
        while time.monotonic() < settle_by:
            time.sleep(1.0)
            after = server_stats(client)[0]["evalsha"]
            if after - before < max(10, keys // 20):
                break
            before = after
        calls_0, cpu_0 = server_stats(client)
        start = time.monotonic()
        time.sleep(seconds)
        calls_1, cpu_1 = server_stats(client)
        elapsed = time.monotonic() - start
    finally:
        for releaser in releasers:
            releaser.stop()
        for store in stores:
            store.close()
    found = {"cpu": (cpu_1 - cpu_0) / elapsed}
    for name in SHOWN:
        found[name] = (calls_1[name] - calls_0[name]) / elapsed
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--keys", type=int, default=2_000, help="per-key breakers, each with a task parked (2,000)")
    parser.add_argument("--workers", default="1,4,8", help="fleet sizes to run, comma-separated (1,4,8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds measured per fleet size (10)")
    parser.add_argument("--quick", action="store_true", help="200 keys, fleets of 1 and 2, 2 s each: a smoke run")
    options = parser.parse_args()
    keys, seconds = (200, 2.0) if options.quick else (options.keys, options.seconds)
    fleets = [1, 2] if options.quick else [int(w) for w in options.workers.split(",")]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with RedisServer() as server:
        url = server.url()
        start = time.perf_counter()
        populate(url, keys)
        print(
            f"{keys:,} per-key breakers forced open, one task parked behind each ({time.perf_counter() - start:.1f} s)"
        )
        print(f"{seconds:.0f} s measured per fleet, once every releaser's first pass is over\n")
        header = f"{'workers':>7}  {'Redis CPU':>9}  " + "  ".join(f"{name + '/s':>10}" for name in SHOWN)
        print(header)
        print("-" * len(header))
        for workers in fleets:
            found = measure(url, keys, workers, seconds, warmup=min(3.0, seconds))
            row = f"{workers:>7}  {found['cpu']:>8.1%}  " + "  ".join(f"{found[name]:>10,.0f}" for name in SHOWN)
            print(row, flush=True)


if __name__ == "__main__":
    main()
