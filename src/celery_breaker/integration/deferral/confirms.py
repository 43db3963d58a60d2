"""Publishing to RabbitMQ with publisher confirms, over a connection of a process's own.

Published as Celery publishes, a message RabbitMQ refuses (a full queue whose
``x-overflow`` is ``reject-publish``, a user who may not write to the exchange) raises
nothing, or only at the next publish on that channel: a deferral counted as sent, or a
parked task forgotten as released, was lost. Every publish of ours that stands for a
task that must not be lost goes through a ``ConfirmingPublisher`` instead: the releaser's
(``release.py``), the countdown's and broker-delay's (one per process each).

The channel is put in confirm mode once, and a batch is written a ``window`` of messages
at a time, each window's confirms awaited before the next is written (RabbitMQ numbers
the messages of a channel in confirm mode 1, 2, 3...; an ack or nack may settle every
message up to its number at once). py-amqp's own ``confirm_publish`` waits after every
message: one round trip each, which held the releaser to ~900 tasks a second on
loopback where it writes ~2,900 without confirms.

What can go wrong, and what the caller is told (``Published``):

* RabbitMQ refuses a message (``basic.nack``): ``REFUSED``, the batch goes on.
* A message cannot be encoded: ``FAILED`` (its exception in ``Published.errors``), the
  batch goes on.
* No confirm within ``CONFIRM_TIMEOUT``: the messages still waiting are ``UNCONFIRMED``
  and the batch stops (the rest ``UNSENT``). ``Published.blocked`` says whether RabbitMQ
  said it blocks the connection meanwhile (a memory or disk alarm: it routes them once the
  alarm clears) or not (the peer may be gone, and them with it). The connection is
  retired, not closed (RabbitMQ has not read them yet; a connection closed under them can
  take them with it): closed once RabbitMQ unblocks it, or after ``RETIRED_AT_MOST``.
* Anything else (a broker restarted, a channel closed by a refusal such as
  ``ACCESS_REFUSED``): the connection is closed, and the batch goes on over a new one,
  once, the messages that were waiting for a confirm written again (they may have been
  routed: they may run twice, never not at all). A second failure stops it
  (``Published.error``): the messages waiting are ``UNCONFIRMED``, the rest ``UNSENT``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from amqp.exceptions import MessageNacked  # type: ignore[import-untyped]
from kombu.exceptions import EncodeError

__all__ = [
    "CONFIRM_TIMEOUT", "RETIRED_AT_MOST", "WINDOW", "Blocking", "Confirm", "ConfirmingPublisher", "Published",
    "Send", "discard", "nacked", "timed_out",
]  # fmt: skip

T = TypeVar("T")

logger = logging.getLogger("celery_breaker")

#: Seconds RabbitMQ has to confirm a window of messages.
CONFIRM_TIMEOUT = 10.0
#: Seconds a connection retired with messages unconfirmed is kept open at most, waiting
#: for RabbitMQ to unblock it and read what it holds.
RETIRED_AT_MOST = 600.0
#: Messages written before their confirms are awaited. Bounds what a lost connection
#: leaves unconfirmed (released again after their lease: they may run twice).
WINDOW = 64

#: What sends one message: called with a kombu ``Producer`` on the confirming channel.
Send = Callable[[Any], object]


class Confirm(enum.Enum):
    """What became of one message of a batch (``ConfirmingPublisher.publish``)."""

    CONFIRMED = "confirmed"
    """RabbitMQ took it (``basic.ack``)."""
    REFUSED = "refused"
    """RabbitMQ refused it (``basic.nack``): it is not routed."""
    UNCONFIRMED = "unconfirmed"
    """Written, and no confirm came (in time, or before the connection failed): it may be routed, or not."""
    FAILED = "failed"
    """Not written: it could not be encoded (``Published.errors``)."""
    UNSENT = "unsent"
    """Not written: the batch stopped before it (``Published.error``)."""


class Published:
    """The outcome of a batch: one ``Confirm`` per message, in order."""

    __slots__ = ("blocked", "error", "errors", "results")

    def __init__(self, size: int) -> None:
        self.results = [Confirm.UNSENT] * size
        #: By index: why a ``FAILED`` message could not be written.
        self.errors: dict[int, BaseException] = {}
        #: What stopped the batch early (a confirm timed out, a second connection failed).
        self.error: BaseException | None = None
        #: Whether RabbitMQ said it blocks publishers while messages waited for confirms.
        self.blocked = False

    @property
    def stopped_by_timeout(self) -> bool:
        """Whether the batch stopped because a confirm did not come in time: its
        ``UNCONFIRMED`` messages are written, and may yet be routed (``blocked``)."""
        return self.error is not None and timed_out(self.error)

    def failure(self, index: int) -> BaseException:
        """Why message ``index`` did not go: RabbitMQ's refusal, its encoding error, or what
        stopped the batch."""
        result = self.results[index]
        if result is Confirm.REFUSED:
            refused: BaseException = MessageNacked("RabbitMQ refused the message (basic.nack)")
            return refused
        return self.errors.get(index) or self.error or RuntimeError(f"the message was {result.value}")


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a socket timeout: Celery reraises one as kombu's
    ``OperationalError``, the timeout its cause or context."""
    return _caused_by(exc, TimeoutError)  # (socket.timeout is TimeoutError)


