"""Celery events and remote control with real prefork workers on a Redis broker and store.

Events are captured by a real ``app.events.Receiver`` (what Flower runs); remote control
goes through ``app.control`` exactly as ``celery inspect``/``celery control`` send it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_breaker import CircuitBreaker, State
from tests.integration import partner_proj
from tests.integration.event_capture import Events
from tests.integration.partner_proj import BREAKER, call_partner, down_key
from tests.integration.workers import ROOT, WorkerProcess, wait_for
from tests.servers import free_port

pytestmark = pytest.mark.slow

APP = "tests.integration.partner_proj"
POLICY = {"failure_threshold": 2, "reset_timeout": 1.0, "half_open_max_calls": 1, "success_threshold": 1}


@pytest.fixture(scope="module")
def broker(partner_broker: str) -> str:
    return partner_broker


@pytest.fixture
def ns() -> str:
    return f"events-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def workers(broker: str, conf: dict[str, Any], names: list[str]) -> Iterator[list[WorkerProcess]]:
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(WorkerProcess(broker, concurrency=2, extra_conf=json.dumps(conf), name=n, app=APP))
            for n in names
        ]
        for process in started:
            process.wait_ready()
        yield started


def test_transitions_and_deferrals_are_events_sent_once_with_the_worker_node_name(broker: str, ns: str) -> None:
    store_url = f"{broker.rsplit('/', 1)[0]}/7?key_prefix={ns}"
    conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY}
    client = redis.Redis.from_url(broker)
    observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)
    nodes = {f"{name}@{socket.gethostname()}" for name in ("e1", "e2")}
    with Events(partner_proj.app).running() as events, workers(broker, conf, ["e1", "e2"]):
        client.set(down_key(ns), 1)
        results = [call_partner.delay(ns, n) for n in range(8)]
        wait_for(lambda: observer.snapshot().trips >= 2, 60, "two trips (a failed probe reopens)")
        wait_for(lambda: len(events.of("task-breaker-deferred")) >= 4, 30, "deferral events")
        client.delete(down_key(ns))
        wait_for(lambda: all(r.state == "SUCCESS" for r in results), 60, "every task to succeed after recovery")
        final = observer.snapshot()
        wait_for(lambda: events.of("breaker-closed") != [], 10, "the closing event")

    transitions = events.of("breaker-opened", "breaker-half-opened", "breaker-closed")
    counts = collections.Counter(e["type"] for e in transitions)
    # Once per transition cluster-wide: as many "opened" as trips, whichever process won each.
    assert counts["breaker-opened"] == final.trips, counts
    assert counts["breaker-closed"] == 1
    assert counts["breaker-half-opened"] >= 1
    for event in transitions:
        assert event["hostname"] in nodes, event  # the node name, never the machine's host name
        assert event["breaker"] == BREAKER
        assert event["key"] is None
    opened = events.of("breaker-opened")[0]
    assert opened["state"] == State.OPEN.value
    assert opened["previous"] == State.CLOSED.value
    assert opened["failures"] >= POLICY["failure_threshold"]
    assert opened["open_until"] > opened["at"]
    assert opened["trips"] == 1
    assert opened["reason"]

    deferred = events.of("task-breaker-deferred")
    ids = {r.id for r in results}
    for event in deferred:
        assert event["hostname"] in nodes, event
        assert event["uuid"] in ids
        assert event["breaker"] == BREAKER
        assert event["reason"].startswith(f"breaker {BREAKER!r} ")
        assert event["deferral"] >= 1
        assert event["delay"] > 0
    assert len(deferred) == final.deferrals


def test_events_stay_off_without_minus_e_or_breaker_send_events(broker: str, ns: str) -> None:
    store_url = f"{broker.rsplit('/', 1)[0]}/7?key_prefix={ns}"
    conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY, "breaker_send_events": False}
    client = redis.Redis.from_url(broker)
    observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)
    with Events(partner_proj.app).running() as events, workers(broker, conf, ["q1"]):
        client.set(down_key(ns), 1)
        results = [call_partner.delay(ns, n) for n in range(4)]
        wait_for(lambda: observer.snapshot().deferrals >= 2, 60, "deferrals")
        client.delete(down_key(ns))
        wait_for(lambda: all(r.state == "SUCCESS" for r in results), 60, "every task to succeed")
        assert events.of("task-retried")  # Celery's own events flow (the worker runs with -E)
    assert not events.of("breaker-opened", "breaker-closed", "task-breaker-deferred")


def test_breaker_events_follow_enable_events_as_flower_sends_it(broker: str, ns: str) -> None:
    # Flower turns a worker's events on with `enable_events` (every few seconds) rather
    # than -E: the transitions and deferrals happen in the pool's children, which the
    # command never reaches, so they must hear it through the main process.
    store_url = f"{broker.rsplit('/', 1)[0]}/7?key_prefix={ns}"
    conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY}
    client = redis.Redis.from_url(broker)
    observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)
    node = f"n1@{socket.gethostname()}"
    with (
        Events(partner_proj.app).running() as events,
        WorkerProcess(broker, concurrency=2, extra_conf=json.dumps(conf), name="n1", app=APP, events=False) as worker,
    ):
        worker.wait_ready()
        replies = partner_proj.app.control.enable_events(reply=True, destination=[node], timeout=10)
        assert replies, "no reply to enable_events"
        assert "ok" in replies[0][node], replies
        client.set(down_key(ns), 1)
        results = [call_partner.delay(ns, n) for n in range(4)]
        wait_for(lambda: observer.snapshot().deferrals >= 2, 60, "deferrals")
        wait_for(lambda: len(events.of("task-breaker-deferred")) >= 2, 30, "deferral events after enable_events")
        client.delete(down_key(ns))
        wait_for(lambda: all(r.state == "SUCCESS" for r in results), 60, "every task to succeed")
        wait_for(lambda: events.of("breaker-closed") != [], 30, "the closing event")
    assert events.of("task-retried")  # Celery's own task events, switched on by the same command
    assert len(events.of("breaker-opened")) == observer.snapshot().trips
    assert {event["hostname"] for event in events.of("breaker-opened", "task-breaker-deferred")} == {node}
    observer.close()


# -- remote control -----------------------------------------------------------------


def test_inspect_breakers_and_control_commands_act_on_the_shared_store(broker: str, ns: str) -> None:
    store_url = f"{broker.rsplit('/', 1)[0]}/7?key_prefix={ns}"
    conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY}
    observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)
    observer.reset()
    control = partner_proj.app.control  # limit=2: each call returns once both workers replied
    with workers(broker, conf, ["c1", "c2"]):
        replies = control.inspect(timeout=5, limit=2)._request("breakers")
        assert set(replies) == {f"{n}@{socket.gethostname()}" for n in ("c1", "c2")}
        for rows in replies.values():
            assert [(row["name"], row["state"]) for row in rows] == [(BREAKER, "closed")]

        generation = observer.snapshot().generation
        answers = control.broadcast("breaker_open", arguments={"name": BREAKER}, reply=True, timeout=5, limit=2)
        # One broadcast, one move: the second worker finds it forced open and changes nothing.
        assert sorted(a[node]["ok"].split(":")[0] for a in answers for node in a) == [
            f"breaker {BREAKER} already forced_open",
            f"breaker {BREAKER} forced open",
        ], answers
        assert observer.snapshot().state is State.FORCED_OPEN
        assert observer.snapshot().generation == generation + 1

        for command, state in (("breaker_disable", State.DISABLED), ("breaker_close", State.CLOSED)):
            answers = control.broadcast(command, arguments={"name": BREAKER}, reply=True, timeout=5, limit=2)
            assert len(answers) == 2
            assert all("ok" in a[node] for a in answers for node in a), answers
            assert observer.snapshot().state is state

        answers = control.broadcast(
            "breaker_open", arguments={"name": BREAKER, "key": "tenant-7"}, reply=True, timeout=5, limit=2
        )
        assert all("ok" in a[node] for a in answers for node in a), answers
        per_key = CircuitBreaker(BREAKER, POLICY, storage=store_url, key="tenant-7")
        assert per_key.snapshot().state is State.FORCED_OPEN
        assert observer.snapshot().state is State.CLOSED  # the unkeyed breaker is another one

        answers = control.broadcast("breaker_reset", arguments={"name": BREAKER}, reply=True, timeout=5, limit=2)
        assert all("ok" in a[node] for a in answers for node in a), answers
        assert observer.snapshot().trips == 0

        # Bad input: an error reply naming what the worker knows, and nothing changed.
        answers = control.broadcast("breaker_open", arguments={"name": "no-such"}, reply=True, timeout=5, limit=2)
        errors = [a[node]["error"] for a in answers for node in a]
        assert len(errors) == 2
        assert all("unknown breaker 'no-such'" in e and BREAKER in e for e in errors)
        answers = control.broadcast("breaker_open", arguments={}, reply=True, timeout=5, limit=2)
        assert all("needs a breaker name" in a[node]["error"] for a in answers for node in a)
        assert observer.snapshot().state is State.CLOSED


# -- the worker's metrics endpoint ----------------------------------------------------


def test_a_worker_serves_the_breakers_metrics_on_loopback(broker: str, ns: str) -> None:
    store_url = f"{broker.rsplit('/', 1)[0]}/7?key_prefix={ns}"
    port = free_port()
    conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY, "breaker_metrics_port": port}
    observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)
    observer.force_open()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())

    with workers(broker, conf, ["m1"]) as (worker,):
        wait_for(lambda: _answers(scrape), 30, "the worker's metrics endpoint")
        text = scrape()
        assert f'celery_breaker_state{{breaker="{BREAKER}",key="",state="forced_open"}} 1.0' in text
        assert "celery_breaker_store_up 1.0" in text
        listening = [line for line in worker.log().splitlines() if "metrics" in line.lower()]
        assert listening, worker.log()[-2000:]
    with pytest.raises(urllib.error.URLError):  # stopped with the worker
        scrape()


def _answers(scrape: Any) -> bool:
    try:
        scrape()
    except OSError:
        return False
    return True


def celery_cli(broker: str, *args: str, conf: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """``celery -A partner_proj <args>`` as an operator types it (with the workers' settings)."""
    env = {**os.environ, "PROJ_BROKER": broker, "PROJ_EXTRA_CONF": json.dumps(conf or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_celery_inspect_and_control_commands_as_an_operator_types_them(broker: str, ns: str) -> None:
    store_url = f"{broker.rsplit('/', 1)[0]}/7?key_prefix={ns}"
    conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY}
    observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)
    observer.reset()

    # No worker answering: Celery's own message and exit code 69, never a traceback.
    nobody = celery_cli(broker, "inspect", "breakers", "--timeout", "0.5", conf=conf)
    assert nobody.returncode == 69, nobody
    assert "No nodes replied" in nobody.stderr + nobody.stdout
    assert "Traceback" not in nobody.stderr

    with workers(broker, conf, ["o1"]):
        listed = celery_cli(broker, "inspect", "breakers", "--json", "--timeout", "5", conf=conf)
        assert listed.returncode == 0, listed
        rows = json.loads(listed.stdout)[f"o1@{socket.gethostname()}"]
        assert [(row["name"], row["state"]) for row in rows] == [(BREAKER, "closed")]

        opened = celery_cli(broker, "control", "breaker_open", BREAKER, "--timeout", "5", conf=conf)
        assert opened.returncode == 0, opened
        assert "forced open" in opened.stdout
        assert observer.snapshot().state is State.FORCED_OPEN
        closed = celery_cli(broker, "control", "breaker_close", BREAKER, "--timeout", "5", conf=conf)
        assert "closed" in closed.stdout
        assert observer.snapshot().state is State.CLOSED

        # An unknown breaker is refused by the client (it loads the app and reads the store).
        unknown = celery_cli(broker, "control", "breaker_open", "no-such", "--timeout", "5", conf=conf)
        assert unknown.returncode == 2, unknown
        assert "unknown breaker 'no-such'; known: partner" in unknown.stderr
        assert "Traceback" not in unknown.stderr
        for bad in ("", "tab\there"):
            refused = celery_cli(broker, "control", "breaker_open", BREAKER, bad, "--timeout", "5", conf=conf)
            assert refused.returncode == 2, refused
            assert "Invalid value" in refused.stderr
            assert "Traceback" not in refused.stderr
        assert observer.snapshot().state is State.CLOSED


def answered(ask: Callable[[], Any], seconds: float = 60.0) -> Any:
    """``ask()``'s first answer that is not empty (no reply within its own timeout: asked
    again), for at most ``seconds``; the last, empty, answer after that."""
    deadline = time.monotonic() + seconds
    found = ask()
    while not found and time.monotonic() < deadline:
        found = ask()
    return found


def test_a_prefork_worker_on_a_memory_store_refuses_control_inspect_and_metrics(broker: str) -> None:
    """Its pool children hold the breakers, each its own; its main process, where the
    commands and the endpoint run, holds none a task uses. A success reply would be a lie
    (the children's breakers stay closed), and an endpoint would export no breaker."""
    port = free_port()
    conf = {"breaker_storage_url": "memory://", "breaker_default_policy": POLICY, "breaker_metrics_port": port}
    control = partner_proj.app.control
    with workers(broker, conf, ["mp1"]) as (worker,):
        # (asked again until the worker answers: "ready." in its log does not mean a busy
        # machine gives it the time to answer within one timeout; each ask changes nothing)
        answers = answered(lambda: control.broadcast(
            "breaker_open", arguments={"name": BREAKER}, reply=True, timeout=5, limit=1
        ))  # fmt: skip
        [error] = [a[node]["error"] for a in answers for node in a]
        assert error.startswith("breaker_storage_url is 'memory://': a memory store holds only the breakers"), error
        assert "-P solo, threads or gevent" in error
        replies = answered(lambda: control.inspect(timeout=5, limit=1)._request("breakers"))
        [listing] = replies.values()
        assert "so inspect breakers would reach only the main process's" in listing["error"], listing
        [line] = [line for line in worker.log().splitlines() if "serves no Prometheus metrics" in line]
        assert "ERROR/MainProcess" in line, line
        assert "serves no Prometheus metrics: breaker_storage_url is 'memory://'" in line
        with pytest.raises(urllib.error.URLError):  # no endpoint rather than an empty one
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
