"""A task run that cannot finish waits instead: the rejection it is deferred with, and what its end hands on."""

from __future__ import annotations

import contextlib
import traceback
from typing import Any

from ..breaker import CircuitBreaker, RunAdmission
from ..core import State
from ..errors import CircuitOpenError, StorageError
from ..storage import forced_why

__all__ = [
    "FAILED_ATTR",
    "REFUSED",
    "RETRY_CALL_ATTR",
    "arguments",
    "drop_frames",
    "note_retry_call",
    "refusal",
    "rejection_now",
    "send_outcome",
    "waits_instead",
]

#: Why a task the downstream refused was deferred (the deferral's reason ends with it).
REFUSED = "the downstream refused it"
#: Where ``BreakerTask.retry`` notes, on the rejection it raises instead of retrying, the
#: arguments and the options the retry asked for (``self.retry(args=..., queue=...)``): the
#: deferral takes them.
RETRY_CALL_ATTR = "_celery_breaker_retry_call"
#: Where ``waits_instead`` notes, on the rejection it makes, that the run itself failed
#: and left its breaker open: its deferral goes to the back of the parking.
FAILED_ATTR = "_celery_breaker_failed_run"


def note_retry_call(rejection: CircuitOpenError, args: Any, kwargs: Any, asked: dict[str, Any]) -> None:
    """Note on ``rejection`` (raised by ``BreakerTask.retry`` instead of a retry) the
    arguments and options that retry asked for, if it asked for any: the run defers the
    task with them (``self.retry(queue="slow", priority=9)``), as Celery's retry would
    have sent it, not with the ones this run had."""
    if args is not None or kwargs is not None or asked:
        setattr(rejection, RETRY_CALL_ATTR, (args, kwargs, asked))


def arguments(
    retry_args: Any, retry_kwargs: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments a retry asked for (``None``: this run's, as ``Task.retry`` takes them)."""
    return (
        args if retry_args is None else tuple(retry_args),
        kwargs if retry_kwargs is None else dict(retry_kwargs),
    )


def drop_frames(exc: BaseException) -> None:
    """Clear the tracebacks of ``exc``, its cause, context and a ``Retry``'s ``exc``:
    finished frames drop their locals (running ones are left alone) and no exception
    keeps a traceback, so nothing of the run waits for the cyclic GC."""
    pending: list[Any] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
            current.__traceback__ = None
        pending += [current.__cause__, current.__context__, getattr(current, "exc", None)]


def rejection_now(breaker: CircuitBreaker) -> CircuitOpenError:
    """The rejection an open breaker would give a new call right now."""
    snapshot = breaker.snapshot()
    retry_after = snapshot.retry_after
    if snapshot.state is State.HALF_OPEN and not retry_after:
        retry_after = breaker.policy.reset_timeout  # probes are out: wait for their verdict
    return CircuitOpenError.rejected(breaker.name, breaker.key, snapshot.state, retry_after, forced_why(breaker._cell))


def waits_instead(run: RunAdmission) -> CircuitOpenError | None:
    """Whether a run that just failed waits (is deferred) instead of failing, and its
    rejection if so: its downstream call failed and the breaker is open now (the task
    too waits for recovery), or the downstream refused a task released from the parking,
    or any task while that release is under way (a 429: the release was too fast for it;
    parked, no retry spent)."""
    if run.failed_while_open():
        rejection = rejection_now(run.breaker)
        setattr(rejection, FAILED_ATTR, True)  # (parked, it goes to the back: ParkInStore)
        return rejection
    if run.refused_for is not None:
        return refusal(run.breaker, run.refused_for)
    return None


def send_outcome(breaker: CircuitBreaker) -> None:
    """Send this process's counts to the store now, not with the next second's flush: the
    success of a task released from the parking is what the adaptive release grows on, and
    news a second late held its growth to one step a second (``core/pacing.py``)."""
    store = breaker.store
    if not store.down:
        with contextlib.suppress(StorageError):  # (the store reports its outage itself)
            store.flush()


def refusal(breaker: CircuitBreaker, seconds: float) -> CircuitOpenError:
    """The rejection of a task the downstream refused (429) while its breaker stayed
    CLOSED (or an operator's DISABLED): deferred again for the ``seconds`` the
    downstream asked for."""
    state = State.DISABLED if breaker.state is State.DISABLED else State.CLOSED
    rejection = CircuitOpenError.rejected(breaker.name, breaker.key, state, seconds)
    rejection.detail = REFUSED
    return rejection
