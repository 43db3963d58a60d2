"""Loopback TCP proxies put between a real client and a real server, to fail the network
between them as a real one fails: nothing of the server is imitated, and every proxy is
bound to 127.0.0.1 only.

* ``LoopbackProxy``: forwards each connection both ways, by a thread per direction;
* ``ReplyDropper``: passes a command on, lets the server act on it, then drops the reply
  and closes the client's connection (or holds it open, silent, until the client's own
  timeout): what a client sees when the network fails between its write and the reply
  (a peer reset, a NAT or a load balancer that dropped the flow): the server did the
  work, the client got an error;
* ``BlackHole``: makes the connections open through it go silent, as a peer that
  vanished does (a crashed node, a partition, a firewall that dropped the flow): what is
  written to them goes nowhere, and nothing comes back.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from .servers import Owned

__all__ = ["BlackHole", "LoopbackProxy", "ReplyDropper"]

_CHUNK = 65536


class LoopbackProxy(Owned):
    """Forwards ``127.0.0.1:port`` to ``target``: each connection accepted is joined to one
    of its own to ``target`` (``connected``: a thread per direction, ``pump``)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name=type(self).__name__, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # (closed)
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, server]
            self.connected(client, server)

    def connected(self, client: socket.socket, server: socket.socket) -> None:
        """Join a client's connection to the server's: each way by its own thread."""
        threading.Thread(target=self.pump, args=(client, server), daemon=True).start()
        threading.Thread(target=self.pump, args=(server, client), daemon=True).start()

    def pump(self, source: socket.socket, target: socket.socket) -> None:
        """Pass what ``source`` sends on to ``target`` until either closes."""
        with contextlib.suppress(OSError):
            while chunk := source.recv(_CHUNK):
                target.sendall(chunk)

    def opened(self) -> list[socket.socket]:
        """The sockets of every connection made through the proxy so far."""
        with self._lock:
            return list(self._sockets)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            _close(*self._sockets)
            self._sockets.clear()


class BlackHole(LoopbackProxy):
    """A proxy whose connections open now can be made silent (``silence``); later ones pass."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.silenced: set[socket.socket] = set()
        super().__init__(target)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(_CHUNK):
                if source not in self.silenced and target not in self.silenced:
                    target.sendall(data)

    def silence(self) -> None:
        """Every connection open now goes silent; later ones pass."""
        self.silenced.update(self.opened())


class ReplyDropper(LoopbackProxy):
    """Forwards ``127.0.0.1:port`` to ``target``; while ``marker`` is set, a command whose
    bytes hold it reaches the server, and its reply does not reach the client
    (``dropped`` counts them): the connection is closed once the server has answered, or
    not ``close``, left open and silent (the client times out)."""

    def __init__(self, target: tuple[str, int], *, close: bool = True) -> None:
        self.close_after = close
        self.marker: bytes | None = None
        self.dropped = 0
        super().__init__(target)

    def connected(self, client: socket.socket, server: socket.socket) -> None:
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


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
