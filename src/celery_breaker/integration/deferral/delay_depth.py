"""How many deferred runs wait in broker-delay's queues: one total for operators, read with passive declares.

broker-delay's levels (``celery_breaker_delayed_0`` .. ``_27``, ``broker_delay.py``) hold
the runs of every breaker, every queue and every app that defers on the vhost, mixed:
which breaker a run waits behind is written in its message alone, and reading it means
taking the message. What can be told without touching one is the total. A run waits in
one level at a time (it passes from level to level by dead-lettering), so the sum of
the levels' depths counts each waiting run once. Runs that came due for a queue that
was gone wait apart, in ``UNROUTABLE``, and are counted apart: they do not come back
by themselves.

A depth is what RabbitMQ answers a passive ``queue.declare``: the messages ready (no
one consumes a level). A passive declare creates nothing. A queue that does not exist
(nothing deferred on this vhost yet, the topology deleted) counts 0; RabbitMQ closes
the channel that asked (404), so the next queue is asked on a new one and the closed
one is let go (py-amqp reopens it: kept, they would pile up on a connection kept open).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from ...storage.masking import masked_in_text
from .broker_delay import LEVELS, UNROUTABLE, level_name
from .confirms import timed_out

__all__ = [
    "DEPTH_TIMEOUT", "DelayDepth", "delay_depth", "depth_connection", "failure_text", "read_delay_depth",
    "unroutable_count",
]  # fmt: skip

#: Seconds RabbitMQ has to accept a connection for a count (each of the broker's hosts,
#: once) and to answer each request on it: a count fails in seconds when the broker is
#: down or does not answer, and never hangs the command or the scrape that asked.
DEPTH_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class DelayDepth:
    """What waits in broker-delay's queues of one vhost, for every breaker and app together."""

    delayed: int
    """Deferred runs waiting for their delay (the 28 levels): they come back by themselves."""
    unroutable: int
    """Runs that came due for a queue that no longer existed (``UNROUTABLE``): they wait
    for an operator to move them back to their queue, or purge them."""


def _depths(connection: Any, queues: list[str]) -> list[int]:
    """Each queue's ready messages, asked on one channel (0: no such queue, not created).
    Raises any other answer, and what the connection meets (a timeout, the connection lost)."""
    found: list[int] = []
    channel = connection.channel()
    try:
        for queue in queues:
            try:
                found.append(int(channel.queue_declare(queue, passive=True).message_count))
            except connection.channel_errors as exc:  # (RabbitMQ closed the channel with its answer)
                if getattr(exc, "reply_code", None) != 404:
                    raise  # (a refusal, say: not a queue to count as empty)
                found.append(0)
                with contextlib.suppress(Exception):
                    channel.close()
                channel = connection.channel()
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return found


def delay_depth(connection: Any) -> DelayDepth:
    """What waits in the delay topology, read on ``connection`` (a kombu connection to the
    vhost; its own timeouts bound the reads): ``LEVELS + 1`` passive declares on one
    channel (another after each queue that does not exist)."""
    *levels, unroutable = _depths(connection, [*(level_name(level) for level in range(LEVELS)), UNROUTABLE])
    return DelayDepth(delayed=sum(levels), unroutable=unroutable)


def unroutable_count(connection: Any) -> int:
    """How many due runs wait in ``UNROUTABLE``, their queue gone when they came due (0: none, or no topology)."""
    return _depths(connection, [UNROUTABLE])[0]


def depth_connection(app: Any, timeout: float = DEPTH_TIMEOUT) -> Any:
    """A kombu connection to ``app``'s broker for a count, connected: the app's own
    settings (``connection_for_read``: URL and failover hosts, credentials, TLS,
    ``broker_transport_options``), each host tried once, without the retries and sleeps
    of a worker's connection. Connecting waits at most ``timeout`` seconds a host (less
    if ``broker_connection_timeout`` says so), and so does each answer (py-amqp's
    ``read_timeout`` and ``write_timeout``). Raises kombu's ``OperationalError`` when no
    host takes it."""
    configured = app.conf.broker_connection_timeout
    connection = app.connection_for_read(
        connect_timeout=min(float(configured), timeout) if configured else timeout,
        transport_options={"read_timeout": timeout, "write_timeout": timeout},
    )
    try:
        # (kombu lists failover hosts in ``alt``, none for a single URL; it sleeps only
        # once every host has failed, and the last failure raises before that)
        connection.ensure_connection(max_retries=max(len(connection.alt), 1) - 1)
    except BaseException:
        connection.collect()  # (no goodbye to a broker that took no connection)
        raise
    return connection


def read_delay_depth(app: Any, timeout: float = DEPTH_TIMEOUT) -> DelayDepth:
    """What waits in ``app``'s broker's delay topology, over a connection of its own
    (``depth_connection``), closed after. Raises what connecting or reading meets."""
    connection = depth_connection(app, timeout)
    try:
        found = delay_depth(connection)
    except BaseException:
        connection.collect()  # (closing politely would wait for an answer that may not come)
        raise
    connection.close()
    return found


def failure_text(app: Any, exc: BaseException) -> str:
    """Why a count failed, in one line for an operator: the broker and its error, the
    password masked in both (kombu's error may quote the broker's URL)."""
    where = app.connection_for_read().as_uri()  # (not connected: only the URL is read)
    reason = "no answer (timed out)" if timed_out(exc) else (masked_in_text(str(exc)) or type(exc).__name__)
    return f"{where}: {reason}"
