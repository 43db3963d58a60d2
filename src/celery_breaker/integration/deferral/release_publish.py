"""The releaser's publishing: parked tasks sent again as they were, confirmed on RabbitMQ; the unsendable dropped."""

from __future__ import annotations

import logging
import threading
from typing import Any

from ...labels import shown_label
from ...storage import Parking
from ...storage.masking import MaskedRepr, MaskedText
from ..throttle import Throttle
from . import confirms
from .confirms import Confirm, ConfirmingPublisher, Send
from .parking import NeedsCode, NewerFormat, NotAcceptedHere, read_parked

__all__ = ["Republishing"]

logger = logging.getLogger("celery_breaker")


#: Set while this thread publishes a parked task again (``Releaser._publish``).
_RELEASING = threading.local()


class _ExpiredOnPurpose(logging.Filter):
    """Drops Celery's WARNING that a task "has an expiration date in the past" when the
    releaser publishes it: a parked task is released at its expiry on purpose, so that
    the worker revokes it as Celery does any expired task (``task_revoked``, REVOKED)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_RELEASING, "on", False) and "has an expiration date in the past" in str(record.msg))


_EXPIRED_ON_PURPOSE = _ExpiredOnPurpose()
logging.getLogger("celery.app.base").addFilter(_EXPIRED_ON_PURPOSE)  # (once: addFilter keeps one of each)


class Republishing:
    """What a ``Releaser`` does to publish the tasks it claimed (a part of that class: it
    keeps the state below, set in ``Releaser.__init__``)."""

    app: Any
    parking: Parking
    accept: Any
    _publisher: ConfirmingPublisher | None
    _refusals: Throttle
    _nacks: Throttle

    def _unpublishable(self, tag: str, entry: str, exc: BaseException) -> bool:
        """Whether ``entry`` can never be published (``_never_publishable``): then it is
        dropped, with an ERROR naming it, its breaker and the reason. Left claimed, it was
        claimed again after every lease (30 s) for ever, a WARNING each time, and its
        breaker's parked count never went to 0."""
        if not _never_publishable(exc):
            return False
        logger.error(
            "celery-breaker releaser: dropped parked entry %s of %s: it can never be published (%s: %s); a writer "
            "of another app or release parked it with arguments or options Celery refuses",
            entry, shown_label(self.parking.label(tag)), type(exc).__name__, MaskedText(exc),
        )  # fmt: skip
        return True

    def _not_accepted(self, tag: str, entry: str, exc: NotAcceptedHere) -> None:
        if self._refusals.due(tag) is not None:
            if isinstance(exc, NewerFormat):
                advice = "Upgrade this worker: until then, workers of the newer release release it"
            else:
                who = (
                    "that has that code releases it: deploy it to every worker"
                    if isinstance(exc, NeedsCode)
                    else "whose accept_content takes it releases it"
                )
                advice = f"A worker {who}; a worker of another app sharing this store's key_prefix should use its own"
            logger.warning(
                "celery-breaker releaser: left %s of %s parked: %s. %s",
                entry, shown_label(self.parking.label(tag)), MaskedText(exc), advice,
            )  # fmt: skip

    def _publish(self, tag: str, claimed: list[tuple[str, str]]) -> list[str]:
        """Publish the claimed entries again; return those to forget: published (on RabbitMQ:
        confirmed), or never publishable. The others stay claimed, and are released again
        after their lease."""
        done: list[str] = []
        ready: list[tuple[str, Any, dict[str, Any]]] = []  # (entry, signature, publish options)
        for entry, payload in claimed:
            try:
                signature, serializer = read_parked(payload, self.accept)
            except NotAcceptedHere as exc:
                # Another app or worker on this store parked it, in a serializer this one does
                # not accept: left claimed, its lease puts it back for a worker that does.
                self._not_accepted(tag, entry, exc)
                continue
            except ValueError as exc:
                # Never publishable: dropping it is the only way forward; say so loudly.
                logger.error("celery-breaker releaser: dropped parked entry %s of %s: %s", entry, tag, MaskedText(exc))
                done.append(entry)
                continue
            try:
                made = self.app.signature(signature)
            except Exception as exc:  # (left claimed, as a publish that failed: the others go on)
                if self._unpublishable(tag, entry, exc):
                    done.append(entry)
                else:
                    _not_published(entry, exc)
                continue
            # (in the serializer it was parked in: its arguments may take no other)
            ready.append((entry, made, {"serializer": serializer} if serializer else {}))
        _RELEASING.on = True
        try:
            if self._publisher is not None:
                done += self._publish_confirmed(tag, ready)
                return done
            for entry, signature, options in ready:
                try:
                    signature.apply_async(**options)
                except Exception as exc:
                    if self._unpublishable(tag, entry, exc):
                        done.append(entry)
                    else:  # (left claimed: the lease runs out and it is released again)
                        _not_published(entry, exc)
                else:
                    done.append(entry)
        finally:
            _RELEASING.on = False
        return done

    def _unrouted(self, tag: str, entry: str, exchange: str, routing_key: str) -> None:
        """Say that RabbitMQ routed ``entry`` to no queue: it stays parked (claimed, released
        again after its lease) until a queue takes it again."""
        quiet = self._nacks.due(f"unrouted {tag}")
        logger.log(
            logging.DEBUG if quiet is None else logging.WARNING,
            "celery-breaker releaser: RabbitMQ routed parked task %s of %s to no queue (exchange %r, routing key %r: "
            "its queue deleted since it was parked?); it stays parked and is released again after its lease. Declare "
            "the queue again (a worker consuming it does, or task_queues) (logged at most once a minute per breaker; "
            "%d more since the last time, at DEBUG)",
            entry, shown_label(self.parking.label(tag)), exchange, routing_key, quiet or 0,
        )  # fmt: skip

    def _publish_confirmed(self, tag: str, ready: list[tuple[str, Any, dict[str, Any]]]) -> list[str]:
        """Publish on RabbitMQ with publisher confirms (``ConfirmingPublisher``); return the
        entries RabbitMQ took.

        Published as Celery publishes, without confirms, a message RabbitMQ refused (a full
        queue whose ``x-overflow`` is ``reject-publish``, a user who may not write to the
        exchange) raised nothing: the entry was forgotten and the task lost. A refusal now
        leaves it claimed (released again after the lease). A confirm that does not come
        within ``CONFIRM_TIMEOUT`` (RabbitMQ blocks publishers under a memory or disk
        alarm, or the peer is gone) leaves the unconfirmed ones claimed, and the rest of
        the claim waits: they may run twice (a copy is routed when the alarm clears),
        never not at all.

        Each goes ``mandatory``: one that no queue takes (its queue deleted since it was
        parked: an ``auto_delete`` or ``x-expires`` queue, an operator's delete) RabbitMQ
        returns, then confirms. Taken for published, it was forgotten, and the task lost
        without a word; it stays claimed now (``_unrouted``)."""
        returned: dict[str, tuple[str, str]] = {}  # (task id -> the exchange and key RabbitMQ returned it from)
        channels: list[Any] = []

        def on_return(exc: Any, exchange: str, routing_key: str, message: Any) -> None:
            task_id = (getattr(message, "headers", None) or {}).get("id")
            if isinstance(task_id, str):
                returned[task_id] = (exchange, routing_key)

        def send(signature: Any, options: dict[str, Any]) -> Send:
            def publish(producer: Any) -> object:
                handlers = producer.channel.events["basic_return"]
                if on_return not in handlers:
                    handlers.add(on_return)
                    channels.append(handlers)
                return signature.apply_async(producer=producer, retry=False, mandatory=True, **options)

            return publish

        assert self._publisher is not None
        try:
            published = self._publisher.publish(self.app, [send(signature, options) for _, signature, options in ready])
        finally:
            for handlers in channels:  # (this batch's: a handler left behind is one more each batch)
                handlers.discard(on_return)
        for index, (entry, signature, _) in enumerate(ready):
            route = returned.get(signature.id) if published.results[index] is Confirm.CONFIRMED else None
            if route is not None:  # (confirmed after it was returned: routed to no queue)
                published.results[index] = Confirm.UNSENT
                self._unrouted(tag, entry, *route)
        confirmed = []
        for index, exc in list(published.errors.items()):
            entry = ready[index][0]
            if published.results[index] is not Confirm.CONFIRMED and self._unpublishable(tag, entry, exc):
                confirmed.append(entry)  # (forgotten, as a task published is)
                del published.errors[index]
        refused = unconfirmed = 0
        for (entry, _, _), result in zip(ready, published.results, strict=True):
            if result is Confirm.CONFIRMED:
                confirmed.append(entry)
            elif result is Confirm.REFUSED:
                refused += 1
            elif result is Confirm.UNCONFIRMED:
                unconfirmed += 1
        for index, exc in published.errors.items():
            _not_published(ready[index][0], exc)
        if refused:
            quiet = self._nacks.due("")
            logger.log(
                logging.DEBUG if quiet is None else logging.WARNING,
                "celery-breaker releaser: RabbitMQ refused %d parked task(s) (a full queue that rejects publishes?); "
                "they stay parked, and are released again after their lease (logged at most once a minute; %d "
                "more refused since the last time, at DEBUG)",
                refused, quiet or 0,
            )  # fmt: skip
        if published.error is not None:
            if published.stopped_by_timeout:
                logger.warning(
                    "celery-breaker releaser: RabbitMQ did not confirm %d released task(s) within %g s%s; they stay "
                    "parked, and are released again after their lease (they may run twice)",
                    unconfirmed, confirms.CONFIRM_TIMEOUT, " (it blocks publishers)" if published.blocked else "",
                )  # fmt: skip
            else:
                logger.warning(
                    "celery-breaker releaser: could not publish to RabbitMQ (%r); %d task(s) stay parked, and are "
                    "released again after their lease",
                    MaskedRepr(published.error), len(ready) - len(confirmed),
                )  # fmt: skip
        return confirmed


def _never_publishable(exc: BaseException) -> bool:
    """Whether a publish failed on the task's own data, as no retry can mend: Celery
    raises ``TypeError`` for arguments that are no list, keyword arguments that are no
    mapping, options that are no mapping or a queue that is no name (an entry another
    writer parked). A broker or network failure is never one: those raise kombu's,
    redis-py's and the socket's own errors, and the entry is released again."""
    return isinstance(exc, TypeError)


def _not_published(entry: str, exc: BaseException) -> None:
    """Say that ``entry`` could not be published: left claimed, it is released again after its lease."""
    logger.warning("celery-breaker releaser: could not publish %s (%r); it stays parked", entry, MaskedRepr(exc))
