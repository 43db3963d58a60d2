"""A loopback TCP proxy that loses a server's reply: it passes a command on, lets the server
act on it, then drops the reply and closes the client's connection (or holds it open,
silent, until the client's own timeout).

What a client sees when the network fails between its write and the reply (a peer
reset, a NAT or a load balancer that dropped the flow): the server did the work, the
client got an error. Put between a real Redis client and a real ``redis-server``;
nothing of Redis is imitated. Bound to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from .servers import Owned

__all__ = ["ReplyDropper"]

_CHUNK = 65536


class ReplyDropper(Owned):
    """Forwards ``127.0.0.1:port`` to ``target``; while ``marker`` is set, a command whose
    bytes hold it reaches the server, and its reply does not reach the client
    (``dropped`` counts them): the connection is closed once the server has answered, or
    not ``close``, left open and silent (the client times out)."""

    def __init__(self, target: tuple[str, int], *, close: bool = True) -> None:
        self.target = target
        self.close_after = close
        self.marker: bytes | None = None
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="reply-dropper", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # (closed)
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, server]
            losing = threading.Event()  # (set before the marked command goes on: its reply is the one lost)
            threading.Thread(target=self._requests, args=(client, server, losing), daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, losing), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, losing: threading.Event) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while chunk := client.recv(_CHUNK):
                marker = self.marker
                if marker is not None and marker in tail + chunk:
                    losing.set()
                tail = chunk[-len(marker) :] if marker else b""
                server.sendall(chunk)
        _close(client, server)

    def _replies(self, server: socket.socket, client: socket.socket, losing: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while chunk := server.recv(_CHUNK):
                if losing.is_set():
                    # (the server answered: it has done the work; the client gets no reply)
                    with self._lock:
                        self.dropped += 1
                    if self.close_after:
                        break
                    continue  # (nothing more reaches the client; it closes the connection on its timeout)
                client.sendall(chunk)
        _close(client, server)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            _close(*self._sockets)
            self._sockets.clear()


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
