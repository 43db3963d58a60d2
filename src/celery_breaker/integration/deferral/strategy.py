"""The deferral seam: what a strategy is given (one ``Deferral``) and what it must do with it.

A rejected run is *planned* (``plan.py``: when it may run, how often it was deferred, or
whether to give up) and then *delivered* by the first strategy that takes it: parked in
the breaker's store (``parking.py``), delayed in the broker itself (``broker_delay.py``,
RabbitMQ), or published again with a countdown a worker holds (``countdown.py``).
``selection.py`` chooses the strategies from the broker and the settings. A new mechanism
is one module here that implements ``DeferralStrategy`` plus one line in ``selection.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from kombu.exceptions import EncodeError
from kombu.serialization import registry

from ...breaker import CircuitBreaker
from ...errors import CircuitOpenError
from .plan import DeferralPlan

__all__ = [
    "CONTENT_TYPE_KEY", "DESTINATION_OPTIONS", "Deferral", "DeferralStrategy", "Handed", "in_a_serializer",
    "names_destination", "note_content_type", "publish", "serializers_of",
]  # fmt: skip

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Deferral:
    """One rejected run to deliver again, and the plan for it."""

    task: Any
    """The running ``BreakerTask`` (its ``request`` is the delivery being deferred)."""
    breaker: CircuitBreaker
    """The task's own breaker (parked tasks wait behind it)."""
    rejected: CircuitOpenError
    """The rejection: the task's breaker, or one nested in its body."""
    state: str
    """The rejecting breaker's state, as text (``open``, ``forced_open``, ...)."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    """The delivery's headers, with the ``x-breaker-*`` ones for this deferral."""
    plan: DeferralPlan
    expires_in: float | None
    """Seconds until the task's ``expires`` (``None``: it has none)."""
    max_defer_age: float | None
    """The task's ``breaker_max_defer_age``."""
    now: float
    """Epoch seconds when the deferral was planned."""
    failed: bool = False
    """The run ran and failed, and its breaker is open now (it tripped it, or failed as a
    probe): parked, it goes to the back (``now``), not to its first deferral's place."""
    options: dict[str, Any] = field(default_factory=dict)
    """Publishing options of the delivery that ``signature_from_request`` does not carry
    (``compression``, ``argsrepr``, ``kwargsrepr``), and those of the ``self.retry(...)``
    the deferral replaces (``queue``, ``priority``, ``time_limit``...): every strategy
    passes them to it. A destination among them (``names_destination``) is where the
    run goes back to, instead of the queue it was delivered from."""


#: The options that say where a message goes.
DESTINATION_OPTIONS = ("queue", "exchange", "routing_key")


def names_destination(options: Mapping[str, Any]) -> bool:
    """Whether ``options`` (a ``Deferral``'s) say where the run goes: a ``self.retry(queue=...)``
    (or ``exchange``, ``routing_key``) it replaces asked for another destination."""
    return any(options.get(name) is not None for name in DESTINATION_OPTIONS)


class DeferralStrategy(Protocol):
    """A way to deliver a deferred run so that it runs again later."""

    name: str
    """Named in logs and in the ``task-breaker-deferred`` event: ``park``, ``countdown``, ..."""
    parks: bool
    """True when the run waits outside every worker (a store, a queue) until released."""

    def deliver(self, deferral: Deferral) -> float | Handed | None:
        """Deliver the run; return the seconds until it comes back (the plan's delay, or
        what the mechanism made of it), or ``None`` when this strategy cannot take it
        now (the next one is tried), or ``Handed`` when another strategy took it in its
        place. An error while publishing passes the run to the next strategy too; the
        last one, which takes every run, raises instead (``Reject`` to requeue it, or a
        final error): nothing is dropped silently."""
        ...


class Handed(NamedTuple):
    """A run a strategy handed to another in its place (the countdown parks a run Celery's
    native delay would not bring back: ``countdown.py``); logged and announced as ``by``'s."""

    by: DeferralStrategy
    delay: float


#: Where the worker's main process notes, in a request's ``delivery_info``, the content
#: type its message came in (``note_content_type``); it travels with the request to the pool.
CONTENT_TYPE_KEY = "celery_breaker_content_type"


def note_content_type(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``task_received`` (the worker's main process): note the content type the task's
    message came in, which Celery does not pass on to the task's ``request``."""
    content_type = getattr(request, "content_type", None)
    info = getattr(request, "delivery_info", None)
    if isinstance(content_type, str) and isinstance(info, dict):
        info[CONTENT_TYPE_KEY] = content_type


def _arrived_in(task: Any) -> str | None:
    """The serializer the running task's message came in (``note_content_type``), if known."""
    info = getattr(task.request, "delivery_info", None)
    content_type = info.get(CONTENT_TYPE_KEY) if isinstance(info, dict) else None
    name = registry.type_to_name.get(content_type) if isinstance(content_type, str) else None
    return name if isinstance(name, str) and name in registry.name_to_type else None


def serializers_of(task: Any) -> list[str]:
    """The serializers a deferral may publish ``task`` in: the one its message came in,
    then its own (``task.serializer`` or ``task_serializer``), then every other the app
    accepts, in ``accept_content`` order.

    A task sent with a serializer of its own (``apply_async(serializer="pickle")``) must
    be published again in it: in the task's default, arguments that only it takes (a set)
    would not encode, and arguments another takes differently would change (JSON turns a
    tuple into a list and the integer keys of a dict into strings), so the body would run
    with other arguments than it was sent with."""
    own = task.serializer or task.app.conf.task_serializer
    came_in = _arrived_in(task)
    found = [own] if came_in is None or came_in == own else [came_in, own]
    for item in task.app.conf.accept_content or ():
        name = registry.type_to_name.get(item, item)
        if name not in found and name in registry.name_to_type:
            found.append(name)
    return found


def in_a_serializer(task: Any, attempt: Callable[[str], T]) -> T:
    """``attempt(serializer)`` in the task's serializer, or else in the first other one the
    app accepts that encodes (``serializers_of``); raises the first ``EncodeError`` if
    none does."""
    first: EncodeError | None = None
    for name in serializers_of(task):
        try:
            return attempt(name)
        except EncodeError as exc:
            first = first or exc
    assert first is not None
    raise first


def publish(task: Any, signature: Any, **options: Any) -> None:
    """``signature.apply_async(**options)`` in a serializer that encodes it
    (``in_a_serializer``), from no parent task when the run had none (``_as_its_own_sender``)."""
    with _as_its_own_sender(task, signature):
        in_a_serializer(task, lambda name: signature.apply_async(serializer=name, **options))


@contextlib.contextmanager
def _as_its_own_sender(task: Any, signature: Any) -> Iterator[None]:
    """While the copy of a run that has no parent task is published from that run: a
    request of no task on top of it, the one Celery reads as the sender.

    Celery fills in a message's missing ``parent_id`` with the id of the task running
    where it is sent (``Celery.send_task``), so a task its caller sent from outside any
    task came back from a countdown or broker-delay deferral as its own child
    (``request.parent_id`` its own id), and the copy's result was added to the run's own
    children. A parked run, published by the releaser thread, kept ``None``."""
    if signature.options.get("parent_id") is not None:
        yield  # (a child keeps the parent it names)
        return
    task.push_request(called_directly=False, id=None, root_id=None, delivery_info=task.request.delivery_info or {})
    try:
        yield
    finally:
        task.pop_request()
