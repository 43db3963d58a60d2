"""No password in any output: a worker, the CLI, remote control, events and metrics, against a
Redis that requires one, through an outage and a store outage. Every output is collected
and searched for the password.

One masking rule (``celery_breaker.storage.describe_url``) serves every place a URL can
appear. Before it did, the warning "breaker X already exists in redis://user:PASSWORD@..."
and ``repr(CircuitBreaker)`` printed the store URL as given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from celery_breaker import CircuitBreaker
from celery_breaker.monitoring.prometheus import BreakerCollector
from celery_breaker.storage import close_stores
from tests.integration.backlog_proj import BREAKER, TASK, executions_key
from tests.integration.deployments import Deployment, deploy
from tests.integration.downstream import Downstream
from tests.integration.workers import ROOT, wait_for
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.slow

SECRET = f"pw-{uuid.uuid4().hex}"
APP = "tests.integration.backlog_proj"
POLICY = {"failure_threshold": 2, "reset_timeout": 1.0, "half_open_max_calls": 1, "success_threshold": 1}


class Outputs:
    """Everything the scenario printed, sent or served, by source."""

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {}

    def add(self, source: str, text: str) -> None:
        self.texts.setdefault(source, []).append(text)

    def leaks(self) -> list[str]:
        return [source for source, texts in self.texts.items() if any(SECRET in text for text in texts)]


def cli(cell: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cell.env, "PROJ_BROKER": cell.broker_url, "PROJ_EXTRA_CONF": json.dumps(cell.conf),
           "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@contextlib.contextmanager
def events_of(app: Celery, outputs: Outputs) -> Iterator[None]:
    connection = app.connection_for_read()
    receiver = app.events.Receiver(connection, handlers={"*": lambda event: outputs.add("events", json.dumps(event))})

    def capture() -> None:
        with contextlib.suppress(Exception):  # it ends when its connection closes
            receiver.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    try:
        yield
    finally:
        receiver.should_stop = True
        thread.join(timeout=5)
        connection.release()


def test_no_output_of_the_worker_the_cli_events_or_metrics_holds_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outputs = Outputs()
    metrics_port = free_port()
    with RedisServer(password=SECRET) as server, caplog.at_level(logging.DEBUG):
        server.start()
        cell = deploy("redis", "redis", "park", redis_server=server, policy=POLICY, breaker_metrics_port=metrics_port,
                      breaker_send_events=True)  # fmt: skip
        assert SECRET in cell.broker_url  # (the URLs do carry it)
        assert SECRET in cell.store_url
        # Made first with another policy (which the breaker keeps): the worker's warns that it exists.
        observer = CircuitBreaker(BREAKER, {**POLICY, "failure_threshold": 1}, storage=cell.store_url)
        outputs.add("repr", repr(observer))
        publisher = cell.publisher()
        client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
        try:
            with Downstream() as downstream, events_of(publisher, outputs), cell.worker() as started:
                ids = [publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id for n in range(4)]
                wait_for(lambda: client.hlen(executions_key(cell.ns)) >= 4, 60, "the first tasks")
                downstream.outage(True)
                ids += [publisher.send_task(TASK, args=(cell.ns, downstream.url, n)).id for n in range(4, 12)]
                wait_for(lambda: observer.snapshot().deferrals >= 4, 60, "deferrals during the outage")
                for args in (
                    ("breaker", "status"), ("breaker", "status", "--json", "--wide"), ("breaker", "watch", "--once"),
                    ("breaker", "open", BREAKER), ("breaker", "open", "no-such-breaker"),
                    ("inspect", "breakers", "--timeout", "5"), ("control", "breaker_close", BREAKER, "--timeout", "5"),
                ):  # fmt: skip
                    done = cli(cell, *args)
                    outputs.add(f"celery {' '.join(args[:2])}", done.stdout + done.stderr)
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                    outputs.add("worker /metrics", response.read().decode())
                outputs.add("collector", repr(BreakerCollector(cell.store_url)))
                downstream.outage(False)
                wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 60, "every task after recovery")

                close_stores()
                server.kill()  # a store outage: the worker and the CLI report it, naming the store
                wait_for(lambda: "lost the breaker transitions channel" in started.log(), 30, "the store outage logged")
                done = cli(cell, "breaker", "status")
                outputs.add("celery breaker status (store down)", done.stdout + done.stderr)
                assert done.returncode == 69, done
                with contextlib.suppress(Exception):
                    observer.snapshot()  # (the test process meets the outage too)
                server.start()
                outputs.add("worker log", started.log())
        finally:
            publisher.close()
            close_stores()
    outputs.add("test process log", caplog.text)
    worker_log = "\n".join(outputs.texts["worker log"])
    assert "already exists in redis://:***@127.0.0.1" in worker_log  # the warning that printed the password
    assert "breakers stored in redis://:***@127.0.0.1" in worker_log
    assert "cannot reach the breaker store redis://:***@127.0.0.1" in "".join(
        outputs.texts["celery breaker status (store down)"]
    )
    assert outputs.texts["events"], "no event was captured"
    assert outputs.leaks() == []
