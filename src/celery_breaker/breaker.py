"""CircuitBreaker: guard any call (sync or async) with a breaker that lives in a store."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import shlex
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from .clock import SYSTEM_CLOCK, Clock
from .core import BreakerPolicy, BreakerSnapshot, Outcome, Probe, State, Ticket, Transition
from .core.retry_after import asked_of, retry_after_of
from .errors import CircuitOpenError, ConfigurationError
from .health import (
    LEAST_PROBE_TIMEOUT,
    Checked,
    CheckResult,
    CheckRun,
    CheckStillHung,
    HealthCheck,
    HealthState,
    PendingCheck,
    ProbeFunction,
    ProbeTimeout,
    checking,
    checking_now,
)
from .labels import breaker_label, shown_label
from .names import check_name, kept_key
from .storage import NO_MOVES, Cell, Moves, Store, describe_url, forced_why, resolve_store, with_fallback
from .storage.fallback import FallbackCell
from .storage.urls import MaskedRepr

__all__ = ["CircuitBreaker", "ExceptionTranslator", "RunAdmission", "TransitionListener", "current_run"]

logger = logging.getLogger("celery_breaker")

P = ParamSpec("P")
R = TypeVar("R")

TransitionListener = Callable[[Transition], object]

SUCCESS, FAILURE, IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED
OPEN, FORCED_OPEN, HALF_OPEN = State.OPEN, State.FORCED_OPEN, State.HALF_OPEN
_ADMITTING = (State.CLOSED, State.DISABLED)


#: What an open ``with`` block holds: its cell, its ticket, when it started (``None``: not
#: timed, as the cell's policy looks at no duration) and the run to tell its success (the
#: run current at its start, if that run covers the breaker; else ``None``). A failure is
#: told by ``_finish`` to the run current at the block's end: the two differ only for
#: blocks and runs that do not nest (entered and left by hand, out of order).
_Held = tuple[Cell, Ticket, "float | None", "RunAdmission | None"]

#: A guarded block on a context's stack (``with breaker:``): ``[breaker, held, outer]``,
#: innermost first through ``outer``. A list, not an object, because a block is entered
#: on the hot path: making one is a single allocation, and closing it is two stores
#: (``breaker`` and ``held`` set to ``None``) rather than setting the context variable
#: again. Closed blocks are skipped, and dropped when the next block is entered.
_Block = list[Any]

# Per thread and per asyncio task: concurrent blocks never see each other's tickets.
# A copied context (a new task) may see its parent's open blocks, as before; it closes
# only blocks of its own, since it enters its own (a closed block is never reopened).
_ACTIVE: ContextVar[_Block | None] = ContextVar("celery_breaker_active", default=None)


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

    def covers(self, breaker: CircuitBreaker) -> bool:
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
                # records is its own: no ``_RUN`` lookup).
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


_RUN: ContextVar[RunAdmission | None] = ContextVar("celery_breaker_run", default=None)
# Bound once: every guarding form reads ``_RUN`` on its closed path, and a run sets and
# resets it; the bound methods skip a method lookup per call (docs/decisions.md, 83).
_run_get = _RUN.get
_run_set = _RUN.set
_run_reset = _RUN.reset

#: Seconds the health checks run for ``enter_run(check_within=...)`` may take at most, all
#: together (a task's own time limit): set only around that admission.
_CHECK_WITHIN: ContextVar[float | None] = ContextVar("celery_breaker_check_within", default=None)
#: Below this many seconds left of ``check_within``, no further check is started.
_LEAST_CHECK_TIME = 0.05
#: Seconds past its timeout a health check's probe slot stays held (``_check_lease``):
#: time for its verdict to reach the store.
CHECK_LEASE_MARGIN = 5.0


def check_time(half_open_max_wait: float) -> float:
    """The longest a health check runs under a probe slot leased for at most
    ``half_open_max_wait`` seconds: ``CHECK_LEASE_MARGIN`` less, or a fifth less where
    that is shorter. Cut at the lease's end (a ``probe_timeout`` of ``half_open_max_wait``
    or more), its verdict was recorded as the lease ran out, and another caller could take
    the slot and start a second check beside it in the same half-open period."""
    return half_open_max_wait - min(CHECK_LEASE_MARGIN, half_open_max_wait / 5)


def check_fits(policy: BreakerPolicy, probe: HealthCheck | None, where: str) -> None:
    """Refuse a health check under a ``half_open_max_wait`` that leaves it less than
    ``LEAST_PROBE_TIMEOUT`` (``check_time``: a fifth of the wait goes to the slot's
    margin): every check was cut before it could answer, and the breaker never closed."""
    if probe is None:
        return
    wait = policy.half_open_max_wait
    if check_time(wait) < LEAST_PROBE_TIMEOUT:
        least = LEAST_PROBE_TIMEOUT * 5 / 4  # (check_time(least) is LEAST_PROBE_TIMEOUT)
        raise ConfigurationError(
            f"{where}: half_open_max_wait={wait:g} s leaves its health check {probe.name} {check_time(wait):g} s, "
            f"less than the {LEAST_PROBE_TIMEOUT:g} s a check needs; raise half_open_max_wait to {least:g} s or "
            "more, or give the breaker no probe"
        )


#: The breakers already told that the ``half_open_max_wait`` they keep leaves their health
#: check no time (``_tell_short_lease``): by store, each (name, key) with the wait told of.
#: Once per breaker and wait in a process, not at every check (nor at every task run,
#: whose breaker object is made for the run).
_TOLD_SHORT: weakref.WeakKeyDictionary[object, dict[tuple[str, str | None], float]] = weakref.WeakKeyDictionary()


#: How long the health checks of a call made inside a run may take, all together, given
#: the run and how many checks close the breaker (``None``: each its own timeout). The
#: Celery integration sets it (``bound_checks_in_runs``): a task body's guarded call that
#: runs a check then waits no longer than the task's admission would have, and is
#: rejected (the task deferred) while the check goes on in its slot.
_RUN_CHECK_WITHIN: list[Callable[[RunAdmission, int], float | None]] = []


def bound_checks_in_runs(within: Callable[[RunAdmission, int], float | None]) -> None:
    """Bound the health checks of the calls made inside runs by ``within(run, checks)``
    seconds (``None``: unbounded), in place of any bound set before."""
    _RUN_CHECK_WITHIN[:] = [within]


#: How long a probe slot won by a run's admission is held at most, given the run's
#: ``owner`` (``None``: the policy's ``half_open_max_wait``). The Celery integration sets
#: it (``lease_runs_by``): a task whose pool enforces its hard time limit gives a verdict
#: within it, or is killed and gives none, so its slot is held no longer than that and
#: ``CHECK_LEASE_MARGIN``, where the slot of a killed probe was held for
#: ``half_open_max_wait`` (60 s by default).
_RUN_LEASE: list[Callable[[object], float | None]] = []


def lease_runs_by(lease: Callable[[object], float | None]) -> None:
    """Lease the probe slots that runs win for ``lease(owner)`` seconds at most (``None``:
    ``half_open_max_wait``), in place of any lease set before."""
    _RUN_LEASE[:] = [lease]


#: The ticket of a call a health check makes through its own breaker: a generation no
#: cell has, so its outcome is counted and judged by no rule.
_UNJUDGED = -1


def _primary(store: object) -> object:
    """The shared store a store stands for (``FallbackStore.primary``; else itself): two
    breakers of one store differ in ``breaker_on_storage_error`` only by their wrappers."""
    return getattr(store, "primary", store)


class _EnteredRun(RunAdmission):
    """The admissions ``enter_run`` makes: a ``RunAdmission`` made without ``__init__``
    (``enter_run`` stores the fields itself), so making one is a bare class call."""

    __slots__ = ()
    __init__ = object.__init__


def current_run() -> RunAdmission | None:
    """The run admission of the task running in this context, if any."""
    return _run_get()


class _NoLoop:
    """The loop of a future made done at once: with no callback to schedule, a future
    only asks its loop ``get_debug()`` (when made), so it needs no real loop."""

    __slots__ = ()

    def get_debug(self) -> bool:
        return False


def _done(value: R) -> asyncio.Future[R]:
    """A future already holding ``value``: awaiting it (from any loop, asyncio or not,
    or none) gives ``value`` at once, without suspending."""
    future: asyncio.Future[R] = asyncio.Future(loop=_NoLoop())  # type: ignore[arg-type]
    future.set_result(value)
    return future


#: What ``await breaker.__aexit__(...)`` gives: ``None``, so the body's exception propagates.
_EXITED: asyncio.Future[None] = _done(None)


class CircuitBreaker:
    """A named breaker in a store; the same name on the same store is the same breaker.

    Use it as ``breaker.call(fn, *args)``, ``with breaker:``, ``async with breaker:``,
    ``await breaker.acall(coro_fn, *args)`` or as a decorator on sync or async
    functions. A rejected call raises ``CircuitOpenError`` without running.

    Args:
        name: the breaker's name.
        policy: a ``BreakerPolicy`` or a dict of its fields (over the defaults).
        storage: a store URL (``memory://`` by default) or a store object.
        clock: where time comes from (``celery_breaker.testing.FakeClock`` in tests).
        key: the per-key part (tenant, host, ...) of a per-key breaker.
        on_storage_error: while a shared store cannot be reached, ``"local"`` (a breaker
            of this process stands in), ``"allow"`` (every call passes) or ``"deny"``
            (every call is rejected); the shared state is rejoined when it answers.
        probe: a health check (a callable taking no arguments, or one: the breaker's key;
            sync or async; or a ``HealthCheck``): when the breaker may half-open, the call
            that wins a probe slot runs it instead of itself, and is rejected unless the
            check closed the breaker. It fails by raising or returning ``False``; its verdict counts as a
            probe's would. Every process using the breaker should give it the same probe.
        probe_timeout: seconds the health check may take before it counts as failed
            (default 10; never more than the ``half_open_max_wait`` of the policy the
            breaker keeps, which sets the check's lease, less a margin to record its
            verdict: 5 s, or a fifth of it where shorter).
    """

    __slots__ = (
        "name", "key", "policy", "store", "probe", "_clock", "_now", "_cell", "_listeners", "__weakref__",
        "_slot", "_stacked", "_entered", "_open_blocks",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | dict[str, Any] | None = None,
        *,
        storage: str | Store = "memory://",
        clock: Clock | None = None,
        key: str | None = None,
        on_storage_error: str = "local",
        probe: HealthCheck | ProbeFunction | None = None,
        probe_timeout: float | None = None,
    ) -> None:
        self.name = check_name(name, "CircuitBreaker name")
        if key is not None and not isinstance(key, str):
            raise ConfigurationError(
                f"CircuitBreaker key of breaker {name!r} must be a str (or None: no key), got {type(key).__name__} "
                f"{key!r:.100}; pass str(key), as a BreakerTask does with what its breaker_key returns"
            )
        self.key = key = kept_key(name, key)
        self.policy = BreakerPolicy.coerce(policy)
        self.probe = HealthCheck.coerce(probe, probe_timeout)
        """The health check run instead of a real call when the breaker may half-open (or ``None``)."""
        check_fits(self.policy, self.probe, f"breaker {breaker_label(self.name, key)!r}")
        self.store = with_fallback(resolve_store(storage), on_storage_error)
        self._clock = clock or SYSTEM_CLOCK
        self._now = self._clock.monotonic
        self._listeners: list[TransitionListener] = []
        # The first open ``with`` block's ``_Held``, under key 0 (see __enter__).
        self._slot: dict[int, _Held] = {}
        self._stacked = False
        # Every open block on a context's stack, by id: what an exit that cannot see its
        # block (see _exit_block) closes instead. (A block entered and never left stays
        # here, as its ticket stays unreported.)
        self._open_blocks: dict[int, _Block] = {}
        self._entered: asyncio.Future[CircuitBreaker] | None = None  # (see __aenter__)
        self._cell = self.store.cell(name, key, self.policy, self._clock)
        existing = self._cell.policy
        if existing is not self.policy and existing != self.policy:
            logger.warning(
                "breaker %s already exists in %s with another policy; it keeps that one "
                "(reset() adopts a new policy): existing %r, this one %r",
                shown_label(self.label), describe_url(self.store.url), existing, self.policy,
            )  # fmt: skip

    # -- the guarded call ----------------------------------------------------

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` if the breaker admits it; record how it went."""
        if _run_get() is not None:
            return self._call_in_run(fn, *args, **kwargs)
        cell = self._cell
        start: float | None
        if cell.passing:
            # Should a trip land between these two reads, the ticket carries the OPEN
            # generation, whose outcomes move nothing: a stale read is harmless.
            ticket: Ticket = cell.generation
            start = self._now() if cell.timed else None  # (see Cell.timed)
        else:
            start = self._now()
            state = cell.state
            open_until = cell.open_until
            if not cell.evicted and (
                state is FORCED_OPEN or (state is OPEN and open_until is not None and start < open_until)
            ):
                # Rejected from the local view, raised from this frame: the cheapest
                # rejection there is (every other case asks the store).
                cell.note_rejection(start)
                raise CircuitOpenError.rejected(
                    self.name, self.key, state, None if open_until is None else open_until - start,
                    "" if state is OPEN or type(cell) is not FallbackCell else cell.denying,  # (forced_why, inline)
                )  # fmt: skip
            cell, ticket = self._acquire(cell, start)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._finish(cell, ticket, exc, start)
            raise
        end = self._now()
        if cell.quiet_success and ticket == cell.generation:
            quiet: Any = cell  # (a memory cell: see Cell.quiet_success)
            next(quiet.success_tally)
            quiet.last_success = quiet.last_used = end
            return result
        moves = cell.record_success(ticket, 0.0 if start is None else end - start, self.policy, end)
        if moves:
            self._announce(moves)
        return result

    def _call_in_run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        # Inside a task run: the run's admission may serve this call, and every outcome
        # tells the run what it recorded.
        cell, ticket, start = self._admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._finish(cell, ticket, exc, start)
            raise
        end = self._now()  # _finish's success path, without classifying
        moves = cell.record_success(ticket, end - start, self.policy, end)
        run = _run_get()
        if run is not None and run.covers(self):
            run.recorded = SUCCESS
        if moves:
            self._announce(moves)
        return result

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``await fn(*args, **kwargs)`` under the breaker."""
        cell = self._cell
        start: float | None
        if cell.passing and _run_get() is None:
            start = self._now() if cell.timed else None  # (see Cell.timed)
            ticket: Ticket = cell.generation
        else:
            cell, ticket, start = self._admit(check=False)
            if self.probe is not None and type(ticket) is Probe:
                cell, ticket = await self._acheck_instead(cell, ticket)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._finish(cell, ticket, exc, start)
            raise
        self._finish(cell, ticket, None, start)
        return result

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate ``fn`` (a function or a coroutine function) so every call is guarded."""
        # The wrappers repeat call()'s closed path rather than calling it: one frame, the
        # arguments passed on once. Anything else (a run, a breaker not simply passing
        # calls) goes through call() / acall(), which decide it.
        breaker = self
        now = self._now
        finish = self._finish
        if inspect.iscoroutinefunction(fn):
            acall = self.acall

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                cell = breaker._cell
                if not cell.passing or _run_get() is not None:
                    return await acall(fn, *args, **kwargs)
                start = now() if cell.timed else None
                ticket = cell.generation
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    finish(cell, ticket, exc, start)
                    raise
                end = now()
                if cell.quiet_success and ticket == cell.generation:
                    quiet: Any = cell  # (a memory cell: see Cell.quiet_success)
                    next(quiet.success_tally)
                    quiet.last_success = quiet.last_used = end
                    return result
                moves = cell.record_success(ticket, 0.0 if start is None else end - start, breaker.policy, end)
                if moves:
                    breaker._announce(moves)
                return result

            return guarded_async

        call = self.call

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
            cell = breaker._cell
            if not cell.passing or _run_get() is not None:
                return call(fn, *args, **kwargs)
            start = now() if cell.timed else None
            ticket = cell.generation
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                finish(cell, ticket, exc, start)
                raise
            end = now()
            if cell.quiet_success and ticket == cell.generation:
                quiet: Any = cell  # (a memory cell: see Cell.quiet_success)
                next(quiet.success_tally)
                quiet.last_success = quiet.last_used = end
                return result
            moves = cell.record_success(ticket, 0.0 if start is None else end - start, breaker.policy, end)
            if moves:
                breaker._announce(moves)
            return result

        return guarded

    # ``with`` and ``async with``: a block on a breaker object keeps what it holds (a
    # ``_Held``) in the object's slot, with no context variable set, which is what makes
    # a block about as cheap as call(). dict.setdefault and dict.pop are atomic, so one
    # block at a time holds the slot. Any other block (a second thread or task on the
    # same object, a nested block) goes on its context's stack, as every block did
    # before, and sets ``_stacked`` first: from then on this object's blocks all use the
    # stack (so a context never mistakes a stacked block it inherited from its parent for
    # its own), and an exit looks at its context's stack before the slot. A block still
    # in the slot then finds nothing of its own on the stack (any stacked block of this
    # object came after it, in another context, or nested inside it and closed first).
    # On the closed path a block reads the clock once, at its end, unless the policy
    # times calls, and a memory cell's quiet success is counted in the exit's own frame
    # (Cell.quiet_success; docs/decisions.md, 56). The async methods repeat the sync ones
    # rather than call them (a frame each).

    def __enter__(self) -> CircuitBreaker:
        cell = self._cell
        run = _run_get()
        held: _Held
        if cell.passing and run is None:
            held = (cell, cell.generation, self._now() if cell.timed else None, None)
        elif run is not None and not run.claimed and run.covers(self):
            run.claimed = True  # (as _admit: the run's ticket serves this block; timed from now)
            cell = run.cell
            held = (cell, run.ticket, self._now() if cell.timed else None, run)
        else:
            cell, ticket, start = self._admit()
            held = (cell, ticket, start, run if run is not None and run.covers(self) else None)
        if not self._stacked and self._slot.setdefault(0, held) is held:  # (atomic: one block wins the slot)
            return self
        self._push(held)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._stacked:
            self._exit_block(exc)
            return
        held = self._slot.pop(0, None)
        if held is None:
            raise RuntimeError(f"breaker {self.label!r}: block exited without being entered")
        cell, ticket, start, run = held
        if exc is None:  # _finish's success path, without classifying
            end = self._now()
            if cell.quiet_success and ticket == cell.generation:
                quiet: Any = cell  # (a memory cell: see Cell.quiet_success)
                next(quiet.success_tally)
                quiet.last_success = quiet.last_used = end
            else:
                moves = cell.record_success(ticket, 0.0 if start is None else end - start, self.policy, end)
                if moves:
                    self._announce(moves)
            if run is not None:
                run.recorded = SUCCESS
        else:
            self._finish(cell, ticket, exc, start)

    # ``async with`` admits and records synchronously (nothing in it awaits), so its
    # methods are plain functions returning an awaitable finished in advance: a done
    # future, whose ``await`` is one C call that neither suspends nor makes a frame,
    # where ``async def`` methods made and ran a coroutine each (docs/decisions.md, 47).

    def _aenter(self) -> Awaitable[CircuitBreaker]:
        entered = self._entered or self._make_entered()
        cell = self._cell
        run = _run_get()
        held: _Held
        if cell.passing and run is None:
            held = (cell, cell.generation, self._now() if cell.timed else None, None)
        elif run is not None and not run.claimed and run.covers(self):
            run.claimed = True  # (as _admit: the run's ticket serves this block; timed from now)
            cell = run.cell
            held = (cell, run.ticket, self._now() if cell.timed else None, run)
        else:
            cell, ticket, start = self._admit(check=False)
            covered = run if run is not None and run.covers(self) else None
            if self.probe is not None and type(ticket) is Probe:
                return self._aenter_checked(cell, ticket, start, covered)  # (a coroutine: the check is awaited)
            held = (cell, ticket, start, covered)
        if not self._stacked and self._slot.setdefault(0, held) is held:  # (atomic: one block wins the slot)
            return entered
        self._push(held)
        return entered

    async def _aenter_checked(
        self, cell: Cell, ticket: Probe, start: float, run: RunAdmission | None
    ) -> CircuitBreaker:
        """``async with``'s entry when it won a probe slot of a breaker with a health check:
        the check is awaited (``_acheck_instead``), then the block opens as any other."""
        cell, admitted = await self._acheck_instead(cell, ticket)
        held: _Held = (cell, admitted, start, run)
        if not self._stacked and self._slot.setdefault(0, held) is held:
            return self
        self._push(held)
        return self

    def _aexit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        if self._stacked:
            self._exit_block(exc)
            return _EXITED
        held = self._slot.pop(0, None)
        if held is None:
            raise RuntimeError(f"breaker {self.label!r}: block exited without being entered")
        cell, ticket, start, run = held
        if exc is None:  # _finish's success path, without classifying
            end = self._now()
            if cell.quiet_success and ticket == cell.generation:
                quiet: Any = cell  # (a memory cell: see Cell.quiet_success)
                next(quiet.success_tally)
                quiet.last_success = quiet.last_used = end
            else:
                moves = cell.record_success(ticket, 0.0 if start is None else end - start, self.policy, end)
                if moves:
                    self._announce(moves)
            if run is not None:
                run.recorded = SUCCESS
        else:
            self._finish(cell, ticket, exc, start)
        return _EXITED  # (awaits to None: the body's exception propagates)

    if TYPE_CHECKING:
        # Typed as the ``async def`` methods they were, so a breaker still matches
        # ``contextlib.AbstractAsyncContextManager`` (``AsyncExitStack``, ...).
        async def __aenter__(self) -> CircuitBreaker: ...

        async def __aexit__(
            self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> None: ...

    else:
        __aenter__ = _aenter
        __aexit__ = _aexit

    def _make_entered(self) -> asyncio.Future[CircuitBreaker]:
        """What ``await breaker.__aenter__()`` gives (the breaker), made on first use: the
        future refers to the breaker, so a breaker never used with ``async with`` has no
        reference cycle."""
        self._entered = _done(self)
        return self._entered

    def _push(self, held: _Held) -> None:
        """Open a block on this context's stack (the slot is taken, or was once)."""
        self._stacked = True  # (before the block is visible: see above)
        outer = _ACTIVE.get()
        while outer is not None and outer[0] is None:
            outer = outer[2]  # (closed blocks: dropped here, not when they closed)
        block = [self, held, outer]
        self._open_blocks[id(block)] = block
        _ACTIVE.set(block)

    def _exit_block(self, exc: BaseException | None) -> None:
        """Close this breaker's innermost open block on this context's stack, else the
        slot's block, else a block entered in a context this exit does not see; and
        record how it went."""
        # Blocks normally exit innermost first; an ExitStack or a suspended generator can
        # exit them out of order, so find this breaker's innermost open block. A block is
        # closed by whoever takes it out of _open_blocks (atomic: once).
        held: _Held | None = None
        block = _ACTIVE.get()
        while block is not None:
            if block[0] is self and self._open_blocks.pop(id(block), None) is not None:
                held = block[1]
                block[0] = block[1] = None  # closed: skipped from now on, and holds no cell
                break
            block = block[2]
        if held is None:
            held = self._slot.pop(0, None)
        if held is None:
            # Entered in a context this exit does not see: a sync context manager whose
            # enter and exit a framework runs in worker threads, each in a copy of the
            # caller's context (asyncio.to_thread, anyio, Starlette's threadpool). Such a
            # block was dropped from the slot by another, and its owner then raised here
            # with its outcome lost: it closes an open block it cannot see instead (blocks
            # that exit out of order may swap tickets, but each closes once).
            held = self._take_unseen_block()
        if held is None:
            raise RuntimeError(f"breaker {self.label!r}: block exited without being entered")
        cell, ticket, start, run = held
        if exc is None:  # _finish's success path, without classifying
            end = self._now()
            moves = cell.record_success(ticket, 0.0 if start is None else end - start, self.policy, end)
            if run is not None:
                run.recorded = SUCCESS
            if moves:
                self._announce(moves)
        else:
            self._finish(cell, ticket, exc, start)

    def _take_unseen_block(self) -> _Held | None:
        """Close an open block of this breaker entered in another context (``None``: none)."""
        try:
            _, block = self._open_blocks.popitem()
        except KeyError:
            return None
        held: _Held = block[1]
        block[0] = block[1] = None
        return held

    def begin_run(self, translate: ExceptionTranslator, *, counts_itself: bool = True) -> RunAdmission:
        """Admit a whole run (a task's) before its body starts, or raise ``CircuitOpenError``.

        Enter the returned ``RunAdmission`` (``with run:``) while the body runs, so its
        guarded calls on this breaker use the run's ticket; ``settle`` it when the body
        ends. ``translate`` maps the body's exceptions to the one to classify.
        ``enter_run`` does both steps at once (what ``BreakerTask`` uses).
        """
        cell = self._cell
        outer = _run_get()
        if cell.passing and outer is None:
            run = RunAdmission(self, cell, cell.generation, self._now() if cell.timed else None, translate)
        else:
            cell, ticket, start, took = self._admit_run(outer)
            run = RunAdmission(self, cell, ticket, start, translate)
            run.outer = took
        # (Set apart: a keyword argument makes the class call build a dict, ~140 ns.)
        if not counts_itself:
            run.counts_itself = False
        return run

    def enter_run(
        self,
        translate: ExceptionTranslator,
        counts_itself: bool = True,
        check_within: float | None = None,
        owner: object = None,
    ) -> RunAdmission:
        """``begin_run``, and the run is current at once, as inside ``with run:``, until
        ``run.succeed()`` (the body returned) or ``run.leave()`` (every other end: call one
        of them whatever happens). What ``BreakerTask`` does around every task body: one
        call where ``begin_run`` and ``with run:`` make three (~300 ns less,
        docs/decisions.md, 49). ``check_within``: the most seconds a health check run for
        this admission may take (a task's time limit leaves it no more); ``owner``: what
        the run is of (``RunAdmission.owner``)."""
        # A bare call of a subclass without an ``__init__`` of its own, the fields stored
        # here as ``RunAdmission.__init__`` stores them: no ``__init__`` frame, no
        # arguments passed (``object.__new__(RunAdmission)`` costs more).
        run: RunAdmission
        cell = self._cell
        outer = _run_get()
        if cell.passing and outer is None:  # (the common case first, stored straight in)
            run = _EnteredRun()
            run.breaker = self
            run.cell = cell
            run.ticket = cell.generation
            run.start = self._now() if cell.timed else None  # (as a ``with`` block: see Cell.timed)
            run.outer = None
        else:
            if check_within is None:
                cell, ticket, start, took = self._admit_run(outer, owner)
            else:
                bound = _CHECK_WITHIN.set(check_within)
                try:
                    cell, ticket, start, took = self._admit_run(outer, owner)
                finally:
                    _CHECK_WITHIN.reset(bound)
            run = _EnteredRun()
            run.breaker = self
            run.cell = cell
            run.ticket = ticket
            run.start = start
            run.outer = took
        run.translate = translate
        run.counts_itself = counts_itself
        run.claimed = run.released = False
        run.recorded = run.refused_for = run._own = None
        run.owner = owner
        run._token = _run_set(run)
        return run

    def _admit_run(
        self, outer: RunAdmission | None, owner: object = None
    ) -> tuple[Cell, Ticket, float, RunAdmission | None]:
        """``_admit`` for a run begun while ``outer`` is current (``begin_run``,
        ``enter_run``), of ``owner`` (``RunAdmission.owner``: the probe slot it may win is
        leased by it, ``lease_runs_by``): also the outer run whose unclaimed ticket it
        took, if it did (a task calling another task of the same breaker directly: see
        ``RunAdmission.outer``), else ``None``."""
        free = outer is not None and not outer.claimed
        cell, ticket, start = self._admit(owner=owner)
        return cell, ticket, start, outer if free and outer is not None and outer.claimed else None

    # -- steps shared by every way of guarding -------------------------------

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
            and _primary(checked.store) is _primary(self.store)
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

    # -- health checks ----------------------------------------------------------

    def _check_lease(self, owner: object = None) -> float | None:
        """How long a probe slot this breaker wins is held at most: for a breaker with a
        health check, the check's timeout and ``CHECK_LEASE_MARGIN`` (where shorter than
        ``half_open_max_wait``), since a check gives its verdict within its timeout: the
        slot of a check whose worker was killed held every other check off for
        ``half_open_max_wait`` (60 s by default). Else, for a run's admission (``owner``:
        the run's), what ``lease_runs_by`` says; ``None``: ``half_open_max_wait``."""
        probe = self.probe
        if probe is not None:
            return probe.timeout + CHECK_LEASE_MARGIN
        if owner is not None and _RUN_LEASE:
            return _RUN_LEASE[0](owner)
        return None

    def _check_instead(self, cell: Cell, ticket: Probe) -> tuple[Cell, Ticket]:
        """This call won a probe slot: run the health check in its place, then admit the
        call only if the checks closed the breaker, else reject it (``CircuitOpenError``)."""
        return cell, self._admitted_after(cell, self._run_checks(cell, ticket))

    async def _acheck_instead(self, cell: Cell, ticket: Probe) -> tuple[Cell, Ticket]:
        """``_check_instead`` for a caller on an event loop, which the check never blocks
        (``HealthCheck.arun``)."""
        probe = self.probe
        assert probe is not None
        checks = self._checks(cell, ticket, probe)
        try:
            limit = next(checks)
            while True:
                try:
                    with checking(Checked(self.store, self.name, self.key, CheckRun())):
                        result = await probe.arun(limit)
                except BaseException as exc:  # the caller was cancelled: its probe slot is freed
                    checks.throw(exc)
                    raise  # (not reached: _checks raises it again)
                limit = checks.send(result)
        except StopIteration as done:
            admitted: Ticket = done.value
        return cell, self._admitted_after(cell, admitted)

    def _admitted_after(self, cell: Cell, admitted: Ticket) -> Ticket:
        """The ticket the checks left: an ordinary one admits the call; a probe ticket
        (they did not close the breaker) rejects it. Still HALF_OPEN, the checks ended
        with this caller's slot freed (no verdict) or kept while no time was left for
        another: a retry may find a slot now (a full breaker raised in ``_checks``)."""
        if type(admitted) is not Probe:
            return admitted
        now = self._now()
        state = cell.state
        open_until = cell.open_until
        retry_after = None if state is FORCED_OPEN else 0.0
        if state is OPEN and open_until is not None:
            retry_after = max(0.0, open_until - now)
        cell.note_rejection(now)
        raise CircuitOpenError.rejected(self.name, self.key, state, retry_after, forced_why(cell))

    def _run_checks(self, cell: Cell, ticket: Probe, *, counted: bool = True) -> Ticket:
        """Run the health check on each probe slot this caller wins, until the breaker
        closes (return its ordinary ticket) or not (return the last probe ticket, or raise
        ``CircuitOpenError`` when no slot is left for the next check): at most
        ``probes_to_close`` checks, back to back (``_checks``, each run here)."""
        probe = self.probe
        assert probe is not None
        checks = self._checks(cell, ticket, probe, counted=counted)
        try:
            limit = next(checks)
            while True:
                try:
                    # (its own calls on this breaker pass while it runs)
                    with checking(Checked(self.store, self.name, self.key, CheckRun())):
                        result = probe.run(limit)
                except BaseException as exc:  # (a KeyboardInterrupt while waiting: the slot is freed)
                    checks.throw(exc)
                    raise  # (not reached: _checks raises it again)
                limit = checks.send(result)
        except StopIteration as done:
            admitted: Ticket = done.value
        return admitted

    def _checks(
        self, cell: Cell, ticket: Probe, probe: HealthCheck, *, counted: bool = True
    ) -> Generator[float, CheckResult, Ticket]:
        """The checks of ``_run_checks``, for a sync or an async driver: yields the time
        limit of each check to run, is sent its result, and returns what they left; raises
        the store's ``CircuitOpenError`` when the breaker stays half-open with no slot left
        for another check, or this caller's time ran out while a check goes on without it
        (a rejection ``counted`` unless nobody called: ``check_health``)."""
        # The breaker's kept policy (the store's), not this object's: it sets the lease a
        # check runs under, and how many successes close the breaker.
        policy = cell.policy
        longest = check_time(policy.half_open_max_wait)  # (a lease lasts no longer: ended before it)
        if longest < LEAST_PROBE_TIMEOUT:
            self._tell_short_lease(policy.half_open_max_wait, probe)
        within = _CHECK_WITHIN.get()
        if within is None and _RUN_CHECK_WITHIN:
            run = _run_get()
            if run is not None:  # (a call inside a run: a task's body)
                within = _RUN_CHECK_WITHIN[0](run, policy.probes_to_close)
        # ``check_within`` bounds all the checks together, in real time (what a task's
        # time limit counts), not each of them.
        deadline = None if within is None else time.monotonic() + within
        for _ in range(policy.probes_to_close):
            limit = longest if deadline is None else min(longest, deadline - time.monotonic())
            start = self._now()
            try:
                result = yield limit
            except BaseException:
                self._no_verdict(cell, ticket, start)  # (its caller was cancelled)
                raise
            if (
                deadline is not None
                and limit < min(longest, probe.timeout)
                and not result.healthy
                and isinstance(result.error, ProbeTimeout)
                # (one not started beside a hung one was not cut short: it failed at once; taken
                # for cut short, it left the breaker HALF_OPEN through the outage, its slot
                # taken and freed by every releaser each tick)
                and not isinstance(result.error, CheckStillHung)
            ):
                # Cut short by the caller's own time budget, not by the check's timeout: this
                # caller is rejected, and the check goes on without it, in its slot, its
                # verdict counted when it comes (a run's time limit shorter than the check
                # freed the slot each time and never closed the breaker). A check that
                # cannot go on (a subclass's ``run``) gives no verdict: its slot is freed.
                if result.pending is None:
                    self._no_verdict(cell, ticket, start)
                    break
                # (no longer than the slot's lease: a verdict after it would count for a slot
                # another check holds by then)
                late = functools.partial(self._late_verdict, cell, ticket, start, probe.name)
                result.pending.then(late, within=min(longest, probe.timeout) - limit)
                raise self._handed_on(cell, result.pending, counted)
            if result.pending is not None:
                # Cut at its slot's lease, short of its own timeout: it fails now, and is given
                # up on as one cut at its timeout is (a check that hung left one more thread
                # beside it each half-open period, its calls on this breaker still passing).
                result.pending.give_up()
            self._record_check(cell, ticket, start, result, probe.name)
            if cell.state in _ADMITTING:
                return cell.generation
            if cell.state is not HALF_OPEN:
                break
            if deadline is not None and deadline - time.monotonic() < _LEAST_CHECK_TIME:
                break  # no time left for another check: no slot is taken for one
            # Every slot taken (another caller's checks decide) rejects this caller with
            # what the store said: the seconds until a slot may free, the rejection counted.
            next_ticket, moves = cell.acquire(self.policy, self._now(), self._check_lease())
            if moves:
                self._announce(moves)
            if type(next_ticket) is not Probe:
                return next_ticket
            ticket = next_ticket
        return ticket

    def _tell_short_lease(self, wait: float, probe: HealthCheck) -> None:
        """Warn, once per breaker and kept ``wait``, that the check runs for less than
        ``LEAST_PROBE_TIMEOUT``. ``check_fits`` refuses such a wait where a breaker is made,
        but sees only the maker's policy: the breaker keeps the one it was created (or last
        reset) with, anywhere, perhaps by a caller with no check, and a probe may be set
        later. The check still ends before its slot's lease (a longer one would run beside
        the next caller's): one slower than the kept wait allows fails, and the breaker does
        not close until it is reset to a longer wait. Refusing the call instead would fail
        every task of a worker over another process's setting."""
        told = _TOLD_SHORT.setdefault(_primary(self.store), {})
        ident = (self.name, self.key)
        if told.get(ident) == wait:
            return
        told[ident] = wait
        least = LEAST_PROBE_TIMEOUT * 5 / 4  # (check_time(least) is LEAST_PROBE_TIMEOUT)
        own = self.policy.half_open_max_wait
        if check_time(own) >= LEAST_PROBE_TIMEOUT:
            fix = (
                f"reset the breaker to adopt this process's policy (half_open_max_wait={own:g} s): "
                f"`celery -A <app> breaker reset {shlex.quote(shown_label(self.label))}`, or CircuitBreaker.reset()"
            )
        else:
            fix = f"raise half_open_max_wait to {least:g} s or more, and reset the breaker to adopt it"
        logger.warning(
            "breaker %s keeps half_open_max_wait=%g s (the policy it was created or last reset with, in %s), "
            "which leaves its health check %s %g s, less than the %g s a check needs: a slower check fails, "
            "and the breaker does not close; %s",
            shown_label(self.label), wait, describe_url(self.store.url), probe.name, check_time(wait),
            LEAST_PROBE_TIMEOUT, fix, extra={"breaker": self.name, "breaker_key": self.key},
        )  # fmt: skip

    def _handed_on(self, cell: Cell, pending: PendingCheck, counted: bool) -> CircuitOpenError:
        """The rejection of a caller whose check goes on without it: retry once the check
        has had all its time, or after an open period if that is sooner (the check may
        answer long before its timeout; a retry meanwhile is rejected, its slot taken)."""
        if counted:
            cell.note_rejection(self._now())
        retry_after = min(pending.left(), cell.policy.reset_timeout)
        return CircuitOpenError.rejected(self.name, self.key, cell.state, retry_after)

    def _late_verdict(self, cell: Cell, ticket: Probe, start: float, name: str, result: CheckResult | None) -> None:
        """Record the verdict of a check its caller stopped waiting for (``PendingCheck``,
        in the check's verdict thread): ``None`` is no verdict (it was abandoned)."""
        try:
            if result is None:
                self._no_verdict(cell, ticket, start)
            else:
                self._record_check(cell, ticket, start, result, name)
        except Exception as exc:  # (a thread of its own: nobody else would hear of it)
            logger.warning(
                "breaker %s: the verdict of health check %s was not recorded (%s); its probe slot is "
                "freed when its lease runs out", shown_label(self.label), name, exc,
                extra={"breaker": self.name, "breaker_key": self.key},
            )  # fmt: skip

    def _no_verdict(self, cell: Cell, ticket: Probe, start: float) -> None:
        """A check under ``ticket``'s lease that gave no verdict: a neutral outcome frees
        its probe slot now, not when the lease runs out."""
        end = self._now()
        moves = cell.finish(ticket._replace(check=True), IGNORED, end - start, self.policy, end)
        if moves:
            self._announce(moves)

    def _record_check(self, cell: Cell, ticket: Probe, start: float, result: CheckResult, name: str) -> None:
        """Record the verdict of the check ``name`` run under ``ticket``'s lease since ``start``."""
        end = self._now()
        open_for = None
        if result.error is not None:
            open_for = retry_after_of(result.error, self._clock.time())
        outcome = SUCCESS if result.healthy else FAILURE
        moves = cell.finish(ticket._replace(check=True), outcome, end - start, self.policy, end, open_for=open_for)
        try:
            if not result.healthy:
                # At WARNING for the check that reopened the breaker; the others of its
                # half-open period (their verdict came too late to count) at DEBUG.
                logger.log(
                    logging.WARNING if moves else logging.DEBUG,
                    "breaker %s: health check %s failed (%s)", shown_label(self.label), name, result.detail,
                    extra={"breaker": self.name, "breaker_key": self.key},
                )  # fmt: skip
            elif any(move.target is OPEN for move in moves):
                # Healthy, but slower than the kept policy's slow calls: it reopened the
                # breaker, and checks as slow never close it. Said with the fix (the
                # transition's reason alone, "slow health check", left operators guessing).
                slow = cell.policy.slow_call_duration
                logger.warning(
                    "breaker %s: health check %s succeeded in %.3g s, over slow_call_duration=%s s, so it counted "
                    "as a slow call and reopened the breaker; only checks faster than that close it: make the "
                    "check faster, or raise slow_call_duration (and reset the breaker to adopt it)",
                    shown_label(self.label), name, end - start, "?" if slow is None else f"{slow:g}",
                    extra={"breaker": self.name, "breaker_key": self.key},
                )  # fmt: skip
        finally:
            # The move is stored: it is announced whatever logging does (a filter of the
            # user's may raise), or listeners, events and logs would never hear of it.
            if moves:
                self._announce(moves)

    def check_health(self, *, wait: float | None = None) -> HealthState:
        """Run the health check now if the breaker may admit a probe (its open time is up,
        or it is half-open with a free slot), and return where it leaves the breaker.

        Nothing runs, and nothing is counted, while the breaker admits calls, is still
        open, or is half-open with every probe slot taken: its state (and while OPEN, the
        seconds left) is returned as this process sees it. This is how parked tasks'
        breakers close while nobody calls them (the worker's releaser calls it).

        ``wait``: the most seconds to wait for the checks. A check still running then goes
        on without this caller, holding its probe slot, and its verdict is recorded when it
        comes (the breaker stays half-open meanwhile). The worker's releaser waits a
        moment only, so a check that hangs holds up no other breaker's tasks."""
        if self.probe is None:
            raise ValueError(f"breaker {self.label!r} has no probe to check its health with")
        cell = self._cell if not self._cell.evicted else self._refresh()
        now = self._now()
        state = cell.state
        if state in _ADMITTING or state is FORCED_OPEN or not self._due(cell, now):
            return self._health_of(cell, now)
        if state is HALF_OPEN and cell.snapshot(now).retry_after:
            # Every slot is taken (another caller's probe or check decides): asking for
            # one would count a rejection, five a second from the worker's releaser, of
            # calls nobody made.
            return self._health_of(cell, now)
        try:
            ticket, moves = cell.acquire(self.policy, now, self._check_lease())
        except CircuitOpenError:
            return self._health_of(cell, now)
        if moves:
            self._announce(moves)
        if type(ticket) is Probe:
            bound = None if wait is None else _CHECK_WITHIN.set(wait)
            try:
                # (no slot left for a next check, or the check goes on without this caller)
                with contextlib.suppress(CircuitOpenError):
                    self._run_checks(cell, ticket, counted=False)
            finally:
                if bound is not None:
                    _CHECK_WITHIN.reset(bound)
        return self._health_of(cell, self._now())

    @staticmethod
    def _due(cell: Cell, now: float) -> bool:
        """Whether an OPEN or HALF_OPEN breaker may admit a probe now (HALF_OPEN: if a slot is free)."""
        open_until = cell.open_until
        return cell.state is HALF_OPEN or (cell.state is OPEN and open_until is not None and now >= open_until)

    @staticmethod
    def _health_of(cell: Cell, now: float) -> HealthState:
        open_until = cell.open_until
        if cell.state is OPEN and open_until is not None:
            return HealthState(OPEN, max(0.0, open_until - now))
        return HealthState(cell.state)

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
                    logger.exception("breaker %s: transition listener %r raised", shown_label(self.label), listener)

    # -- observing and operating ----------------------------------------------

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``."""
        return breaker_label(self.name, self.key)

    @property
    def state(self) -> State:
        """The stored state (an OPEN breaker whose time is up half-opens on its next call)."""
        cell = self._cell if not self._cell.evicted else self._refresh()
        return cell.state

    def snapshot(self) -> BreakerSnapshot:
        """State and metrics now: failures, successes, last failure/success, trips, ..."""
        cell = self._cell if not self._cell.evicted else self._refresh()
        return cell.snapshot(self._now())

    @property
    def listeners(self) -> tuple[TransitionListener, ...]:
        """What ``add_listener`` added, in order."""
        return tuple(self._listeners)

    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener(transition)`` after every transition this breaker object causes."""
        self._listeners.append(listener)

    def remove_listener(self, listener: TransitionListener) -> None:
        """Stop calling ``listener``; ``ValueError`` if it was never added."""
        self._listeners.remove(listener)

    def force_open(self) -> None:
        """Reject every call until an operator closes, resets or disables the breaker."""
        self._operate(State.FORCED_OPEN)

    def disable(self) -> None:
        """Admit every call and never trip, until an operator closes or resets it."""
        self._operate(State.DISABLED)

    force_closed = disable

    def close(self) -> None:
        """Move to CLOSED now (windows cleared, lifetime counters kept)."""
        self._operate(State.CLOSED)

    def reset(self) -> None:
        """Forget everything: a fresh CLOSED breaker with zeroed counters."""
        cell = self._cell if not self._cell.evicted else self._refresh()
        self._announce(cell.reset(self.policy, self._now()))

    def note_deferral(self) -> None:
        """Count a task deferred because this breaker rejected it."""
        cell = self._cell if not self._cell.evicted else self._refresh()
        cell.note_deferral()

    def _operate(self, target: State) -> None:
        # A memory store's sweep may drop the cell between the check and the move, which
        # would then land on a forgotten copy: an operator's move is made again on the
        # new cell. (A sweep never drops a cell once it holds an operator's state.)
        while True:
            cell = self._cell if not self._cell.evicted else self._refresh()
            moves = cell.force(target, self.policy, self._now())
            if not cell.evicted:
                break
        self._announce(moves)

    def __repr__(self) -> str:
        shown = self.state.value
        if forced_why(self._cell):
            shown += " (store unreachable: breaker_on_storage_error='deny')"
        return f"<CircuitBreaker {self.label!r} {shown} on {describe_url(self.store.url)}>"


#: The runs lent to this context by a run's own breaker for its open blocks (``with`` or
#: ``async with`` on it in a thread, greenlet or task where the run was not current):
#: ``(token, breaker, outer)``, innermost first, ``token`` being what resets ``_RUN``
#: (``None`` for a block nested in a lent one, which leaves it lent).
_LENT: ContextVar[tuple[Any, CircuitBreaker, Any] | None] = ContextVar("celery_breaker_lent", default=None)
_lent_get = _LENT.get  # (bound once, as ``_run_get``)


class _RunBreaker(CircuitBreaker):
    """A run's own breaker object (``RunAdmission.own_breaker``; ``self.breaker`` in a
    task body): the run's breaker, whose every guarded call makes the run current while
    it is admitted and recorded, wherever it is made.

    In the body's own context the run is current already, and each form is the
    breaker's own. In a thread or greenlet the body starts (``pool.submit(breaker.call,
    ...)``, ``threading.Thread``, ``gevent.spawn``), which starts with a context of its
    own, the run is lent to that context for the call or block: its first guarded call
    uses the run's ticket (so a half-open breaker spends one probe slot per run, and
    the run is never rejected by the probe it holds), and what each records is the
    run's, so the run does not count itself besides them (``breaker_scope``). Only to a
    context where no run is current: where another is (an object kept from an earlier
    run and used in a later one's body), it is a breaker like any other.
    """

    __slots__ = ("_run",)
    # Made only by ``_run_breaker``, which stores every field itself: a bare class call
    # (~35 ns less than ``object.__new__(_RunBreaker)``, as ``_EnteredRun``).
    __init__ = object.__init__
    #: The run, referred to weakly (the run refers to this object: no reference cycle, so
    #: both go when the run's task returns). Once the run is gone (a thread the body left
    #: behind still calls), this is a breaker like any other.
    _run: weakref.ReferenceType[RunAdmission]

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        run = self._run()
        if run is None or _run_get() is not None:  # (gone, or a run is current here: as any breaker)
            return CircuitBreaker.call(self, fn, *args, **kwargs)
        token = _run_set(run)
        try:
            return CircuitBreaker.call(self, fn, *args, **kwargs)
        finally:
            _run_reset(token)

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        run = self._run()
        if run is None or _run_get() is not None:
            return await CircuitBreaker.acall(self, fn, *args, **kwargs)
        token = _run_set(run)
        try:
            return await CircuitBreaker.acall(self, fn, *args, **kwargs)
        finally:
            _run_reset(token)

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        # (through call() and acall(), which lend the run where it is not current)
        if inspect.iscoroutinefunction(fn):
            acall = self.acall

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await acall(fn, *args, **kwargs)

            return guarded_async

        call = self.call

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
            return call(fn, *args, **kwargs)

        return guarded

    def _lend(self) -> None:
        """Before a block opens: lend the run to this context if it is not current here
        (or note a block nested in one lent here, which leaves it lent)."""
        run = self._run()
        lent = _lent_get()
        if run is None:
            return  # (the run is gone: nothing to lend)
        if _run_get() is None:
            _LENT.set((_run_set(run), self, lent))
        elif lent is not None and lent[1] is self:
            _LENT.set((None, self, lent))

    def _give_back(self) -> None:
        """After a block closed (or failed to open): undo what ``_lend`` did for it."""
        lent = _lent_get()
        if lent is not None and lent[1] is self:
            _LENT.set(lent[2])
            if lent[0] is not None:
                _run_reset(lent[0])

    # (A block in the body's own context, where the run is current and nothing is lent,
    # is the breaker's own block at the cost of one more frame.)

    def __enter__(self) -> CircuitBreaker:
        if _lent_get() is None and _run_get() is self._run():
            return _ENTER(self)
        self._lend()
        try:
            return _ENTER(self)
        except BaseException:
            self._give_back()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if _lent_get() is None:
            _EXIT(self, exc_type, exc, tb)
            return
        try:
            CircuitBreaker.__exit__(self, exc_type, exc, tb)
        finally:
            self._give_back()

    def _aenter(self) -> Awaitable[CircuitBreaker]:
        if _lent_get() is None and _run_get() is self._run():
            return CircuitBreaker._aenter(self)
        self._lend()
        try:
            entered = CircuitBreaker._aenter(self)
        except BaseException:
            self._give_back()
            raise
        if inspect.iscoroutine(entered):  # (a health check to await first: see _aenter_checked)
            return self._checked_then_entered(entered)
        return entered

    async def _checked_then_entered(self, entering: Awaitable[CircuitBreaker]) -> CircuitBreaker:
        try:
            return await entering
        except BaseException:
            self._give_back()
            raise

    def _aexit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        if _lent_get() is None:
            return CircuitBreaker._aexit(self, exc_type, exc, tb)
        try:
            return CircuitBreaker._aexit(self, exc_type, exc, tb)
        finally:
            self._give_back()

    if not TYPE_CHECKING:
        __aenter__ = _aenter
        __aexit__ = _aexit


def _run_breaker(breaker: CircuitBreaker, run: RunAdmission) -> _RunBreaker:
    """``run``'s own breaker: ``breaker`` (the run's), made again without ``__init__``
    (nothing is asked of the store), with blocks of its own and the run it lends."""
    own: _RunBreaker = _RunBreaker()
    own.name = breaker.name
    own.key = breaker.key
    own.policy = breaker.policy
    own.store = breaker.store
    own.probe = breaker.probe
    own._clock = breaker._clock
    own._now = breaker._now
    own._cell = breaker._cell
    own._listeners = breaker._listeners  # (the same list: its listeners hear this object's moves)
    own._slot = {}
    own._stacked = False
    own._open_blocks = {}
    own._entered = None
    own._run = _weak(run)
    return own


_weak = weakref.ref  # (bound once: read for every run's own breaker)


_ENTER = CircuitBreaker.__enter__
_EXIT = CircuitBreaker.__exit__


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
