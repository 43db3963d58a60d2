"""Follow docs/quickstart.md as a newcomer would, command by command, against a real Redis and worker.

Usage: ``python scripts/quickstart_path.py`` with the Python of a fresh venv (CI's, which
holds the built wheel with ``[redis]``); run from the repository's root. The commands come
from the page itself, so the page and this script cannot drift apart:

1. the install command (``pip install "./celery-breaker[redis]"``), run from a directory
   where ``./celery-breaker`` is this clone;
2. the first ``BreakerTask`` (the page's Python block, its broker pointed at this script's
   own ``redis-server``), with a fake ``payments_api`` that a Redis key turns down;
3. the worker command, then charges while the API is up, and while it is down until the
   breaker opens;
4. every ``celery -A shop breaker ...`` command the page shows: ``status``, ``watch`` and
   ``web`` (both ended with Ctrl-C, as the page says), and ``close payments``, answered
   "no" while the API is down (nothing changes) and "yes" once it is back;
5. then every charge completes exactly once, and the worker logged what the page says it logs.

A ``celery -A shop`` command on the page that this script does not follow fails the run.
Starts its own ``redis-server`` on a free loopback port and stops everything it started.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "quickstart.md"
ORDERS_UP, ORDERS_DOWN = range(0, 4), range(4, 14)

PAYMENTS_API = '''
"""A payments API for the quick start: down while the Redis key ``payments-down`` exists."""
import os

import redis

_redis = redis.Redis.from_url(os.environ["QUICKSTART_REDIS"])


def charge(order_id):
    if _redis.exists("payments-down"):
        raise ConnectionError("payments API down")
    _redis.rpush("payments-charged", order_id)
    return {"order": order_id, "charged": True}
'''


class PathError(Exception):
    """The page and what happened disagree."""


def blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced block of the page: (language, body)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shop_commands(text: str) -> list[str]:
    """Every ``celery -A shop ...`` command on the page, in its order: inline or in an ``sh`` block."""
    found = [(match.start(), match.group(1)) for match in re.finditer(r"`(celery -A shop [^`]+)`", text)]
    for match in re.finditer(r"^```sh\n(.*?)^```", text, re.S | re.M):
        for offset, line in _lines(match.group(1), match.start(1)):
            command = line.split("#", 1)[0].strip()
            if command.startswith("celery -A shop "):
                found.append((offset, command))
    return [command for _, command in sorted(found)]


def _lines(body: str, start: int) -> list[tuple[int, str]]:
    out, offset = [], start
    for line in body.splitlines(keepends=True):
        out.append((offset, line))
        offset += len(line)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise PathError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Run:
    """The run: a work directory, a Redis, the venv's commands, the worker."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.port}/0"
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "PYTHONPATH": str(workdir), "QUICKSTART_REDIS": self.redis_url}  # fmt: skip
        self.env.pop("NO_COLOR", None)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.worker_log = workdir / "worker.log"
        self.followed: list[str] = []

    def start_redis(self) -> None:
        self.background(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            log=self.workdir / "redis.log",
        )  # fmt: skip
        poll("redis-server", lambda: self.redis("PING") == "True", 20)

    def redis(self, *args: str) -> str:
        """A Redis command's reply as text ("True" for PING and SET), "" when Redis cannot be reached."""
        import redis

        client = redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)
        try:
            return str(client.execute_command(*args))  # type: ignore[no-untyped-call]
        except redis.ConnectionError:
            return ""
        finally:
            client.close()

    def charged(self) -> list[int]:
        import redis

        with redis.Redis(port=self.port, decode_responses=True) as client:
            return [int(x) for x in client.lrange("payments-charged", 0, -1)]

    def background(self, argv: list[str], *, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(argv, cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def run(self, command: str, *, answer: str | None = None, expect: int = 0) -> subprocess.CompletedProcess[str]:
        """A command as the page writes it, run to its end."""
        print(f"$ {command}" + (f"   (answering {answer.strip()!r})" if answer else ""), flush=True)
        done = subprocess.run(shlex.split(command), cwd=self.workdir, env=self.env, input=answer or "",
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        if done.returncode != expect:
            raise PathError(f"{command!r} exited {done.returncode}, expected {expect}:\n{done.stdout}\n{done.stderr}")
        self.followed.append(command)
        return done

    def until_interrupted(self, command: str, ready: Callable[[str], bool]) -> str:
        """A command that runs until Ctrl-C (``watch``, ``web``): its output once ``ready``, then SIGINT, exit 0."""
        print(f"$ {command}   (then Ctrl-C)", flush=True)
        log = self.workdir / (command.rsplit(maxsplit=1)[-1] + ".out")
        process = self.background(shlex.split(command), log=log)
        try:
            poll(f"{command!r} to show the breaker", lambda: ready(log.read_text(errors="replace")), 60)
        except PathError as exc:
            raise PathError(f"{exc}; it printed:\n{log.read_text(errors='replace')}") from None
        finally:
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=30)
        output = log.read_text(errors="replace")
        if code != 0 or "Traceback" in output:
            raise PathError(f"{command!r} ended by Ctrl-C exited {code}:\n{output}")
        self.followed.append(command)
        return output

    def send(self, orders: range) -> None:
        code = f"import shop\nfor order in {list(orders)!r}:\n    shop.charge.delay(order)\n"
        subprocess.run([sys.executable, "-c", code], cwd=self.workdir, env=self.env, check=True, timeout=60)

    def state(self) -> str:
        done = subprocess.run(["celery", "-A", "shop", "breaker", "status", "--json"], cwd=self.workdir,
                              env=self.env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        rows = json.loads(done.stdout or "[]") if done.returncode == 0 else []
        return next((row["state"] for row in rows if row["name"] == "payments"), "")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def follow(path: Run, page: str) -> None:
    # 1. Install, as the page says, from a directory where ./celery-breaker is this clone.
    install = next(body for lang, body in blocks(page) if lang == "sh" and "pip install" in body)
    pip = next(line for line in install.splitlines() if line.startswith("pip install"))
    (path.workdir / "celery-breaker").symlink_to(ROOT)
    print(f"$ {pip}", flush=True)
    argv = [sys.executable, "-m", *shlex.split(pip), "-q", "--disable-pip-version-check"]
    subprocess.run(argv, cwd=path.workdir, env=path.env, check=True, timeout=600)

    # 2. The first BreakerTask, with a payments API, on this script's Redis.
    code = next(body for lang, body in blocks(page) if lang == "python" and "BreakerTask" in body)
    if "redis://localhost:6379/0" not in code:
        raise PathError("the page's first BreakerTask no longer uses redis://localhost:6379/0: update this script")
    (path.workdir / "payments_api.py").write_text(PAYMENTS_API)
    shop = "import payments_api\n" + code.replace("redis://localhost:6379/0", path.redis_url)
    (path.workdir / "shop.py").write_text(shop)
    path.start_redis()

    commands = shop_commands(page)
    print("the page's commands:", *commands, sep="\n  ", flush=True)
    worker = next(command for command in commands if command.startswith("celery -A shop worker"))
    print(f"$ {worker}   (in the background)", flush=True)
    path.background(shlex.split(worker), log=path.worker_log)
    path.followed.append(worker)
    poll("the worker to be ready", lambda: " ready." in path.worker_log.read_text(errors="replace"), 90)

    # 3. Charges while the API is up; then down, until the breaker opens.
    path.send(ORDERS_UP)
    poll("the charges made while the API is up", lambda: sorted(path.charged()) == list(ORDERS_UP))
    path.redis("SET", "payments-down", "1")
    path.send(ORDERS_DOWN)
    poll("the breaker to open", lambda: path.state() == "open")

    # 4. What the page says an operator sees and does meanwhile.
    for command in commands:
        if command == worker or command.startswith("celery -A shop breaker close"):
            continue
        if command == "celery -A shop breaker status":
            shown = path.run(command).stdout
            row = next((line for line in shown.splitlines() if line.startswith("payments ")), "")
            if " open " not in row or not re.search(r"in \d+\.\d s", row):
                raise PathError(f"status does not show payments open with its time to probe:\n{shown}")
        elif command == "celery -A shop breaker watch":
            path.until_interrupted(command, lambda out: re.search(r"^payments +open ", out, re.M) is not None)
        elif command == "celery -A shop breaker web":
            out = path.until_interrupted(command, _web_shows_open)
            if "http://127.0.0.1:8787/" not in out:
                raise PathError(f"web did not serve the page's address:\n{out}")
        else:
            raise PathError(f"the page shows {command!r}, which this script does not follow: add it")

    close = next(command for command in commands if command.startswith("celery -A shop breaker close"))
    refused = path.run(close, answer="n\n", expect=1)
    if "Warning: payments tripped" not in refused.stderr or path.state() != "open":
        raise PathError(f"closing while the API is down did not warn, or changed the breaker:\n{refused.stderr}")

    # 5. The API is back; the operator closes the breaker; every charge completes once.
    path.redis("DEL", "payments-down")
    path.run(close, answer="y\n")
    everything = list(ORDERS_UP) + list(ORDERS_DOWN)
    poll("every charge to complete", lambda: sorted(path.charged()) == everything, 120)
    time.sleep(1.0)  # (a duplicate would show now)
    if sorted(path.charged()) != everything:
        raise PathError(f"charges ran more than once: {sorted(path.charged())}")
    log = path.worker_log.read_text(errors="replace")
    for said in ("celery-breaker: breakers stored in redis://127.0.0.1:", "breaker payments closed -> open (",
                 "retry: deferred: breaker 'payments' open, deferred "):  # fmt: skip
        if said not in log:
            raise PathError(f"the worker's log lacks {said!r}, which the page quotes:\n{log}")
    if "Traceback" in log:
        raise PathError(f"the worker's log has a traceback:\n{log}")


def _web_shows_open(out: str) -> bool:
    match = re.search(r"(http://127\.0\.0\.1:\d+/)", out)
    if match is None:
        return False
    try:
        with urllib.request.urlopen(match.group(1) + "api/breakers", timeout=5) as response:
            view = json.load(response)
    except OSError:
        return False
    return any(row["name"] == "payments" and row["state"] == "open" for row in view["breakers"])


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="quickstart-path-"))
    path = Run(workdir)
    started = time.monotonic()
    try:
        follow(path, PAGE.read_text())
    except (PathError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"quickstart path FAILED: {exc}", file=sys.stderr)
        if path.worker_log.exists():
            print("--- worker log ---\n" + path.worker_log.read_text(errors="replace")[-8000:], file=sys.stderr)
        return 1
    finally:
        path.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"quickstart path followed in {time.monotonic() - started:.0f} s: " + "; ".join(path.followed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
