"""A run's admission: the ticket a task takes for its whole run, and the context variable making it current."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..core import Outcome, State, Ticket
from ..storage import NO_MOVES, Cell

if TYPE_CHECKING:
    from .circuit_breaker import CircuitBreaker
    from .steps import GuardSteps

__all__ = ["RUN", "ExceptionTranslator", "RunAdmission", "current_run", "make_own_breakers_with"]

SUCCESS, FAILURE, IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED


#: Maps an exception raised inside a run to the one to classify, or ``None`` for
#: "neutral" (the Celery layer unwraps ``Retry`` and neutralises ``Ignore``/``Reject``).
ExceptionTranslator = Callable[[BaseException], BaseException | None]


class RunAdmission:
    """A ticket taken for a whole run (a task's) before its body starts.

    While the run is current, the first guarded call on the same breaker (same store,
    name and key; ``self.breaker`` or any other object) uses this ticket instead of
    acquiring another: a half-open breaker spends one probe slot per run, and a run is
    never rejected by the admission it already holds. ``recorded`` is what the run last
    recorded on that breaker. ``released``: the run is a task released from its breaker's
    parking (``BreakerTask`` sets it); a 429 it meets on its own breaker is then a
    refusal (``refused_for``: the seconds it asked for; see ``BreakerMachine.record``), as
    is one met by any run while its breaker's release is under way, if the store says so
    (``Cell.finish_refusal``).
    """

    __slots__ = (
        "breaker", "cell", "ticket", "start", "claimed", "recorded", "translate", "counts_itself", "_token",
        "released", "refused_for", "outer", "owner", "_own", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        breaker: CircuitBreaker,
        cell: Cell,
        ticket: Ticket,
        start: float | None,
        translate: ExceptionTranslator,
        *,
        counts_itself: bool = True,
    ) -> None:
        self.breaker = breaker
        self.cell = cell
        self.ticket = ticket
        self.start = start
        self.claimed = False
        self.recorded: Outcome | None = None
        self.translate = translate
        self.counts_itself = counts_itself
        """False: a run that made no guarded call records nothing (``breaker_scope="calls"``)."""
        self.released = False
        self.refused_for: float | None = None
        self.outer: RunAdmission | None = None
        """The run current when this one was admitted, whose unclaimed ticket this run took
        (a task calling another task of the same breaker directly): told what this run
        records, as its own guarded call would have told it."""
        self.owner: object = None
        """What the run is of, as the code that admitted it says (``BreakerTask``: the task;
        ``None`` here and for ``enter_run`` without one): how a task knows the current run
        is its own (``self.breaker``, ``self.retry()``)."""
        self._own: CircuitBreaker | None = None  # (``own_breaker``, once made)

    def own_breaker(self) -> CircuitBreaker:
        """This run's breaker object (``self.breaker`` in a task body), made on first use:
        its guarded calls are the run's in any thread, greenlet or asyncio task the body
        hands it to, as they are in the body itself (they use the run's ticket first, and
        tell the run what they recorded). A thread or greenlet starts with a context of
        its own, where the run is not current: through the breaker object the run is
        found anyway (``_RunBreaker``)."""
        own = self._own
        if own is None:
            own = self._own = self.breaker = _run_breaker(self.breaker, self)  # (``covers`` then knows it at once)
        return own

    def covers(self, breaker: GuardSteps) -> bool:
        """True if ``breaker`` is the run's own breaker (same store, name and key)."""
        own = self.breaker
        if breaker is own:  # (a task body's ``self.breaker`` is the run's own object)
            return True
        return breaker.store is own.store and breaker.name == own.name and breaker.key == own.key

    def settle(self, exc: BaseException | None, *, neutral: bool = False) -> Outcome | None:
        """Record the run's own outcome unless a guarded call used its ticket; return
        what the run last recorded on its breaker."""
        if not self.claimed:
            self.claimed = True
            breaker = self.breaker
            if exc is None and not neutral and self.counts_itself:
                # A run that returned: _finish's success path, without classifying (and
                # a memory cell's quiet success counted here, as a ``with`` block does).
                end = breaker._now()
                cell, ticket, start = self.cell, self.ticket, self.start
                if cell.quiet_success and ticket == cell.generation:
                    quiet: Any = cell  # (a memory cell: see Cell.quiet_success)
                    next(quiet.success_tally)
                    quiet.last_success = quiet.last_used = end
                    moves = NO_MOVES
                else:
                    moves = cell.record_success(ticket, 0.0 if start is None else end - start, breaker.policy, end)
                run = _run_get()
                if run is self or (run is not None and run.covers(breaker)):
                    run.recorded = SUCCESS
                if moves:
                    breaker._announce(moves)
            elif not self.counts_itself and self.outer is not None:
                # A run that does not count itself (``breaker_scope="calls"``), on the
                # outer run's ticket and with no guarded call of its own: the ticket goes
                # back unused, for the outer run to record its own outcome on. Recorded
                # neutral, it swallowed the outer run's success, and a half-open breaker
                # whose probes ran such a run never closed.
                self.outer.claimed = False
                return None
            else:
                neutral = neutral or not self.counts_itself
                breaker._finish(self.cell, self.ticket, exc, self.start, IGNORED if neutral else None)
        outer = self.outer
        if outer is not None and self.recorded is not None:
            # (this run used the outer run's ticket: what it recorded, the outer did)
            outer.recorded = self.recorded
            if self.refused_for is not None:
                outer.refused_for = self.refused_for
        return self.recorded

    def succeed(self) -> Outcome | None:
        """``settle(None)`` and ``leave()`` in one call: the end of a run made current by
        ``enter_run`` whose body returned (what ``BreakerTask`` calls; ``leave()`` alone,
        in a ``finally``, for every other end). Returns what ``settle`` returns. Call it
        where the run is current, as ``leave()``: what it records is the run's own."""
        try:
            if self.outer is None:
                # settle's commonest paths, unfolded (the run is current here, so what it
                # records is its own: no ``RUN`` lookup).
                if self.claimed:  # a guarded call used the run's ticket, and recorded
                    return self.recorded
                cell = self.cell
                if self.counts_itself and cell.quiet_success and self.ticket == cell.generation:
                    self.claimed = True
                    quiet: Any = cell  # (a memory cell: see Cell.quiet_success)
                    next(quiet.success_tally)
                    quiet.last_success = quiet.last_used = self.breaker._now()
                    self.recorded = SUCCESS
                    return SUCCESS
            return self.settle(None)
        finally:
            _run_reset(self._token)

    @property
    def enclosing(self) -> RunAdmission | None:
        """The run that was current when this one was made current (a task body that
        called a task directly), if any."""
        token = getattr(self, "_token", None)
        previous = None if token is None else token.old_value
        return previous if isinstance(previous, RunAdmission) else None

    def failed_while_open(self) -> bool:
        """The run recorded a failure, and its breaker no longer admits calls freely."""
        if self.recorded is not FAILURE:
            return False
        return self.breaker.state not in (State.CLOSED, State.DISABLED)  # (re-reads an evicted cell)

    def __enter__(self) -> RunAdmission:
        """Make this the current run (``current_run()``) until the block ends."""
        self._token = _run_set(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _run_reset(self._token)

    def leave(self) -> None:
        """Stop being the current run: the end of a run made current by ``enter_run``
        (what leaving ``with run:`` does)."""
        _run_reset(self._token)


RUN: ContextVar[RunAdmission | None] = ContextVar("celery_breaker_run", default=None)
# Bound once: every guarding form reads ``RUN`` on its closed path, and a run sets and
# resets it; the bound methods skip a method lookup per call (docs/decisions.md, 83).
_run_get = RUN.get
_run_set = RUN.set
_run_reset = RUN.reset


def current_run() -> RunAdmission | None:
    """The run admission of the task running in this context, if any."""
    return _run_get()


#: Makes ``run``'s own breaker object (``RunAdmission.own_breaker``) from the run's breaker:
#: the maker ``run_breaker`` registers as it is imported (``make_own_breakers_with``), since
#: the class it makes is a ``CircuitBreaker``, which admits runs. (The package imports it.)
_run_breaker: Callable[[CircuitBreaker, RunAdmission], CircuitBreaker]


def make_own_breakers_with(make: Callable[[CircuitBreaker, RunAdmission], CircuitBreaker]) -> None:
    """Make each run's own breaker object with ``make(breaker, run)``, in place of any maker
    set before."""
    global _run_breaker  # noqa: PLW0603  (a module global, read as every other: no list indexed per run)
    _run_breaker = make
