"""Every example runs, as a user would run it, and reports success."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_demo_completes_every_charge() -> None:
    done = subprocess.run(
        [sys.executable, "examples/quickstart.py"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "charges sent 40, completed 40, failed 0" in out
    assert "breaker closed -> open" in out
    assert "breaker half_open -> closed" in out
    assert "retries spent" in out


def test_rate_limited_api_example_waits_out_every_retry_after() -> None:
    done = subprocess.run(
        [sys.executable, "examples/rate_limited_api.py"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tasks 30, completed 30" in done.stdout
    refused = int(done.stdout.rsplit("refused with 429: ", 1)[1].split()[0])
    # Without the breaker every queued task would hit the limit; with it, about one probe per window.
    assert refused < 15, done.stdout


def run_example(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], check=False, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env
    )


def test_routes_only_example_defers_a_plain_task() -> None:
    done = run_example("examples/routes_only.py")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "under breaker 'sms-gateway' by breaker_routes: True" in out
    assert "breaker closed -> open" in out
    assert "breaker half_open -> closed" in out
    assert "messages sent 30, completed 30, failed 0" in out
    deferred = int(out.split("messages deferred ", 1)[1].split()[0])
    retries = int(out.split("retries spent ", 1)[1].split()[0])
    # Deferral spends no retry: only the failures before the trip were retried.
    assert deferred >= 10, out
    assert retries <= 3, out


@pytest.mark.slow
def test_multi_worker_example_shares_one_breaker_across_workers() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # it starts its own redis-server
    done = run_example("examples/multi_worker.py", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "one trip opened the breaker in every worker: True" in out
    assert "tasks sent 80, completed 80 (w1 " in out
    assert "failed 0, lost 0" in out
    completed = out.split("completed 80 (", 1)[1].split(")", 1)[0]  # "w1 41, w2 39"
    assert all(int(part.split()[1]) > 0 for part in completed.split(", ")), out
    outage_calls = int(out.split("inventory API calls during the outage: ", 1)[1].split()[0])
    # About 50 tasks arrived during the outage; the shared breaker let only a handful call.
    assert outage_calls <= 12, out
    deferrals = out.split("deferrals per worker: ", 1)[1].split(";", 1)[0]  # "w1 29, w2 31"
    assert [part.split()[0] for part in deferrals.split(", ")] == ["w1", "w2"], out


def test_django_project_demo_reads_every_setting_from_django() -> None:
    done = run_example("examples/django_project/manage.py", "breaker_demo")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "plain task under breaker 'mailer' (CELERY_BREAKER_ROUTES)" in out
    assert "breaker payments: closed -> open (3 failures" in out  # CELERY_BREAKER_DEFAULT_POLICY
    assert "breaker mailer: closed -> open (2 failures" in out  # CELERY_BREAKER_POLICIES["mailer"]
    assert "orders 30: charges completed 30, receipts completed 30, failed 0" in out
    assert "does not start: ConfigurationError: unknown celery-breaker setting(s): CELERY_BREAKER_DEFAULT_POLCY" in out


def test_django_project_tests_pass_under_djangos_test_runner() -> None:
    done = run_example("examples/django_project/manage.py", "test", "shop")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Ran 4 tests" in done.stderr
    assert "OK" in done.stderr
