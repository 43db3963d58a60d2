"""Browser-test helpers: headless Chromium driven by the system chromedriver, ``celery breaker web`` as a real
subprocess, and a store of the test's own whose URL carries a password."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from celery_breaker import CircuitBreaker
from celery_breaker.storage import close_stores

from .webproj import POLICY, STORE_ENV

ROOT = Path(__file__).resolve().parents[2]
#: Debian's packages `chromium` and `chromium-driver` (./scripts/test.sh installs them): nothing is downloaded.
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: Set to a directory (docs/img) to write the screenshots there instead of the test's temp dir.
SCREENSHOTS_ENV = "CELERY_BREAKER_WEB_SCREENSHOTS"


@pytest.fixture(scope="session")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the session, 1280 px wide."""
    with chromium() as driver:
        yield driver


@contextlib.contextmanager
def chromium(*arguments: str) -> Iterator[WebDriver]:
    """A headless Chromium, 1280 px wide, with these command-line ``arguments`` too."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (./scripts/test.sh does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--window-size=1280,640",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--lang=en-US",
        *arguments,
    ):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=subprocess.DEVNULL), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the screenshots go: ``$CELERY_BREAKER_WEB_SCREENSHOTS`` (the docs' images), else a temp dir."""
    return Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)


@pytest.fixture
def store_url(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the session's Redis, reached as an ACL user with a password:
    the URL carries a secret the page must never show."""
    user, password = f"web-{uuid.uuid4().hex[:8]}", secrets.token_hex(12)
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"], commands=["+@all"])
    prefix = f"web{uuid.uuid4().hex[:8]}"
    try:
        yield f"redis://{user}:{password}@{redis_url.partition('://')[2]}/0?key_prefix={prefix}"
    finally:
        close_stores()  # before its user goes: the clients would try again as a user no longer there
        for key in admin.scan_iter(match=f"*{prefix}*"):
            admin.delete(key)
        admin.acl_deluser(user)
        admin.close()


def breaker(url: str, name: str, key: str | None = None) -> CircuitBreaker:
    """A breaker of the store, as a worker holds it."""
    return CircuitBreaker(name, POLICY, storage=url, key=key)


class WebProcess:
    """``celery -A tests.web.webproj:app breaker web --port 0 <args>`` in a subprocess, as an operator starts it.

    ``url`` is the address it printed. ``interrupt()`` sends SIGINT to its process group,
    which is what Ctrl-C at a terminal does.
    """

    def __init__(self, store: str, *args: str, env: dict[str, str] | None = None) -> None:
        argv = ["celery", "-A", "tests.web.webproj:app", "breaker", "web", "--port", "0", *args]
        # SIGINT handled as Python does by default, even if this test runner ignores it (a
        # background job does): an ignored signal would be inherited.
        start = (
            "import faulthandler, runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "faulthandler.register(signal.SIGUSR1, all_threads=True); "  # (see interrupt: where a hang is)
            f"sys.argv = {argv!r}; runpy.run_module('celery', run_name='__main__')"
        )
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (the process's log, for its life: closed on exit)
        self._stderr_text = ""
        self.process = subprocess.Popen(
            [sys.executable, "-c", start],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, **(env or {}), STORE_ENV: store, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"},
            start_new_session=True,
        )
        self.stdout = ""
        self.url = self._served_at()

    def _served_at(self, timeout: float = 30.0) -> str:
        """Read stdout until the command prints where it serves (polling a starting process)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r" at (https?://\S+) \(Ctrl-C to quit\)", self.stdout)
            if found:
                return found.group(1)
            # (poll, not select: a long test session may hold descriptors past FD_SETSIZE)
            ready = poller.poll(100)
            chunk = os.read(fd, 65536) if ready else b""
            if ready and not chunk:
                break  # the process closed stdout: it exited
            self.stdout += chunk.decode()
        self.interrupt()
        raise AssertionError(f"celery breaker web did not start:\n{self.stdout}\n{self.stderr()}")

    def stderr(self) -> str:
        """What it wrote to stderr so far (its log), after it ended too."""
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_text = self._stderr.read().decode(errors="replace")
        return self._stderr_text

    def interrupt(self) -> int:
        """Ctrl-C; return the exit code."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        return self._exit_code("Ctrl-C")

    def terminate(self) -> int:
        """SIGTERM (systemctl stop, docker stop); return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self._exit_code("SIGTERM")

    def _exit_code(self, sent: str) -> int:
        try:
            out, _ = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            # Still running 20 s after it was told to stop: every thread's stack goes to its
            # log (SIGUSR1), and the test that stopped it fails showing them.
            os.kill(self.process.pid, signal.SIGUSR1)
            time.sleep(1.0)  # (waiting for the dump: a process, not time, is waited for)
            self.process.kill()
            out, _ = self.process.communicate()
            self.stdout += out.decode()
            log = self.stderr()[-6000:]
            raise AssertionError(f"celery breaker web did not exit on {sent}; its log:\n{log}") from None
        self.stdout += out.decode()
        return self.process.returncode

    def __enter__(self) -> WebProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.interrupt()
        self.stderr()
        self._stderr.close()


def request(
    url: str, *, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """One HTTP request; its status and its JSON (or text) body, errors included."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    sent = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(sent, timeout=10) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    with contextlib.suppress(ValueError):
        return status, json.loads(text)
    return status, text
