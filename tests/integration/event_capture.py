"""Every Celery event on a broker, captured by a real ``app.events.Receiver`` (what Flower runs) in a thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Events"]


class Events:
    """Every event on ``app``'s broker, captured by a real ``Receiver`` in a thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._receiver: Any = None

    def of(self, *types: str) -> list[dict[str, Any]]:
        with self._lock:
            return [event for event in self.seen if event["type"] in types]

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append(event)

    def _run(self) -> None:
        app = self.app
        with app.connection_for_read() as connection:
            receiver = self._receiver = app.events.Receiver(connection, handlers={"*": self._on_event})
            bind = receiver.on_consume_ready

            def ready(*args: Any, **kwargs: Any) -> None:
                bind(*args, **kwargs)
                self._ready.set()

            receiver.on_consume_ready = ready
            for _ in receiver.consume(limit=None, timeout=None, safety_interval=0.2, wakeup=False):
                pass

    @contextlib.contextmanager
    def running(self) -> Iterator[Events]:
        thread = threading.Thread(target=self._run, name="event-receiver", daemon=True)
        thread.start()
        assert self._ready.wait(10), "the event receiver did not start"
        try:
            yield self
        finally:
            self._receiver.should_stop = True
            thread.join(timeout=5)
