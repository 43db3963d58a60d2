"""Start and stop real ``celery worker`` and ``celery flower`` processes for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until it holds; return the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)  # polling real processes for an outcome
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class WorkerProcess:
    """``celery -A <app> worker`` (``tests.integration.proj`` by default) in a subprocess, logging to a file."""

    def __init__(self, broker: str, *, pool: str = "prefork", concurrency: int = 2,
                 extra_conf: str = "{}", name: str = "w1", app: str = "tests.integration.proj",
                 queues: str | None = None, env: dict[str, str] | None = None,
                 events: bool = True) -> None:  # fmt: skip
        self.broker = broker
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"celery-{name}-", suffix=".log")[1])
        env = {**os.environ, "PROJ_BROKER": broker, "PROJ_EXTRA_CONF": extra_conf, **(env or {}),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool,
             "-c", str(concurrency), "-n", f"{name}@%h", "--loglevel", "INFO", *(["-E"] if events else []),
             "--without-gossip",
             "--without-mingle", *(["-Q", queues] if queues else [])],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if " ready." in self.log():
                return
            time.sleep(0.1)  # polling the log of a starting process
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log()}")

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Flower:
    """``celery -A <app> flower`` on a free loopback port, with a ``flowerconfig.py``."""

    def __init__(self, broker: str, config: str, app: str = "tests.integration.partner_proj") -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="flower-"))
        (self.dir / "flowerconfig.py").write_text(config)
        self.log_path = self.dir / "flower.log"
        env = {**os.environ, "PROJ_BROKER": broker, "FLOWER_UNAUTHENTICATED_API": "true",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", app, "--broker", broker, "flower",
                 f"--conf={self.dir / 'flowerconfig.py'}", "--address=127.0.0.1", f"--port={self.port}",
                 "--persistent=False"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return str(response.read().decode())

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"flower exited:\n{self.log_path.read_text(errors='replace')}")
        try:
            self.get("/healthcheck")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def flower(broker: str, config: str) -> Iterator[Flower]:
    """A started Flower, stopped on leaving."""
    started = Flower(broker, config)
    try:
        wait_for(started.up, 60, "flower to answer")
        yield started
    finally:
        started.stop()
