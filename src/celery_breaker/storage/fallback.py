"""What a breaker does while its shared store cannot be reached: ``breaker_on_storage_error``.

``FallbackStore`` wraps a shared store. Its cells follow the shared breaker while the
store answers; when an operation raises ``StorageError`` they switch to a breaker of
this process — where the shared breaker was last seen (``local``: OPEN until its time
is up, FORCED_OPEN or DISABLED as an operator left it, else fresh and CLOSED), DISABLED
(``allow``: every call passes) or FORCED_OPEN (``deny``: every call is rejected) — and
the shared store is tried again every ``retry_interval`` seconds, by one cell for the
whole store: while it is down, a breaker made meanwhile (a new per-key breaker) takes
its stand-in at once instead of waiting out the store's timeout, unless this process still
hears the store's transitions (a Cluster with another primary down): it then asks. Every
cell rejoins the shared state once it answers.
The outage is logged once per ``log_interval`` per store, not per call.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..clock import Clock
from ..core import BreakerPolicy, BreakerSnapshot, Outcome, Probe, State, Ticket, Transition
from ..core.pacing import PacingLaw
from ..errors import CircuitOpenError, ConfigurationError, StorageError
from .contract import (
    Cell,
    Claimed,
    EvictionCheck,
    History,
    Moves,
    Parking,
    ReleasePace,
    Selected,
    Store,
    UnreadableBreaker,
)
from .masking import MaskedText
from .memory import MemoryCell
from .urls import describe_url

__all__ = ["MODES", "FallbackCell", "FallbackStore", "forced_why", "with_fallback"]

logger = logging.getLogger("celery_breaker")

#: ``breaker_on_storage_error``'s values: what a breaker does while its shared store is down.
MODES = ("local", "allow", "deny")
DEFAULT_RETRY_INTERVAL = 5.0
DEFAULT_LOG_INTERVAL = 60.0


class FallbackStore:
    """A shared store whose cells keep working, as ``mode`` says, while it is down."""

    def __init__(
        self,
        primary: Store,
        mode: str,
        *,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        log_interval: float = DEFAULT_LOG_INTERVAL,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"breaker_on_storage_error must be one of {', '.join(MODES)}, got {mode!r}")
        self.primary = primary
        self.mode = mode
        self.url = primary.url
        self.label = describe_url(primary.url)
        self.retry_interval = retry_interval
        self.log_interval = log_interval
        self._lock = threading.Lock()  # the outage bookkeeping
        self._cells_lock = threading.Lock()  # the cell map (cells report outages while made)
        self._down = False
        self._retry_at = float("-inf")  # while down: when the store may be tried again
        self._last_log = float("-inf")
        self._cells: weakref.WeakValueDictionary[tuple[str, str | None], FallbackCell] = weakref.WeakValueDictionary()
        _STORES.add(self)

    def cell(self, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> FallbackCell:
        # One cell per breaker, so its stand-in keeps its state across refreshes.
        ident = (name, key)
        found = self._cells.get(ident)
        if found is None:
            with self._cells_lock:
                found = self._cells.get(ident)
                if found is None:
                    found = self._cells[ident] = FallbackCell(self, name, key, policy, clock)
                    return found
        found.refresh(clock.monotonic())
        return found

    def snapshots(self, clock: Clock, where: Selected | None = None) -> list[BreakerSnapshot]:
        try:
            return self.primary.snapshots(clock, where)
        except StorageError as exc:
            self.store_failed(exc, clock.monotonic())
            return []

    def find(self, name: str, key: str | None, clock: Clock) -> BreakerSnapshot | UnreadableBreaker | None:
        """The shared store's ``find``; ``None`` while it cannot be read, as ``snapshots`` lists none."""
        try:
            return self.primary.find(name, key, clock)
        except StorageError as exc:
            self.store_failed(exc, clock.monotonic())
            return None

    def delete(self, name: str, key: str | None) -> bool:
        """Delete the breaker in the shared store (an operator's act: a ``StorageError``
        while it is down is raised, never covered by the fallback)."""
        return self.primary.delete(name, key)

    def sync(self, timeout: float = 5.0) -> bool:
        """The shared store's barrier (``RedisStore.sync``); False while it cannot be reached."""
        try:
            return self.primary.sync(timeout)
        except StorageError:
            return False

    # -- what the shared store can do ------------------------------------------

    @property
    def shared(self) -> bool:
        return self.primary.shared

    @property
    def parking(self) -> Parking | None:
        """The shared store's parking, whose failures are reported as this store's outage."""
        parking = self.primary.parking
        return None if parking is None else _ReportingParking(parking, self)

    @property
    def history(self) -> History | None:
        return self.primary.history

    def flush(self) -> None:
        self.primary.flush()

    def close(self) -> None:
        self.primary.close()

    # -- outage bookkeeping, shared by every cell of this store ---------------

    @property
    def down(self) -> bool:
        """The shared store failed and has not answered since (its outage is being logged)."""
        return self._down

    def may_try(self, now: float) -> bool:
        """Whether the shared store may be tried now: it is not down, or its retry is due."""
        return not self._down or now >= self._retry_at

    def hears_primary(self) -> bool:
        """Whether this process hears the shared store's transitions now: it answers, at
        least where its channel lives, whatever breaker failed (a Cluster's other primary)."""
        parking = self.primary.parking
        return parking is not None and parking.hearing() is not None

    def claim_try(self, now: float) -> bool:
        """Like ``may_try``, but a due retry is taken by this caller alone: the next is
        due ``retry_interval`` later, whatever this one finds."""
        with self._lock:
            if not self._down:
                return True
            if now < self._retry_at:
                return False
            self._retry_at = now + self.retry_interval
            return True

    def store_failed(self, exc: StorageError, now: float, *, postpone: bool = True) -> None:
        """Note that the shared store failed; logs the outage at most once per ``log_interval``.
        ``postpone``: the next retry is ``retry_interval`` from now at the earliest (not so
        for a failure that was no retry, while the store was known to be down already)."""
        with self._lock:
            first = not self._down
            self._down = True
            if postpone or first:
                self._retry_at = max(self._retry_at, now + self.retry_interval)
            due = now - self._last_log >= self.log_interval
            if first or due:
                self._last_log = now
        if first or due:
            logger.warning(
                "breaker store %s unreachable (%s); breakers follow breaker_on_storage_error=%s "
                "until it answers again (retried every %g s)",
                self.label, MaskedText(exc), self.mode, self.retry_interval,
                extra={"breaker_store": self.label, "breaker_on_storage_error": self.mode},
            )  # fmt: skip

    def store_answered(self) -> None:
        """Note that the shared store answers again; logs the recovery once."""
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            logger.info("breaker store %s answers again: breakers rejoin the shared state", self.label)


