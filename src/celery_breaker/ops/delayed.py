"""What waits in RabbitMQ's delay queues, as the operators' views say it: ``status``'s and ``watch``'s line, the page's.

On RabbitMQ deferred tasks wait in broker-delay's queues, not in the store, so PARKED
reads 0 for them (``integration/deferral/delay_depth.py`` counts them: one total, every
breaker's and every app's on the vhost). Two kinds of app defer there:

* an app that defers there first (``breaker_park="auto"`` on RabbitMQ): its views always
  say the count, or that it could not be counted and why (the broker, its password
  masked);
* an app that parks in its store (``breaker_park=True`` on RabbitMQ) and defers there the
  runs parking does not take, every run while its store is down (``falls_back_to_rabbitmq``):
  its views say the count only when it is not 0, and nothing when it cannot be counted.
  Its backlog is PARKED; the delay queues are where the runs of an outage of its store
  went, worth a line only when some did, and a broker that cannot be asked is the
  workers' trouble, which they log, not news about that backlog.

``status`` counts once, over a connection of its own; ``watch`` and the page count at
every refresh over one kept connection (``DelayDepthReader``: each read bounded, none
tried for 30 s after a failure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..integration.deferral.delay_depth import DelayDepth, failure_text, read_delay_depth
from ..integration.deferral.selection import (
    IN_DELAY_QUEUES,
    falls_back_to_rabbitmq,
    uses_delay_queues,
    waiting_elsewhere,
)
from ..integration.throttle import EVERY
from ..monitoring.delay_gauge import DelayDepthReader

__all__ = [
    "DelayCount",
    "DelayCounter",
    "delay_view",
    "elsewhere_view",
    "fallen_back_text",
    "status_line",
    "waiting_text",
]

_IN_STORE = "counts tasks parked in the store"


@dataclass(frozen=True, slots=True)
class DelayCount:
    """One count of an app's delay queues for a view: ``depth``, or else ``failure``, why not."""

    depth: DelayDepth | None
    failure: str | None
    """Why they were not counted: the broker (its password masked) and its error."""
    fallback: bool
    """The app parks in its store and defers into the delay queues only what parking does not take."""

    @property
    def worth_saying(self) -> bool:
        """Whether a view says it: always for an app deferring there first; for one that
        falls back there, only a count that is not 0."""
        if not self.fallback:
            return True
        return self.depth is not None and self.depth.delayed + self.depth.unroutable > 0


class DelayCounter:
    """Counts an app's delay queues for a view; ``count()`` never raises.

    Without a ``reader``, each count opens a connection of its own and closes it
    (``read_delay_depth``: ``status``, once); with one, every count goes over the
    connection it keeps (``watch`` and the page, at each refresh). ``of(app)`` makes the
    counter an app needs, or ``None`` when it defers nothing into the delay queues."""

    def __init__(self, app: Any, *, fallback: bool, reader: DelayDepthReader | None = None) -> None:
        self.app = app
        self.fallback = fallback
        self.reader = reader

    @classmethod
    def of(
        cls, app: Any, *, kept: bool = False, clock: Clock = SYSTEM_CLOCK, logged_as: str | None = None,
        meanwhile: str = "",
    ) -> DelayCounter | None:  # fmt: skip
        """``app``'s counter: over a kept connection if ``kept``, its failures logged as
        ``DelayDepthReader`` logs them under ``logged_as`` (``None``: not logged; never for
        an app that falls back there, whose views say nothing of a failure either)."""
        if not uses_delay_queues(app):
            return None
        fallback = falls_back_to_rabbitmq(app)
        reader = None
        if kept:
            told = None if fallback else logged_as
            reader = DelayDepthReader(app, clock=clock, log_interval=EVERY, logged_as=told, meanwhile=meanwhile)
        return cls(app, fallback=fallback, reader=reader)

    def count(self) -> DelayCount:
        """What waits in the delay queues now, or why it cannot be told."""
        if self.reader is not None:
            reading = self.reader.read()
            error = reading.error
            return DelayCount(reading.depth, None if error is None else failure_text(self.app, error), self.fallback)
        try:
            depth = read_delay_depth(self.app)
        except Exception as exc:  # (whatever connecting or reading met: said, not raised)
            return DelayCount(None, failure_text(self.app, exc), self.fallback)
        return DelayCount(depth, None, self.fallback)

    def close(self) -> None:
        """Close the kept connection, if any."""
        if self.reader is not None:
            self.reader.close()

    def __repr__(self) -> str:
        return f"DelayCounter({self.app!r}, fallback={self.fallback}, kept={self.reader is not None})"