def nacked(exc: BaseException) -> bool:
    """Whether ``exc`` is RabbitMQ's negative confirm (``basic.nack``), perhaps wrapped."""
    return _caused_by(exc, MessageNacked)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def discard(connection: Any) -> None:
    """Close ``connection``, dead or alive, without raising."""
    try:
        connection.collect()
    except Exception:  # (already broken: nothing more to release)
        logger.debug("celery-breaker: closing a confirming connection failed", exc_info=True)


class Blocking:
    """Whether RabbitMQ blocks a connection's publishers, as it says itself
    (``connection.blocked`` and ``connection.unblocked``, which py-amqp hands to the
    ``on_blocked`` and ``on_unblocked`` callbacks while it reads the connection)."""

    def __init__(self) -> None:
        self.now = False  # blocked at present
        self.seen = False  # blocked at some time since the current window began

    def blocked(self, reason: str | None = None) -> None:
        """RabbitMQ said it blocks the connection (``connection.blocked``)."""
        self.now = self.seen = True

    def unblocked(self) -> None:
        """RabbitMQ said it no longer blocks it (``connection.unblocked``)."""
        self.now = False

    def publishing(self) -> None:
        """A window begins: only a block from here on (or one still on) explains its timeout."""
        self.seen = self.now


class _Link:
    """One confirming connection: its channel in confirm mode, and the messages written on
    it that wait for a confirm (RabbitMQ's number for each, in order, to its index in the
    batch being published)."""

    def __init__(self, connection: Any, blocking: Blocking) -> None:
        self.connection = connection
        self.blocking = blocking
        self.written = 0  # the number RabbitMQ gave the last message written
        self.waiting: dict[int, int] = {}
        self.published: Published | None = None
        self.producer: Any = None
        self.prepared: Any = None
        self.sending: int | None = None  # the index of the message being sent, until its first publish

    def open(self) -> None:
        channel = self.connection.default_channel
        channel.confirm_select()
        channel.events["basic_ack"].add(self.acked)
        channel.events["basic_nack"].add(self.refused)
        self.producer = self.connection.Producer(channel=channel)
        publish = channel.basic_publish

        def numbered(*args: Any, **kwargs: Any) -> Any:
            # RabbitMQ numbers every publish on the channel, and a send may publish more
            # than its message: with task_send_sent_event, Celery publishes a task-sent
            # event on the same producer right after the task. Counted one per send, every
            # number after the first event named the wrong message: a refused task was
            # forgotten as confirmed, confirmed ones waited out the timeout. The message's
            # own number (its first publish) is awaited, and noted before it is written:
            # its confirm may be read while the event is published.
            self.written += 1
            if self.sending is not None:
                self.waiting[self.written] = self.sending
                self.sending = None
            return publish(*args, **kwargs)

        channel.basic_publish = numbered

    def took(self) -> bool:
        """Whether the message being sent was published (its number awaited); it is sent no longer."""
        published, self.sending = self.sending is None, None
        return published

    def acked(self, number: int, multiple: bool) -> None:
        self._settle(number, multiple, Confirm.CONFIRMED)

    def refused(self, number: int, multiple: bool) -> None:
        self._settle(number, multiple, Confirm.REFUSED)

    def _settle(self, number: int, multiple: bool, outcome: Confirm) -> None:
        published, waiting = self.published, self.waiting
        if multiple:
            settled = [written for written in waiting if written <= number]  # (in order: the oldest first)
        else:
            settled = [number] if number in waiting else []
        for written in settled:
            index = waiting.pop(written)
            if published is not None:
                published.results[index] = outcome

    def await_confirms(self, timeout: float) -> None:
        """Read the connection until every message written has its confirm; raise
        ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"RabbitMQ did not confirm {len(self.waiting)} message(s) within {timeout:g} s")
            self.connection.drain_events(timeout=left)

    def abandon(self) -> list[int]:
        """Stop waiting for confirms: the indices of the messages still waiting."""
        left = list(self.waiting.values())
        self.waiting.clear()
        self.published = None
        return left


class ConfirmingPublisher:
    """Publishes batches of messages to RabbitMQ with publisher confirms, over a connection
    of this process's own (opened on first use, and again after a fork or a failure).

    ``prepare(connection, app)``: called on each new connection before anything is
    published on it (broker-delay declares its topology there); what it returns is
    ``prepared`` while that connection serves. ``on_failure(exc)``: called when a batch
    goes on over a new connection after ``exc``. Thread-safe: batches take turns."""

    def __init__(
        self,
        *,
        prepare: Callable[[Any, Any], Any] | None = None,
        on_failure: Callable[[BaseException], object] | None = None,
        window: int = WINDOW,
        confirm_timeout: float = CONFIRM_TIMEOUT,
    ) -> None:
        self.prepare = prepare
        self.on_failure = on_failure
        self.window = window
        #: Seconds RabbitMQ has to confirm a window (``CONFIRM_TIMEOUT`` by default).
        self.confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process that owns ``_link``
        self._link: _Link | None = None
        #: Connections retired with messages unconfirmed, and when: closed once RabbitMQ
        #: unblocks them, or after ``RETIRED_AT_MOST`` seconds.
        self._retired: list[tuple[_Link, float]] = []

    @property
    def prepared(self) -> Any:
        """What ``prepare`` returned for the connection in use (``None``: none open)."""
        link = self._link
        return None if link is None or self._pid != os.getpid() else link.prepared

    def ask(self, app: Any, question: Callable[[Any], T]) -> T:
        """``question(prepared)``: asked of what ``prepare`` returned for this process's
        connection (opened if none serves), under the lock batches take turns by. A
        connection error raises."""
        with self._lock:
            return question(self._connected(app).prepared)

    def publish(self, app: Any, sends: Sequence[Send]) -> Published:
        """Write each message (``send(producer)``), a window at a time; return what became of each."""
        published = Published(len(sends))
        with self._lock:
            first, failed_once = 0, False
            while first < len(sends):
                end = min(len(sends), first + self.window)
                try:
                    first = self._publish_window(app, sends, first, end, published)
                except Exception as exc:
                    link = self._link
                    left = link.abandon() if link is not None else []
                    for index in left:
                        published.results[index] = Confirm.UNCONFIRMED
                    if timed_out(exc) and link is not None:
                        published.blocked = link.blocking.seen
                        published.error = exc
                        self._retire()
                        break
                    self.close()
                    if failed_once:
                        published.error = exc
                        break
                    # A broker restarted since, a channel closed by a refusal: once more over a
                    # new connection, the messages left unconfirmed written again (a copy may
                    # have been routed: they may run twice, never not at all).
                    failed_once = True
                    if self.on_failure is not None:
                        self.on_failure(exc)
                    for index in left:
                        published.results[index] = Confirm.UNSENT
                    first = self._next_unwritten(published, first)
        return published

    def _publish_window(self, app: Any, sends: Sequence[Send], first: int, end: int, published: Published) -> int:
        """Write ``sends[first:end]`` and await their confirms; return ``end``."""
        link = self._connected(app)
        link.published = published
        link.blocking.publishing()
        for index in range(first, end):
            if published.results[index] is not Confirm.UNSENT:
                continue  # (settled before the connection failed)
            link.sending = index
            try:
                sends[index](link.producer)
            except (EncodeError, TypeError) as exc:
                # The message's own data, before anything is written: it fails alone. (Celery
                # raises TypeError for arguments that are no list, options that are no
                # mapping: taken for a broken connection, one such message failed the whole
                # window, on a new connection, every time.)
                link.sending = None
                published.results[index] = Confirm.FAILED
                published.errors[index] = exc
                continue
            if not link.took():  # (the send published nothing: nothing to await)
                published.results[index] = Confirm.FAILED
                published.errors[index] = RuntimeError("nothing was published")
                continue
            if published.results[index] is Confirm.UNSENT:  # (its confirm may have come already)
                published.results[index] = Confirm.UNCONFIRMED  # (until its confirm comes)
        link.await_confirms(self.confirm_timeout)
        link.published = None
        return end

    @staticmethod
    def _next_unwritten(published: Published, first: int) -> int:
        """The first message of the window that failed which was not written."""
        index = first
        while index < len(published.results) and published.results[index] is not Confirm.UNSENT:
            index += 1
        return index

    def _connected(self, app: Any) -> _Link:
        if self._pid != os.getpid():  # (forked: the parent's socket is not ours to use or close)
            self._pid, self._link, self._retired = os.getpid(), None, []
        if self._retired:
            self._close_retired()
        if self._link is None:
            blocking = Blocking()
            # (confirms are read here, a window at a time: py-amqp's own confirm_publish, set
            # in broker_transport_options for the app's publishes, would wait after each)
            options = {"confirm_publish": False, "on_blocked": blocking.blocked, "on_unblocked": blocking.unblocked}
            link = _Link(app.connection_for_write(transport_options=options), blocking)
            try:
                link.open()
                if self.prepare is not None:
                    link.prepared = self.prepare(link.connection, app)
            except BaseException:
                discard(link.connection)
                raise
            self._link = link
        return self._link

    def close(self) -> None:
        """Close the connection in use (a failed one, or at the end); the next batch opens another."""
        link, self._link = self._link, None
        if link is not None and self._pid == os.getpid():
            discard(link.connection)

    def close_all(self) -> None:
        """Close the connection in use and every retired one (the owner stops)."""
        self.close()
        if self._pid == os.getpid():
            for link, _since in self._retired:
                discard(link.connection)
        self._retired = []

    def _retire(self) -> None:
        """Stop publishing on this connection (its confirms are no longer awaited), and
        leave it open until RabbitMQ has read what it holds."""
        if self._link is not None and self._pid == os.getpid():
            self._retired.append((self._link, time.monotonic()))
        self._link = None

    def _close_retired(self) -> None:
        """Close the retired connections RabbitMQ no longer blocks (its ``connection.unblocked``
        read now, without waiting), or that were retired ``RETIRED_AT_MOST`` seconds ago."""
        kept = []
        for link, since in self._retired:
            with contextlib.suppress(Exception):  # (nothing to read, or the connection is gone)
                link.connection.drain_events(timeout=0)
            if link.blocking.now and time.monotonic() - since < RETIRED_AT_MOST:
                kept.append((link, since))
            else:
                discard(link.connection)
        self._retired = kept
