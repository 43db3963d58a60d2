"""Run a real ``celery worker`` on a Redis broker from an installed celery-breaker, and one guarded task through it.

Usage: ``python scripts/wheel_worker_smoke.py`` with the Python of a venv that has only
``celery-breaker[redis]`` installed (from the built wheel): CI's check that the ``redis``
extra installs everything a Redis broker and store need. A worker on a Redis broker once
crashed on its first start, because kombu's Redis transport needs ``packaging``, which
the extra did not bring. Starts its own ``redis-server`` on a free loopback port and stops
everything it started; exits non-zero, with the worker's log, if the task does not succeed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PROJECT = textwrap.dedent(
    """
    import os
    from celery import Celery
    from celery_breaker import BreakerTask

    app = Celery("smoke", broker=os.environ["SMOKE_BROKER"], backend=os.environ["SMOKE_BROKER"])

    @app.task(base=BreakerTask, bind=True, breaker="smoke")
    def guarded(self, x):
        with self.breaker:
            return x * 2
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="wheel-smoke-"))
    (workdir / "smoke.py").write_text(PROJECT)
    port = free_port()
    redis_server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    broker = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "SMOKE_BROKER": broker, "PYTHONPATH": str(workdir)}
    log = workdir / "worker.log"
    worker = None
    try:
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "smoke", "worker", "-P", "prefork", "-c", "1",
                 "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        check = (
            "import smoke; r = smoke.guarded.delay(21); value = r.get(timeout=60); "
            "assert value == 42, value; print('guarded task ran on a real worker:', value)"
        )
        done = subprocess.run([sys.executable, "-c", check], cwd=workdir, env=env, timeout=120, check=False)
        if done.returncode != 0 or worker.poll() is not None:
            print(log.read_text(errors="replace"), file=sys.stderr)
            return 1
        if "breakers stored in redis://" not in log.read_text(errors="replace"):
            print("the worker did not log celery-breaker's start line:\n" + log.read_text(), file=sys.stderr)
            return 1
        return 0
    finally:
        for process in (worker, redis_server):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
