"""Deferral by RabbitMQ's own delayed delivery: the run waits in the broker, in durable queues, not in a worker.

Celery delays quorum-queue countdowns this way ("native delayed delivery"): 28 exchanges
and queues ``celery_delayed_0`` .. ``celery_delayed_27``, queue *n* holding messages for
2**n seconds, route a message whose routing key spells its delay in binary, then hand it
to the topic exchange ``celery_delayed_delivery``. The same topology serves every
RabbitMQ deployment here, classic queues and direct exchanges included
(``broker_native_delayed_delivery_queue_type`` says its queue type).

A deferred run goes back to **the queue it was delivered from, and to no other**. Celery
binds queues to ``celery_delayed_delivery`` by their routing key (``#.<key>``), which
loses a message whose delivery key the pattern does not name (a direct queue reached
through the default exchange by its name, a queue with several ``bindings``) and copies
it into every queue whose key ends the same way (``high`` and ``emails.high``): copies
that double with each deferral. Here each queue is bound by a key of its own instead,
``*.`` x 28 then ``celery-breaker.<digest of the queue's name>``, which matches that
queue's delayed messages only. The worker's main process notes which queue each task
came from (``note_delivery_queue``: the delivery's consumer tag); without that note the
queue is inferred: the queue named by the key for the default exchange, else the one
queue of the app bound to that exchange with a matching key. When neither tells exactly
one queue the run is not taken here (the next strategy, a countdown, republishes it as
Celery's retry would).

So a deferred run survives what a queued task survives, no worker holds it (RabbitMQ's
``consumer_timeout`` cannot strike), and it comes back by itself when its delay is up.
Delays are whole seconds, at least one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from kombu.entity import Exchange
from kombu.exceptions import EncodeError
from kombu.transport.native_delayed_delivery import (
    calculate_routing_key,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from .strategy import Deferral, publish

__all__ = [
    "CONFIRM_TIMEOUT", "DELAY_EXCHANGE", "DELIVERY_EXCHANGE", "QUEUE_KEY", "BrokerDelay", "destination_queue",
    "ensure_topology", "note_delivery_queue", "queue_binding", "queue_token", "topic_matches",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")

#: Where a delayed message enters (the longest level) and where it leaves for its queue.
DELAY_EXCHANGE = "celery_delayed_27"
DELIVERY_EXCHANGE = "celery_delayed_delivery"
#: The longest delay the topology spells (28 bits of seconds, about 8.5 years).
LONGEST_DELAY = 2**28 - 1
#: A delayed message's routing key: 28 binary digits, then the destination's own key.
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")
#: The word before a queue's digest in the key of a run deferred to that queue.
TOKEN_WORD = "celery-breaker"
#: Seconds between two warnings that a run could not be routed back by broker-delay.
_WARN_EVERY = 60.0
#: Seconds a broker-delay publish waits for RabbitMQ's confirm before it counts as failed.
CONFIRM_TIMEOUT = 10.0
#: The key of a request's ``delivery_info`` under which the worker notes the queue a task
#: was delivered from (``note_delivery_queue``); it travels with the request to the pool.
QUEUE_KEY = "celery_breaker_queue"


def note_delivery_queue(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``task_received`` (the worker's main process, where the consumer is): note in the
    request's ``delivery_info`` the queue its message came from, told by the delivery's
    consumer tag. Celery keeps only the exchange and the key, which may lead to several
    queues (a topic or fanout exchange) or to none the app declares."""
    info = getattr(getattr(request, "message", None), "delivery_info", None)
    tag = info.get("consumer_tag") if isinstance(info, dict) else None
    tags = getattr(getattr(sender, "task_consumer", None), "_active_tags", None)  # (kombu: queue -> tag)
    if tag is None or not isinstance(tags, dict):
        return
    for queue, active in tags.items():
        if active == tag:
            request.delivery_info[QUEUE_KEY] = queue
            return


def queue_token(queue: str) -> str:
    """The last two words of the key that brings a delayed run back to ``queue``:
    ``celery-breaker.<digest>`` (any queue name, even one with dots or wildcards, in a key
    of fixed length)."""
    return f"{TOKEN_WORD}.{hashlib.blake2s(queue.encode(), digest_size=16).hexdigest()}"


def queue_binding(queue: str) -> str:
    """The pattern ``queue`` is bound to ``celery_delayed_delivery`` with: 28 one-word
    wildcards (the delay's digits) and its token, so it matches that queue's runs only."""
    return "*." * 28 + queue_token(queue)


