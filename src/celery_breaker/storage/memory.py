"""The in-memory store (``memory://``): one process, a lock per breaker, bounded however many keys appear."""

from __future__ import annotations

import os
import threading
import weakref
from urllib.parse import parse_qs, urlsplit

from ..clock import Clock
from ..core import BreakerMachine, BreakerPolicy, BreakerSnapshot, Outcome, State, Ticket
from ..core.policy import LONGEST_SECONDS
from ..errors import CircuitOpenError, ConfigurationError
from .contract import NO_MOVES, History, Moves, Parking, Selected
from .registry import register_scheme, remember
from .urls import describe_url

__all__ = ["DEFAULT_IDLE_TTL", "DEFAULT_MAX_BREAKERS", "MemoryCell", "MemoryStore"]

DEFAULT_MAX_BREAKERS = 10_000
DEFAULT_IDLE_TTL = 3600.0
#: Share of ``max_breakers`` kept after an eviction sweep, so sweeps are rare
#: (one per ``max_breakers / 2`` new breakers) and their cost amortises to O(log n).
_KEEP_AFTER_SWEEP = 0.5

CLOSED, OPEN, FORCED_OPEN = State.CLOSED, State.OPEN, State.FORCED_OPEN
_OPERATOR_STATES = (State.FORCED_OPEN, State.DISABLED)
_PASSING = (State.CLOSED, State.DISABLED)
#: A generation no cell ever has: an outcome with it is counted, and judged by no rule.
_STALE = -1
SUCCESS = Outcome.SUCCESS