def waiting_text(count: DelayCount) -> str | None:
    """How many deferred tasks wait in the delay queues, the unroutable ones apart with what
    to do about them; or that they were not counted, and why. ``None``: nothing to say
    (``DelayCount.worth_saying``)."""
    if not count.worth_saying:
        return None
    depth = count.depth
    if depth is None:
        return f"this app's deferred tasks wait {IN_DELAY_QUEUES}, not counted ({count.failure})"
    tasks, wait = ("task", "waits") if depth.delayed == 1 else ("tasks", "wait")
    text = f"{depth.delayed} deferred {tasks} (all breakers, all apps on the vhost) {wait} {IN_DELAY_QUEUES}"
    if count.fallback:
        text += ", where this app defers the tasks it cannot park (its store down, say)"
    if depth.unroutable:
        # (they do not come back by themselves: a worker's start log says it too)
        text += (
            f", and {depth.unroutable} in celery_breaker_delayed_unroutable: their queue was gone when they came "
            "due; move them back to it (a shovel, or the management UI) or purge that queue"
        )
    return text


def fallen_back_text(app: Any) -> str | None:
    """For an app that parks in its store (``breaker_park=True`` on RabbitMQ), counted now
    over a connection of its own: the tasks it deferred into the delay queues instead
    (``waiting_text``); ``None`` for any other app, or when none wait there or they
    cannot be counted."""
    counter = DelayCounter.of(app)
    return waiting_text(counter.count()) if counter is not None and counter.fallback else None


def status_line(app: Any, count: DelayCount | None) -> str | None:
    """The line under ``status``'s and ``watch``'s table: where ``app``'s deferred tasks wait
    when PARKED cannot show them, and on RabbitMQ how many (``count``, of the app's
    ``DelayCounter``); ``None`` when there is nothing to say."""
    said = waiting_text(count) if count is not None else None
    if said is None and count is None:
        elsewhere = waiting_elsewhere(app)  # (a countdown: where, never how many)
        said = None if elsewhere is None else f"this app's deferred tasks wait {elsewhere}"
    return None if said is None else f"PARKED {_IN_STORE}; {said}."


def delay_view(count: DelayCount | None) -> dict[str, Any] | None:
    """The page's ``delay_queues`` (JSON-ready): the count, the unroutable count, why not
    counted, and the line the page shows; ``None`` when there is nothing to say."""
    if count is None or not count.worth_saying:
        return None
    depth = count.depth
    if depth is None:
        text = f"this app's deferred tasks wait {IN_DELAY_QUEUES}, not counted: {count.failure}; retrying"
    else:
        text = str(waiting_text(count))
    return _view(depth, count.failure, count.fallback, f"Parked {_IN_STORE}; {text}.")


def elsewhere_view(app: Any) -> dict[str, Any] | None:
    """The page's ``delay_queues`` for an app whose deferred tasks wait where nothing counts
    them (countdown messages, held by the workers): where they wait, as ``status`` and
    ``watch`` say it, never how many; ``None`` for an app that parks them in its store or
    defers them into RabbitMQ's delay queues (``DelayCounter.of`` counts those)."""
    if DelayCounter.of(app) is not None:
        return None
    elsewhere = waiting_elsewhere(app)
    if elsewhere is None:
        return None
    return _view(None, None, False, f"Parked {_IN_STORE}; this app's deferred tasks wait {elsewhere}.")


def _view(depth: DelayDepth | None, failure: str | None, fallback: bool, text: str) -> dict[str, Any]:
    return {
        "delayed": None if depth is None else depth.delayed,
        "unroutable": None if depth is None else depth.unroutable,
        "error": failure,
        "fallback": fallback,
        "text": text,
    }