#: A stand-in's tickets carry its serial in the bits above these: the shared breaker and
#: each stand-in count generations (and probe leases) from 0, so a ticket is judged only
#: by the cell that issued it. Any other cell counts its outcome as stale (``_STALE``).
_STAND_IN_SHIFT = 64
_FIRST_STAND_IN_TICKET = 1 << _STAND_IN_SHIFT
_STAND_INS = itertools.count(1)
#: A generation no cell ever has: the outcome is counted, and judged by no rule.
_STALE = -1


def _regenerated(ticket: Ticket, generation: int) -> Ticket:
    """``ticket`` with another generation (a probe keeps its lease and kind)."""
    if type(ticket) is Probe:
        return ticket._replace(generation=generation)
    return generation


class FallbackCell:
    """A cell that is the shared store's while it answers, and this process's while not.

    A call admitted by one and finished on the other (the store went down, or came back,
    meanwhile) is counted there as stale, never judged: the two count generations and
    probe leases apart, and a stand-in's probe finished on the shared breaker took a
    slot another process held (``_for``).
    """

    # Either cell may be active at the end of a call that began on the other: time
    # every call, and record every success through record_success.
    timed = True
    quiet_success = False

    def __init__(self, store: FallbackStore, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> None:
        self._store = store
        self._name = name
        self._key = key
        self._policy = policy
        self._clock = clock
        self._local: MemoryCell | None = None
        self._base = 0  # (the generation offset of the stand-in's tickets: _STAND_IN_SHIFT)
        self._active: Cell
        self._primary: Cell | None = None
        #: The move back to the shared breaker's state when this cell rejoined it from a
        #: stand-in that had left CLOSED: told with the next operation's moves (``_told``).
        self._rejoined: Transition | None = None
        now = clock.monotonic()
        if store.claim_try(now):
            if not self._try_primary(now):
                self._active = self._fallback()
        elif not (store.hears_primary() and self._try_primary(now, rejoined=False)):
            # (A store that failed another breaker and whose transitions this process still
            # hears answers, on a Cluster with one primary down: a new breaker whose own
            # primary answers is shared; one whose primary is down fails at once.)
            self._active = self._fallback()

    # -- switching ------------------------------------------------------------

    def _try_primary(self, now: float, *, rejoined: bool = True) -> bool:
        """Switch to the shared cell if the store answers; ``rejoined``: the store as a
        whole is then taken to answer again (not so for one breaker made while it was
        down: another's primary may still be down, and the outage is still logged)."""
        try:
            self._primary = self._store.primary.cell(self._name, self._key, self._policy, self._clock)
        except StorageError as exc:
            # (A breaker made while the store is down and asking only for itself leaves the
            # next retry of the others where it was: else each new one postponed it.)
            self._degrade(exc, now, postpone=rejoined)
            return False
        self._active = self._primary
        local, self._local = self._local, None  # (the next outage starts with a fresh stand-in, as documented)
        adopt = getattr(self._primary, "adopt", None)
        if local is not None:
            seen = local.snapshot(now)
            if adopt is not None:
                # What the stand-in counted (successes, rejections, deferrals) goes with the
                # shared breaker's next counts: dropped, every surface kept the outage's gap
                # for good. Its failures and trips judged this process's breaker only.
                adopt((seen.rejections, seen.deferrals, seen.successes, 0))
            if self._store.mode == "local" and seen.state is not State.CLOSED:
                # Its moves were told (marked as the stand-in's); the way back is told too, or
                # a listener (an event consumer: Flower) kept the stand-in's OPEN for good.
                self._rejoined = self._rejoin_move(seen.state, now)
        if rejoined:
            self._store.store_answered()
        return True

    def _rejoin_move(self, was: State, now: float) -> Transition | None:
        primary = self._primary
        if primary is None or primary.state is was:
            return None
        return Transition(
            name=self._name, key=self._key, source=was, target=primary.state,
            reason=f"rejoined the shared breaker in {self._store.label}", generation=primary.generation,
            at=self._clock.time(), open_until=None, failures=0, calls=0, trips=0,
        )  # fmt: skip

    def _told(self, moves: Moves, *, stand_in: bool = False) -> Moves:
        """``moves`` as the breaker tells them: a stand-in's marked as such (they are this
        process's, not the shared breaker's), after the rejoin move if one is due."""
        if stand_in and moves:
            whose = f"this process's stand-in while {self._store.label} cannot be reached"
            moves = tuple(replace(move, reason=f"{move.reason}; {whose}") for move in moves)
        rejoined, self._rejoined = self._rejoined, None
        return moves if rejoined is None else (rejoined, *moves)

    def _fallback(self) -> Cell:
        if self._local is None:
            now = self._clock.monotonic()
            local = MemoryCell(self._name, self._key, self._policy, now)
            local.wall_offset = self._clock.time() - now
            mode = self._store.mode
            if mode != "local":
                # (its transition is not announced: a move of this process's stand-in, not of the breaker)
                local.force(State.DISABLED if mode == "allow" else State.FORCED_OPEN, self._policy, now)
            elif self._primary is not None:
                # Where the shared breaker was last seen: started CLOSED, a stand-in let this
                # process's first failures through to a downstream every process knew was
                # down, and called one an operator had forced open (docs/decisions.md, 105).
                local.take_view(self._primary.state, self._primary.open_until, now)
            self._base = next(_STAND_INS) << _STAND_IN_SHIFT
            self._local = local
        return self._local

    def _degrade(self, exc: StorageError, now: float, *, postpone: bool = True) -> None:
        if self._primary is not None:
            self._primary.stale()  # so rejoining reads the shared state: a real check
        self._store.store_failed(exc, now, postpone=postpone)
        self._active = self._fallback()

    def refresh(self, now: float) -> None:
        """Asked again by a holder: rejoin the shared store if a retry is due, and take a
        fresh shared cell if the current one went stale."""
        if self._due(now):
            if self._store.claim_try(now):
                self._try_primary(now)
        elif self._active is self._primary and self._primary.evicted:
            # (Its own breaker read again, no retry of the store: answering, it does not end
            # an outage another's primary may still be in, a Cluster's, which its next call
            # then began again, a WARNING each second; failing, it does not postpone the retry.)
            self._try_primary(now, rejoined=False)

    def _due(self, now: float) -> bool:
        return self._active is self._local and self._store.may_try(now)

    def _target(self, now: float) -> Cell:
        """The cell an operation starts on: the shared one if it answers (or a due retry
        makes it answer), else the stand-in."""
        if self._due(now) and self._store.claim_try(now):
            self._try_primary(now)
        return self._active

    def _for(self, ticket: Ticket, cell: Cell) -> Ticket:
        """``ticket`` as ``cell`` judges it: its own (a stand-in's without the offset
        ``acquire`` gave it), or a stale one if another cell issued it."""
        generation: int = ticket.generation if type(ticket) is Probe else ticket  # type: ignore[assignment]
        if generation >= _FIRST_STAND_IN_TICKET:
            base = self._base
            if cell is self._local and base <= generation < base + _FIRST_STAND_IN_TICKET:
                return _regenerated(ticket, generation - base)
            return _regenerated(ticket, _STALE)
        return ticket if cell is self._primary else _regenerated(ticket, _STALE)

    def _run(self, operation: str, now: float, *args: Any, **kwargs: Any) -> Any:
        """Do ``operation`` on the shared cell if possible, else on the stand-in."""
        active = self._target(now)
        if active is self._primary:
            try:
                return getattr(active, operation)(*args, **kwargs)
            except StorageError as exc:
                self._degrade(exc, now)
        return getattr(self._active, operation)(*args, **kwargs)

    # -- the local view (read by CircuitBreaker on every call) ----------------

    @property
    def passing(self) -> bool:
        # While on the stand-in, a retry that is due sends calls down the slow path,
        # where acquire() tries the shared store again.
        active = self._active
        if active is self._primary:
            return active.passing  # (the hot path: no clock read)
        return active.passing and not self._due(self._clock.monotonic())

    @property
    def state(self) -> State:
        return self._active.state

    @property
    def denying(self) -> str:
        """Why this cell rejects every call while its store is down (``deny``), for the
        rejection's text: its FORCED_OPEN is no operator's (``''`` otherwise)."""
        if self._active is not self._local or self._store.mode != "deny":
            return ""
        return (
            f"its store {self._store.label} cannot be reached "
            "(breaker_on_storage_error='deny' rejects every call until it answers)"
        )

    @property
    def policy(self) -> BreakerPolicy:
        return self._active.policy

    @property
    def generation(self) -> int:
        # (a caller admitting with it as its ticket: a stand-in's carries the offset)
        active = self._active
        if active is self._primary:
            return active.generation
        return self._base + active.generation

    @property
    def evicted(self) -> bool:
        # "Ask the store again": the shared cell went stale, or a retry is due.
        if self._active is self._primary:
            return self._active.evicted
        return self._due(self._clock.monotonic())

    def stale(self) -> None:
        self._active.stale()

    @property
    def open_until(self) -> float | None:
        return self._active.open_until

    def note_rejection(self, now: float) -> None:
        self._active.note_rejection(now)

    # -- atomic operations ----------------------------------------------------

    def acquire(self, policy: BreakerPolicy, now: float, lease_for: float | None = None) -> tuple[Ticket, Moves]:
        cell = self._target(now)
        if cell is self._primary:
            try:
                ticket, moves = cell.acquire(policy, now, lease_for)
                return ticket, self._told(moves)
            except StorageError as exc:
                self._degrade(exc, now)
        try:
            ticket, moves = self._active.acquire(policy, now, lease_for)
        except CircuitOpenError as rejected:
            rejected.detail = rejected.detail or self.denying
            raise
        generation: int = ticket.generation if type(ticket) is Probe else ticket  # type: ignore[assignment]
        return _regenerated(ticket, self._base + generation), self._told(moves, stand_in=True)

    def finish(
        self,
        ticket: Ticket,
        outcome: Outcome,
        duration: float,
        policy: BreakerPolicy,
        now: float,
        *,
        open_for: float | None = None,
        refused: bool = False,
    ) -> Moves:
        cell = self._target(now)
        if cell is self._primary:
            try:
                return self._told(
                    cell.finish(
                        self._for(ticket, cell), outcome, duration, policy, now, open_for=open_for, refused=refused
                    )
                )
            except StorageError as exc:
                self._degrade(exc, now)
        local = self._active
        moves = local.finish(
            self._for(ticket, local), outcome, duration, policy, now, open_for=open_for, refused=refused
        )
        return self._told(moves, stand_in=True)

    def finish_refusal(
        self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float, open_for: float | None
    ) -> tuple[bool, Moves]:
        cell = self._target(now)
        if cell is self._primary:
            try:
                refusing, moves = cell.finish_refusal(self._for(ticket, cell), duration, policy, now, open_for)
                return refusing, self._told(moves)
            except StorageError as exc:
                self._degrade(exc, now)
        # (the stand-in parks nothing: the failure it is)
        local = self._active
        moves = local.finish(self._for(ticket, local), Outcome.FAILURE, duration, policy, now, open_for=open_for)
        return False, self._told(moves, stand_in=True)

    def record_success(self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float) -> Moves:
        active = self._active
        if active is self._primary and ticket.__class__ is int and ticket < _FIRST_STAND_IN_TICKET:
            try:  # the hot path: the shared breaker's own ticket, without the generic dispatch
                return active.record_success(ticket, duration, policy, now)
            except StorageError as exc:
                self._degrade(exc, now)
        cell = self._target(now)
        if cell is self._primary:
            try:
                return self._told(cell.record_success(self._for(ticket, cell), duration, policy, now))
            except StorageError as exc:
                self._degrade(exc, now)
        local = self._active
        return self._told(local.record_success(self._for(ticket, local), duration, policy, now), stand_in=True)

    def force(self, target: State, policy: BreakerPolicy, now: float) -> Moves:
        moves: Moves = self._run("force", now, target, policy, now)
        return self._told(moves, stand_in=self._active is self._local)

    def reset(self, policy: BreakerPolicy, now: float) -> Moves:
        moves: Moves = self._run("reset", now, policy, now)
        return self._told(moves, stand_in=self._active is self._local)

    def take_rejoined(self) -> Moves:
        """The rejoin move due, if any (``CircuitBreaker._refresh`` tells it: a breaker that
        rejoined on a refresh may pass its calls without another operation)."""
        return self._told(())

    def note_deferral(self) -> None:
        self._run("note_deferral", self._clock.monotonic())

    def snapshot(self, now: float) -> BreakerSnapshot:
        snapshot: BreakerSnapshot = self._run("snapshot", now, now)
        return snapshot


class _ReportingParking:
    """A shared store's parking whose failures count as the store's outage: logged once
    per interval by the ``FallbackStore``, then raised as usual (the caller falls back)."""

    def __init__(self, parking: Parking, store: FallbackStore) -> None:
        self._parking = parking
        self._store = store

    def _reporting(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._parking, operation)(*args, **kwargs)
        except StorageError as exc:
            self._store.store_failed(exc, time.monotonic())
            raise

    def tag(self, name: str, key: str | None) -> str:
        return self._parking.tag(name, key)

    def label(self, tag: str) -> str:
        return self._parking.label(tag)

    def breaker(self, tag: str) -> tuple[str, str | None] | None:
        return self._parking.breaker(tag)

    def park(self, name: str, key: str | None, entry: str, order: float, payload: str, deadline: float | None) -> int:
        count: int = self._reporting("park", name, key, entry, order, payload, deadline)
        return count

    def release(
        self,
        tag: str,
        *,
        most: int,
        pace: float,
        ramp: float,
        lease: float,
        now: float | None = None,
        law: PacingLaw | None = None,
        paced: int | None = None,
    ) -> Claimed:
        claimed: Claimed = self._reporting(
            "release", tag, most=most, pace=pace, ramp=ramp, lease=lease, now=now, law=law, paced=paced
        )
        return claimed

    def done(self, tag: str, entries: list[str]) -> None:
        self._reporting("done", tag, entries)

    def purge(self, tag: str) -> int:
        discarded: int = self._reporting("purge", tag)
        return discarded

    def tags(self) -> list[str]:
        tags: list[str] = self._reporting("tags")
        return tags

    def index_size(self) -> int:
        size: int = self._reporting("index_size")
        return size

    def count(self, tag: str) -> tuple[int, int]:
        counts: tuple[int, int] = self._reporting("count", tag)
        return counts

    def counts(self, tags: list[str]) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = self._reporting("counts", tags)
        return found

    def epoch(self) -> str | None:
        found: str | None = self._reporting("epoch")
        return found

    def forget(self, tag: str) -> None:
        self._reporting("forget", tag)

    def lives(self, tags: list[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = self._reporting("lives", tags)
        return found

    def eviction(self) -> EvictionCheck:
        found: EvictionCheck = self._reporting("eviction")
        return found

    def lookout(self, holder: str, lease: float, *, take_free: bool = True) -> bool | None:
        held: bool | None = self._reporting("lookout", holder, lease, take_free=take_free)
        return held

    def stand_down(self, holder: str, lease: float) -> None:
        self._reporting("stand_down", holder, lease)

    def watch(self, watcher: Callable[[str], object]) -> Callable[[], None] | None:
        return self._parking.watch(watcher)

    def hearing(self) -> int | None:
        return self._parking.hearing()

    def release_paces(self, tags: list[str], now: float | None = None) -> dict[str, ReleasePace]:
        found: dict[str, ReleasePace] = self._reporting("release_paces", tags, now)
        return found


_FALLBACKS: dict[tuple[int, str], FallbackStore] = {}
_FALLBACKS_LOCK = threading.Lock()
_STORES: weakref.WeakSet[FallbackStore] = weakref.WeakSet()


def with_fallback(store: Store, mode: str) -> Store:
    """``store`` itself when only this process uses it (it cannot become unreachable),
    else the process's ``FallbackStore`` for it and ``mode`` (``breaker_on_storage_error``)."""
    if not store.shared or isinstance(store, FallbackStore):
        return store
    ident = (id(store), mode)
    found = _FALLBACKS.get(ident)
    if found is None or found.primary is not store:
        with _FALLBACKS_LOCK:
            found = _FALLBACKS[ident] = FallbackStore(store, mode)
    return found


def _reinit_locks_after_fork() -> None:
    # A lock held by another thread at fork time would stay held forever in the child:
    # ``_cells_lock`` is held while a new breaker's cell first asks the shared store (a
    # round trip, as long as the store's timeouts while it does not answer), and a
    # prefork worker's main process makes cells in its releaser thread while it forks
    # pool children. The child's first new breaker on that store then waited forever.
    # A stand-in's lock, held for each of its steps (the releaser's calls while the
    # store is down), hung the child's next call on that breaker the same way.
    for store in list(_STORES):
        store._lock = threading.Lock()
        store._cells_lock = threading.Lock()
        for cell in list(store._cells.values()):
            local = cell._local
            if local is not None:
                local.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)


def forced_why(cell: Cell) -> str:
    """Why ``cell`` rejects every call when no operator forced it open: its shared store
    is down and ``breaker_on_storage_error`` is ``deny`` (``''`` for any other cell)."""
    return cell.denying if type(cell) is FallbackCell else ""
