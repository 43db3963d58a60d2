"""Deferral by RabbitMQ's own delayed delivery: the run waits in the broker, in durable queues, not in a worker.

The scheme is the one Celery delays quorum-queue countdowns with ("native delayed
delivery"), in a topology of celery-breaker's own: 28 topic exchanges and queues
``celery_breaker_delayed_0`` .. ``celery_breaker_delayed_27``, queue *n* holding messages
for 2**n seconds, route a message whose routing key spells its delay in binary, then
hand it to the topic exchange ``celery_breaker_delayed_delivery``. The same topology
serves every RabbitMQ deployment here, classic queues and direct exchanges included
(``broker_native_delayed_delivery_queue_type`` says its queue type). Celery's own
``celery_delayed_delivery`` is not used: Celery binds each quorum queue's exchange to it
by ``#.<key>``, and a key that already starts with ``#`` as it is, so a queue bound by
``#`` would take a copy of every run delayed through it.

A deferred run goes back to **the queue it was delivered from, and to no other**. Celery
binds queues to its delivery exchange by their routing key (``#.<key>``), which
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
Celery's retry would). A run deferred instead of a ``self.retry(queue=...)`` goes to
the queue the retry asked for (``asked_queue``).

So a deferred run survives what a queued task survives, no worker holds it (RabbitMQ's
``consumer_timeout`` cannot strike), and it comes back by itself when its delay is up.
Delays are whole seconds, at least one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kombu.entity import Exchange
from kombu.transport.native_delayed_delivery import calculate_routing_key

from ...storage.masking import MaskedRepr
from ..throttle import Throttle
from . import confirms
from .confirms import Confirm, ConfirmingPublisher, Send
from .native_delay import LOOK_AGAIN_AFTER, RecentRefusals
from .plan import DEFERRALS_HEADER
from .strategy import DESTINATION_OPTIONS, Deferral, names_destination, publish

__all__ = [
    "DELAY_EXCHANGE", "DELIVERY_EXCHANGE", "LEGACY_DELIVERY_EXCHANGE", "QUEUE_KEY",
    "ROUTING_EXCHANGE", "UNROUTABLE", "BrokerDelay", "asked_queue", "destination_queue", "ensure_topology",
    "forget_delay_deaths", "level_name", "note_delivery_queue", "queue_binding", "queue_token",
    "show_queue_delivery",
    "topic_matches",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")

#: The levels of the delay topology: one per binary digit of the delay in seconds.
LEVELS = 28
#: The longest delay the topology spells (28 bits of seconds, about 8.5 years).
LONGEST_DELAY = 2**LEVELS - 1
#: Where a delayed message leaves for its queue (the lowest level dead-letters into it).
DELIVERY_EXCHANGE = "celery_breaker_delayed_delivery"
#: Bound to ``DELIVERY_EXCHANGE`` by ``#``; each queue is bound here by its token. A due
#: message no queue takes (its queue deleted: an ``auto_delete`` or ``x-expires`` queue,
#: one an operator removed) goes to its alternate exchange, ``UNROUTABLE``. Without one,
#: a quorum level's at-least-once dead-lettering kept retrying each such message, and 32
#: of them (RabbitMQ's ``dead_letter_worker_consumer_prefetch``) stopped that level: no
#: deferred task of any queue came back through it again.
ROUTING_EXCHANGE = "celery_breaker_delayed_routing"
#: The fanout exchange and the queue where due messages no queue takes wait, for an operator.
UNROUTABLE = "celery_breaker_delayed_unroutable"
#: Celery's shared delivery exchange, which runs deferred by an earlier release of
#: celery-breaker come back through: queues stay bound to it by their token, when it exists.
LEGACY_DELIVERY_EXCHANGE = "celery_delayed_delivery"
#: A delayed message's routing key: 28 binary digits, then the destination's own key.
_DELAY_PREFIX = re.compile(rf"^(?:[01]\.){{{LEVELS}}}")
#: The word before a queue's digest in the key of a run deferred to that queue.
TOKEN_WORD = "celery-breaker"
#: The key of a request's ``delivery_info`` under which the worker notes the queue a task
#: was delivered from (``note_delivery_queue``); it travels with the request to the pool.
QUEUE_KEY = "celery_breaker_queue"


def level_name(level: int) -> str:
    """The exchange and queue of the delay topology that holds messages for 2**level seconds."""
    return f"celery_breaker_delayed_{level}"


#: Where a delayed message enters: the longest level.
DELAY_EXCHANGE = level_name(LEVELS - 1)
#: The exchange a run back from a delay shows in its ``delivery_info``: the one it was
#: dead-lettered into last. That is the delivery exchange only for an odd delay; any
#: other leaves from the lowest level that held it into the level below, and passes on
#: through exchange bindings, which keep that exchange (2 s comes back through
#: ``celery_breaker_delayed_0``, 4 s through ``_1``). Celery's own levels alike.
_BACK_FROM_A_DELAY = re.compile(r"celery(?:_breaker)?_delayed_(?:delivery|[0-9]+)")


def back_from_a_delay(exchange: object) -> bool:
    """Whether a delivery through ``exchange`` came back from a delay (ours, or Celery's
    for runs an earlier release deferred through its topology)."""
    return isinstance(exchange, str) and _BACK_FROM_A_DELAY.fullmatch(exchange) is not None


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


def show_queue_delivery(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``task_received`` (the worker's main process, after ``note_delivery_queue``): a run
    back from a broker-delay deferral shows the delivery of a message sent straight to
    its queue (``delivery_info`` exchange ``""``, routing key the queue's name), as the
    countdown and the parking bring it back, not the delay's exchange and key
    (``celery_breaker_delayed_delivery``, ``0.0.(...).1.celery-breaker.<digest>``),
    which no queue is named by: a run that retried itself to the queue it came from
    (``self.retry(queue=self.request.delivery_info["routing_key"])``) sent it to a queue
    of that name, which Celery declared and no worker consumes. Left as it is when the
    queue cannot be told."""
    info = getattr(request, "delivery_info", None)
    if not isinstance(info, dict) or _token_of(info) is None:
        return  # (not back from a delay of ours)
    queue = info.get(QUEUE_KEY)
    if not isinstance(queue, str) or not queue:
        app = getattr(sender, "app", None)
        queue = destination_queue(app, info) if app is not None else None
    if queue is not None:
        info["exchange"], info["routing_key"] = "", queue


