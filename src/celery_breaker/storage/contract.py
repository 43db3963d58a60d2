"""The contract every breaker store keeps: intention-level atomic operations and declared capabilities.

A store holds breakers (``Store.cell``); a cell is one breaker, whose every operation is
one atomic step across all the processes sharing the store. Callers never read a store's
internals: what a store can do beyond holding breakers it declares (``shared``,
``parking``, ``history``), and every operation that changes a breaker returns the
transitions it made, for the caller to announce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..clock import Clock
from ..core import BreakerPolicy, BreakerSnapshot, Outcome, State, Ticket, Transition
from ..core.pacing import PacingLaw
from ..labels import breaker_label

__all__ = [
    "KEPT_LIFE",
    "NO_MOVES",
    "Cell",
    "Claimed",
    "EvictionCheck",
    "History",
    "Listing",
    "Moves",
    "Parking",
    "ReleasePace",
    "Selected",
    "Store",
    "UnreadableBreaker",
]

#: The end of a parking life written while the breaker still held entries (``Parking.lives``).
KEPT_LIFE = ":kept"

#: Which breakers a listing wants, by name and key (``Store.snapshots``'s ``where``).
Selected = Callable[[str, str | None], bool]

#: The transitions one operation made, oldest first (usually none).
Moves = tuple[Transition, ...]
NO_MOVES: Moves = ()


class Cell(Protocol):
    """One breaker inside a store, seen through a local view that its operations refresh.

    The view (``passing``, ``generation``, ``state``, ``evicted``) is read without I/O on
    every call; each method that changes the breaker is one atomic step across every
    process that shares the store.
    """

    @property
    def state(self) -> State:
        """The breaker's state as last seen by this process."""
        ...

    @property
    def policy(self) -> BreakerPolicy:
        """The policy the breaker was created with (``reset`` replaces it)."""
        ...

    @property
    def generation(self) -> int:
        """Increments on every transition; tickets carry it so stale outcomes are fenced."""
        ...

    @property
    def passing(self) -> bool:
        """True while calls pass without asking the store (CLOSED or DISABLED, view fresh):
        callers then admit with ``generation`` as the ticket and skip ``acquire``."""
        ...

    @property
    def evicted(self) -> bool:
        """True when the holder must ask the store for the cell again (``Store.cell``)."""
        ...

    @property
    def timed(self) -> bool:
        """True when the breaker's policy looks at how long calls take (a slow-call rule):
        callers then time every call. False: no duration is ever looked at, and a caller
        may skip the clock reading that starts one (passing ``0.0`` as its duration)."""
        ...

    @property
    def quiet_success(self) -> bool:
        """True while a success in the current generation moves nothing and needs no
        lock (the memory store, CLOSED, no rule minding successes): a caller may then
        record it in its own frame, as the memory cell's ``record_success`` would, by
        ``next(cell.success_tally)`` and ``cell.last_success = cell.last_used = now``
        (what ``with`` blocks do: docs/decisions.md, 56). A cell without those fields
        keeps it False."""
        ...

    def stale(self) -> None:
        """Forget the local view: the holder asks the store again (``evicted`` turns True)
        and ``Store.cell`` reads the breaker before the next call."""
        ...

    @property
    def open_until(self) -> float | None:
        """While OPEN: when (on the caller's monotonic clock) a probe may be admitted.
        With ``state``, what lets a caller reject a call from the view, without the store."""
        ...

    def note_rejection(self, now: float) -> None:
        """Count a call the caller rejected from the view (the store learns it later)."""
        ...

    def acquire(self, policy: BreakerPolicy, now: float, lease_for: float | None = None) -> tuple[Ticket, Moves]:
        """Admit a call (its ticket, and the transition admitting it made: an OPEN
        breaker whose time is up half-opens) or raise ``CircuitOpenError``. ``lease_for``:
        seconds a probe slot won is held at most, if shorter than the policy's
        ``half_open_max_wait`` (a health check's: its timeout and a margin)."""
        ...

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
        """Record a call's outcome and apply any transition it causes. ``open_for`` (a
        failure's Retry-After, seconds) opens a CLOSED or HALF_OPEN breaker at once for
        that long, capped by the policy's ``max_reset_timeout``. ``refused``: the failure
        is the downstream refusing (429) a task released from the parking; a CLOSED
        breaker counts it as a failure and nothing more, and the store's adaptive release
        slows down and waits ``open_for`` (``BreakerMachine.record``)."""
        ...

    def record_success(self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float) -> Moves:
        """``finish`` for a success: the hot path, kept separate so stores can make it cheap."""
        ...

    def finish_refusal(
        self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float, open_for: float | None
    ) -> tuple[bool, Moves]:
        """Record a failure that is the downstream refusing (429) a call not released from
        the parking (a fresh task's, any caller's); ``open_for``: its Retry-After, if any.
        While the breaker's release is under way (CLOSED or DISABLED, with tasks parked or
        claimed) it is a refusal, as ``finish(refused=True)`` records one (the release
        waits ``open_for``, ``REFUSAL_WAIT`` without one), and the first item is True: the
        caller's call waits too. Otherwise (nothing being released, a probe, or a store
        that parks nothing) it is the failure it is, as ``finish(open_for=open_for)``
        records it (a Retry-After opens the breaker), and the first item is False."""
        ...

    def force(self, target: State, policy: BreakerPolicy, now: float) -> Moves:
        """Operator move to CLOSED, FORCED_OPEN or DISABLED."""
        ...

    def reset(self, policy: BreakerPolicy, now: float) -> Moves:
        """Forget everything: a fresh CLOSED breaker under ``policy``."""
        ...

    def note_deferral(self) -> None:
        """Count one task deferred because this breaker rejected it."""
        ...

    def snapshot(self, now: float) -> BreakerSnapshot:
        """The breaker as of ``now`` (the caller's monotonic clock): state, window totals and counters."""
        ...


