"""Whether Celery's native delayed delivery will bring a countdown copy back to its queue, made sure of per connection.

On an app with a quorum queue Celery delays every countdown in RabbitMQ itself: it
publishes the copy to ``celery_delayed_27`` with its delay spelt in the routing key, and
the copy comes back through ``celery_delayed_delivery``, which the worker's
``DelayedDelivery`` step binds to each of the app's queues (``#.<key>``) after declaring
the 28 delay levels with ``broker_native_delayed_delivery_queue_type``. When that step
fails (the levels exist with another queue type: a 406; a user without configure
permission on ``celery_delayed_*``: a 403), Celery logs CRITICAL and goes on, and nothing
binds the app's queues. A countdown published then is confirmed (a delay level took it)
and never comes back: lost.

So before a countdown goes that way, the countdown's own connection (``CountdownRepublish``'s
confirming publisher: ``prepare``) declares the levels exactly as Celery does, with the
app's queue type, and binds the app's queues as Celery does (the queue a copy goes to,
again before its first copy over that connection). A 403 on the levels is no failure
where they all exist (an administrator declared them for a user who may not configure
them; passive declarations tell): binding needs no configure permission. What succeeds there is what Celery's
step would have made; a failure means the copy would not come back, and the countdown
sends it another way (``countdown.py``), and the connection looks again a minute later
(``LOOK_AGAIN_AFTER``: the operator may have fixed it). kombu's helpers open a channel for the levels and
one per queue bound; they stay open with the connection.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from kombu.common import Broadcast
from kombu.transport.native_delayed_delivery import (
    CELERY_DELAYED_DELIVERY_EXCHANGE,
    MAX_LEVEL,
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
    level_name,
)

from ...storage.masking import MaskedRepr
from ..broker import uses_quorum_queues
from ..throttle import Throttle

__all__ = ["LOOK_AGAIN_AFTER", "NativeDelay", "RecentRefusals", "goes_through_native_delay", "not_set_up", "prepare"]

logger = logging.getLogger("celery_breaker")

#: RabbitMQ's reply code for an operation the user has no permission for.
ACCESS_REFUSED = 403


#: Seconds after which a connection that found the native delay not set up looks again
#: (an operator may have fixed it: deleted the delay queues of the other type, granted a
#: permission), instead of sending runs without their delay for as long as it lives.
LOOK_AGAIN_AFTER = 60.0


class RecentRefusals:
    """RabbitMQ's refusals this process remembers, by what was refused (a topology, a
    level, a queue), for ``LOOK_AGAIN_AFTER`` seconds: a run that would meet one again goes
    its other way at once, without the connection or the publish that met it (decisions 96
    and 98); after that, the next run tries again (an operator may have fixed it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._found: dict[object, tuple[BaseException, float]] = {}

    def note(self, what: object, exc: BaseException) -> None:
        """RabbitMQ refused ``what`` just now, with ``exc``."""
        self._found[what] = (exc, self._clock())

    def forget(self, what: object) -> None:
        """RabbitMQ took ``what``: nothing of it is remembered."""
        self._found.pop(what, None)

    def lately(self, what: object) -> tuple[BaseException, float] | None:
        """RabbitMQ's refusal of ``what`` and how many seconds ago, if less than
        ``LOOK_AGAIN_AFTER``; ``None`` otherwise (an older one is forgotten)."""
        found = self._found.get(what)
        if found is None:
            return None
        ago = self._clock() - found[1]
        if ago >= LOOK_AGAIN_AFTER:
            self._found.pop(what, None)
            return None
        return found[0], ago


class NativeDelay:
    """What one connection found of Celery's native delayed delivery: whether its levels
    could be declared (``levels_error``), and each queue bound to it (``None``) or not
    (what RabbitMQ answered). A failure is looked at again after ``LOOK_AGAIN_AFTER``."""

    def __init__(self, connection: Any, app: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.connection = connection
        self.app = app
        self._clock = clock
        self.levels_error: BaseException | None = None
        self._levels_at = 0.0
        self.bound: dict[str, tuple[BaseException | None, float]] = {}
        self._declare_levels()

    def _declare_levels(self) -> None:
        self._levels_at = self._clock()
        try:
            declare_native_delayed_delivery_exchanges_and_queues(
                self.connection, self.app.conf.broker_native_delayed_delivery_queue_type
            )
        except self.connection.channel_errors as exc:  # (a level declared with other arguments, or no permission)
            self.levels_error = None if _refused(exc) and _levels_exist(self.connection) else exc
        else:
            self.levels_error = None

    def problem(self, queue: Any) -> BaseException | None:
        """Why a copy delayed for ``queue`` (a kombu ``Queue``; ``None``: not told) would
        not come back (``None``: it would). The queue is bound on first asking."""
        if self.levels_error is not None and self._clock() - self._levels_at >= LOOK_AGAIN_AFTER:
            self._declare_levels()
            self.bound.clear()  # (bound again below, once the levels are there)
        if self.levels_error is not None or queue is None:
            return self.levels_error
        name: str = queue.name
        found = self.bound.get(name)
        if found is None or (found[0] is not None and self._clock() - found[1] >= LOOK_AGAIN_AFTER):
            found = (_bind(self.connection, queue), self._clock())
            self.bound[name] = found
        return found[0]


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` is RabbitMQ's 403: the user may not configure what it declared."""
    return getattr(exc, "reply_code", None) == ACCESS_REFUSED


def _levels_exist(connection: Any) -> bool:
    """Whether Celery's delay levels and ``celery_delayed_delivery`` exist, as passive
    declarations tell (they need no permission): an administrator declared them for a
    user who may not configure them. They bring a copy back once its queue is bound,
    which needs no configure permission either; before, a 403 sent every run there
    straight back without its delay."""
    channel = connection.channel()
    try:
        for level in range(MAX_LEVEL + 1):
            channel.exchange_declare(level_name(level), "topic", passive=True)
            channel.queue_declare(level_name(level), passive=True)
        channel.exchange_declare(CELERY_DELAYED_DELIVERY_EXCHANGE, "topic", passive=True)
    except connection.channel_errors:  # (a 404: RabbitMQ closed the channel)
        return False
    with contextlib.suppress(*connection.channel_errors, *connection.connection_errors):
        channel.close()
    return True


def _bind(connection: Any, queue: Any) -> BaseException | None:
    """Bind ``queue`` to ``celery_delayed_delivery`` as Celery's worker does; RabbitMQ's refusal, if any."""
    try:
        bind_queue_to_native_delayed_delivery_exchange(connection, queue)
    except connection.channel_errors as exc:  # (a 403, a 404: RabbitMQ closed that channel, not the connection)
        refused: BaseException = exc
        return refused
    return None


def prepare(connection: Any, app: Any) -> NativeDelay | None:
    """On a new connection of the countdown's: declare Celery's delay levels with the app's
    ``broker_native_delayed_delivery_queue_type`` and bind the app's queues (not a direct
    exchange's: Celery does not delay through those), as Celery's ``DelayedDelivery`` step
    does; ``None`` when the app has no quorum queue (Celery then delays nothing in
    RabbitMQ). A connection error raises (the publisher opens a new connection)."""
    if not uses_quorum_queues(app):
        return None
    found = NativeDelay(connection, app)
    if found.levels_error is None:
        for queue in app.amqp.queues.values():
            if goes_through_native_delay(queue):
                found.problem(queue)
    return found


def goes_through_native_delay(queue: Any) -> bool:
    """Whether Celery delays a countdown for ``queue`` in RabbitMQ (a quorum-queue app) and
    binds it for that: not for a direct exchange's queue, which a worker holds instead
    (Celery warns); not for a ``Broadcast`` queue, which Celery's step never binds. Bound,
    its fanout exchange took every delayed copy whose key ends in its routing key (the
    app's default, ``celery``) from ``celery_delayed_delivery``: the default queue's
    countdowns, Celery's own too, reached every worker's broadcast queue as well."""
    if isinstance(queue, Broadcast):
        return False
    exchange = getattr(queue, "exchange", None)
    if exchange is None:
        return bool(getattr(queue, "bindings", None))
    return bool(exchange.name) and exchange.type != "direct"


#: One ERROR a minute per queue whose countdowns cannot go through the native delay.
_told = Throttle()


def not_set_up(task: Any, queue: str | None, exc: BaseException, waits: str, *, parked: bool = False) -> None:
    """The ERROR (at most once a minute per queue, and apart for runs ``parked`` and runs
    sent straight back) that ``queue``'s countdowns cannot go through Celery's native
    delayed delivery, with where each run ``waits`` instead, the setting and the fix."""
    quiet = _told.due(f"{queue or ''}\0{'parked' if parked else 'back'}")
    if quiet is None:
        return
    queue_type = task.app.conf.broker_native_delayed_delivery_queue_type
    logger.error(
        "celery-breaker: task %s[%s]: RabbitMQ's native delayed delivery cannot bring a countdown copy back to queue "
        "%r (%r): instead, each such run %s, until this is fixed. Fix: make broker_native_delayed_delivery_queue_type "
        "(now %r) the type of the celery_delayed_* and celery_breaker_delayed_* queues that exist on this vhost, or "
        "delete those queues (when empty) so they are declared again; grant the user configure and write permission "
        "on them; lift a length limit a policy puts on them (logged at most once a minute per queue; %d more since "
        "the last time)",
        task.name, task.request.id, queue, MaskedRepr(exc), waits, queue_type, quiet,
    )  # fmt: skip
