"""CircuitBreaker: guard any call (sync or async) with a breaker that lives in a store."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, ParamSpec, TypeVar, overload

from ..clock import SYSTEM_CLOCK, Clock
from ..core import BreakerPolicy, Outcome, Probe, State, Ticket
from ..errors import CircuitOpenError, ConfigurationError
from ..health import HealthCheck, ProbeFunction
from ..labels import breaker_label, shown_label
from ..names import check_name, kept_key
from ..storage import Cell, Store, describe_url, resolve_store, with_fallback
from ..storage.fallback import FallbackCell
from ..storage.masking import MaskedRepr
from .blocks import GuardedBlocks
from .check_limits import CHECK_WITHIN, check_fits
from .checks import HealthCheckAdmission
from .operating import Operating
from .runs import RUN, ExceptionTranslator, RunAdmission
from .steps import TransitionListener

__all__ = ["CircuitBreaker"]

logger = logging.getLogger("celery_breaker")

P = ParamSpec("P")
R = TypeVar("R")

SUCCESS = Outcome.SUCCESS
OPEN, FORCED_OPEN = State.OPEN, State.FORCED_OPEN

_run_get = RUN.get  # (bound once: see ``RUN``)
_run_set = RUN.set

#: The policy mismatches this process has warned of: (store URL, breaker name, the policy
#: kept, the policy given). Warned for each breaker object made, a rolling deploy that
#: changed a policy logged the WARNING once per key of a per-key breaker (one per tenant),
#: and once per breaker a registry made again, in every pool process: a flood.
_MISMATCHES_WARNED: set[tuple[str, str, BreakerPolicy, BreakerPolicy]] = set()
#: Beyond this many, the set is emptied (policies made anew for each breaker, a lambda
#: predicate each time, never match one another: they are warned of each time anyway).
_MOST_MISMATCHES_KEPT = 1_000


def _first_mismatch(breaker: CircuitBreaker, existing: BreakerPolicy) -> bool:
    """Whether ``breaker``'s policy, other than the ``existing`` one its store keeps, is a
    mismatch this process has not warned of yet (any key of its name counts)."""
    seen = (breaker.store.url, breaker.name, existing, breaker.policy)
    try:
        if seen in _MISMATCHES_WARNED:
            return False
        if len(_MISMATCHES_WARNED) >= _MOST_MISMATCHES_KEPT:
            _MISMATCHES_WARNED.clear()
        _MISMATCHES_WARNED.add(seen)
    except TypeError:  # (a policy holding something unhashable: warned each time, as before)
        return True
    return True


class _EnteredRun(RunAdmission):
    """The admissions ``enter_run`` makes: a ``RunAdmission`` made without ``__init__``
    (``enter_run`` stores the fields itself), so making one is a bare class call."""

    __slots__ = ()
    __init__ = object.__init__


class CircuitBreaker(GuardedBlocks, HealthCheckAdmission, Operating):
    """A named breaker in a store; the same name on the same store is the same breaker.

    Use it as ``breaker.call(fn, *args)``, ``with breaker:``, ``async with breaker:``,
    ``await breaker.acall(coro_fn, *args)`` or as a decorator on sync or async
    functions. A rejected call raises ``CircuitOpenError`` without running.

    Args:
        name: the breaker's name.
        policy: a ``BreakerPolicy`` or a dict (any mapping) of its fields (over the defaults).
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

    __slots__ = ()

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | Mapping[str, Any] | None = None,
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
                f"{key!r:.100}; pass str(key) for a whole number or a UUID (a BreakerTask reads what its "
                "breaker_key returns so), else a text that is the same for the same key on every run and process"
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
        self._slot = {}
        self._stacked = False
        # Every open block on a context's stack, by id: what an exit that cannot see its
        # block (see _exit_block) closes instead. (A block entered and never left stays
        # here, as its ticket stays unreported.)
        self._open_blocks = {}
        self._entered = None  # (see __aenter__)
        self._cell = self.store.cell(name, key, self.policy, self._clock)
        existing = self._cell.policy
        if existing is not self.policy and existing != self.policy and _first_mismatch(self, existing):
            logger.warning(
                "breaker %s already exists in %s with another policy; it keeps that one "
                "(reset() adopts a new policy): existing %r, this one %r (said once per process for this "
                "breaker's name and these two policies, whatever its key)",
                shown_label(self.label), describe_url(self.store.url), MaskedRepr(existing), MaskedRepr(self.policy),
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

    # (a coroutine function stays one: ``asyncio.run`` and ``create_task`` take a
    # coroutine, not any awaitable; any other callable keeps its own return type)
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]: ...
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
                bound = CHECK_WITHIN.set(check_within)
                try:
                    cell, ticket, start, took = self._admit_run(outer, owner)
                finally:
                    CHECK_WITHIN.reset(bound)
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
