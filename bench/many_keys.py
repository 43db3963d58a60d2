"""Per-key breakers at scale: what listing, scraping and operating cost with N keys in Redis.

Run ``python bench/many_keys.py`` (20,000 keys, about a minute), ``--keys N`` for another
count, ``--quick`` for 500 (a smoke run). This is a benchmark, not a timed test: it
reports, it never fails on a figure.

It starts its own ``redis-server`` (``redis_meter.RedisServer``), makes N per-key
breakers of one name (every tenth forced open), then times, each once:

- ``store.snapshots()``: the listing behind ``status``, ``watch``, the web page and the
  metrics (SCAN, then one snapshot script per breaker, pipelined), with the Redis
  server's CPU time for it;
- a Prometheus scrape (``generate_latest`` of a registry holding the ``BreakerCollector``):
  seconds, bytes and lines (Prometheus's default ``scrape_timeout`` is 10 s);
- ``ops.operator.operate(app, "open", "crm", KEY)``: an operator acting on one key.

Figures come from one run on a shared machine: compare them with each other.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import redis
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest

from celery_breaker import CircuitBreaker
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.monitoring.prometheus import register
from celery_breaker.ops.operator import operate
from celery_breaker.storage.redis import RedisStore

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from redis_meter import RedisServer, server_stats  # noqa: E402  (beside this file)


def populate(url: str, keys: int) -> float:
    """Make ``keys`` breakers ``crm[tenant-N]``, every tenth forced open; return the seconds taken."""
    start = time.perf_counter()
    for n in range(keys):
        breaker = CircuitBreaker("crm", storage=url, key=f"tenant-{n}")
        if n % 10 == 0:
            breaker.force_open()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--keys", type=int, default=20_000, help="per-key breakers to make (default 20,000)")
    parser.add_argument("--quick", action="store_true", help="500 keys: a smoke run")
    options = parser.parse_args()
    keys = 500 if options.quick else options.keys
    logging.getLogger("celery_breaker").setLevel(logging.ERROR)  # (a line per forced-open breaker)

    with RedisServer() as server:
        url = server.url()
        client = redis.Redis.from_url(url)
        print(f"{keys:,} per-key breakers in redis-server {server.version()} on {url}")
        print(f"  made in {populate(url, keys):.1f} s")
        store = RedisStore.from_url(url)

        _, cpu_before = server_stats(client)
        start = time.perf_counter()
        listed = store.snapshots(SYSTEM_CLOCK)
        took = time.perf_counter() - start
        _, cpu_after = server_stats(client)
        print(f"  listing: {len(listed):,} breakers in {took:.2f} s (Redis CPU {cpu_after - cpu_before:.2f} s)")

        registry = CollectorRegistry()
        register(store, registry)
        start = time.perf_counter()
        scrape = generate_latest(registry)
        took = time.perf_counter() - start
        lines = scrape.count(b"\n")
        print(f"  scrape: {took:.2f} s, {len(scrape) / 1e6:.1f} MB, {lines:,} lines")

        app = Celery("many_keys", broker="memory://", set_as_current=False)
        app.conf.breaker_storage_url = url
        start = time.perf_counter()
        operate(app, "open", "crm", f"tenant-{keys // 2 + 1}", store=store)
        print(f"  open one key: {time.perf_counter() - start:.3f} s")
        store.close()


if __name__ == "__main__":
    main()
