"""Deferral by countdown: publish the run again now, to arrive after the planned delay.

The new message has the same id, arguments and ``request.retries``; the worker that
receives it holds it until it is due (an ETA message). This is the strategy every broker
has, so it comes last: it never passes a run on. If the broker refuses the publish, a
late-acknowledged delivery is requeued (``Reject``); otherwise the task fails with a
``CircuitOpenError`` that says so.

On RabbitMQ the copy goes back to the queue the run was delivered from
(``destination_queue``), by that queue's name (a run deferred instead of a
``self.retry(queue=...)`` goes where the retry asked, as Celery's retry sends it). Republished through the delivery's
exchange and key, as Celery's own retry does, a topic or fanout exchange put a copy in
every queue it routes the key to, again at each deferral; and on quorum queues Celery
delays a countdown in the broker by the routing key of the message's queue, which, for
a delivery through a named exchange, Celery takes to be ``task_default_queue``: the run
came back to the default queue, which the worker may not consume. When the queue cannot
be told (a consumer that notes no queue, a headers exchange) the copy goes as Celery's
retry would, and on quorum queues a WARNING (once a minute) says it may reach the
default queue.

On quorum queues the copy goes through Celery's native delayed delivery only once this
process's connection has made sure it is set up for its queue (``native_delay.py``). When
it is not (Celery's delay queues exist with another type than
``broker_native_delayed_delivery_queue_type``, or may not be declared), RabbitMQ would
confirm the copy into a delay queue that never brings it back. The run then goes straight
back to its queue, without a countdown, after a pause of ``REQUEUE_PAUSE`` in the pool
process, as a new message (a quorum queue's ``delivery-limit`` counts requeues, not new
messages), and an ERROR (once a minute per queue) names the setting and the fix; so does a
copy RabbitMQ refuses on its way into them (a length policy, a missing write
permission), which a late acknowledgement would requeue and an early one fail. It
does not spend a deferral of the task's ``breaker_max_deferrals``: its planned delay was
not kept. Where the app has a Redis breaker store and may park (``breaker_park`` not
``False``), such a run is parked there instead (``park``: the pool process is not held
for the pause, and the run waits for its breaker as any parked task, counted as one
deferral); only a run the store does not take (down) goes straight back. A copy RabbitMQ
refused on its way into Celery's delay queues is not published again for its queue for
``LOOK_AGAIN_AFTER``: those runs are parked at once (decision 96).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

from amqp.exceptions import ChannelError  # type: ignore[import-untyped]
from celery.exceptions import Reject

from ...errors import CircuitOpenError
from ...storage import describe_url
from ...storage.masking import MaskedRepr, masked_error
from ..broker import AMQP, broker_kind
from ..throttle import Throttle
from . import confirms, native_delay
from .broker_delay import UnroutedWarning, destination_queue
from .confirms import Confirm, ConfirmingPublisher
from .native_delay import NativeDelay
from .parking import ParkInStore
from .plan import DEFERRALS_HEADER
from .strategy import Deferral, Handed, names_destination, publish

__all__ = ["RECEIVED_KEY", "REQUEUE_PAUSE", "CountdownRepublish", "note_received"]

logger = logging.getLogger("celery_breaker")

#: Seconds before requeueing a task whose deferral could not be published.
REQUEUE_PAUSE = 1.0
#: The key of a request's ``delivery_info`` under which the worker notes when it received
#: the task (``note_received``, epoch seconds); it travels with the request to the pool.
RECEIVED_KEY = "celery_breaker_received"


def note_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``task_received`` (the worker's main process): note when the delivery came. The
    broker's window (RabbitMQ's ``consumer_timeout``, a ``visibility_timeout``) runs from
    then until the acknowledgement, which a countdown held by the worker delays."""
    info = getattr(request, "delivery_info", None)
    if isinstance(info, dict):
        info[RECEIVED_KEY] = time.time()