class MemoryCell(BreakerMachine):
    """A ``BreakerMachine`` behind its own lock. The lock guards state, never the user's call."""

    __slots__ = ("lock", "evicted", "home")

    def __init__(self, name: str, key: str | None, policy: BreakerPolicy, now: float) -> None:
        super().__init__(name, key, policy, now)
        self.lock = threading.Lock()
        self.evicted = False
        #: The store whose sweep dropped this cell (``None`` while it is kept, or when it
        #: was deleted or cleared): an outcome of a call it admitted goes there (``_onward``).
        self.home: MemoryStore | None = None

    def stale(self) -> None:
        """Nothing to forget: the view is the breaker itself."""

    def take_view(self, state: State, open_until: float | None, now: float) -> None:
        """Start where a shared breaker was last seen (a stand-in: ``FallbackCell``), with no
        transition told and no trip counted: the state is the shared breaker's, which this
        process has told already. FORCED_OPEN and DISABLED as they are; OPEN until
        ``open_until`` (over already: half-opens at the next call); HALF_OPEN, whose probes
        are other processes', as an OPEN whose time is up; CLOSED as made."""
        with self.lock:
            if state is State.FORCED_OPEN or state is State.DISABLED:
                self.operate(state, now)
            elif state is State.OPEN or state is State.HALF_OPEN:
                until = now if open_until is None or state is State.HALF_OPEN else open_until
                self._move(State.OPEN, now, "the shared breaker's, as last seen", max(0.0, until - now))
                self.trips, self.streak = 0, 1
            self.moves.clear()

    def note_rejection(self, now: float) -> None:
        next(self.rejection_tally)
        self.last_used = now

    def acquire(self, policy: BreakerPolicy, now: float, lease_for: float | None = None) -> tuple[Ticket, Moves]:
        with self.lock:
            try:
                return self.admit(policy, now, lease_for), self.take_moves()
            except CircuitOpenError:
                self.moves.clear()  # (a rejection moves nothing)
                raise

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
        with self.lock:
            home = self.home
            if home is None or outcome is Outcome.IGNORED:
                self.record(ticket, outcome, duration, policy, now, open_for, refused)
                return self.take_moves()
            # (a probe's outcome too: recorded on the dropped cell, it announced a move of a
            # breaker nobody holds, and the live one never heard of the failure)
            current = type(ticket) is int and self._passed(ticket)
        live, onward = _onward(home, self, current, now)
        return live.finish(onward, outcome, duration, policy, now, open_for=open_for, refused=refused)

    def _passed(self, ticket: int) -> bool:
        """Whether ``ticket`` was admitted by this cell's current CLOSED (or DISABLED) state."""
        return ticket == self.generation and self.state in _PASSING

    def finish_refusal(
        self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float, open_for: float | None
    ) -> tuple[bool, Moves]:
        # Nothing is parked in memory, so nothing is ever being released: the failure it is.
        return False, self.finish(ticket, Outcome.FAILURE, duration, policy, now, open_for=open_for)

    def record_success(self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float) -> Moves:
        if self.quiet_success and ticket == self.generation:
            # The common case needs no lock: when no rule minds a success (no rate window,
            # no run of consecutive failures), a success in CLOSED moves nothing, and the
            # tally's next() is atomic. Should another thread trip the breaker (or start a
            # run) meanwhile, this success still belongs to the generation it ran in, and
            # counts as if it had finished first, which is all the metrics claim.
            next(self.success_tally)
            self.last_success = self.last_used = now
            return NO_MOVES
        count = self.unlocked_success
        if count is not None and ticket == self.generation:
            # CLOSED, and only a rate window minds a success: a fast one is counted in
            # its newest bucket without the lock (False: the window must move first).
            # A trip meanwhile clears the window, and the success goes with it.
            slow_limit = self.policy.slow_call_duration
            if (slow_limit is None or duration < slow_limit) and count(now):
                next(self.success_tally)
                self.last_success = self.last_used = now
                return NO_MOVES
        with self.lock:
            home = self.home
            if home is not None and type(ticket) is int:
                current = self._passed(ticket)
            else:
                if self.state is CLOSED and ticket == self.generation:
                    slow_limit = self.policy.slow_call_duration
                    if slow_limit is None or duration < slow_limit:
                        # A fast success trips no rule: count it in each, no trip to evaluate.
                        next(self.success_tally)
                        self.last_success = self.last_used = now
                        self.observe_success(now)
                        return NO_MOVES
                self.record(ticket, SUCCESS, duration, policy, now)
                return self.take_moves()
        live, ticket = _onward(home, self, current, now)
        return live.record_success(ticket, duration, policy, now)

    def force(self, target: State, policy: BreakerPolicy, now: float) -> Moves:
        with self.lock:
            self.operate(target, now)
            return self.take_moves()

    def reset(self, policy: BreakerPolicy, now: float) -> Moves:
        with self.lock:
            self.renew(policy, now)
            return self.take_moves()

    def note_deferral(self) -> None:
        with self.lock:
            self.deferrals += 1

    def snapshot(self, now: float) -> BreakerSnapshot:
        with self.lock:
            return super().snapshot(now)


def _at_rest(cell: MemoryCell, now: float) -> bool:
    # Reading a window moves it forward: do it under the cell's lock, and count a cell
    # that is busy right now as in use rather than wait for it.
    if not cell.lock.acquire(blocking=False):
        return False
    try:
        return cell.is_at_rest(now)
    finally:
        cell.lock.release()


def _evict(cell: MemoryCell, store: MemoryStore) -> bool:
    # Under the cell's lock, so an operator's move made since the ranking is seen and
    # kept; a cell busy right now is in use, and kept too.
    if not cell.lock.acquire(blocking=False):
        return False
    try:
        if cell.state in _OPERATOR_STATES:
            return False
        cell.evicted = True
        cell.passing = False
        # A call it admitted may still be running (nothing counts calls in flight, and
        # the ranking sees only ended ones): its outcome goes to the breaker's live cell
        # (``_onward``), through the locked paths, which look for ``home``.
        cell.home = store
        cell.quiet_success = False
        cell.unlocked_success = None
        return True
    finally:
        cell.lock.release()


