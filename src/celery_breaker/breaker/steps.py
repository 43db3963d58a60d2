"""The steps every way of guarding a breaker takes (admit, acquire, finish, announce), and the fields they use."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..clock import Clock
from ..core import BreakerPolicy, Outcome, Probe, State, Ticket, Transition
from ..core.retry_after import asked_of
from ..errors import CircuitOpenError
from ..health import HealthCheck, checking_now, shown_callable
from ..labels import breaker_label, shown_label
from ..storage import Cell, Moves, Store
from ..storage.fallback import FallbackCell
from ..storage.masking import MaskedRepr
from .runs import RUN

__all__ = ["GuardSteps", "TransitionListener", "primary"]

logger = logging.getLogger("celery_breaker")

TransitionListener = Callable[[Transition], object]

SUCCESS, FAILURE, IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED
OPEN, FORCED_OPEN = State.OPEN, State.FORCED_OPEN

_run_get = RUN.get  # (bound once: see ``RUN``)

#: The ticket of a call a health check makes through its own breaker: a generation no
#: cell has, so its outcome is counted and judged by no rule.
_UNJUDGED = -1


def primary(store: object) -> object:
    """The shared store a store stands for (``FallbackStore.primary``; else itself): two
    breakers of one store differ in ``breaker_on_storage_error`` only by their wrappers."""
    return getattr(store, "primary", store)


class GuardSteps:
    """What every part of a ``CircuitBreaker`` shares: its fields, and the steps of every way of guarding."""

    __slots__ = ("name", "key", "policy", "store", "probe", "_clock", "_now", "_cell", "_listeners", "__weakref__")

    name: str
    key: str | None
    policy: BreakerPolicy
    store: Store
    probe: HealthCheck | None
    _clock: Clock
    _now: Callable[[], float]
    _cell: Cell
    _listeners: list[TransitionListener]

    if TYPE_CHECKING:  # (the health-check admission's: ``HealthCheckAdmission``)

        def _check_lease(self, owner: object = None) -> float | None: ...

        def _check_instead(self, cell: Cell, ticket: Probe) -> tuple[Cell, Ticket]: ...

        async def _acheck_instead(self, cell: Cell, ticket: Probe) -> tuple[Cell, Ticket]: ...

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``."""
        return breaker_label(self.name, self.key)

    def _refresh(self) -> Cell:
        cell = self._cell = self.store.cell(self.name, self.key, self.policy, self._clock)
        if type(cell) is FallbackCell:  # (rejoined the shared breaker on this refresh: say so)
            moves = cell.take_rejoined()
            if moves:
                self._announce(moves)
        return cell

    def _admit(self, *, check: bool = True, owner: object = None) -> tuple[Cell, Ticket, float]:
        """Acquire a ticket (or raise ``CircuitOpenError``); ``check=False``: a probe slot
        won by a breaker with a health check is returned for the caller to check
        (``_acheck_instead``: the async callers); ``owner``: a run's admission's
        (``_admit_run``)."""
        run = _run_get()
        if run is not None and not run.claimed and run.covers(self):
            run.claimed = True  # the run's ticket serves this call; timed from now
            return run.cell, run.ticket, self._now()
        cell = self._cell
        start = self._now()
        if cell.passing:
            return cell, cell.generation, start
        cell, ticket = self._acquire(cell, start, check=check, owner=owner)
        return cell, ticket, start

    def _acquire(self, cell: Cell, now: float, *, check: bool = True, owner: object = None) -> tuple[Cell, Ticket]:
        """The path for a breaker that is not simply passing calls."""
        if cell.evicted:
            cell = self._refresh()
            if cell.passing:
                return cell, cell.generation
        state = cell.state
        open_until = cell.open_until
        # Reject from the local view without asking the store: one frame deep, so
        # the rejection stays cheap (the store decides everything else).
        if state is FORCED_OPEN or (state is OPEN and open_until is not None and now < open_until):
            cell.note_rejection(now)
            raise CircuitOpenError.rejected(
                self.name, self.key, state, None if open_until is None else open_until - now,
                "" if state is OPEN or type(cell) is not FallbackCell else cell.denying,  # (forced_why, inline)
            )  # fmt: skip
        checked = checking_now()
        if (
            checked is not None
            and not checked.run.over
            and checked.name == self.name
            and checked.key == self.key
            and primary(checked.store) is primary(self.store)
        ):
            # A guarded call this breaker's own health check makes while it runs (a client
            # library's breaker of the same name, as a task run's calls share its
            # admission): served by the check's probe slot, and judged by no rule (the
            # check's verdict is what counts). It was rejected by the very slot the check
            # held: the check failed, and such a breaker never closed. (Not while the
            # breaker is open again, nor once the check is over: what it left behind, a
            # thread or a task, keeps its context, and is a caller like any other.)
            return cell, _UNJUDGED
        ticket, moves = cell.acquire(self.policy, now, self._check_lease(owner))
        if moves:
            self._announce(moves)
        if check and self.probe is not None and type(ticket) is Probe:
            return self._check_instead(cell, ticket)
        return cell, ticket

    def _finish(
        self,
        cell: Cell,
        ticket: Ticket,
        exc: BaseException | None,
        start: float | None,
        outcome: Outcome | None = None,
    ) -> Outcome:
        """Record how a call that started at ``start`` went (``None``: it was not timed, as
        its cell looks at no duration; see ``Cell.timed``); return how it counted."""
        run = _run_get()
        if outcome is None:
            if exc is not None and run is not None:
                exc = run.translate(exc)
                outcome = IGNORED if exc is None else self.policy.classify(exc)
            else:
                outcome = self.policy.classify(exc)
        end = self._now()
        duration = 0.0 if start is None else end - start
        if outcome is SUCCESS:
            moves = cell.record_success(ticket, duration, self.policy, end)
        elif outcome is FAILURE and exc is not None:
            # Only failures pay for this: a Retry-After opens the breaker for that long;
            # a 429 met by a task released from the parking is a refusal (see RunAdmission),
            # and so is one met by any other call while the breaker's release is under way,
            # as the store says (``Cell.finish_refusal``; docs/decisions.md, 91).
            asked, refused_for = asked_of(exc, self._clock.time())
            own = run if run is not None and run.covers(self) else None
            if refused_for is None:
                moves = cell.finish(ticket, outcome, duration, self.policy, end, open_for=asked)
            elif own is not None and own.released:
                own.refused_for = refused_for
                moves = cell.finish(ticket, outcome, duration, self.policy, end, open_for=refused_for, refused=True)
            else:
                refusing, moves = cell.finish_refusal(ticket, duration, self.policy, end, asked)
                if refusing and own is not None:
                    own.refused_for = refused_for
        else:
            moves = cell.finish(ticket, outcome, duration, self.policy, end)
        if run is not None and run.covers(self):
            run.recorded = outcome
        if outcome is FAILURE:
            logger.debug(
                "breaker %s: recorded failure %s", shown_label(self.label), MaskedRepr(exc),
                extra={"breaker": self.name, "breaker_key": self.key},
            )  # fmt: skip
        if moves:
            self._announce(moves)
        return outcome

    def _announce(self, moves: Moves) -> None:
        """Log each transition this object's operation made and tell its listeners."""
        for transition in moves:
            _log_transition(transition)
            for listener in tuple(self._listeners):
                try:
                    listener(transition)
                except Exception:  # a hook cannot change the breaker's decision
                    logger.exception(  # (named, never its repr: a partial's arguments, a webhook URL)
                        "breaker %s: transition listener %s raised", shown_label(self.label), shown_callable(listener)
                    )


def _log_transition(transition: Transition) -> None:
    level = logging.WARNING if transition.target in (State.OPEN, State.FORCED_OPEN) else logging.INFO
    until = ""
    if transition.open_until is not None:
        until = f", may half-open in {transition.open_until - transition.at:.1f} s"
    logger.log(
        level,
        "breaker %s %s -> %s (%s; %d failures, %d calls in window%s)",
        shown_label(transition.label), transition.source.value, transition.target.value, transition.reason,
        transition.failures, transition.calls, until,
        extra={
            "breaker": transition.name,
            "breaker_key": transition.key,
            "breaker_state": transition.target.value,
            "breaker_previous_state": transition.source.value,
            "breaker_reason": transition.reason,
            "breaker_generation": transition.generation,
            "breaker_open_until": transition.open_until,
        },
    )  # fmt: skip
