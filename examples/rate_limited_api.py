"""A rate-limited HTTP API: 429 + Retry-After opens the breaker for exactly that long.

Runs in this process on the embedded defaults (in-memory broker and breaker store, a
worker thread) against a small HTTP server it starts on 127.0.0.1:

    python examples/rate_limited_api.py

The "partner API" allows 5 requests per 2-second window and answers everything beyond
with ``429 Too Many Requests`` and ``Retry-After`` (the seconds until its window
resets). Thirty ``fetch`` tasks are sent at once. The first 429 opens the breaker for
the Retry-After it carries (``urllib``'s ``HTTPError``, like ``requests``' and
``httpx``'s, is read for it), so the backlog waits instead of hammering the API: each
window, one probe goes first and the rest follow once it closes. The script prints how
many requests the API saw and how many it refused, and exits non-zero unless every
task completed.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_breaker import BreakerTask

TASKS = 30
ALLOWED_PER_WINDOW = 5
WINDOW = 2.0


class RateLimitedAPI(BaseHTTPRequestHandler):
    """Allows ALLOWED_PER_WINDOW requests per WINDOW seconds; refuses the rest with 429."""

    lock = threading.Lock()
    window_start = time.monotonic()
    used = 0
    served = 0
    refused = 0

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            now = time.monotonic()
            if now - cls.window_start >= WINDOW:
                cls.window_start, cls.used = now, 0
            allowed = cls.used < ALLOWED_PER_WINDOW
            if allowed:
                cls.used += 1
                cls.served += 1
            else:
                cls.refused += 1
            wait = max(1, round(WINDOW - (now - cls.window_start)))
        if allowed:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")
        else:
            self.send_response(429)
            self.send_header("Retry-After", str(wait))
            self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet


server = ThreadingHTTPServer(("127.0.0.1", 0), RateLimitedAPI)
API = f"http://127.0.0.1:{server.server_address[1]}/items"

app = Celery("rate_limited_api", broker="memory://", backend="cache+memory://")
app.conf.update(
    broker_transport_options={"polling_interval": 0.02},
    worker_hijack_root_logger=False,
    breaker_default_policy={
        "failure_threshold": 5,  # ordinary failures: 5 within a minute open it
        "half_open_max_calls": 1,  # one probe per window
        "success_threshold": 1,
        "reset_timeout": 1.0,
    },
    breaker_defer_spread=0.5,
)


@app.task(base=BreakerTask, bind=True, breaker="partner-api", max_retries=0)
def fetch(self: Any, n: int) -> int:
    # A 429 raises urllib.error.HTTPError carrying Retry-After: the breaker opens for it.
    with urllib.request.urlopen(f"{API}?n={n}", timeout=2) as response:
        return int(response.status)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    started = time.monotonic()
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        results = [fetch.delay(n) for n in range(TASKS)]
        statuses = [r.get(timeout=120, propagate=False) for r in results]
    server.shutdown()
    completed = sum(1 for s in statuses if s == 200)
    took = time.monotonic() - started
    print(f"tasks {TASKS}, completed {completed}, in {took:.1f} s")
    print(f"API requests served {RateLimitedAPI.served}, refused with 429: {RateLimitedAPI.refused}")
    return 0 if completed == TASKS else 1


if __name__ == "__main__":
    raise SystemExit(main())
