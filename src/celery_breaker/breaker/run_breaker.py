"""A run's own breaker object (``self.breaker`` in a task body): its guarded calls are the run's, in any context."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from .circuit_breaker import CircuitBreaker
from .runs import RUN, RunAdmission, make_own_breakers_with

if TYPE_CHECKING:
    from typing_extensions import Self

__all__: list[str] = []

P = ParamSpec("P")
R = TypeVar("R")

_run_get = RUN.get  # (bound once: see ``RUN``)
_run_set = RUN.set
_run_reset = RUN.reset


#: The runs lent to this context by a run's own breaker for its open blocks (``with`` or
#: ``async with`` on it in a thread, greenlet or task where the run was not current):
#: ``(token, breaker, outer)``, innermost first, ``token`` being what resets ``RUN``
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

    def __enter__(self) -> Self:
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

    def _aenter(self) -> Awaitable[Self]:
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

    async def _checked_then_entered(self, entering: Awaitable[Self]) -> Self:
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


make_own_breakers_with(_run_breaker)
