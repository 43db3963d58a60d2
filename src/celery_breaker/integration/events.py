"""Celery events for breakers: ``breaker-opened``, ``breaker-half-opened``, ``breaker-closed``
(one per transition, sent by the process whose call made it, so once cluster-wide) and
``task-breaker-deferred`` (one per deferral).

They go out only in workers with events on: ``breaker_send_events``, or when that is
left unset, the worker's own ``-E`` / ``worker_send_task_events``. Every event carries
the worker's node name as ``hostname`` (Celery's solo pool would give the machine's
host name, which makes Flower invent a phantom worker). Sending never raises into a
task or a breaker: a broker that cannot take an event costs a log line, once a minute.
"""

from __future__ import annotations

import logging
import mmap
from typing import Any

from ..core import State, Transition
from ..storage.masking import MaskedRepr
from .throttle import Throttle

__all__ = [
    "DEFERRED_EVENT", "EVENT_TYPES", "configure", "enabled", "nodename", "send", "switched", "transition_event",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")

#: The event type of a transition, by the state it moved to.
EVENT_TYPES = {
    State.OPEN: "breaker-opened",
    State.FORCED_OPEN: "breaker-opened",
    State.HALF_OPEN: "breaker-half-opened",
    State.CLOSED: "breaker-closed",
    State.DISABLED: "breaker-closed",
}
DEFERRED_EVENT = "task-breaker-deferred"
#: One WARNING a minute per process about events that could not be sent.
_unsent = Throttle()

# "shared": whether events are on, in a page the worker's main process maps before its
# pool forks: ``celery control enable_events`` (what Flower sends every few seconds)
# reaches only the main process, while transitions and deferrals happen in the children.
_state: dict[str, Any] = {"enabled": False, "nodename": None, "follows_remote": False, "shared": None}


def configure(*, enabled: bool | None = None, nodename: str | None = None, follows_remote: bool | None = None) -> None:
    """Set (in a worker) whether events go out and the node name they carry;
    ``follows_remote``: whether ``enable_events``/``disable_events`` switch them too (when
    ``breaker_send_events`` is left unset: they follow the worker's task events)."""
    if follows_remote is not None:
        _state["follows_remote"] = follows_remote
    if enabled is not None:
        _state["enabled"] = enabled
        shared = _state["shared"]
        if shared is None:  # (anonymous and shared: every process forked later sees it)
            shared = _state["shared"] = mmap.mmap(-1, 1)
        shared[0] = int(enabled)
    if nodename:
        _state["nodename"] = nodename


def switched(on: bool) -> None:
    """Remote control turned the worker's task events on or off (``enable_events``,
    ``disable_events``): breaker events follow, in every pool process, unless
    ``breaker_send_events`` says otherwise."""
    if _state["follows_remote"]:
        configure(enabled=on)


def enabled() -> bool:
    """Whether this worker sends breaker events (``breaker_send_events``, else its task
    events: ``-E``, or ``celery control enable_events`` since)."""
    shared = _state["shared"]
    return bool(shared[0] if shared is not None else _state["enabled"])


def nodename() -> str | None:
    """This worker's node name (``celery@host``), once a worker has started here."""
    return _state["nodename"]  # type: ignore[no-any-return]


def send(app: Any, type_: str, **fields: Any) -> bool:
    """Send one event as this worker; False (logged, rate-limited) when it could not go."""
    try:
        with app.events.default_dispatcher(hostname=nodename()) as dispatcher:
            dispatcher.send(type_, **fields)
    except Exception as exc:
        quiet = _unsent.due("send")
        if quiet is not None:
            logger.warning(
                "celery-breaker: could not send the %s event (%r); events are skipped meanwhile%s",
                type_, MaskedRepr(exc), f" ({quiet} more could not be sent in the last minute)" if quiet else "",
            )  # fmt: skip
        return False
    return True


def transition_event(transition: Transition) -> tuple[str, dict[str, Any]]:
    """The event type and fields of a transition."""
    calls = transition.calls
    return EVENT_TYPES[transition.target], {
        "breaker": transition.name,
        "key": transition.key,
        "state": transition.target.value,
        "previous": transition.source.value,
        "reason": transition.reason,
        "failures": transition.failures,
        "calls": calls,
        "failure_rate": transition.failures / calls if calls else None,
        "open_until": transition.open_until,
        "trips": transition.trips,
        "generation": transition.generation,
        "at": transition.at,
    }


class TransitionEvents:
    """A transition listener (``BreakerRegistry.add_listener``) that sends the events."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, transition: Transition) -> None:
        if enabled():
            type_, fields = transition_event(transition)
            send(self.app, type_, **fields)
