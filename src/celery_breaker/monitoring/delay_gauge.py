"""broker-delay's depth for metric scrapes: counted over one kept connection, each read bounded, paused after a failure.

On RabbitMQ an app's deferred tasks wait in the delay queues, which the store's counts
never see (``integration/deferral/delay_depth.py`` counts them: 29 passive declares, a
few milliseconds). A scrape every 15 s that opened a connection of its own to count them
would be the connection churn RabbitMQ advises against, with two lines of its log each
time, so a ``DelayDepthReader`` keeps one connection open in the process that scrapes
(a worker's main process) and counts on it. What bounds a scrape while RabbitMQ is down
or does not answer:

* connecting (each host) and each answer wait at most ``DEPTH_TIMEOUT`` seconds;
* a kept connection that fails is let go and one new connection tried at once (a broker
  restarted since the last scrape), unless it timed out: a broker that does not answer
  would not answer the new one either;
* after a failed read the next one waits ``RETRY_AFTER`` seconds: scrapes meanwhile get
  that failure at once, without a try;
* one read at a time (a py-amqp connection is not thread-safe): a scrape that finds a
  read under way waits for it, and after a failed one gets that failure at once.

A process forked from the one that read (a prefork child) lets the inherited connection
go without a word: anything sent on it there would end the parent's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..clock import Clock
from ..integration.deferral.confirms import timed_out
from ..integration.deferral.delay_depth import DEPTH_TIMEOUT, DelayDepth, delay_depth, depth_connection, failure_text
from ..integration.throttle import Throttle

__all__ = ["RETRY_AFTER", "DelayDepthReader", "DepthReading"]

logger = logging.getLogger("celery_breaker")

#: Seconds after a failed read before the next is tried.
RETRY_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class DepthReading:
    """One read of the delay queues' depth: ``depth``, or else ``error``, why not."""

    depth: DelayDepth | None
    error: BaseException | None = None


class DelayDepthReader:
    """Counts what waits in ``app``'s broker's delay queues, over a connection it keeps.

    ``read()`` never raises: a failure is a ``DepthReading`` without a depth, logged as a
    WARNING at most once per ``log_interval`` seconds, then an INFO line once a read
    succeeds again; the lines name the reader's user (``logged_as``: ``celery-breaker
    metrics: ...``) and what it does meanwhile (``meanwhile``); ``logged_as=None`` logs
    nothing (a view that says the failure itself, or nothing). ``connect`` opens the
    connection (``depth_connection`` unless given: a test seam); ``clock`` times the pause
    after a failure. ``close()`` lets the connection go."""

    def __init__(
        self,
        app: Any,
        *,
        clock: Clock,
        log_interval: float,
        retry_after: float = RETRY_AFTER,
        timeout: float = DEPTH_TIMEOUT,
        connect: Callable[[Any, float], Any] | None = None,
        logged_as: str | None = "metrics",
        meanwhile: str = "exporting celery_breaker_broker_delay_up 0",
    ) -> None:
        self.app = app
        self.logged_as = logged_as
        self.meanwhile = meanwhile
        self.clock = clock
        self.retry_after = retry_after
        self.timeout = timeout
        self._connect = connect if connect is not None else depth_connection
        self._told = Throttle(log_interval, clock=clock.monotonic)
        self._lock = threading.Lock()  # one read at a time: the connection is not thread-safe
        self._pid = os.getpid()
        self._connection: Any = None
        self._last: DepthReading | None = None
        self._failed_at: float | None = None

    def read(self) -> DepthReading:
        """The depth now; the last failure, untried, within ``retry_after`` seconds of it."""
        if self._pid != os.getpid():  # forked: the connection and the lock are the parent's
            self._pid, self._lock, self._connection = os.getpid(), threading.Lock(), None
        with self._lock:
            now = self.clock.monotonic()
            if self._last is not None and self._failed_at is not None and now - self._failed_at < self.retry_after:
                return self._last
            reading = self._read_now()
            if reading.error is not None:
                self._failed_at = now
                self._failed(reading.error)
            elif self._failed_at is not None:
                self._failed_at = None
                self._told.forget("")
                if self.logged_as is not None:
                    logger.info("celery-breaker %s: RabbitMQ's delay queues are counted again", self.logged_as)
            self._last = reading
            return reading

    def close(self) -> None:
        """Close the kept connection (the next read opens another)."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None and self._pid == os.getpid():
                with contextlib.suppress(Exception):  # (a goodbye to a broker that may be gone)
                    connection.close()

    def _read_now(self) -> DepthReading:
        kept = self._connection is not None
        try:
            return DepthReading(self._count())
        except Exception as exc:
            self._let_go()
            if not kept or timed_out(exc):
                return DepthReading(None, exc)
        try:  # (the kept connection was gone: a broker restarted since, a connection it closed)
            return DepthReading(self._count())
        except Exception as exc:
            self._let_go()
            return DepthReading(None, exc)

    def _count(self) -> DelayDepth:
        if self._connection is None:
            self._connection = self._connect(self.app, self.timeout)
        return delay_depth(self._connection)

    def _let_go(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.collect()  # (closed without a goodbye: one may never be answered)

    def _failed(self, exc: BaseException) -> None:
        if self.logged_as is None or self._told.due("") is None:
            return
        logger.warning(
            "celery-breaker %s: cannot count the deferred tasks in RabbitMQ's delay queues (%s); %s, trying again in "
            "%g s",
            self.logged_as, failure_text(self.app, exc), self.meanwhile, self.retry_after,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"DelayDepthReader({self.app!r})"
