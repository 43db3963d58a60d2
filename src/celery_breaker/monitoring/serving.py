"""What a small HTTP server of ours needs against clients that never finish: the worker's
``/metrics`` (``prometheus.start_metrics_server``) and ``celery breaker web``.

The standard library's threading servers start a thread per connection, with no limit,
and wait for a request forever. A client that connects and sends nothing (or a thousand
of them) then holds a thread and a file descriptor each for as long as it likes. The
worker's endpoint runs in the worker's main process: when its descriptors ran out, the
broker connection could not be made again, and the worker stopped with
``Unrecoverable error: OperationalError('[Errno 24] Too many open files')``; until then
``accept()`` failed at once in a loop, at full CPU. ``Guarded`` bounds both:

* a connection silent for ``timeout`` seconds (each read or write) is closed (the
  handler's ``timeout``, ``QUIET_FOR``);
* a connection that has not sent its whole request ``request_within`` seconds after it
  was accepted is closed (``Deadlined``, ``REQUEST_WITHIN``): a client that trickles its
  request a byte at a time, each within ``QUIET_FOR``, holds its slot no longer;
* at most ``max_connections`` are served at once; one more is closed as soon as it is
  accepted, so the process never comes near its descriptor limit;
* when ``accept()`` fails for want of descriptors anyway (other parts of the process
  used them), the server waits a little before it tries again, instead of spinning.

Only the standard library: ``prometheus`` and ``ops.web`` both use it.
"""

from __future__ import annotations

import errno
import io
import logging
import sys
import threading
import time
from typing import Any

from ..storage.masking import MaskedRepr

__all__ = ["ACCEPT_PAUSE", "QUIET_FOR", "REQUEST_WITHIN", "Deadlined", "Guarded"]

logger = logging.getLogger("celery_breaker")

#: Seconds a connection may stay silent (each read or write) before it is closed: a
#: scrape or a page's request takes milliseconds.
QUIET_FOR = 10.0
#: Seconds a connection has to send its whole request (line, headers and body), from when
#: it was accepted: a scrape or a page's request comes in one piece.
REQUEST_WITHIN = 30.0
#: Seconds the server waits after ``accept()`` failed for want of file descriptors.
ACCEPT_PAUSE = 0.1
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Guarded:
    """A mix-in for a ``socketserver.ThreadingMixIn`` server (before it in the bases):
    at most ``max_connections`` connections at once, and no busy loop when the process
    is out of file descriptors. Pair it with a handler whose ``timeout`` is set
    (``QUIET_FOR``), so an idle connection ends."""

    #: Connections served at once; more are closed as they are accepted.
    max_connections = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        # The connections holding a slot: each frees it once, whoever gets there first
        # (its thread at its end, or ``process_request`` when starting it failed).
        self._holding: set[int] = set()
        self._holding_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> Any:
        """Accept a connection; out of file descriptors, pause before the error (no busy loop)."""
        try:
            return super().get_request()  # type: ignore[misc]
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                time.sleep(ACCEPT_PAUSE)  # (the listening socket stays readable: without this, a busy loop)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread of its own, or close it when all slots are taken."""
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # type: ignore[attr-defined]  # (as many as it serves: closed at once)
            return
        with self._holding_lock:
            self._holding.add(id(request))
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            # No thread started, or one started as Ctrl-C landed in ``Thread.start``: freed
            # here or by that thread, once. (Freed twice, the semaphore's ValueError replaced
            # the KeyboardInterrupt, which socketserver then logged and served on: the
            # command outlived Ctrl-C.)
            self._free(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve it, then free its slot."""
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._free(request)

    def _free(self, request: Any) -> None:
        """Free ``request``'s slot, unless it was freed already."""
        with self._holding_lock:
            if id(request) not in self._holding:
                return
            self._holding.discard(id(request))
        self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went quiet (the handler's timeout) or away is no error of ours."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            logger.debug("celery-breaker: connection from %s ended: %r", client_address[0], MaskedRepr(exc))
            return
        super().handle_error(request, client_address)  # type: ignore[misc]


class Deadlined:
    """A mix-in for a ``socketserver.StreamRequestHandler`` (before it in the bases): the
    request must arrive within ``request_within`` seconds of the handler's start, and
    each read within the handler's ``timeout``. A read past the deadline raises
    ``TimeoutError``, which ``http.server`` and ``wsgiref`` take as a request that timed
    out: the connection is closed. Answers are written with the handler's ``timeout``."""

    request_within = REQUEST_WITHIN
    connection: Any
    rfile: Any

    def setup(self) -> None:
        """The handler's streams, its request read through ``_ReadBy`` (bounded in all)."""
        super().setup()  # type: ignore[misc]
        self.rfile.close()  # (the socket's own reader: replaced, not left holding the socket open)
        quiet: float | None = getattr(self, "timeout", None)  # (the handler's)
        raw = _ReadBy(self.connection, time.monotonic() + self.request_within, quiet)
        self.rfile = io.BufferedReader(raw)


class _ReadBy(io.RawIOBase):
    """A socket's reads, each within ``quiet`` seconds and all by ``deadline`` (monotonic)."""

    def __init__(self, sock: Any, deadline: float, quiet: float | None) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._quiet = quiet

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left if self._quiet is None else min(self._quiet, left))
        try:
            return int(self._sock.recv_into(buffer))
        finally:
            self._sock.settimeout(self._quiet)  # (the answer is written with the handler's own)
