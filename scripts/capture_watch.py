"""Capture ``celery breaker watch`` during a real outage, for the docs: ``docs/img/breaker-watch.{txt,svg}``.

    .venv/bin/python scripts/capture_watch.py        # ~25 s; needs redis-server

It starts a redis-server on a free loopback port and a worker of the small app below
(three breakers: ``partner-api``, ``billing`` and the per-key ``crm``), sends tasks at a
steady rate, and runs ``celery -A capture_watch breaker watch --color`` while the
partner goes down, an operator forces ``crm[tenant-3]`` open, and the partner comes
back. The frame kept is the last one showing the partner's breaker open with tasks
parked behind it: ``breaker-watch.txt`` is that frame with its ANSI colours (``cat`` it
in a terminal), ``breaker-watch.svg`` the same frame drawn as an image (written by hand
from the colour codes: no extra dependency) and, when ``rsvg-convert`` is installed
(Debian ``librsvg2-bin``), ``breaker-watch.png`` rendered from it.

This module is also the demo's Celery app (``-A capture_watch``), configured from
``WATCH_DEMO_BROKER``.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_breaker import BreakerTask

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BROKER = os.environ.get("WATCH_DEMO_BROKER", "redis://127.0.0.1:6379/0")
DOWN_KEY = "demo:partner-down"

app = Celery("capture_watch", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    breaker_default_policy={
        "failure_rate_threshold": 0.5,
        "minimum_calls": 6,
        "window": 10.0,
        "reset_timeout": 2.0,
        "half_open_max_calls": 1,
    },
    breaker_defer_spread=0.5,
)


def _downstream() -> redis.Redis:
    return redis.Redis.from_url(BROKER)


@app.task(base=BreakerTask, breaker="partner-api", max_retries=0)
def call_partner(n: int) -> int:
    """The partner API: fails while ``DOWN_KEY`` exists."""
    if _downstream().exists(DOWN_KEY):
        raise ConnectionError("partner API is down")
    return n


@app.task(base=BreakerTask, breaker="billing")
def charge(n: int) -> int:
    """A healthy downstream."""
    return n


@app.task(base=BreakerTask, breaker="crm", breaker_key=lambda args, kwargs: args[0])
def sync_tenant(tenant: str, n: int) -> int:
    """One breaker per tenant."""
    return n


# -- the capture ------------------------------------------------------------------

ITERATIONS = 16
PARTNER_DOWN_AT = 3.0  # seconds after the watch starts
OPERATOR_AT = 5.0
PARTNER_UP_AT = 12.0


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from tests.servers import RedisServer

    with RedisServer() as server, tempfile.TemporaryDirectory() as scratch:
        server.start()
        broker = f"{server.url}/0"
        env = {**os.environ, "WATCH_DEMO_BROKER": broker, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}"}
        env.pop("NO_COLOR", None)
        log = Path(scratch) / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "capture_watch", "worker", "-P", "threads", "-c", "8",
                 "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "-n", "demo@%h"],
                cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            _wait_ready(broker, worker, log)
            frames = _run(broker, env)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    frame = _pick(frames)
    img = ROOT / "docs" / "img"
    img.mkdir(exist_ok=True)
    (img / "breaker-watch.txt").write_text(frame + "\n")
    (img / "breaker-watch.svg").write_text(to_svg(frame))
    written = ["breaker-watch.txt", "breaker-watch.svg"]
    rsvg = shutil.which("rsvg-convert")  # optional (Debian: librsvg2-bin): the PNG the docs show
    if rsvg is not None:
        subprocess.run([rsvg, "-z", "1.5", str(img / "breaker-watch.svg"), "-o", str(img / "breaker-watch.png")],
                       check=True)  # fmt: skip
        written.append("breaker-watch.png")
    else:
        print("rsvg-convert not found (apt-get install librsvg2-bin): breaker-watch.png not redrawn")
    print(_strip(frame))
    print(f"\nwrote {', '.join(written)} in {img}")


def _wait_ready(broker: str, worker: subprocess.Popen[bytes], log: Path) -> None:
    app.conf.broker_url = broker
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited:\n{log.read_text(errors='replace')}")
        if app.control.ping(timeout=0.5):
            return
    raise SystemExit("the worker did not answer a ping within 60 s")


def _run(broker: str, env: dict[str, str]) -> list[str]:
    stop = threading.Event()
    sender = threading.Thread(target=_send, args=(stop,), daemon=True)
    sender.start()
    time.sleep(1.5)  # some traffic before the first frame (a demo paced in real time)
    watch = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "capture_watch", "breaker", "watch", "--color",
         "--interval", "1", "--iterations", str(ITERATIONS)],
        cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    start = time.monotonic()
    client = redis.Redis.from_url(broker)
    _at(start + PARTNER_DOWN_AT, lambda: client.set(DOWN_KEY, 1))
    _at(start + OPERATOR_AT, lambda: subprocess.run(
        [sys.executable, "-m", "celery", "-A", "capture_watch", "breaker", "open", "crm[tenant-3]"],
        cwd=HERE, env=env, check=True, capture_output=True,
    ))  # fmt: skip
    _at(start + PARTNER_UP_AT, lambda: client.delete(DOWN_KEY))
    out, err = watch.communicate(timeout=120)
    stop.set()
    if watch.returncode != 0:
        raise SystemExit(f"watch exited with {watch.returncode}: {err}")
    return ["celery breaker watch" + part.rstrip("\n") for part in out.split("\x1b[1mcelery breaker watch")[1:]]


def _at(when: float, action: Any) -> None:
    time.sleep(max(0.0, when - time.monotonic()))
    action()


def _send(stop: threading.Event) -> None:
    """About 14 tasks a second: partner 6/s, billing 4/s, crm 4/s over four tenants."""
    n = 0
    while not stop.is_set():
        call_partner.delay(n)
        if n % 3 != 2:
            charge.delay(n)
        if n % 3 != 1:
            sync_tenant.delay(f"tenant-{n % 4 + 1}", n)
        n += 1
        time.sleep(1 / 6)


_SGR = re.compile(r"\x1b\[([0-9;]*)m")


def _strip(text: str) -> str:
    return _SGR.sub("", text)


def _pick(frames: list[str]) -> str:
    """The last frame showing partner-api open with tasks parked behind it (else the last)."""
    for frame in reversed(frames):
        row = next((line for line in _strip(frame).splitlines() if line.startswith("partner-api ")), "")
        if " open " in row and not row.rstrip().endswith(" 0"):
            return "\x1b[1m" + frame
    return "\x1b[1m" + frames[-1]


_COLOURS = {"31": "#ff6b6b", "32": "#69db7c", "33": "#ffd43b", "34": "#74c0fc", "35": "#f783ac"}
_FOREGROUND, _BACKGROUND = "#d8dee9", "#1e2430"


def to_svg(frame: str, *, font_size: int = 14) -> str:
    """``frame`` (text with ANSI colour codes) drawn as an SVG terminal screenshot."""
    char_width, line_height, pad = font_size * 0.6, font_size * 1.35, 16
    lines = frame.split("\n")
    width = max(len(_strip(line)) for line in lines) * char_width + 2 * pad
    height = len(lines) * line_height + 2 * pad
    body = []
    for index, line in enumerate(lines):
        y = pad + (index + 0.8) * line_height
        spans, colour, bold, at = [], _FOREGROUND, False, 0
        for match in [*_SGR.finditer(line), None]:
            end = match.start() if match else len(line)
            if end > at:
                weight = ' font-weight="bold"' if bold else ""
                spans.append(f'<tspan fill="{colour}"{weight}>{html.escape(line[at:end])}</tspan>')
            if match is None:
                break
            for code in (match.group(1) or "0").split(";"):
                if code in ("0", ""):
                    colour, bold = _FOREGROUND, False
                elif code == "1":
                    bold = True
                elif code in _COLOURS:
                    colour = _COLOURS[code]
            at = match.end()
        body.append(f'<text x="{pad}" y="{y:.1f}" xml:space="preserve">{"".join(spans)}</text>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{font_size}">\n'
        f'<rect width="100%" height="100%" rx="6" fill="{_BACKGROUND}"/>\n' + "\n".join(body) + "\n</svg>\n"
    )


if __name__ == "__main__":
    main()
