"""One tenant's breaker corrupted under a running prefork worker: every other tenant goes on as if nothing happened.

Five tenants, one per-key breaker each, all tripped by a downstream outage, their tasks
parked in the Redis store. Then one tenant's state is overwritten with values no script
writes (a NaN generation, an infinite open-until, a NaN probe count) and its parking
queue with a key of the wrong type. While the outage lasts, the listing (``celery breaker
status``) and the worker's metrics endpoint stay complete; when it ends, every tenant's
parked tasks are released and run exactly once, the corrupted tenant's included (its
queue is rebuilt from its parked messages), and the worker warns about that one tenant
only, once for each thing it repaired, and never stops serving the others.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest
import redis

from tests.integration.backlog_proj import KEYED_BREAKER, KEYED_TASK, executions_key, failed_ids_key
from tests.integration.deployments import Deployment, deploy
from tests.integration.downstream import Downstream
from tests.integration.workers import ROOT, wait_for
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.slow

APP = "tests.integration.backlog_proj"
POLICY = {"failure_threshold": 2, "reset_timeout": 1.0, "half_open_max_calls": 1, "success_threshold": 1}
TENANTS = [f"t{i}" for i in range(5)]
BAD = "t2"
PER_TENANT = 6


def cli(cell: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cell.env, "PROJ_BROKER": cell.broker_url, "PROJ_EXTRA_CONF": json.dumps(cell.conf),
           "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "celery", "-A", APP, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)  # fmt: skip


def tag(cell: Deployment, tenant: str) -> str:
    """The hash tag of a tenant's breaker: the deployment's key prefix, the name and the key (all plain)."""
    return "{" + f"{cell.ns}:{KEYED_BREAKER}:{tenant}" + "}"


def scraped(port: int) -> set[str]:
    """The tenants the worker's metrics endpoint has a state for."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return set(re.findall(r'celery_breaker_state\{breaker="tenants",key="([^"]+)"', text))


def test_one_corrupted_tenant_neither_stops_nor_loses_the_others(redis_server: RedisServer) -> None:
    metrics_port = free_port()
    cell = deploy("redis", "redis", "park", redis_server=redis_server, policy=POLICY,
                  breaker_metrics_port=metrics_port,
                  breaker_release_pace="fixed", breaker_release_ramp=0.0)  # fmt: skip
    store = redis.Redis.from_url(f"{redis_server.url}/1", decode_responses=True)
    counts = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    publisher = cell.publisher()
    ids: list[str] = []

    def send(n: int, tenant: str) -> None:
        ids.append(publisher.send_task(KEYED_TASK, args=(cell.ns, downstream.url, n, tenant)).id)

    def settled() -> int:
        """Tasks that ran, or failed before their breaker tripped (the project's tasks have no retries)."""
        return int(counts.hlen(executions_key(cell.ns))) + int(counts.scard(failed_ids_key(cell.ns)))

    def parked(tenant: str) -> int:
        queue = tag(cell, tenant) + ":q"
        return int(store.zcard(queue)) if store.type(queue) == "zset" else 0

    try:
        with Downstream() as downstream, cell.worker(concurrency=2) as worker:
            for n, tenant in enumerate(TENANTS):  # each tenant's breaker exists, closed
                send(n, tenant)
            wait_for(lambda: counts.hlen(executions_key(cell.ns)) >= len(TENANTS), 60, "the first tasks")
            downstream.outage(True)
            for i in range(PER_TENANT):
                for tenant in TENANTS:
                    send(100 + i * len(TENANTS) + TENANTS.index(tenant), tenant)
            wait_for(lambda: all(parked(tenant) >= 2 for tenant in TENANTS), 90, "every tenant's tasks parked")

            # Corrupt one tenant: values no script writes, and a parking queue of the wrong type.
            bad = tag(cell, BAD)
            store.hset(bad + ":s", mapping={"gen": "nan", "ou": "inf", "hos": "nan"})
            entries = store.zrange(bad + ":q", 0, -1)
            assert entries, "the corrupted tenant had tasks parked"
            store.delete(bad + ":q")
            store.set(bad + ":q", "not a sorted set")

            # Listings stay complete while the outage lasts.
            status = cli(cell, "breaker", "status", "--json")
            assert status.returncode == 0, status.stderr
            listed = {row["key"] for row in json.loads(status.stdout) if row["name"] == KEYED_BREAKER}
            assert set(TENANTS) - {BAD} <= listed, listed
            wait_for(lambda: set(TENANTS) - {BAD} <= scraped(metrics_port), 30, "a complete metrics scrape")
            inspected = cli(cell, "inspect", "breakers", "--json", "--timeout", "5")
            assert inspected.returncode == 0, inspected.stderr

            downstream.outage(False)
            wait_for(lambda: settled() >= len(ids), 120, "every tenant's tasks, the corrupted one's included")
            log = worker.log()
    finally:
        publisher.close()
        store.close()

    executions = counts.hgetall(executions_key(cell.ns))
    failed = counts.smembers(failed_ids_key(cell.ns))
    assert sorted([*executions, *failed]) == sorted(ids)  # nothing lost
    assert set(executions.values()) == {"1"}  # nothing run twice
    assert len(failed) <= 2 * len(TENANTS)  # only the failures that tripped each breaker
    assert all(parked(tenant) == 0 for tenant in TENANTS)
    # Whichever process meets the damage first repairs it and says so: the worker (the
    # state, the queue), or `breaker status`, whose listing reads every parking (the queue:
    # the releaser leaves an OPEN breaker unasked until its open time is up, decision 68,
    # so the CLI may come first).
    # The CLI logs through Python's last-resort handler: its stderr holds only messages.
    warnings = [line for line in log.splitlines() if "WARNING" in line and "tenants[" in line and "->" not in line]
    warnings += [line for line in status.stderr.splitlines() if "tenants[" in line]
    about_bad = [line for line in warnings if f"tenants[{BAD}]" in line]
    assert about_bad, log + status.stderr
    # A listing (status, the scrape, inspect) shows the state unreadable and leaves it, told
    # once a minute per process (decision 107); the worker's scripts repair it.
    shown = [line for line in about_bad if "a listing leaves it as it is" in line]
    assert len(shown) <= 4, shown  # (the CLI's; the worker's, once a minute while it lasts)
    repaired = [line for line in about_bad if line not in shown]
    assert repaired, log
    assert len(repaired) <= 3, repaired  # one for each thing repaired: the state, the queue
    assert all(f"tenants[{BAD}]" in line for line in warnings), warnings  # no other tenant is warned about
    breaker_errors = [line for line in log.splitlines() if "ERROR" in line and "DownstreamError" not in line]
    assert breaker_errors == []  # (the tasks that tripped the breakers failed, as the project's tasks do)