#: A level of the delay topology, as RabbitMQ names it in the dead-lettering headers.
_LEVEL_QUEUE = re.compile(r"celery_breaker_delayed_[0-9]+")
#: A level of Celery's native delay (quorum queues), which carries countdown deferrals there.
_CELERY_LEVEL_QUEUE = re.compile(r"celery_delayed_[0-9]+")


def _a_level(queue: Any, *, celerys: bool = False) -> bool:
    """Whether ``queue`` is a level of the delay topology (``celerys``: or of Celery's native delay)."""
    if not isinstance(queue, str):
        return False
    return _LEVEL_QUEUE.fullmatch(queue) is not None or (celerys and _CELERY_LEVEL_QUEUE.fullmatch(queue) is not None)


def forget_delay_deaths(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``task_received`` (the worker's main process): take out of the run's headers what
    RabbitMQ wrote when a level of the delay topology dead-lettered it (``x-death``
    entries, ``x-first-death-*``, ``x-last-death-*``): a run that came back from
    broker-delay saw them in ``self.request.headers``, beside what its caller sent. So
    too for a deferral (``DEFERRALS_HEADER``) back from Celery's native delay, where a
    countdown waits on quorum queues. Entries of other dead-lettering (the app's own, and
    Celery's delay of the app's own countdowns, as Celery gives them) are kept."""
    headers = getattr(request, "request_dict", None)  # (what the pool builds the run's request from)
    if not isinstance(headers, dict):
        return
    celerys = DEFERRALS_HEADER in headers
    deaths = headers.get("x-death")
    if isinstance(deaths, list):
        kept = [
            death for death in deaths if not (isinstance(death, dict) and _a_level(death.get("queue"), celerys=celerys))
        ]
        if kept:
            headers["x-death"] = kept
        else:
            del headers["x-death"]
    for which in ("first", "last"):
        if _a_level(headers.get(f"x-{which}-death-queue"), celerys=celerys):
            for part in ("exchange", "queue", "reason"):
                headers.pop(f"x-{which}-death-{part}", None)


def queue_token(queue: str) -> str:
    """The last two words of the key that brings a delayed run back to ``queue``:
    ``celery-breaker.<digest>`` (any queue name, even one with dots or wildcards, in a key
    of fixed length)."""
    return f"{TOKEN_WORD}.{hashlib.blake2s(queue.encode(), digest_size=16).hexdigest()}"


def queue_binding(queue: str) -> str:
    """The pattern ``queue`` is bound to the delivery exchange with: 28 one-word
    wildcards (the delay's digits) and its token, so it matches that queue's runs only."""
    return "*." * LEVELS + queue_token(queue)


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
    before comes back through a delivery exchange (``DELIVERY_EXCHANGE``, or Celery's,
    ``LEGACY_DELIVERY_EXCHANGE``) with its queue's token (an earlier release's key: the
    queue named by it, else the one queue with that key)."""
    info = delivery_info or {}
    noted = info.get(QUEUE_KEY)
    if isinstance(noted, str) and noted:
        return noted  # (the worker told it from the consumer tag: note_delivery_queue)
    exchange, key = info.get("exchange") or "", info.get("routing_key")
    if not isinstance(key, str) or not key or not isinstance(exchange, str):
        return None
    queues = app.amqp.queues
    if back_from_a_delay(exchange):
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


def asked_queue(app: Any, options: dict[str, Any]) -> str | None:
    """The queue ``options`` (a ``self.retry(queue=..., exchange=..., routing_key=...)``'s)
    send a message to, as the app routes them (``None``: not exactly one queue)."""
    queue = options.get("queue")
    if queue is not None:
        name = getattr(queue, "name", queue)  # (a kombu Queue, or its name)
        return name if isinstance(name, str) and name else None
    exchange = options.get("exchange")
    exchange = getattr(exchange, "name", exchange)  # (a kombu Exchange, or its name)
    key = options.get("routing_key")
    if exchange is None or key is None:  # (Celery takes what is missing from the default queue)
        default = app.amqp.default_queue
        exchange = default.exchange.name if exchange is None and default.exchange is not None else exchange
        key = default.routing_key if key is None else key
    return destination_queue(app, {"exchange": exchange or "", "routing_key": key})


#: When the last "declaring the delay topology again" was logged at INFO.
_declaring_again = Throttle()


def _declare_again(exc: BaseException) -> None:
    """A broker-delay publish failed (a broker restarted, empty or without a transient
    queue's binding; an exchange deleted; a connection gone): it goes once more over a new
    connection, with the topology declared again. At INFO once a minute (a refusal every
    deferral meets, a permission missing, would otherwise add a line to each)."""
    logger.log(
        logging.DEBUG if _declaring_again.due("") is None else logging.INFO,
        "celery-breaker: broker-delay publish failed (%r); declaring the delay topology again", MaskedRepr(exc),
    )  # fmt: skip


#: What ``BrokerDelay._refused`` remembers a refusal of: the delay topology itself.
_TOPOLOGY = "topology"


class _TopologyRefused(Exception):
    """RabbitMQ refused broker-delay's delay topology a moment ago (``BrokerDelay._still_refused``)."""


class _LevelRefused(Exception):
    """RabbitMQ nacked a run entering a level of the delay topology a moment ago (``BrokerDelay._nacked_lately``)."""


class _ConfirmLost(Exception):
    """A broker-delay message was written and not confirmed in time, and RabbitMQ never
    said it blocks the connection: the peer is taken for gone (a crashed node, a
    partition, a firewall that dropped the flow), the message with it."""


class UnroutedWarning:
    """The WARNING, at most once a minute, that a run's queue cannot be told, so it is
    deferred by countdown; ``why`` says what follows from that (a strategy's own words)."""

    def __init__(self, why: str) -> None:
        self._why = why
        self._told = Throttle()

    def __call__(self, delivery_info: Any) -> None:
        if self._told.due("") is None:
            return
        info = delivery_info or {}
        logger.warning(
            "celery-breaker: a run delivered through exchange %r with routing key %r is deferred by countdown, %s "
            "(declare the queue in task_queues, with its exchange and routing key or bindings)",
            info.get("exchange"), info.get("routing_key"), self._why,
        )  # fmt: skip


def drops_when_full(app: Any, queue: str) -> bool:
    """Whether a run delayed for ``queue`` may be dropped when it comes due: the delay
    levels are classic queues (``broker_native_delayed_delivery_queue_type="classic"``),
    whose dead-lettering is at most once, and the app declares ``queue`` with a length
    limit (``x-max-length``, ``x-max-length-bytes``). A full queue with ``x-overflow:
    reject-publish`` refuses the due run and RabbitMQ drops it: nothing says so, and the
    task never runs. Quorum levels dead-letter at least once, retrying until the queue
    takes it. Not for a quorum queue: Celery delays its countdowns in delay queues of
    that same type, so a countdown would meet the same drop."""
    if app.conf.broker_native_delayed_delivery_queue_type != "classic":
        return False
    declared = app.amqp.queues.get(queue)
    arguments = (declared.queue_arguments or {}) if declared is not None else {}
    if arguments.get("x-queue-type") == "quorum":
        return False
    return any(limit in arguments for limit in ("x-max-length", "x-max-length-bytes"))


class _MayDropWarning:
    """The WARNING, at most once a minute per queue, that a run is deferred by countdown
    because broker-delay could drop it (``drops_when_full``)."""

    def __init__(self) -> None:
        self._told = Throttle()

    def __call__(self, queue: str) -> None:
        if self._told.due(queue) is None:
            return
        logger.warning(
            "celery-breaker: runs of queue %r are deferred by countdown, not broker-delay: it has a length limit, "
            "and the classic delay queues (broker_native_delayed_delivery_queue_type) would drop a run that comes "
            "due while it is full; quorum delay queues (the default) do not",
            queue,
        )


_may_drop = _MayDropWarning()


def _token_of(delivery_info: dict[str, Any] | None) -> str | None:
    """The queue token of a run that came back from a delay of ours, else ``None``."""
    info = delivery_info or {}
    key = info.get("routing_key")
    if not back_from_a_delay(info.get("exchange")) or not isinstance(key, str):
        return None
    tail = _DELAY_PREFIX.sub("", key)
    return tail if re.fullmatch(re.escape(TOKEN_WORD) + r"\.[0-9a-f]{32}", tail) else None


class _UnboundWarning:
    """The WARNING, at most once a minute per queue, that a queue could not be declared or
    bound to the delay topology (each new connection tries again: a pool process's
    first deferral, every consumer start)."""

    def __init__(self) -> None:
        self._told = Throttle()

    def __call__(self, name: str, queue: Any, exc: BaseException) -> None:
        if queue is not None and queue.no_declare and getattr(exc, "reply_code", None) == 404:
            # (a queue the app leaves to others, absent: nothing comes from it to defer)
            logger.debug("celery-breaker: queue %r (no_declare) does not exist; not bound to broker-delay", name)
            return
        if self._told.due(name) is None:
            return
        logger.warning(
            "celery-breaker: could not declare queue %r or bind it to broker-delay's delivery exchange (%r); its "
            "deferred tasks go by countdown until it can be, the other queues are not affected",
            name, MaskedRepr(exc),
        )  # fmt: skip


_unbound = _UnboundWarning()


def _declare_levels(channel: Any, queue_type: str) -> None:
    """Declare the delay topology: the delivery exchange, then each level *n* from the
    shortest: a topic exchange, and a queue bound to it that holds what it takes for
    2**n seconds, then dead-letters it into the level below (level 0: into the delivery
    exchange). A message's routing key spells its delay in 28 binary digits, the longest
    level's first: a level keeps a message whose digit is 1 and passes one whose digit is
    0 straight to the level below. Idempotent; raises what the broker answers (a level
    declared before with another queue type, say)."""
    if queue_type not in ("classic", "quorum"):
        raise ValueError(f"broker_native_delayed_delivery_queue_type must be 'classic' or 'quorum', not {queue_type!r}")
    # What no queue takes must be taken somewhere: a quorum level retries dead-lettering a
    # message that routes nowhere, and 32 such messages stop the level (``ROUTING_EXCHANGE``).
    channel.exchange_declare(UNROUTABLE, "fanout", durable=True, auto_delete=False)
    channel.queue_declare(UNROUTABLE, durable=True, auto_delete=False, arguments={"x-queue-type": queue_type})
    channel.queue_bind(UNROUTABLE, UNROUTABLE, routing_key="")
    channel.exchange_declare(
        ROUTING_EXCHANGE, "topic", durable=True, auto_delete=False, arguments={"alternate-exchange": UNROUTABLE}
    )
    channel.exchange_declare(DELIVERY_EXCHANGE, "topic", durable=True, auto_delete=False)
    channel.exchange_bind(destination=ROUTING_EXCHANGE, source=DELIVERY_EXCHANGE, routing_key="#")
    for level in range(LEVELS):
        name, below = level_name(level), level_name(level - 1) if level else DELIVERY_EXCHANGE
        arguments: dict[str, Any] = {
            "x-queue-type": queue_type,
            "x-message-ttl": 2**level * 1000,
            "x-dead-letter-exchange": below,
            "x-overflow": "reject-publish",  # (a full queue refuses the publish: a nack, not a drop)
        }
        if queue_type == "quorum":
            arguments["x-dead-letter-strategy"] = "at-least-once"  # (no message lost between two levels)
        channel.exchange_declare(name, "topic", durable=True, auto_delete=False)
        channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
        earlier = "*." * (LEVELS - 1 - level)  # (the digits of the longer levels, read already)
        channel.queue_bind(name, name, routing_key=earlier + "1.#")
        channel.exchange_bind(destination=below, source=name, routing_key=earlier + "0.#")


def _exists(connection: Any, exchange: str) -> bool:
    """Whether ``exchange`` exists (asked on a channel of its own, which a 404 closes)."""
    channel = connection.channel()
    try:
        channel.exchange_declare(exchange, "topic", passive=True)
    except connection.channel_errors:
        return False
    with contextlib.suppress(Exception):
        channel.close()
    return True


def ensure_topology(connection: Any, app: Any, consumed: Iterable[str] = ()) -> set[str]:
    """Declare the delay topology (``_declare_levels``), declare every queue of ``app``
    (not a ``no_declare`` one) and bind it to ``celery_breaker_delayed_delivery`` by its
    own token (``queue_binding``); bind the ``consumed`` queues the app does not declare
    too (added with ``add_consumer``). Each is bound to Celery's
    ``celery_delayed_delivery`` by its token as well, when that exchange exists: runs an
    earlier release deferred through Celery's delay queues come back that way. Return
    the queues bound.

    Each queue on its own: one that cannot be declared or bound (a ``no_declare`` queue
    that does not exist, one declared elsewhere with other arguments) is left out, with
    a WARNING, and the others are bound all the same; the queue a run is deferred to is
    bound again before its publish (``BrokerDelay._publish``). Idempotent; raises what
    the broker answers about the delay topology itself, and a connection error."""
    channel = connection.channel()
    try:
        _declare_levels(channel, app.conf.broker_native_delayed_delivery_queue_type)
    finally:
        with contextlib.suppress(Exception):  # (the connection may be closing with it)
            channel.close()
    exchanges = [ROUTING_EXCHANGE]  # (queues an earlier release bound to DELIVERY_EXCHANGE get one copy still)
    if _exists(connection, LEGACY_DELIVERY_EXCHANGE):  # (harmless: only an earlier release keyed runs so)
        exchanges.append(LEGACY_DELIVERY_EXCHANGE)
    queues: list[tuple[str, Any]] = [(queue.name, queue) for queue in app.amqp.queues.values()]
    queues += [(name, None) for name in consumed if name not in app.amqp.queues]
    bound: set[str] = set()
    channel = connection.channel()
    try:
        for name, queue in queues:
            try:
                if queue is not None:
                    queue.bind(channel).declare()  # (kombu declares nothing for a no_declare queue)
                for exchange in exchanges:
                    channel.queue_bind(queue=name, exchange=exchange, routing_key=queue_binding(name))
            except connection.channel_errors as exc:
                _unbound(name, queue, exc)
                channel = connection.channel()  # (RabbitMQ closed that one with its answer)
            else:
                bound.add(name)
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return bound


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
    to the next strategy; so does every run for a minute after RabbitMQ refused the
    topology itself (``_still_refused``, decision 96), and every run entering a level for
    a minute after RabbitMQ nacked one entering it (``_nacked_lately``, decision 98). A
    publish not confirmed in time counts as delivered on a connection RabbitMQ said it
    blocks (``_Blocking``), and otherwise goes to the next strategy at once
    (``_ConfirmLost``). A blocked connection is retired, not closed:
    RabbitMQ has not read the message yet, and a connection closed under it (an RST
    when unread frames are left) can take the message with it; it is closed once
    RabbitMQ unblocks it, or after ``RETIRED_AT_MOST`` seconds."""

    name = "broker-delay"
    parks = True

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        # Each process's confirming connection, the topology declared on it (``prepared``:
        # the queues bound by their token over it).
        self._publisher = ConfirmingPublisher(prepare=self._prepare, on_failure=_declare_again)
        #: RabbitMQ's refusal of the delay topology itself (decision 96).
        self._refused = RecentRefusals(clock)
        #: Per level, RabbitMQ's nack of a run entering it (a length policy; decision 98).
        self._nacked = RecentRefusals(clock)
        self._cannot_tell = UnroutedWarning(
            "not broker-delay: not exactly one queue of the app is bound there, so the queue it came from cannot "
            "be told"
        )

    def _prepare(self, connection: Any, app: Any) -> set[str]:
        """``ensure_topology`` on a new connection, noting RabbitMQ's refusal of the
        topology itself (a 406: its queues exist with another type; a 403: no configure
        permission), which every new connection would meet again."""
        try:
            bound = ensure_topology(connection, app)
        except connection.channel_errors as exc:
            self._refused.note(_TOPOLOGY, exc)
            raise
        self._refused.forget(_TOPOLOGY)
        return bound

    def _still_refused(self) -> BaseException | None:
        """Why runs do not go this way for now: RabbitMQ refused the topology less than
        ``LOOK_AGAIN_AFTER`` seconds ago (decision 96). Each run opened two connections
        before (the publish and its retry), declaring the topology on each, to meet the
        same refusal: on this path, which decision 95 made fast, that was two connections
        per deferral, a burst of them for a backlog."""
        found = self._refused.lately(_TOPOLOGY)
        if found is None:
            return None  # (none, or the operator may have fixed it: the next publish declares it again)
        exc, ago = found
        return _TopologyRefused(
            f"RabbitMQ refused broker-delay's delay topology {ago:.0f} s ago ({MaskedRepr(exc)}); looked at again "
            f"{LOOK_AGAIN_AFTER:g} s after"
        )

    def _nacked_lately(self, level: int) -> BaseException | None:
        """Why runs entering ``level`` do not go this way for now: RabbitMQ nacked one less
        than ``LOOK_AGAIN_AFTER`` seconds ago (a length policy on the delay queues, whose
        ``x-overflow`` is ``reject-publish``: decision 98). Each such run published its
        copy first, to meet the same nack: one refused round trip per run."""
        found = self._nacked.lately(level)
        if found is None:
            return None  # (none, or fixed by an operator, or the level drained: the next run tries)
        exc, ago = found
        return _LevelRefused(
            f"RabbitMQ refused a run entering {level_name(level)} {ago:.0f} s ago ({MaskedRepr(exc)}); tried again "
            f"{LOOK_AGAIN_AFTER:g} s after"
        )

    def _send(self, task: Any, signature: Any, queue: str | None, routing_key: str) -> Send:
        """What publishes the run into the delay topology (with its queue bound first)."""

        def send(producer: Any) -> None:
            bound: set[str] = self._publisher.prepared
            if queue is not None and queue not in bound:
                # (not declared, or not bound with the others: binding a queue that does not
                # exist fails, which is the answer for this run alone)
                producer.channel.queue_bind(queue=queue, exchange=ROUTING_EXCHANGE, routing_key=queue_binding(queue))
                bound.add(queue)
            publish(
                task,
                signature,
                producer=producer,
                exchange=Exchange(DELAY_EXCHANGE, type="topic"),  # type: ignore[no-untyped-call]
                routing_key=routing_key,
                declare=[],  # (the topology is declared on this connection; nothing else is published to)
                retry=False,  # (a connection error comes back here, to open a new one and declare the topology)
                # A level an operator deleted since this connection declared it routes the
                # message to no queue, and RabbitMQ confirms it all the same: mandatory, it
                # is returned first (py-amqp raises NO_ROUTE while the confirm is awaited),
                # and it goes again over a new connection, the topology declared again.
                mandatory=True,
            )

        return send

    def deliver(self, deferral: Deferral) -> float | None:
        task = deferral.task
        request = task.request
        # The queue it was delivered from first (the worker's note, else the routes): the
        # key it came back with names the queue it was deferred to, and a copy that a
        # catch-all binding put in another queue must go back to that other queue, not
        # add a copy to the first one at each deferral. A retry it replaces may have asked
        # for another destination: that one then.
        queue: str | None
        if names_destination(deferral.options):
            queue = asked_queue(task.app, deferral.options)
            if queue is None:
                return None  # (a countdown sends it there, as Celery's retry would)
            token: str | None = queue_token(queue)
        else:
            queue = destination_queue(task.app, request.delivery_info)
            token = queue_token(queue) if queue is not None else _token_of(request.delivery_info)
        if queue is not None and drops_when_full(task.app, queue):
            _may_drop(queue)
            return None
        if token is None:
            self._cannot_tell(request.delivery_info)
            return None
        refused = self._still_refused()
        if refused is not None:
            raise refused  # (the next strategy takes the run, without a connection opened for nothing)
        seconds = min(LONGEST_DELAY, max(1, math.ceil(deferral.plan.delay)))
        level = seconds.bit_length() - 1  # (the level a run of this delay enters: its highest binary digit)
        nacked = self._nacked_lately(level)
        if nacked is not None:
            raise nacked  # (the next strategy takes the run, as after the nack, without the publish)
        signature = task.signature_from_request(
            request, deferral.args, deferral.kwargs, headers=deferral.headers, **deferral.options
        )
        # No countdown or eta: the broker holds it for exactly that long, and a worker
        # must not hold it again. The explicit exchange and key replace the delivery's own.
        for option in DESTINATION_OPTIONS:
            signature.options.pop(option, None)
        routing_key = calculate_routing_key(seconds, token)
        published = self._publisher.publish(task.app, [self._send(task, signature, queue, routing_key)])
        result = published.results[0]
        if result is Confirm.CONFIRMED:
            return float(seconds)
        if result is Confirm.UNCONFIRMED and published.stopped_by_timeout:
            # Written, and not confirmed in time. Whether it arrives depends on why: a broker
            # that blocks publishers routes it later, a dead peer never will (an unanswered
            # write looks the same from this side).
            if not published.blocked:
                # (a lost confirm has had its time: the next strategy takes the run now; if
                # the message did reach RabbitMQ the task runs twice, which is better than never)
                raise _ConfirmLost(
                    f"RabbitMQ did not confirm the deferral within {confirms.CONFIRM_TIMEOUT:g} s and did not say it "
                    f"blocks publishers: its connection is taken for dead ({MaskedRepr(published.error)})"
                ) from published.error
            # Sent, and not confirmed in time, on a connection RabbitMQ said it blocks (a
            # memory or disk alarm): it routes the message once it reads it. Publishing
            # again, here or by the next strategy, would run the task twice: it counts as
            # delivered.
            logger.warning(
                "celery-breaker: task %s[%s]: RabbitMQ did not confirm its deferral within %g s, and blocks "
                "publishers (a memory or disk alarm); counted as deferred, not sent again",
                task.name, request.id, confirms.CONFIRM_TIMEOUT,
            )  # fmt: skip
            return float(seconds)
        failure = published.failure(0)
        if result is Confirm.REFUSED:
            self._nacked.note(level, failure)  # (every run entering that level would meet it)
        raise failure
