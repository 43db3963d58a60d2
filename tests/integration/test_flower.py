"""A real Flower (pip ``flower``) against a real Redis broker and prefork worker.

The worker defers tasks while a breaker is open; Flower's HTTP API must then show the
deferred task as RETRY with the readable reason, count the breaker events per worker,
and serve the celery-breaker series on ``/metrics`` through the two documented lines
of ``flowerconfig.py`` (docs/metrics.md).
"""

from __future__ import annotations

import html
import json
import os
import re
import uuid
from typing import Any

import pytest
import redis

from celery_breaker import CircuitBreaker
from tests.integration.partner_proj import BREAKER, call_partner, down_key
from tests.integration.workers import WorkerProcess, flower, wait_for

pytestmark = pytest.mark.slow

APP = "tests.integration.partner_proj"
POLICY = {"failure_threshold": 2, "reset_timeout": 30.0, "half_open_max_calls": 1}
DEFERRED = re.compile(r"CircuitOpenError: breaker 'partner' open, deferred \d+\.\d s \(deferral \d+\)")


@pytest.fixture(scope="module")
def broker(partner_broker: str) -> str:
    return partner_broker


def test_flower_shows_the_deferral_the_breaker_events_and_the_breaker_metrics(broker: str) -> None:
    ns = f"flower-{uuid.uuid4().hex[:8]}"
    store_url = f"{broker.rsplit('/', 1)[0]}/9?key_prefix={ns}"
    conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY}
    client = redis.Redis.from_url(broker)
    observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)
    config = f"from celery_breaker.monitoring.flower import register_breakers\nregister_breakers({store_url!r})\n"
    with (
        flower(broker, config) as web,
        WorkerProcess(broker, concurrency=2, extra_conf=json.dumps(conf), name="f1", app=APP) as worker,
    ):
        worker.wait_ready()
        node = f"f1@{os.uname().nodename}"
        client.set(down_key(ns), 1)
        results = [call_partner.delay(ns, n) for n in range(6)]
        wait_for(lambda: observer.snapshot().deferrals >= 3, 60, "deferrals")

        # The deferred task: RETRY, with the reason readable on its page.
        def retried() -> dict[str, Any] | None:
            for result in results:
                info = web.json(f"/api/task/info/{result.id}")
                if info.get("state") == "RETRY" and DEFERRED.search(info.get("exception") or ""):
                    return dict(info)
            return None

        wait_for(lambda: retried() is not None, 30, "a deferred task shown as RETRY in flower")
        info = retried()
        assert info is not None
        assert info["worker"] == node
        page = web.get(f"/task/{info['uuid']}")
        assert DEFERRED.search(html.unescape(page)), [line for line in page.splitlines() if "Circuit" in line]

        # The worker's event counters include the breaker events.
        def counters() -> dict[str, Any]:
            rows = web.json("/workers?json=1")["data"]
            return next((row for row in rows if row.get("hostname") == node), {})

        wait_for(lambda: counters().get("task-breaker-deferred", 0) >= 3, 30, "breaker events counted")
        row = counters()
        assert row.get("breaker-opened", 0) >= 1, row
        assert row["task-breaker-deferred"] >= 3

        # /metrics: Flower's own series and the collector's.
        metrics = web.get("/metrics")
        assert f'celery_breaker_state{{breaker="{BREAKER}",key="",state="open"}} 1.0' in metrics
        assert "celery_breaker_deferrals_total" in metrics
        assert "celery_breaker_store_up 1.0" in metrics
        deferred_series = [
            line for line in metrics.splitlines()
            if line.startswith("flower_events_total{") and 'type="task-breaker-deferred"' in line
        ]  # fmt: skip
        assert deferred_series, "flower counts task-breaker-deferred in flower_events_total"

        client.delete(down_key(ns))
        observer.close()
        wait_for(lambda: all(r.state == "SUCCESS" for r in results), 60, "every task to succeed after recovery")
        wait_for(lambda: web.json(f"/api/task/info/{results[0].id}").get("state") == "SUCCESS", 30, "flower")