class CountdownRepublish:
    """Publish the run again with a countdown of the planned delay.

    ``whole_seconds``: round the countdown up to whole seconds, at least one. On RabbitMQ
    quorum queues Celery delays a countdown in the broker (native delayed delivery),
    which takes only whole seconds of at least one: it refuses a shorter countdown and
    leaves a fraction for the worker to hold.
    """

    name = "countdown"
    parks = False

    def __init__(
        self, *, whole_seconds: bool = False, park: ParkInStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.whole_seconds = whole_seconds
        #: Where a run goes that Celery's native delay would not bring back (decision 95):
        #: parked in the breaker store, rather than straight back to its queue after a
        #: pause; and an early-acknowledged run RabbitMQ could not take at all (decision
        #: 112). ``None``: no store to park in (``memory://``), or ``breaker_park=False``.
        self.park = park
        #: The WARNING, once a minute, that runs RabbitMQ could not take are parked (decision 112).
        self._parked_told = Throttle()
        #: Per queue, RabbitMQ's refusal of a copy on its way into Celery's delay queues:
        #: for ``LOOK_AGAIN_AFTER`` such runs are parked without that publish (decision 96).
        self._refused = native_delay.RecentRefusals(clock)
        # (RabbitMQ: each process's own connection, on which Celery's native delay is made sure of)
        self._publisher = ConfirmingPublisher(prepare=native_delay.prepare)
        self._cannot_tell = UnroutedWarning(
            "which Celery delays in RabbitMQ by task_default_queue's routing key on quorum queues: the queue it "
            "came from cannot be told, so it may come back to task_default_queue"
        )

    def route(self, task: Any) -> dict[str, Any]:
        """On RabbitMQ, the options that send the copy to the queue the run came from, by
        name: the queue, and a direct exchange type, for which Celery publishes through
        the default exchange (Celery's native delay on quorum queues routes by that
        queue's own exchange and key instead). ``{}`` elsewhere, or when it cannot be told."""
        if broker_kind(task.app.conf) != AMQP:
            return {}
        info = task.request.delivery_info
        queue = destination_queue(task.app, info)
        if queue is not None:
            return {"queue": queue, "exchange_type": "direct"}
        if self.whole_seconds:
            self._cannot_tell(info)
        return {}

    def send(self, task: Any, signature: Any, *, instead: _Instead | None = None) -> BaseException | None:
        """Publish the copy; on RabbitMQ with publisher confirms (``ConfirmingPublisher``),
        over a connection of this process's own. Without them, a publish RabbitMQ refuses
        (no write permission on the default exchange the copy goes through, a queue whose
        ``x-overflow`` is ``reject-publish`` and full) raised nothing: the delivery was
        acknowledged as deferred and the task lost. Now that raises. A failure is tried
        once more over a new connection (a broker restarted since). A confirm that does
        not come within ``CONFIRM_TIMEOUT`` counts as sent on a connection RabbitMQ said it
        blocks (a memory or disk alarm: it routes the copy once the alarm clears); on any
        other (a peer gone silent, which may have taken the copy with it) the copy is
        published again over a new connection, and may then run twice, never not at all.

        ``instead``: a copy through Celery's native delay, and what to publish in its place
        when this connection finds that delay not set up for its queue; returns why it
        was not (``None``: the copy went as asked)."""
        if broker_kind(task.app.conf) != AMQP:
            publish(task, signature)
            return None
        why: list[BaseException | None] = [None]

        def send(producer: Any) -> None:
            found = self._publisher.prepared
            why[0] = found.problem(instead.queue) if instead is not None and isinstance(found, NativeDelay) else None
            chosen = signature if why[0] is None or instead is None else instead.signature
            # (through Celery's delay levels: one an operator deleted since this connection
            # declared it routes the copy to no queue, and RabbitMQ confirms it all the same;
            # mandatory, it is returned, and goes again over a new connection, which declares
            # the levels again)
            through_levels = instead is not None and chosen is signature
            publish(task, chosen, producer=producer, retry=False, **({"mandatory": True} if through_levels else {}))

        sends = [send]
        published = self._publisher.publish(task.app, sends)
        if self._unconfirmed(published) and not published.blocked:
            # Written, not confirmed in time, and RabbitMQ did not say it blocks: a dead peer
            # looks the same from this side, and it took the copy with it. Counted as sent,
            # the delivery was acknowledged and the task lost; once more over a new
            # connection instead (the connection that timed out is retired).
            logger.warning(
                "task %s[%s]: RabbitMQ did not confirm its countdown deferral within %g s and did not say it blocks "
                "publishers: sent again over a new connection (it may run twice, never not at all)",
                task.name, task.request.id, confirms.CONFIRM_TIMEOUT,
            )  # fmt: skip
            published = self._publisher.publish(task.app, sends)
        result = published.results[0]
        if result is Confirm.CONFIRMED:
            return why[0]
        if self._unconfirmed(published) and published.blocked:
            # Under a memory or disk alarm: RabbitMQ routes it once it reads it, and
            # publishing it again would run the task twice.
            logger.warning(
                "task %s[%s]: RabbitMQ did not confirm its countdown deferral within %g s, and blocks publishers (a "
                "memory or disk alarm); counted as sent, not sent again",
                task.name, task.request.id, confirms.CONFIRM_TIMEOUT,
            )  # fmt: skip
            return why[0]
        raise published.failure(0)

    @staticmethod
    def _unconfirmed(published: confirms.Published) -> bool:
        """Written, and its confirm did not come in time."""
        return published.results[0] is Confirm.UNCONFIRMED and published.stopped_by_timeout

    def deliver(self, deferral: Deferral) -> float | Handed:
        task = deferral.task
        request = task.request
        delay = deferral.plan.delay
        if self.whole_seconds:
            delay = float(max(1, math.ceil(delay)))
        # (a destination the retry it replaces asked for goes as Celery's retry sends it)
        route = {} if names_destination(deferral.options) else self.route(task)
        signature = task.signature_from_request(
            request, deferral.args, deferral.kwargs, countdown=delay, headers=deferral.headers,
            **deferral.options, **route,
        )  # fmt: skip
        name = _queue_name(deferral, route)  # (the copy's queue, named once for every use below)
        instead = self._instead(deferral, route, name)
        queue = str(name or "")
        if instead is not None and self.park is not None:
            problem = self._refused_lately(queue) or self._not_set_up(task, instead)
            parked = None if problem is None else self._parked(deferral, route, name, problem)
            if parked is not None:
                return parked
        try:
            why = self.send(task, signature, instead=instead)
        except Exception as exc:
            # (refused on its way into Celery's delay queues: RabbitMQ routed nothing, so parked, or
            # sent straight back, it runs once)
            if instead is not None and _refusal(exc):
                self._refused.note(queue, exc)
                parked = self._parked(deferral, route, name, exc)
                if parked is not None:
                    return parked
            why = self._straight_back(task, instead, exc)
            if why is None:
                kept = self._parked_for_now(deferral, route, exc)
                if kept is not None:
                    return kept
                _not_deferred(deferral, exc)
        if why is not None:
            if _refusal(why):
                where = (
                    f"goes straight back to its queue after a {REQUEUE_PAUSE:g} s pause, without its planned delay"
                    + (
                        ""
                        if self.park is None
                        else " (not parked: its breaker store is down or refused it, or it expires first, or a "
                        "breaker in its body rejected it)"
                    )
                )
                native_delay.not_set_up(task, name, why, where)
            else:  # (a connection that failed twice, then came back: no setting is to blame)
                logger.warning(
                    "task %s[%s]: its countdown copy could not be published (%r); it went straight back to its queue "
                    "instead, without its planned delay, after a %g s pause",
                    task.name, request.id, MaskedRepr(why), REQUEUE_PAUSE,
                )  # fmt: skip
            time.sleep(REQUEUE_PAUSE)  # (sent already: a worker killed now loses nothing)
            return REQUEUE_PAUSE
        return delay

    def _parked_for_now(self, deferral: Deferral, route: dict[str, Any], exc: Exception) -> Handed | None:
        """Park a run neither RabbitMQ way could defer (``exc``: RabbitMQ down or restarting,
        the connection dropped, a refusal) when its delivery is acknowledged already (not
        ``acks_late``) and the app has a Redis breaker store: the run failed for good
        before, lost though the store could hold it (decision 112). ``None`` when the store
        does not take it either, or the delivery goes back to RabbitMQ (``acks_late``:
        parked too, it would run twice)."""
        park, task = self.park, deferral.task
        if park is None or task.acks_late or broker_kind(task.app.conf) != AMQP:
            return None  # (on Redis, parking came first, and failed)
        try:
            delay = park.park(deferral, route)
        except Exception:
            logger.debug("task %s[%s]: could not park it either", task.name, task.request.id, exc_info=True)
            return None
        if delay is None:
            return None
        quiet = self._parked_told.due("")
        logger.log(
            logging.DEBUG if quiet is None else logging.WARNING,
            "task %s[%s]: could not defer it through RabbitMQ (%r); parked in the breaker store %s instead (PARKED "
            "in `celery breaker status`), released once RabbitMQ and its breaker take it (logged at most once a "
            "minute; %d more since, at DEBUG)",
            task.name, task.request.id, MaskedRepr(exc), describe_url(deferral.breaker.store.url), quiet or 0,
        )  # fmt: skip
        return Handed(park, delay)

    def _refused_lately(self, queue: str) -> BaseException | None:
        """RabbitMQ's refusal of a copy for ``queue`` on its way into Celery's delay queues
        (a length policy's ``basic.nack``, no write permission on ``celery_delayed_27``),
        less than ``LOOK_AGAIN_AFTER`` seconds ago: such a run is parked without publishing
        it again (decision 96). The publish met the refusal every run, and a closed
        channel cost two new connections (the publish and its retry) each time."""
        found = self._refused.lately(queue)
        return None if found is None else found[0]  # (none: the operator may have fixed it, the next copy tries)

    def _not_set_up(self, task: Any, instead: _Instead) -> BaseException | None:
        """Why this process's connection finds that Celery's native delay would not bring a
        copy back to ``instead``'s queue (``None``: it would, or the connection cannot be
        had now, which the publish meets and tells)."""

        def problem(found: Any) -> BaseException | None:
            return found.problem(instead.queue) if isinstance(found, NativeDelay) else None

        try:
            return self._publisher.ask(task.app, problem)
        except Exception:
            logger.debug("task %s[%s]: could not look at the native delay", task.name, task.request.id, exc_info=True)
            return None

    def _parked(self, deferral: Deferral, route: dict[str, Any], name: Any, why: BaseException) -> Handed | None:
        """Park a run Celery's native delay would not bring back (``why``), released to its
        queue by name; ``None`` when the store does not take it (down, refusing, or no
        parking for it: it expires first, a nested breaker rejected it), and it goes
        straight back instead. The ERROR names the queue (``name``, as ``_queue_name`` gives
        it) and says where it waits."""
        park = self.park
        if park is None:
            return None
        task = deferral.task
        try:
            delay = park.park(deferral, route)
        except Exception:  # (sent straight back instead: it runs once, twice if the store kept it, never not at all)
            logger.debug("task %s[%s]: could not park it", task.name, task.request.id, exc_info=True)
            return None
        if delay is None:
            return None
        store = describe_url(deferral.breaker.store.url)
        where = (
            f"is parked in the breaker store {store} (PARKED in `celery breaker status`) and released when its "
            "breaker admits it"
        )
        native_delay.not_set_up(task, name, why, where, parked=True)
        return Handed(park, delay)

    def _straight_back(self, task: Any, instead: _Instead | None, exc: Exception) -> BaseException | None:
        """When a copy through Celery's native delay could not be published (RabbitMQ
        refused it: a delay queue full under a length policy, no write permission on
        ``celery_delayed_27``), publish its stand-in straight to its queue; ``exc`` if that
        went, ``None`` if not (or there is no stand-in). Requeued instead, a late
        acknowledgement spends a quorum queue's ``delivery-limit``; an early one fails."""
        if instead is None:
            return None
        try:
            self.send(task, instead.signature)
        except Exception:
            logger.debug(
                "task %s[%s]: could not send it straight back either", task.name, task.request.id, exc_info=True
            )
            return None
        return exc

    def _instead(self, deferral: Deferral, route: dict[str, Any], name: Any) -> _Instead | None:
        """When the copy goes through Celery's native delay (quorum queues, a queue not on a
        direct exchange): the copy to publish in its place if that delay is not set up for
        its queue (``name``, as ``_queue_name`` gives it: no countdown, the deferral count as
        the delivery had it), and the queue."""
        task = deferral.task
        if not self.whole_seconds or broker_kind(task.app.conf) != AMQP:
            return None
        queue: Any = None
        if isinstance(name, str) and name:
            with contextlib.suppress(KeyError):  # (Celery's router makes a queue it does not know, as here)
                queue = task.app.amqp.queues[name]
            if queue is not None and not native_delay.goes_through_native_delay(queue):
                return None
        headers = {**deferral.headers, DEFERRALS_HEADER: max(0, deferral.plan.count - 1)}
        straight = task.signature_from_request(
            task.request, deferral.args, deferral.kwargs, headers=headers, **deferral.options, **route
        )
        return _Instead(queue, straight)


def _queue_name(deferral: Deferral, route: dict[str, Any]) -> Any:
    """The name of the queue the copy is sent to (``route``'s, else the deferral's options'),
    whether given as a kombu ``Queue`` or as its name; ``None`` if neither names one."""
    queue = route.get("queue") or deferral.options.get("queue")
    return getattr(queue, "name", queue)


def _refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is RabbitMQ refusing the copy or the delay's set-up (a ``basic.nack``;
    a channel it closed: 403, 404, 406...), not a connection that failed: only a refusal
    says Celery's native delay is not set up for the queue, which the ERROR blames."""
    return confirms.nacked(exc) or isinstance(exc, ChannelError)


