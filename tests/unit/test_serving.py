"""The connection guard of the metrics endpoint and the web page (monitoring/serving.py)."""

from __future__ import annotations

import socket
import socketserver
from typing import Any

import pytest

from celery_breaker.monitoring.serving import Guarded


class Server(Guarded, socketserver.ThreadingTCPServer):
    daemon_threads = False  # (so the server keeps its threads, for the test to join)
    max_connections = 2


class Quick(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(1)  # (the client has closed: returns at once)


def test_ctrl_c_while_a_connection_thread_starts_stops_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C landed in ``Thread.start`` (waiting for the new thread to run): the slot was
    freed there and again by the thread, the semaphore's ValueError replaced the
    KeyboardInterrupt, socketserver logged it and served on, and ``celery breaker web``
    outlived Ctrl-C (seen in a CI run: tests/web/test_page.py)."""
    started = socketserver.ThreadingMixIn.process_request

    def interrupted(self: Any, request: Any, client_address: Any) -> None:
        started(self, request, client_address)
        for thread in list(self._threads):
            thread.join(5)  # (the connection served and its slot freed, as the signal arrives)
        raise KeyboardInterrupt

    monkeypatch.setattr(socketserver.ThreadingMixIn, "process_request", interrupted)
    with Server(("127.0.0.1", 0), Quick) as server:
        host, port = server.server_address[:2]
        socket.create_connection((str(host), int(port))).close()
        with pytest.raises(KeyboardInterrupt):
            server._handle_request_noblock()  # type: ignore[attr-defined]  # (serve_forever's step per connection)
        taken = [server._slots.acquire(blocking=False) for _ in range(Server.max_connections + 1)]
    assert taken == [True, True, False]  # every slot free, none freed twice