def topic_matches(pattern: str, key: str) -> bool:
    """Whether a topic exchange routes ``key`` through a binding of ``pattern`` (``*``: one
    word, ``#``: zero or more words, words separated by dots)."""
    words, parts = key.split("."), pattern.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(parts):
            return j == len(words)
        if parts[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(words) + 1))
        return j < len(words) and parts[i] in ("*", words[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _routes(queue: Any) -> Iterator[tuple[Any, str]]:
    """The (exchange, routing key) pairs that bind ``queue``: its own, and its ``bindings``."""
    if queue.exchange is not None and queue.exchange.name:
        yield queue.exchange, queue.routing_key or ""
    for bound in queue.bindings or ():
        exchange = bound.exchange
        if exchange is not None and getattr(exchange, "name", None):
            yield exchange, bound.routing_key or ""


def _reaches(exchange: Any, pattern: str, key: str) -> bool | None:
    """Whether a binding (``exchange``, ``pattern``) takes a message published with ``key``
    (``None``: cannot tell, a headers exchange)."""
    kind = exchange.type
    if kind == "direct":
        return pattern == key
    if kind == "topic":
        return topic_matches(pattern, key)
    if kind == "fanout":
        return True
    return None


def destination_queue(app: Any, delivery_info: dict[str, Any] | None) -> str | None:
    """The queue a delivery came from (``None``: it cannot be told): the one the worker
    noted from the consumer tag, else as far as the app's queues tell (exactly one). The
    default exchange routes to the queue named by the key; a named
    exchange to the app's queues bound to it with a matching key; a run delayed here
    before comes back through ``celery_delayed_delivery`` with its queue's token (an
    earlier release's key: the queue named by it, else the one queue with that key)."""
    info = delivery_info or {}
    noted = info.get(QUEUE_KEY)
    if isinstance(noted, str) and noted:
        return noted  # (the worker told it from the consumer tag: note_delivery_queue)
    exchange, key = info.get("exchange") or "", info.get("routing_key")
    if not isinstance(key, str) or not key or not isinstance(exchange, str):
        return None
    queues = app.amqp.queues
    if exchange == DELIVERY_EXCHANGE:
        tail = _DELAY_PREFIX.sub("", key)
        if tail.startswith(TOKEN_WORD + "."):
            return next((name for name in queues if queue_token(name) == tail), None)
        if tail in queues:  # (a run delayed by an earlier release, keyed by its queue's key)
            return str(tail)
        keyed = [name for name, queue in queues.items() if (queue.routing_key or name) == tail]
        return keyed[0] if len(keyed) == 1 else None
    if not exchange:
        return key  # (the default exchange: the queue of that name, declared by the app or not)
    found: list[str] = []
    for name, queue in queues.items():
        verdicts = [_reaches(bound, pattern, key) for bound, pattern in _routes(queue) if bound.name == exchange]
        if None in verdicts:
            return None  # a headers exchange: which queue it was cannot be told
        if any(verdicts):
            found.append(name)
    return found[0] if len(found) == 1 else None


class UnroutedWarning:
    """The WARNING, at most once a minute, that a run's queue cannot be told, so it is
    deferred by countdown; ``why`` says what follows from that (a strategy's own words)."""

    def __init__(self, why: str) -> None:
        self._why = why
        self._at = -math.inf

    def __call__(self, delivery_info: Any) -> None:
        now = time.monotonic()
        if now - self._at < _WARN_EVERY:
            return
        self._at = now
        info = delivery_info or {}
        logger.warning(
            "celery-breaker: a run delivered through exchange %r with routing key %r is deferred by countdown, %s "
            "(declare the queue in task_queues, with its exchange and routing key or bindings)",
            info.get("exchange"), info.get("routing_key"), self._why,
        )  # fmt: skip


class _Unconfirmed(Exception):
    """A broker-delay message was written, and RabbitMQ did not confirm it in time: it may
    route it yet (``BrokerDelay.deliver`` sends it no second time)."""


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a socket timeout: Celery reraises one as kombu's
    ``OperationalError``, the timeout its cause or context."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, TimeoutError):  # (socket.timeout is TimeoutError)
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _discard(connection: Any) -> None:
    """Close ``connection``, dead or alive, without raising."""
    try:
        connection.collect()
    except Exception:  # (already broken: nothing more to release)
        logger.debug("celery-breaker: closing a broker-delay connection failed", exc_info=True)


def _token_of(delivery_info: dict[str, Any] | None) -> str | None:
    """The queue token of a run that came back from a delay of ours, else ``None``."""
    info = delivery_info or {}
    key = info.get("routing_key")
    if info.get("exchange") != DELIVERY_EXCHANGE or not isinstance(key, str):
        return None
    tail = _DELAY_PREFIX.sub("", key)
    return tail if re.fullmatch(re.escape(TOKEN_WORD) + r"\.[0-9a-f]{32}", tail) else None


def ensure_topology(connection: Any, app: Any, consumed: Iterable[str] = ()) -> None:
    """Declare the delay exchanges and queues (as Celery does for quorum queues), declare
    every queue of ``app`` and bind it to ``celery_delayed_delivery`` by its own token
    (``queue_binding``); bind the ``consumed`` queues the app does not declare too (added
    with ``add_consumer``). Idempotent; raises what the broker answers (a queue already
    declared with other arguments, say)."""
    declare_native_delayed_delivery_exchanges_and_queues(connection, app.conf.broker_native_delayed_delivery_queue_type)
    channel = connection.default_channel
    for queue in app.amqp.queues.values():
        bound = queue.bind(channel)
        bound.declare()
        channel.queue_bind(queue=queue.name, exchange=DELIVERY_EXCHANGE, routing_key=queue_binding(queue.name))
    for name in consumed:
        if name not in app.amqp.queues:
            channel.queue_bind(queue=name, exchange=DELIVERY_EXCHANGE, routing_key=queue_binding(name))


class BrokerDelay:
    """Publish the run into RabbitMQ's delay topology, to come back to the queue it was
    delivered from after the planned delay (rounded up to whole seconds, at least one).

    Each process publishes over a connection of its own with publisher confirms: a
    publish RabbitMQ does not take (an exchange missing, the connection gone) raises
    instead of vanishing. Before the first publish on each new connection the topology
    is declared again (``ensure_topology``), so a broker restarted without its
    definitions, or one that dropped a transient queue's binding, has them back; a
    queue the app does not declare (one added with ``add_consumer``) is bound on its
    first run there. A publish that fails is tried once more over a new connection; if
    that fails too, or the queue cannot be told (``destination_queue``), the run goes
    to the next strategy."""

    name = "broker-delay"
    parks = True

    def __init__(self) -> None:
        self._pid: int | None = None  # the process that owns ``_connection``
        self._connection: Any = None  # that process's confirming connection, the topology declared on it
        self._bound: set[str] = set()  # queues bound by their token over that connection
        self._cannot_tell = UnroutedWarning(
            "not broker-delay: not exactly one queue of the app is bound there, so the queue it came from cannot "
            "be told"
        )
        self._lock = threading.Lock()

    def _connected(self, app: Any) -> Any:
        """This process's connection, opened (and the topology declared) if it has none."""
        if self._pid != os.getpid():  # (forked: the parent's socket is not ours to use or close)
            self._pid, self._connection, self._bound = os.getpid(), None, set()
        if self._connection is None:
            connection = app.connection_for_write(transport_options={"confirm_publish": True})
            try:
                ensure_topology(connection, app)
            except BaseException:
                _discard(connection)
                raise
            self._connection, self._bound = connection, set(app.amqp.queues)
        return self._connection

    def _drop(self) -> None:
        connection, self._connection, self._bound = self._connection, None, set()
        if connection is not None and self._pid == os.getpid():
            _discard(connection)

    def _publish(self, task: Any, signature: Any, queue: str | None, routing_key: str) -> None:
        connection = self._connected(task.app)
        if queue is not None and queue not in self._bound:
            # (not declared: binding a queue that does not exist fails, which is the answer)
            connection.default_channel.queue_bind(
                queue=queue, exchange=DELIVERY_EXCHANGE, routing_key=queue_binding(queue)
            )
            self._bound.add(queue)
        try:
            publish(
                task,
                signature,
                producer=connection.Producer(),
                exchange=Exchange(DELAY_EXCHANGE, type="topic"),  # type: ignore[no-untyped-call]
                routing_key=routing_key,
                declare=[],  # (the topology is declared on this connection; nothing else is published to)
                retry=False,  # (a connection error comes here, to open a new one and declare the topology)
                confirm_timeout=CONFIRM_TIMEOUT,
            )
        except Exception as exc:
            if _timed_out(exc):  # (only here, once connected: the message went out)
                raise _Unconfirmed(str(exc)) from exc
            raise

    def deliver(self, deferral: Deferral) -> float | None:
        task = deferral.task
        request = task.request
        queue: str | None = None
        token = _token_of(request.delivery_info)
        if token is None:  # (else it came back from a delay of ours: its queue is bound by that token)
            queue = destination_queue(task.app, request.delivery_info)
            if queue is None:
                self._cannot_tell(request.delivery_info)
                return None
            token = queue_token(queue)
        seconds = min(LONGEST_DELAY, max(1, math.ceil(deferral.plan.delay)))
        signature = task.signature_from_request(request, deferral.args, deferral.kwargs, headers=deferral.headers)
        # No countdown or eta: the broker holds it for exactly that long, and a worker
        # must not hold it again. The explicit exchange and key replace the delivery's own.
        signature.options.pop("queue", None)
        routing_key = calculate_routing_key(seconds, token)
        with self._lock:  # (one channel per process: publishes take turns)
            for attempt in (1, 2):
                try:
                    self._publish(task, signature, queue, routing_key)
                except EncodeError:
                    raise
                except Exception as exc:
                    self._drop()
                    if isinstance(exc, _Unconfirmed):
                        # Sent, and not confirmed in time: RabbitMQ blocks publishers (a
                        # memory or disk alarm) and routes the message once it reads it.
                        # Publishing again, here or by the next strategy, would run the
                        # task twice: it counts as delivered, as a publish without
                        # confirms did.
                        logger.warning(
                            "celery-breaker: task %s[%s]: RabbitMQ did not confirm its deferral within %g s (is it "
                            "blocking publishers?); counted as deferred, not sent again",
                            task.name, request.id, CONFIRM_TIMEOUT,
                        )  # fmt: skip
                        break
                    if attempt == 2:
                        raise
                    # A broker restarted (empty, or without a transient queue's binding), an
                    # exchange deleted, a connection gone: once more over a new connection,
                    # with the topology declared again.
                    logger.info(
                        "celery-breaker: broker-delay publish failed (%r); declaring the delay topology again", exc
                    )
                else:
                    break
        return float(seconds)
