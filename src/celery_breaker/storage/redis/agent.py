"""The one background thread per process and Redis store: hears transitions, sends local counts.

It keeps a SUBSCRIBE on the store's transitions channel (every script that moves a
breaker PUBLISHes there), so each process's local view follows every transition without
asking Redis on each call; and every ``FLUSH_INTERVAL`` it sends what cells counted
locally (successes, rejections, deferrals). While it is subscribed and its heartbeat is
answered the store is *live*: CLOSED cells then pass calls without a round trip. When it
loses the subscription (or a heartbeat goes unanswered for ``DEAD_AFTER``) the store goes
dark at once: every call asks Redis again until the subscription is back and each cell
has been read again.

Started lazily by the first cell a process creates (so never before a prefork pool
forks its children: each child starts its own), it stops by itself when the store is
garbage or has had no cells for ``IDLE_EXIT`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import redis

from ...errors import StorageError
from ..masking import MaskedRepr, MaskedText
from .client import is_cluster

if TYPE_CHECKING:
    from .store import RedisStore

__all__ = ["DEAD_AFTER", "FLUSH_INTERVAL", "HEARTBEAT", "Agent"]

logger = logging.getLogger("celery_breaker")

#: Seconds between sends of locally counted successes, rejections and deferrals.
FLUSH_INTERVAL = 1.0
#: Seconds between PINGs on the subscription connection.
HEARTBEAT = 0.5
#: A subscription that has not answered a PING for this long is treated as lost: the
#: worst-case delay before a process stops trusting its local view when transitions
#: cannot reach it (normally they arrive in well under a millisecond).
DEAD_AFTER = 1.5
#: Seconds without any cell before the thread stops (a new cell starts it again).
IDLE_EXIT = 5.0
_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)


def _idle_since(store: RedisStore, since: float | None, now: float) -> float | None:
    """Since when ``store`` has needed no agent (``since``: as last seen), or ``None``
    while it needs one: it has cells, or counts of dropped breakers still to send (a
    flush that failed sends them later), or something watches its transitions."""
    if store.cell_count() or store.orphans or store.watched:
        return None
    return now if since is None else since


def _refused(exc: BaseException) -> bool:
    """Whether Redis refused a command outright (an ACL denial, an unknown or renamed command)."""
    return isinstance(exc, redis.exceptions.NoPermissionError) or (
        isinstance(exc, redis.ResponseError) and "unknown command" in str(exc)
    )


class _Lost(Exception):
    """The subscription stopped answering."""


class _Unread(Exception):
    """Subscribed, but the views could not be read again (the store failed the flush)."""


class Agent(threading.Thread):
    """The background thread of one store in one process (see the module docstring)."""

    def __init__(self, store: RedisStore) -> None:
        super().__init__(name=f"celery-breaker {store.key_prefix}", daemon=True)
        self.pid = os.getpid()
        self._store = weakref.ref(store)
        self._stop_event = threading.Event()
        self._reconnects = 0
        self._refusal_told = False

    def stop(self) -> None:
        """Ask the thread to stop; it closes its subscription and ends at its next wake-up."""
        self._stop_event.set()

    def run(self) -> None:
        failures = 0
        empty_since: float | None = None  # (while failing: since when the store has had no cells)
        try:
            while not self._stop_event.is_set():
                store: RedisStore | None = self._store()
                if store is None or self.pid != os.getpid():
                    return
                pubsub = None
                try:
                    pubsub = self._subscribe(store)
                    empty_since = None
                    store.go_live()
                    try:
                        store.flush(everything=True)  # views read from here on are followed
                    except StorageError as exc:
                        # On a Cluster a breaker fails on its own primary: the views that could
                        # not be read went dark each (their next call asks Redis), the others
                        # are followed. Not live until that primary came back, every call on
                        # every breaker of the process asked Redis meanwhile.
                        if not is_cluster(store.client()):
                            raise _Unread(exc) from exc
                    store.settle()
                    failures = 0  # (only now: a Redis refusing writes answers a SUBSCRIBE)
                    store = None  # (only the weak reference while listening)
                    if self._listen(pubsub):
                        return
                except Exception as exc:  # the thread must outlive anything it meets
                    if not isinstance(exc, (redis.RedisError, OSError, StorageError, _Lost, _Unread)):
                        logger.warning(
                            "redis store agent: unexpected %r; resubscribing", MaskedRepr(exc), exc_info=True
                        )
                    elif _refused(exc) and not self._refusal_told:
                        # Redis answered, refusing the SUBSCRIBE (an ACL user without the
                        # command or the channel, or a disabled command): calls still work,
                        # each asking Redis, so nothing else would ever say why the fast
                        # path never comes.
                        self._refusal_told = True
                        store = self._store()
                        logger.warning(
                            "redis store %s: Redis refused to subscribe to %s (%s); every breaker call asks Redis "
                            "until it can (the store's user needs SUBSCRIBE and the channel)",
                            store.label if store else "?", store.channel if store else "the transitions channel",
                            MaskedText(exc),
                        )  # fmt: skip
                    failures += 1
                    store = self._store()
                    if store is not None:
                        # Views that could not be read again (Redis refusing writes: full,
                        # read-only, too few replicas) lose no channel: no WARNING (each call
                        # meets the failure and breaker_on_storage_error says so), and the
                        # next try waits longer each time.
                        store.go_dark(None if isinstance(exc, _Unread) else exc)
                        if isinstance(exc, _Unread):
                            logger.debug(
                                "redis store %s: views not read again (%s); retrying", store.label, MaskedText(exc)
                            )
                        # A store that cannot be reached stops its agent too once it has
                        # needed none for IDLE_EXIT (a new cell starts another).
                        now = time.monotonic()
                        empty_since = _idle_since(store, empty_since, now)
                        if empty_since is not None and now - empty_since > IDLE_EXIT:
                            return
                finally:
                    # Not held through the wait: a store nobody else holds is garbage
                    # while its agent waits to retry, and the agent then stops.
                    store = None
                    if pubsub is not None:
                        self._close(pubsub)
                self._stop_event.wait(_BACKOFF[min(failures, len(_BACKOFF)) - 1] if failures else 0.0)
        finally:
            store = self._store()
            if store is not None:
                store.agent_stopped(self)

    def _subscribe(self, store: RedisStore) -> Any:
        pubsub = store.client().pubsub()  # type: ignore[no-untyped-call,unused-ignore]
        pubsub.subscribe(store.channel)
        deadline = time.monotonic() + max(store.socket_timeout, 1.0)
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message is not None and message.get("type") == "subscribe":
                # redis-py reconnects and resubscribes a pub/sub connection by itself,
                # silently: whatever was published meanwhile is lost, so a reconnect
                # must count as a lost subscription.
                connection = getattr(pubsub, "connection", None)
                if connection is not None:
                    connection.register_connect_callback(self._reconnected)
                return pubsub
        raise _Lost(f"no SUBSCRIBE confirmation for {store.channel}")

    def _reconnected(self, connection: Any) -> None:
        self._reconnects += 1

    def _close(self, pubsub: Any) -> None:
        # The connection goes back to the pool, where its reconnects are no longer ours.
        connection = getattr(pubsub, "connection", None)
        with contextlib.suppress(Exception):
            if connection is not None:
                connection.deregister_connect_callback(self._reconnected)
        with contextlib.suppress(redis.RedisError, OSError):
            pubsub.close()

    def _listen(self, pubsub: Any) -> bool:
        """Hear transitions, flush and ping until the subscription is lost (raises), or
        until there is nothing left to serve (returns True) or the thread is stopped."""
        now = time.monotonic()
        answered = now
        next_ping = now + HEARTBEAT
        next_flush = now + FLUSH_INTERVAL
        empty_since: float | None = None
        reconnects = self._reconnects
        while not self._stop_event.is_set():
            timeout = max(0.0, min(next_ping, next_flush) - time.monotonic())
            message = pubsub.get_message(timeout=timeout)
            if self._reconnects != reconnects:
                raise _Lost("the subscription was reconnected; transitions may have been missed")
            now = time.monotonic()
            store = self._store()
            if store is None or self.pid != os.getpid():
                return True
            if message is not None:
                kind = message.get("type")
                if kind == "message":
                    store.hear(message.get("data"))
                answered = now  # any reply proves the connection alive
            if now >= next_flush:
                next_flush = now + FLUSH_INTERVAL
                with contextlib.suppress(StorageError):  # counts are kept and sent next time
                    store.flush()
                empty_since = _idle_since(store, empty_since, now)
                if empty_since is not None and now - empty_since > IDLE_EXIT:
                    return True
            if now >= next_ping:
                if now - answered > DEAD_AFTER:
                    raise _Lost(f"no answer on {store.channel} for {now - answered:.1f} s")
                pubsub.ping()
                next_ping = now + HEARTBEAT
            del store
        return True
