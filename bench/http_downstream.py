"""Real HTTP downstreams on 127.0.0.1 for the benches; each logs every request.

``Downstream`` (bench/outage_timeline.py): healthy, or in an outage; a copy, with a
timestamped log, of ``tests/integration/downstream.py`` (bench cannot import tests/).
``LimitedDownstream`` (bench/recovery.py): down, or up with a capacity of C requests per
second: slower near it, ``429`` with ``Retry-After`` above it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["Downstream", "LimitedDownstream", "Request"]

#: How long a hanging answer is held: well beyond the clients' timeout (the bench app's is 0.5 s).
HANG_S = 2.0


@dataclass(frozen=True)
class Request:
    """One request the downstream received: when (epoch seconds), in which phase, and its answer."""

    at: float
    phase: str
    answer: str  # ok, 503 or hang


class Downstream:
    """``ThreadingHTTPServer`` in a thread. ``outage(True)`` starts an outage: requests get
    503 and hang (no answer for ``HANG_S`` seconds, then 503) in turn; ``outage(False)``
    ends it (200 again). ``requests()`` is every request it has received, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = "before"
        self._log: list[Request] = []
        self._outage_count = 0
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="downstream", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def outage(self, down: bool) -> None:
        """Start (``True``) or end (``False``) the outage; phases: before, outage, after."""
        with self._lock:
            self._phase = "outage" if down else "after"

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._log)

    def _answer(self) -> str:
        """Log this request and decide its answer: ok, 503 or hang."""
        with self._lock:
            if self._phase == "outage":
                self._outage_count += 1
                answer = "hang" if self._outage_count % 2 == 0 else "503"
            else:
                answer = "ok"
            self._log.append(Request(time.time(), self._phase, answer))
        return answer

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        downstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                answer = downstream._answer()
                if answer == "hang":
                    # The downstream misbehaving, not the bench waiting: hold the answer.
                    downstream._stopping.wait(HANG_S)
                status = 200 if answer == "ok" else 503
                body = b"ok" if status == 200 else b"unavailable"
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timed out) before the answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> Downstream:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> Downstream:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class LimitedDownstream:
    """A downstream with a capacity: ``ThreadingHTTPServer`` in a thread.

    While down (``down(True)``) every request gets 503. While up, requests are counted
    over the last second: at ``capacity`` or more, a request gets ``429`` with
    ``Retry-After: 1`` (``retry_after``; and is not counted); below it, a 200 after ``BASE_S``, slower
    from ``slow_from`` of the capacity on, rising linearly to ``BASE_S + SLOW_S`` at the
    capacity (a service queueing as it saturates). ``capacity=None``: no limit, always
    fast. ``usual_slow``: this share of the requests answered takes ``USUAL_S`` more,
    whatever the load (a slow path of the downstream's own: every 1/share-th request,
    evenly). ``refuse_for(seconds)``: every request gets ``429`` for that long (a burst of
    refusals, e.g. another client's spike filling a shared limit). ``latency``: seconds
    every 200 takes on top (a downstream slow to answer, not loaded). ``requests()`` is
    every answer, in order: (epoch seconds, ``ok``/``429``/``503``, delay).
    """

    BASE_S = 0.003
    SLOW_S = 0.4
    USUAL_S = 0.15

    def __init__(
        self,
        capacity: float | None,
        *,
        slow_from: float = 0.85,
        usual_slow: float = 0.0,
        retry_after: float = 1.0,
        latency: float = 0.0,
    ) -> None:
        self.capacity = capacity
        self.latency = latency
        self.retry_after = retry_after
        self.slow_from = slow_from
        self.usual_slow = usual_slow
        self._usual_owed = 0.0  # (the share accumulated: a request is slow each time it passes 1)
        self._lock = threading.Lock()
        self._down = False
        self._refusing_until = 0.0
        self._window: deque[float] = deque()
        self._log: list[tuple[float, str, float]] = []
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.request_queue_size = 256
        self._thread = threading.Thread(target=self._server.serve_forever, name="downstream", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def down(self, down: bool) -> None:
        """Start (``True``) or end (``False``) an outage."""
        with self._lock:
            self._down = down

    def refuse_for(self, seconds: float) -> None:
        """Answer every request ``429`` for the next ``seconds``."""
        with self._lock:
            self._refusing_until = time.monotonic() + seconds

    def requests(self) -> list[tuple[float, str, float]]:
        with self._lock:
            return list(self._log)

    def _answer(self) -> tuple[str, float]:
        """Log this request; its answer (ok, 429 or 503) and how long it takes."""
        with self._lock:
            now = time.monotonic()
            while self._window and self._window[0] <= now - 1.0:
                self._window.popleft()
            if self._down:
                answer, delay = "503", 0.0
            elif now < self._refusing_until or (self.capacity is not None and len(self._window) >= self.capacity):
                answer, delay = "429", 0.0
            else:
                self._window.append(now)
                load = 0.0 if self.capacity is None else len(self._window) / self.capacity
                zone = 1.0 - self.slow_from  # (none: it answers 429 without slowing first)
                queueing = max(0.0, (load - self.slow_from) / zone) if zone > 0 else 0.0
                answer, delay = "ok", self.BASE_S + self.latency + self.SLOW_S * min(1.0, queueing)
                self._usual_owed += self.usual_slow
                if self._usual_owed >= 1.0:
                    self._usual_owed -= 1.0
                    delay += self.USUAL_S
            self._log.append((time.time(), answer, delay))
        return answer, delay

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        downstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                answer, delay = downstream._answer()
                if delay:
                    downstream._stopping.wait(delay)  # the downstream's own latency, not the bench waiting
                status = {"ok": 200, "429": 429, "503": 503}[answer]
                body = b"ok" if status == 200 else b"busy"
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", f"{downstream.retry_after:g}")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> LimitedDownstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
