"""Stand-ins for the shop's downstream services: a payments API and a mailer that can be taken down."""

from __future__ import annotations

import threading
from collections import Counter


class Service:
    """A downstream that refuses connections while it is down; counts calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: Counter[str] = Counter()
        self._down = threading.Event()

    def set_down(self, down: bool) -> None:
        if down:
            self._down.set()
        else:
            self._down.clear()

    def call(self, what: str) -> str:
        down = self._down.is_set()
        self.calls["while down" if down else "while up"] += 1
        if down:
            raise ConnectionError(f"{self.name} refused the connection")
        return f"{self.name}: {what} done"


payments = Service("payments API")
mailer = Service("mailer")