@dataclass(frozen=True, slots=True)
class ReleasePace:
    """Where one breaker's adaptive release stands (``core/pacing.py``), as people see it."""

    generation: int
    """The breaker generation the pace began under (another one: the pace is over)."""
    rate: float
    """Tasks per second the release lets go, as last judged."""
    limit: float | None
    """The pace's limit after the downstream refused a rate (429): that rate, raised by
    ~1 %/s while the pace holds just below it (growth stops at 95 % of it), faster after
    5 s there with no refusal; ``None``: no refusal in this pace, or it was dropped (no
    429 came again)."""
    held_for: float | None
    """Seconds the release still sends nothing, waiting out a refusal's Retry-After;
    ``None``: not waiting."""
    usual_bad_share: float | None = None
    """The share of failed or slow calls (0 to 1) the pace learnt as the downstream's
    usual from its first judgements of good news: bad outcomes up to it (chance allowed)
    do not cut the pace. ``None``: not learnt yet (``core/pacing.py``'s ``USUAL_LEAST``
    outcomes)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EvictionCheck:
    """Whether a store may drop what it holds when it is full (``Parking.eviction``)."""

    risk: str | None = None
    """A sentence naming the servers, the policy, what it may drop and what that does;
    ``None``: nothing is dropped (or the store could not say: ``unknown``)."""
    unknown: str | None = None
    """Why the store could not say (the server refused to tell); ``None``: it could."""
    failover: str | None = None
    """A sentence saying that a failover may drop what was written last, and the fix;
    ``None``: the store has no failover, or its master refuses writes no replica took."""


class Claimed(list[tuple[str, str]]):
    """What ``Parking.release`` claimed: ``(entry, payload)`` pairs, and ``quiet``, the
    seconds in which nothing more can come due for that breaker unless someone moves it
    (an OPEN breaker's time left; a FORCED_OPEN one has none of its own), bounded by the
    next deadline or lease to run out: ``0.0`` when something may come due at any time,
    ``None`` when nothing will by itself. A releaser need not ask again before then."""

    quiet: float | None = 0.0


@dataclass(frozen=True, slots=True)
class UnreadableBreaker:
    """A breaker a listing found but could not read: its stored state holds what no
    script writes (a value out of its bounds, a key of another type: ``docs/redis.md``).
    A listing shows it as it is and changes nothing; the next call through it (a
    worker's) or an operator's move repairs it, as it always did."""

    name: str
    key: str | None
    problem: str
    """What is wrong, as far as the listing read: the key and the value, or Redis's error."""
    stored_state: State | None = None
    """The state its state hash names, when it names one (an operator's ``forced_open``
    is kept by the repair); ``None`` when that too is unreadable."""
    parked: int = 0
    """Deferred tasks waiting in its parking, which is read apart from its state
    (``collect_metrics`` counts them; a store's listing leaves 0)."""
    claimed: int = 0
    """Parked tasks a releaser has claimed and is publishing again (as ``parked``)."""

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``: the breaker as people read it."""
        return breaker_label(self.name, self.key)


_Row = TypeVar("_Row")
_Row2 = TypeVar("_Row2")


class Listing(list[_Row]):
    """What a listing of the store found, and ``unreached``: the servers it could not read
    (a Redis Cluster's primaries that are down while the others answer), whose breakers
    are missing from it. Empty when the listing is whole; a store that cannot be read at
    all raises ``StorageError`` instead."""

    unreached: tuple[str, ...] = ()
    stranded: Selected | None = None
    """Whether breaker ``(name, key)`` is stored on one of ``unreached`` (its absence from
    the listing then says nothing); ``None``: the listing is whole."""
    unreadable: tuple[UnreadableBreaker, ...] = ()
    """The breakers found but not read (not in the rows), sorted by name and key: a listing
    shows them and leaves their keys as they are."""

    def __init__(
        self,
        rows: Iterable[_Row] = (),
        unreached: Iterable[str] = (),
        stranded: Selected | None = None,
        unreadable: Iterable[UnreadableBreaker] = (),
    ) -> None:
        super().__init__(rows)
        self.unreached = tuple(unreached)
        self.stranded = stranded if self.unreached else None
        self.unreadable = tuple(sorted(unreadable, key=lambda found: (found.name, found.key or "")))

    def like(self, rows: Iterable[_Row2], unreadable: Iterable[UnreadableBreaker] | None = None) -> Listing[_Row2]:
        """``rows`` as a listing that left out what this one left out (and found unreadable
        what this one did, unless ``unreadable`` is given: those of them still wanted)."""
        return Listing(rows, self.unreached, self.stranded, self.unreadable if unreadable is None else unreadable)


class Parking(Protocol):
    """Where a store keeps deferred tasks until their breaker lets them run (see
    ``integration/deferral``). Entries are grouped per breaker under a *tag*; every
    method raises ``StorageError`` when the store cannot be reached."""

    def tag(self, name: str, key: str | None) -> str:
        """The tag of breaker ``name``/``key``'s parked entries."""
        ...

    def label(self, tag: str) -> str:
        """The breaker a tag belongs to, as people write it (``crm[tenant-7]``)."""
        ...

    def breaker(self, tag: str) -> tuple[str, str | None] | None:
        """The ``(name, key)`` of the breaker a tag belongs to (``None``: no breaker of this store)."""
        ...

    def park(self, name: str, key: str | None, entry: str, order: float, payload: str, deadline: float | None) -> int:
        """Keep ``payload`` (a task message) until released; return how many are parked."""
        ...

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
        """Claim, under a lease, the ``(entry, payload)`` pairs the breaker lets run now:
        at the fixed ``pace`` (reached after ``ramp``), or at the adaptive pace of ``law``,
        at most ``paced`` of those (``None``: no bound but ``most``; probes and entries
        past their deadline are bounded by ``most`` alone); and say how long nothing more
        can come due (``Claimed.quiet``)."""
        ...

    def done(self, tag: str, entries: list[str]) -> None:
        """Forget claimed entries that were published again. An entry parked again
        under the same id since it was claimed stays parked, with its new message."""
        ...

    def purge(self, tag: str) -> int:
        """Discard the entries parked when the call began; return how many."""
        ...

    def tags(self) -> list[str]:
        """Tags of breakers that may hold parked entries."""
        ...

    def index_size(self) -> int:
        """How many breakers the index behind ``tags`` names, cheaply (listing them may not
        be): a change says the list changed; the same size may hide one added and one dropped."""
        ...

    def count(self, tag: str) -> tuple[int, int]:
        """``(parked, claimed and not yet published)`` entries of one breaker."""
        ...

    def counts(self, tags: list[str]) -> dict[str, tuple[int, int]]:
        """``count`` for many breakers at once."""
        ...

    def epoch(self) -> str | None:
        """What names this parking's life: it changes (or vanishes) when the store loses
        everything parked in it; ``None`` while nothing was parked."""
        ...

    def forget(self, tag: str) -> None:
        """Drop ``tag`` from the index of parked breakers if it holds nothing."""
        ...

    def lives(self, tags: list[str]) -> dict[str, str | None]:
        """What names each breaker's parking life: it changes (or vanishes) when the store
        loses that breaker's parked entries; ``None`` while it has none. A breaker whose
        life cannot be read is left out. A life ending in ``KEPT_LIFE`` was written over
        entries still parked: the one before went alone (deleted, evicted), not them."""
        ...

    def lookout(self, holder: str, lease: float, *, take_free: bool = True) -> bool | None:
        """Take or keep, for ``lease`` seconds, the turn to watch this parking for lost
        tasks (``epoch``, ``counts``, ``lives``): True when ``holder`` has it, False when
        another has it, ``None`` when nobody has it and ``take_free`` is false (only its
        holder keeps it, or takes one given up: ``stand_down``). Of all the processes
        sharing the store, one has it at a time."""
        ...

    def stand_down(self, holder: str, lease: float) -> None:
        """Give up the lookout if ``holder`` has it, so that the next process to ask takes
        it at once, even with ``take_free`` false (for ``lease`` seconds)."""
        ...

    def watch(self, watcher: Callable[[str], object]) -> Callable[[], None] | None:
        """Tell ``watcher`` the tag of each breaker whose transition this process hears from
        now on (quick, never raising: it runs in the store's own thread); return what stops
        it, or ``None`` when the store tells no transitions."""
        ...

    def hearing(self) -> int | None:
        """While this process hears every transition, a number that changes whenever it
        stopped hearing them for a while (some were missed); ``None`` while it does not."""
        ...

    def eviction(self) -> EvictionCheck:
        """Whether the store may evict parked tasks or breakers' state when it is full
        (read once when a worker starts). A store that refuses to say answers ``unknown``."""
        ...

    def release_paces(self, tags: list[str], now: float | None = None) -> dict[str, ReleasePace]:
        """The adaptive release's pace under way for each of ``tags`` that has one (begun
        under its breaker's generation now and in use; one the next ``release`` would
        restart, as damaged, is none); ``now`` as in ``release``."""
        ...


class History(Protocol):
    """Where a store keeps breakers' stored metrics snapshots (``monitoring.history``)."""

    def append(self, name: str, key: str | None, snapshot: str, *, ttl: float, now: float | None = None) -> float:
        """Store ``snapshot`` (a JSON object) in the breaker's history; return its time."""
        ...

    def read(self, name: str, key: str | None, *, since: float | None = None, until: float | None = None) -> list[str]:
        """The breaker's stored snapshots with ``since <= at <= until``, oldest first."""
        ...


class Store(Protocol):
    """Where breakers live. The same (name, key) on the same store is the same breaker."""

    @property
    def url(self) -> str:
        """The URL the store was opened with (may hold a password: show ``describe_url(url)``)."""
        ...

    @property
    def shared(self) -> bool:
        """True when every process opening the same URL sees the same breakers."""
        ...

    @property
    def parking(self) -> Parking | None:
        """Where deferred tasks can wait for their breaker, if this store can keep them."""
        ...

    @property
    def history(self) -> History | None:
        """Where metrics snapshots can be stored, if this store can keep them."""
        ...

    @property
    def down(self) -> bool:
        """True while the store is known to be unreachable (its outage is being handled)."""
        ...

    def cell(self, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> Cell:
        """The cell of breaker ``name``/``key``, created CLOSED on first use."""
        ...

    def snapshots(self, clock: Clock, where: Selected | None = None) -> list[BreakerSnapshot]:
        """Every breaker the store currently holds; ``where``: only those whose
        ``where(name, key)`` is true, told before any is read (a listing of 10,000
        breakers for the one a glob picks read all 10,000). A store whose servers answer
        in part (a Redis Cluster with a primary down) returns a ``Listing`` naming those
        it could not read."""
        ...

    def find(self, name: str, key: str | None, clock: Clock) -> BreakerSnapshot | UnreadableBreaker | None:
        """Breaker ``name``/``key`` as ``snapshots`` would list it, or ``None`` when the
        store does not hold it: one lookup, whatever the number of breakers, creating none.
        A breaker it holds but cannot read is an ``UnreadableBreaker`` (``Listing.unreadable``),
        left as it is."""
        ...

    def delete(self, name: str, key: str | None) -> bool:
        """Delete breaker ``name``/``key`` (state, counters, stored policy and history, not
        its parked tasks): every process's next call through it creates it afresh, CLOSED.
        True when it existed."""
        ...

    def sync(self, timeout: float = 5.0) -> bool:
        """Return once this process's views reflect every transition made (anywhere)
        before the call; False if that could not be established within ``timeout``."""
        ...

    def flush(self) -> None:
        """Send whatever this process counted locally and has not yet stored."""
        ...

    def close(self) -> None:
        """Flush, then let go of connections and threads (a later call reconnects)."""
        ...
