"""The installed ``celery`` command finds ``breaker`` through the entry point: real subprocesses, a real worker.

``celery -A tests.integration.proj breaker ...`` runs as an operator would type it,
configured like the integration tests' workers (``PROJ_BROKER``, ``PROJ_EXTRA_CONF``).
"""

from __future__ import annotations

import gc
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from celery_breaker import State
from celery_breaker.monitoring import collect_metrics
from celery_breaker.ops.cli import EXIT_UNAVAILABLE, EXIT_USAGE, SIGPIPE_EXIT
from tests.integration import proj
from tests.integration.workers import ROOT, WorkerProcess, wait_for
from tests.servers import free_port

from .conftest import breaker, stored, trip


def celery(broker: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A tests.integration.proj <args>`` in a subprocess; breakers under key prefix ``prefix``."""
    env = {**os.environ, "PROJ_BROKER": broker, "PROJ_EXTRA_CONF": json.dumps({"breaker_key_prefix": prefix}),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    env.pop("NO_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.proj", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture
def broker(proj_url: str) -> str:
    """``proj``'s own broker (tests/conftest.py): its app in this process publishes there."""
    return proj_url


@pytest.fixture
def prefix() -> str:
    return f"sub-{uuid.uuid4().hex[:8]}"


def test_celery_help_lists_the_breaker_command(broker: str, prefix: str) -> None:
    result = celery(broker, prefix, "--help")
    assert result.returncode == 0
    assert "breaker" in result.stdout
    assert "Show and operate the app's circuit breakers" in result.stdout


def test_the_entry_point_module_stays_import_light() -> None:
    """Every ``celery`` call imports ``celery_breaker.ops.cli``: Redis, stores and rendering load in a command."""
    heavy = ["redis", "celery_breaker.storage", "celery_breaker.core", "celery_breaker.monitoring",
             "celery_breaker.ops.operator", "celery_breaker.ops.console", "celery_breaker.ops.watch",
             "celery_breaker.integration.settings", "celery_breaker.integration.task"]  # fmt: skip
    check = f"import sys, celery_breaker.ops.cli; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_status_open_and_watch_as_an_operator_types_them(broker: str, prefix: str) -> None:
    url = f"{broker}?key_prefix={prefix}"
    trip(breaker(url, "partner-api"))

    status = celery(broker, prefix, "breaker", "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].split()[:2] == ["partner-api", "open"]
    assert status.stdout.splitlines()[-1] == "1 breaker: 1 open"
    assert "\x1b[" not in status.stdout  # a pipe, not a terminal

    opened = celery(broker, prefix, "breaker", "open", "partner-api")
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout.startswith("partner-api: forced_open (was open)")
    assert stored(url, "partner-api").state is State.FORCED_OPEN
    [row] = json.loads(celery(broker, prefix, "breaker", "status", "--json").stdout)
    assert (row["name"], row["state"], row["trips"]) == ("partner-api", "forced_open", 1)

    watch = celery(broker, prefix, "breaker", "watch", "--once")
    assert watch.returncode == 0, watch.stderr
    assert "celery breaker watch" in watch.stdout
    assert "forced_open" in watch.stdout
    assert "until closed" in watch.stdout


def test_bad_input_and_a_dead_store_are_one_line_each(broker: str, prefix: str) -> None:
    unknown = celery(broker, prefix, "breaker", "close", "no-such-breaker")
    assert unknown.returncode == EXIT_USAGE
    assert unknown.stderr.startswith("Error: no breaker named 'no-such-breaker'")
    assert "partner-api" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1

    empty_key = celery(broker, prefix, "breaker", "open", "partner-api", "--key", "")
    assert empty_key.returncode == EXIT_USAGE
    assert empty_key.stderr.strip() == "Error: breaker key '' is empty; a breaker without a key takes no key at all"

    dead = celery(f"redis://127.0.0.1:{free_port()}/0", prefix, "breaker", "status")
    assert dead.returncode == EXIT_UNAVAILABLE
    assert dead.stderr.startswith("Error: cannot reach the breaker store redis://127.0.0.1:")
    for result in (unknown, empty_key, dead):
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


def test_a_watch_piped_into_a_reader_that_stops_early_ends_quietly(broker: str, prefix: str) -> None:
    # `celery breaker watch | head -3`: the reader closes the pipe; the watch used to end
    # with "unexpected BrokenPipeError" on stderr and exit code 1.
    url = f"{broker}?key_prefix={prefix}"
    trip(breaker(url, "partner-api"))
    env = {**os.environ, "PROJ_BROKER": broker, "PROJ_EXTRA_CONF": json.dumps({"breaker_key_prefix": prefix}),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    watch = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.integration.proj", "breaker", "watch", "--interval", "0.1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert watch.stdout is not None
    assert watch.stderr is not None
    try:
        first = watch.stdout.readline()  # (a reader that takes one line, then goes: head -1)
        assert b"celery breaker watch" in first
        watch.stdout.close()
        code = watch.wait(timeout=60)
    finally:
        watch.kill()
    assert (code, watch.stderr.read()) == (SIGPIPE_EXIT, b"")


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["PYTHONUNBUFFERED", "buffered"])
def test_a_status_bigger_than_the_pipe_piped_into_a_reader_that_stops_early_ends_quietly(
    broker: str, prefix: str, unbuffered: str
) -> None:
    # `celery breaker status --json | head -1` with more than a pipe's worth of rows:
    # under PYTHONUNBUFFERED (stdout's raw file) the write the reader cut short lost the
    # rest with no error, and the command exited 0 where the docs say 141.
    url = f"{broker}?key_prefix={prefix}"
    for n in range(150):  # (about 100 KB of JSON: more than a pipe holds)
        breaker(url, "partner-api", key=f"tenant-{n}").call(lambda: None)
    env = {**os.environ, "PROJ_BROKER": broker, "PROJ_EXTRA_CONF": json.dumps({"breaker_key_prefix": prefix}),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": unbuffered}  # fmt: skip
    status = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.integration.proj", "breaker", "status", "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert status.stdout is not None
    assert status.stderr is not None
    try:
        assert status.stdout.readline() == b"[\n"  # (a reader that takes one line, then goes: head -1)
        status.stdout.close()
        code = status.wait(timeout=60)
    finally:
        status.kill()
    assert (code, status.stderr.read()) == (SIGPIPE_EXIT, b"")


def test_ctrl_c_at_a_terminal_ends_the_watch_cleanly(broker: str, prefix: str) -> None:
    """On a real pseudo-terminal: redrawn in place, the cursor hidden, then restored on ^C."""
    breaker(f"{broker}?key_prefix={prefix}", "partner-api").call(lambda: None)
    env = {**os.environ, "PROJ_BROKER": broker, "PROJ_EXTRA_CONF": json.dumps({"breaker_key_prefix": prefix}),
           "PYTHONPATH": str(ROOT), "COLUMNS": "150", "LINES": "40"}  # fmt: skip
    master, terminal = pty.openpty()
    # SIGINT handled as Python does by default, even if this test runner ignores it (a
    # background job does): an ignored signal would be inherited.
    start = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = ['celery', '-A', 'tests.integration.proj', 'breaker', 'watch', '--interval', '0.2']; "
        "runpy.run_module('celery', run_name='__main__')"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", start], cwd=ROOT, env=env, stdin=terminal, stdout=terminal, stderr=terminal,
        start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen = b""
    try:
        seen = _read_until(master, seen, lambda text: text.count(b"celery breaker watch") >= 2)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C makes the terminal send its foreground group
        assert process.wait(timeout=30) == 0
        seen = _read_until(master, seen, lambda text: False, timeout=0.5)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert text.startswith("\x1b[?25l\x1b[H")  # cursor hidden, drawn from the top left
    assert "partner-api" in text
    assert "Traceback" not in text
    assert "Aborted" not in text
    assert text.rstrip().endswith("\x1b[?25h")  # the cursor is back


def _read_until(fd: int, seen: bytes, done: Callable[[bytes], bool], timeout: float = 30.0) -> bytes:
    """Read a pseudo-terminal until ``done(everything read)`` or ``timeout`` (polling a process's output)."""
    deadline = time.monotonic() + timeout
    poller = select.poll()  # (not select: a long session may hold descriptors past FD_SETSIZE)
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while not done(seen) and time.monotonic() < deadline:
        ready = poller.poll(100)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the other end closed: the process is gone
                break
    return seen


@pytest.fixture
def sender(broker: str) -> Iterator[None]:
    """``proj``'s downstream, up and unused, before and after the test."""
    client = redis.Redis.from_url(broker)
    client.delete(proj.DOWN_KEY, proj.CALLS_KEY)
    yield
    client.delete(proj.DOWN_KEY, proj.CALLS_KEY)


@pytest.mark.slow
def test_an_operator_holds_a_running_cluster_back_and_lets_it_go(broker: str, prefix: str, sender: None) -> None:
    url = f"{broker}?key_prefix={prefix}"
    conf = json.dumps({"breaker_key_prefix": prefix})
    with WorkerProcess(broker, concurrency=1, extra_conf=conf, name=f"cli-{prefix}") as worker:
        worker.wait_ready()
        opened = celery(broker, prefix, "breaker", "open", "partner-api")  # a task's breaker: known before any use
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout.startswith("partner-api: forced_open (created)")

        results = [proj.call_partner.delay(n) for n in range(3)]

        def held_back() -> bool:
            rows = collect_metrics(url)
            return bool(rows) and rows[0].snapshot.deferrals >= 3 and rows[0].parked == 3

        wait_for(held_back, 30, "the worker to defer and park all 3 tasks")
        status = celery(broker, prefix, "breaker", "status")
        assert status.stdout.splitlines()[1].split()[-4:] == ["0", "3", "3", "-"]  # trips, deferred, parked, release
        assert redis.Redis.from_url(broker).get(proj.CALLS_KEY) is None  # the downstream saw nothing

        closed = celery(broker, prefix, "breaker", "close", "partner-api")
        assert closed.returncode == 0, closed.stderr
        wait_for(lambda: all(r.state == "SUCCESS" for r in results), 30, "the parked tasks to run once closed")
        assert sorted(r.get(timeout=5)["n"] for r in results) == [0, 1, 2]
        [row] = json.loads(celery(broker, prefix, "breaker", "status", "--json").stdout)
        assert (row["state"], row["parked"]) == ("closed", 0)
        # Collected now, while the result backend's Redis is up: Celery 5.5's
        # AsyncResult.__del__ unsubscribes, and raises if the server is gone by then.
        results.clear()
        gc.collect()