def _onward(home: MemoryStore, cell: MemoryCell, current: bool, now: float) -> tuple[MemoryCell, int]:
    """Where the outcome of a call ``cell`` admitted goes after a sweep dropped ``cell``:
    the breaker's live cell (made again if need be), with a ticket of its current
    generation if the call was admitted by ``cell``'s current CLOSED state and the live
    one passes calls too (it counts there as a call that just ended, as on Redis, whose
    keys outlive a process's view), else a stale one (counted, judged by no rule).
    Before, it landed on the dropped cell: a failure then tripped nobody's breaker (a
    transition was announced all the same), and was lost."""
    live = home.revive(cell, now)
    return live, live.generation if current and live.passing else _STALE


_STORES: weakref.WeakSet[MemoryStore] = weakref.WeakSet()


class MemoryStore:
    """Breakers of one process, in a dict bounded by ``max_breakers``.

    When a new breaker would exceed the bound, a sweep drops the least useful half:
    first breakers idle for ``idle_ttl`` seconds (an OPEN one counts as used until its
    open period ends), then those "at rest" (CLOSED with
    no failure in their window: forgetting them changes no decision), least recently
    used first, then others. Breakers an operator forced open or disabled are never
    dropped: an operator's state is left only by an operator, so they may take the
    store past ``max_breakers``. ``idle_ttl`` only ranks breakers during a sweep; it
    does not expire them on its own.
    A dropped cell is flagged ``evicted`` so any holder asks the store again instead of
    keeping a private copy; a call it admitted that ends after the sweep is recorded on
    the breaker's live cell (``revive``), as it would be on Redis.
    """

    shared = False
    """Every process has its own memory store: breakers are not shared."""
    parking: Parking | None = None
    """Parked tasks must outlive the process: a memory store keeps none."""
    history: History | None = None
    down = False
    """A memory store is always there."""

    def __init__(
        self,
        url: str = "memory://",
        *,
        max_breakers: int = DEFAULT_MAX_BREAKERS,
        idle_ttl: float = DEFAULT_IDLE_TTL,
    ) -> None:
        if isinstance(max_breakers, bool) or not isinstance(max_breakers, int) or max_breakers < 1:
            raise ConfigurationError(f"memory store: max_breakers must be a whole number >= 1, got {max_breakers!r}")
        if isinstance(idle_ttl, bool) or not isinstance(idle_ttl, (int, float)) or not 0 < idle_ttl <= LONGEST_SECONDS:
            raise ConfigurationError(
                f"memory store: idle_ttl must be seconds > 0, at most {LONGEST_SECONDS:.0f} (ten years), "
                f"got {idle_ttl!r:.100}"
            )
        self.url = url
        self.max_breakers = max_breakers
        self.idle_ttl = float(idle_ttl)
        self._cells: dict[tuple[str, str | None], MemoryCell] = {}
        #: The size that triggers the next sweep: ``max_breakers``, or more while kept
        #: operator states fill the store, so sweeps stay as rare as without them.
        self._sweep_at = max_breakers
        self._lock = threading.Lock()
        _STORES.add(self)
        remember(self)

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """``memory://[name][?max_breakers=N&idle_ttl=SECONDS]``; the name separates stores."""
        query = parse_qs(urlsplit(url).query, keep_blank_values=True)
        options: dict[str, float] = {}
        shown = describe_url(url)  # (an unknown option may be a password=: its value is masked)
        for field, value in query.items():
            if field not in ("max_breakers", "idle_ttl"):
                raise ConfigurationError(
                    f"memory store URL {shown!r}: unknown option {field!r}; allowed: max_breakers, idle_ttl"
                )
            try:
                options[field] = int(value[-1]) if field == "max_breakers" else float(value[-1])
            except ValueError:
                kind = "a whole number" if field == "max_breakers" else "a number of seconds"
                raise ConfigurationError(f"memory store URL {shown!r}: {field}={value[-1]!r} is not {kind}") from None
        return cls(url, **options)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._cells)

    def cell(self, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> MemoryCell:
        ident = (name, key)
        found = self._cells.get(ident)
        if found is not None:
            return found
        now = clock.monotonic()
        return self._found_or_made(ident, policy, now, clock.time() - now)

    def revive(self, cell: MemoryCell, now: float) -> MemoryCell:
        """The live cell of ``cell``'s breaker (``cell`` was dropped by a sweep), made
        again with its policy if no call has made it since."""
        return self._found_or_made((cell.name, cell.key), cell.policy, now, cell.wall_offset)

    def _found_or_made(
        self, ident: tuple[str, str | None], policy: BreakerPolicy, now: float, wall_offset: float
    ) -> MemoryCell:
        found = self._cells.get(ident)
        if found is not None:
            return found
        with self._lock:
            found = self._cells.get(ident)
            if found is None:
                found = self._make(ident, policy, now, wall_offset)
            return found

    def _make(self, ident: tuple[str, str | None], policy: BreakerPolicy, now: float, wall_offset: float) -> MemoryCell:
        # (Under the store's lock.)
        if len(self._cells) >= self._sweep_at:
            self._sweep(now)
        found = MemoryCell(ident[0], ident[1], policy, now)
        found.wall_offset = wall_offset
        self._cells[ident] = found
        return found

    def _sweep(self, now: float) -> None:
        keep = int(self.max_breakers * _KEEP_AFTER_SWEEP)
        cells = self._cells
        idle_before = now - self.idle_ttl

        def rank(cell: MemoryCell) -> tuple[bool, bool, float]:
            # An OPEN breaker counts as used until its open period ends, as its Redis keys
            # live the idle TTL past that end (common.lua save): idle while open is not idle.
            used = cell.last_used
            if cell.state is State.OPEN and cell.open_until is not None:
                used = max(used, cell.open_until)
            return (used > idle_before, not _at_rest(cell, now), used)

        # An operator's state is never forgotten: only the others are candidates.
        candidates = [(ident, cell) for ident, cell in cells.items() if cell.state not in _OPERATOR_STATES]
        candidates.sort(key=lambda item: rank(item[1]))
        for ident, cell in candidates[: max(0, len(cells) - keep)]:
            if _evict(cell, self):
                del cells[ident]
        self._sweep_at = max(self.max_breakers, len(cells) + self.max_breakers - keep)

    def delete(self, name: str, key: str | None) -> bool:
        """Forget breaker ``name``/``key``; a breaker object holding it asks for a new one
        (CLOSED, counters zeroed) on its next call. True when it existed."""
        with self._lock:
            cell = self._cells.pop((name, key), None)
        if cell is None:
            return False
        cell.evicted = True
        cell.passing = False
        return True

    def sync(self, timeout: float = 5.0) -> bool:
        """Nothing to wait for: every breaker of this store lives in this process."""
        return True

    def flush(self) -> None:
        """Nothing to send: every count is kept in the breakers themselves."""

    def close(self) -> None:
        """Nothing to let go of."""

    def snapshots(self, clock: Clock, where: Selected | None = None) -> list[BreakerSnapshot]:
        now = clock.monotonic()
        with self._lock:
            cells = list(self._cells.items())
        return [cell.snapshot(now) for ident, cell in cells if where is None or where(*ident)]

    def find(self, name: str, key: str | None, clock: Clock) -> BreakerSnapshot | None:
        """Breaker ``name``/``key`` as ``snapshots`` would list it, or ``None``."""
        cell = self._cells.get((name, key))
        return None if cell is None else cell.snapshot(clock.monotonic())

    def clear(self) -> None:
        """Forget every breaker (for tests)."""
        with self._lock:
            for cell in self._cells.values():
                cell.evicted = True
                cell.passing = False
            self._cells.clear()
            self._sweep_at = self.max_breakers

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r}, breakers={len(self._cells)})"


def _reinit_locks_after_fork() -> None:
    # A lock held by another thread at fork time would stay held forever in the child.
    for store in list(_STORES):
        store._lock = threading.Lock()
        for cell in store._cells.values():
            cell.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)


register_scheme("memory", shared=False)(MemoryStore.from_url)