def _not_deferred(deferral: Deferral, exc: Exception) -> NoReturn:
    """The run could not be deferred: requeue its delivery (late acknowledgement), else fail it saying so.
    Either way Celery logs ``exc`` (the reason, the cause): its text is masked first."""
    task = deferral.task
    masked_error(exc)
    if task.acks_late:
        # Not acknowledged: the broker gives the message back, nothing is lost.
        # Pause first, so a broker that delivers but will not take a publish
        # does not turn this into a busy loop.
        logger.warning("task %s[%s]: could not defer (%r); requeueing it", task.name, task.request.id, MaskedRepr(exc))
        time.sleep(REQUEUE_PAUSE)
        raise Reject(exc, requeue=True) from exc
    breaker = deferral.breaker
    failed = CircuitOpenError(
        f"breaker {breaker.label!r} {deferral.state} and the task could not be deferred: {MaskedRepr(exc)}",
        name=breaker.name, key=breaker.key, state=deferral.rejected.state, final=True,
    )  # fmt: skip
    raise failed from exc


class _Instead(NamedTuple):
    """A countdown copy's stand-in, when Celery's native delay is not set up for its queue."""

    queue: Any
    """The kombu ``Queue`` the copy goes to (``None``: it cannot be told; only the delay levels are checked)."""
    signature: Any
    """The copy without a countdown, straight to that queue."""
