"""Every example runs, as a user would run it, and reports success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
