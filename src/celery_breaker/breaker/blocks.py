"""``with`` and ``async with`` on a breaker: where an open block keeps its ticket, and how its end is recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ..core import Outcome, Probe, Ticket
from ..storage import Cell
from .runs import RUN
from .steps import GuardSteps

if TYPE_CHECKING:
    from typing_extensions import Self

    from .runs import RunAdmission

__all__ = ["GuardedBlocks"]

R = TypeVar("R")

SUCCESS = Outcome.SUCCESS

_run_get = RUN.get  # (bound once: see ``RUN``)


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


class GuardedBlocks(GuardSteps):
    """``with breaker:`` and ``async with breaker:``: a block admitted on entry, recorded on exit."""

    __slots__ = ("_slot", "_stacked", "_entered", "_open_blocks")

    _slot: dict[int, _Held]
    _stacked: bool
    _entered: asyncio.Future[Self] | None
    _open_blocks: dict[int, _Block]

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

    def __enter__(self) -> Self:
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

    def _aenter(self) -> Awaitable[Self]:
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

    async def _aenter_checked(self, cell: Cell, ticket: Probe, start: float, run: RunAdmission | None) -> Self:
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
        async def __aenter__(self) -> Self: ...

        async def __aexit__(
            self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> None: ...

    else:
        __aenter__ = _aenter
        __aexit__ = _aexit

    def _make_entered(self) -> asyncio.Future[Self]:
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
