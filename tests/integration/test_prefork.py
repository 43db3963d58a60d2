"""Real ``celery worker -P prefork`` processes on a real Redis broker: deferral end to end."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from tests.conftest import emptied
from tests.integration import proj
from tests.integration.workers import WorkerProcess, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(proj_url: str) -> Iterator[str]:
    with emptied(proj_url) as url:
        yield url


@pytest.fixture(scope="module")
def worker(broker: str) -> Iterator[WorkerProcess]:
    with WorkerProcess(broker, concurrency=2) as process:
        process.wait_ready()
        yield process


def info_text(result: AsyncResult) -> str:
    return str(result.info)


def test_outage_defers_without_spending_retries_then_everything_completes(
    worker: WorkerProcess, downstream: redis.Redis
) -> None:
    downstream.set(proj.DOWN_KEY, 1)
    results = [proj.call_partner.delay(n) for n in range(20)]

    # Every task is deferred (RETRY), none fails, although max_retries=0 ...
    wait_for(lambda: all(r.state == "RETRY" for r in results), 30, "all 20 tasks deferred")
    # ... and keeps being deferred while the outage lasts.
    wait_for(lambda: any("(deferral 2)" in info_text(r) for r in results), 30, "a second deferral")
    assert not [r for r in results if r.state == "FAILURE"]
    sample = results[0].info
    assert type(sample).__name__ == "CircuitOpenError"
    assert "breaker 'partner-api'" in str(sample)
    calls_during_outage = int(downstream.get(proj.CALLS_KEY) or 0)

    downstream.delete(proj.DOWN_KEY)
    values: list[dict[str, Any]] = [r.get(timeout=60) for r in results]

    assert [v["n"] for v in values] == list(range(20))
    assert [v["id"] for v in values] == [r.id for r in results]  # same task ids
    assert {v["retries"] for v in values} == {0}  # the retry budget was never spent
    assert all(v["deferrals"] is not None and int(v["deferrals"]) >= 1 for v in values)
    assert len({v["pid"] for v in values}) >= 1
    # While open, the breaker let through only probes: far fewer calls than task runs.
    assert calls_during_outage < 20
    assert worker.process.poll() is None


class EventLog:
    """Celery events from the broker, captured by a receiver thread."""

    def __init__(self, app: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self.events.append})
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the receiver ends when its connection closes
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=5)
        self._connection.release()

    def of(self, kind: str, task_id: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("type") == kind and e.get("uuid") == task_id]


def test_a_deferral_shows_as_retry_with_a_readable_reason_in_celery_events(
    worker: WorkerProcess, downstream: redis.Redis
) -> None:
    with EventLog(proj.app) as log:
        downstream.set(proj.DOWN_KEY, 1)
        result = proj.call_partner.delay(7)
        wait_for(lambda: bool(log.of("task-retried", result.id)), 30, "a task-retried event")
        downstream.delete(proj.DOWN_KEY)
        assert result.get(timeout=60)["retries"] == 0
        wait_for(lambda: bool(log.of("task-succeeded", result.id)), 30, "a task-succeeded event")
    # Flower shows this text as the task's exception. (The receiver may miss events
    # sent before it bound its queue, so any of the task's deferrals will do.)
    for retried in log.of("task-retried", result.id):
        assert re.fullmatch(
            r"CircuitOpenError: breaker 'partner-api' open, deferred \d+\.\d s \(deferral \d+\)",
            retried["exception"],
        ), retried["exception"]
        assert retried["hostname"].startswith("w1@")


def test_malformed_deferral_headers_never_crash_the_worker(worker: WorkerProcess, downstream: redis.Redis) -> None:
    downstream.set(proj.DOWN_KEY, 1)
    bad = proj.call_partner.apply_async(
        (99,), headers={"x-breaker-deferrals": "abc", "x-breaker-deferred-since": "yesterday"}
    )
    wait_for(lambda: bad.state == "RETRY", 30, "the malformed-header task to be deferred")
    # The count restarted at 1 instead of crashing (a slow machine may show the 2nd already).
    assert re.search(r"\(deferral [12]\)$", info_text(bad)), info_text(bad)
    downstream.delete(proj.DOWN_KEY)
    value = bad.get(timeout=60)
    assert value["id"] == bad.id
    assert value["retries"] == 0
    assert worker.process.poll() is None
    log = worker.log()
    assert "header x-breaker-deferrals='abc' is not a whole number" in log
    assert "header x-breaker-deferred-since='yesterday' is not the epoch seconds of a past deferral" in log


@pytest.mark.parametrize(
    ("extra_conf", "expected"),
    [
        ({"breaker_max_deferals": 3}, "unknown celery-breaker setting(s): breaker_max_deferals"),
        ({"breaker_max_deferrals": -1}, "breaker_max_deferrals must be a whole number from 0 to 1,000,000"),
        ({"breaker_default_policy": {"failure_threshold": 0}}, "BreakerPolicy.failure_threshold"),
        ({"breaker_on_storage_error": "panic"}, "breaker_on_storage_error must be one of local, allow, deny"),
    ],
)
def test_bad_settings_stop_the_worker_with_a_clear_error(
    broker: str, extra_conf: dict[str, Any], expected: str
) -> None:
    process = WorkerProcess(broker, concurrency=1, extra_conf=json.dumps(extra_conf), name="bad")
    code = process.wait_exit(timeout=60)
    log = process.log()
    assert code != 0, log
    assert expected in log, log
    assert "ConfigurationError" in log


def test_three_mistakes_are_named_in_one_start_without_a_traceback(broker: str) -> None:
    """Before, a worker stopped at the first bad setting with a 60-line traceback, its fix on
    the last line; the next mistake showed only once the first was fixed."""
    mistakes = {
        "breaker_max_deferrals": -1,
        "breaker_relase_rate": 5,  # a typo of a setting
        "breaker_default_policy": {"failure_treshold": 3},  # a typo of a policy field
    }
    process = WorkerProcess(broker, concurrency=1, extra_conf=json.dumps(mistakes), name="three")
    code = process.wait_exit(timeout=60)
    log = process.log()
    assert code == 78, log  # EX_CONFIG
    assert "3 problems in celery-breaker's settings" in log, log
    assert "the worker cannot start (ConfigurationError):\n3 problems" in log  # (one block, a line each)
    assert "breaker_max_deferrals must be a whole number from 0 to 1,000,000" in log
    assert "breaker_relase_rate: did you mean breaker_release_rate?" in log  # (the setting meant)
    assert "'failure_treshold': did you mean 'failure_threshold'?" in log
    assert "Traceback" not in log
    assert log.count("the worker cannot start") == 1
    assert "breaker_routes not applied" not in log
