"""One breaker in Redis, seen through a local view that every script reply refreshes."""

from __future__ import annotations

import contextlib
import itertools
import logging
import shlex
import threading
import time
from typing import TYPE_CHECKING, NamedTuple

from ...clock import Clock
from ...core import BreakerPolicy, BreakerSnapshot, Outcome, Probe, State, Ticket, Transition
from ...core.chance import CHANCE
from ...core.counters import tally
from ...core.policy import LONGEST_SECONDS
from ...errors import CircuitOpenError, ConfigurationError, StorageError
from ...labels import breaker_label, shown_label
from ..contract import NO_MOVES, Moves
from ..masking import masked_in_text
from .damage import CLOCK_SLACK, RESET, repair_for
from .parking import PARKING_SUFFIXES
from .replies import Reply, decode_reply, decode_snapshot, opt_float, policy_from_text, policy_text

if TYPE_CHECKING:
    from .store import RedisStore

__all__ = ["GONE", "VIEW_TTL", "Orphan", "RedisCell"]

logger = logging.getLogger("celery_breaker")

_REJECTING = (State.OPEN, State.FORCED_OPEN)
_PASSING = (State.CLOSED, State.DISABLED)
#: Real seconds a local OPEN or FORCED_OPEN view may reject calls before it is read
#: again while this process hears no transitions (its subscription is down), so an
#: operator's close or reset in another process still reaches it.
VIEW_TTL = 1.0
#: A flush's verdict when it found no breaker and made none (``common.lua``): its view is
#: the one a delete publishes, incarnation ``"0"`` (``forget.lua``).
GONE = "gone"
#: The incarnation of the view a delete publishes (``forget.lua``): no breaker has it.
DELETED = "0"
#: An operator's states, whose keys never expire, and the ``celery breaker`` move that sets each.
_HELD = {State.FORCED_OPEN: "open", State.DISABLED: "disable"}
#: record.lua's verdict when it counted a fresh call's 429 as a refusal (``finish_refusal``).
REFUSED = "refused"


class Counted(NamedTuple):
    """The view counts waiting to be sent were counted under, at the earliest (common.lua
    ARGV[3]): Redis drops those from before a reset or of another incarnation."""

    incarnation: str
    """``""``: none that can be told (nothing read yet, or so long ago that the breaker
    may have expired since: the counts are then the breaker's that is there now)."""
    generation: int
    stale: int | None
    """The oldest generation a stale success was admitted in (``None``: none, or unknown)."""

    def text(self) -> str:
        return f"{self.incarnation};{self.generation};{'' if self.stale is None else self.stale}"


#: Counts of no known view: Redis takes them as they are.
UNTOLD = Counted("", 0, None)


class Orphan(NamedTuple):
    """What a cell dropped with its last breaker object had counted and not sent."""

    name: str
    key: str | None
    policy: BreakerPolicy
    clock: Clock
    counts: tuple[int, int, int, int]
    counted: Counted


class RedisCell:
    """One breaker in Redis, seen through a local view.

    The view is refreshed by every script reply and, between them, by the transitions
    every process publishes (``RedisStore`` subscribes once per process). While this
    process's subscription is live, a CLOSED or DISABLED view is ``passing``: calls are
    admitted without asking Redis, and their successes are counted locally and sent with
    the next script call or by the store's flusher (every ``FLUSH_INTERVAL``). Failures,
    probes and everything else are one synchronous script call each. Rejections from an
    OPEN or FORCED_OPEN view, or from a HALF_OPEN view whose probe slots were all taken,
    cost nothing; they are counted locally too.
    """

    __slots__ = (
        "name", "key", "policy", "state", "generation", "open_until", "passing", "last_used",
        "_rejections", "state_key", "_store", "_clock", "_keys", "_key_arg", "_policy_text",
        "_offset", "_rj_flushed", "_ok_tally", "_ok_flushed", "_ok_gen", "_stale_ok", "_df_tally",
        "_df_flushed", "_counted", "_incarnation", "_gone_held", "_full_until", "_slow", "_seen",
        "_dropped", "_lock", "_sending", "flush_failed",
        "__weakref__",
    )  # fmt: skip

    # Every call is timed (its duration goes to Redis with a slow call), and every
    # success goes through record_success, which batches it.
    timed = True
    quiet_success = False

    def __init__(self, store: RedisStore, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> None:
        self.name = name
        self.key = key
        self.policy = policy
        self.state = State.CLOSED
        self.generation = 0
        self.open_until: float | None = None
        self.passing = False
        self.flush_failed = False  # (its last flush could not reach Redis: RedisStore.flush)
        self.last_used = clock.monotonic()
        self._rejections = itertools.count()  # counted locally, sent with the next script call
        self._store = store
        self._clock = clock
        self._keys = store.keys_for(name, key)
        self.state_key = self._keys[0]
        self._key_arg = "-" if key is None else "+" + key
        self._policy_text = policy_text(policy)
        # Script times are Redis TIME (epoch seconds) unless the test seam is on, when
        # they are the caller's monotonic clock and need its offset to read as epoch.
        self._offset = clock.time() - self.last_used if store.client_time else 0.0
        # Counted locally, sent with the next script call: rejections, deferrals, and
        # successes (those of generation _ok_gen, and stale ones of earlier generations).
        self._rj_flushed = 0
        self._ok_tally = itertools.count()
        self._ok_flushed = 0
        self._ok_gen = 0
        self._stale_ok = 0
        self._df_tally = itertools.count()
        self._df_flushed = 0
        # The view the counts waiting to be sent were counted under, at the earliest:
        # Redis drops them if a reset or a delete came after it.
        self._counted = UNTOLD
        # A flush and a snapshot never overlap: counts another thread's flush has taken
        # but not yet sent would be in neither Redis nor the snapshot's own pending part.
        self._sending = threading.Lock()
        self._incarnation = ""
        #: The held state a flush found gone (``GONE``), judged lost only by the next read
        #: that makes the breaker again: a delete heard meanwhile (``hear``) was the cause.
        self._gone_held: State | None = None
        self._full_until = 0.0  # HALF_OPEN with every probe slot taken: reject until then
        self._slow = policy.slow_call_duration
        self._seen = time.monotonic()
        self._dropped = False
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``: the breaker as people read it."""
        return breaker_label(self.name, self.key)

    @property
    def evicted(self) -> bool:
        """True when the holder must ask the store again: dropped, or a rejecting view
        older than ``VIEW_TTL`` while no transitions are heard."""
        return self._dropped or (
            self.state in _REJECTING and not self._store.live and time.monotonic() - self._seen > VIEW_TTL
        )

    @evicted.setter
    def evicted(self, value: bool) -> None:
        self._dropped = value

    def stale(self) -> None:
        self._dropped = True

    # -- what was counted locally --------------------------------------------

    def _take_pending(self) -> tuple[str, Counted, tuple[int, int, int, int]]:
        """The counts to send with a script call, and the view they were counted under
        (common.lua ARGV[3]; both to give back if it fails). What is counted from now on
        is counted under the current view."""
        with self._lock:
            rejections = tally(self._rejections) - self._rj_flushed
            deferrals = tally(self._df_tally) - self._df_flushed
            successes = tally(self._ok_tally) - self._ok_flushed
            stale, self._stale_ok = self._stale_ok, 0
            self._rj_flushed += rejections
            self._df_flushed += deferrals
            self._ok_flushed += successes
            text = f"{rejections};{deferrals};{self._ok_gen};{successes};{stale}"
            counted = self._counted
            if time.monotonic() - self._seen > self._store.sure_life:
                # Nothing read or heard of the breaker for longer than its keys surely live
                # idle (idle_ttl less the tenth a script leaves run down): it may have
                # expired (which nobody hears), and what was counted since (in the second
                # before this send) is the breaker's made again. A delete or a reset is
                # heard: the view is then newer than that.
                counted = UNTOLD
            self._counted = self._view_now()
        return text, counted, (rejections, deferrals, successes, stale)

    def adopt(self, counts: tuple[int, int, int, int], counted: Counted | None = None) -> None:
        """Send ``counts`` (another cell's, as ``_take_pending`` took them) with this
        cell's own; its successes count as stale (their generation is not checked).
        ``counted``: the view they were counted under, which this cell's next send then
        carries (flush it first: its own counts would be sent under that view)."""
        self._give_back(counts, counted)

    def _give_back(self, counts: tuple[int, int, int, int], counted: Counted | None = None) -> None:
        rejections, deferrals, successes, stale = counts
        with self._lock:
            self._rj_flushed -= rejections
            self._df_flushed -= deferrals
            # The generation they were counted under may have moved on: keep them as stale.
            self._stale_ok += successes + stale
            if counted is not None:  # (the earlier view: they are sent under it)
                self._counted = counted

    def _view_now(self) -> Counted:
        """The view what this cell counts from now on is counted under."""
        return Counted(self._incarnation, self.generation, None)

    @property
    def pending(self) -> bool:
        """Whether anything counted locally waits to be sent."""
        return (
            tally(self._ok_tally) != self._ok_flushed
            or self._stale_ok > 0
            or tally(self._rejections) != self._rj_flushed
            or tally(self._df_tally) != self._df_flushed
        )

    def forget_pending(self) -> None:
        """After fork: what was counted so far is the parent's to send."""
        with self._lock:
            self._rj_flushed = tally(self._rejections)
            self._df_flushed = tally(self._df_tally)
            self._ok_flushed = tally(self._ok_tally)
            self._stale_ok = 0
            self._counted = self._view_now()

    # -- one round trip ------------------------------------------------------

    def _call(
        self,
        script: str,
        now: float,
        *args: str,
        policy: str | None = None,
        sending: bool = False,
        extra_keys: list[str] | None = None,
    ) -> tuple[Reply, Moves]:
        """Run ``script`` on this breaker, sending what was counted locally; return its
        reply and the transition it made, after taking the view it answered.

        ``sending``: the call only sends those counts (a flush), and makes no breaker for
        counts Redis drops (``common.lua``): finding none, it answers the view a delete
        publishes (``GONE``), which is taken as if heard.

        A script that fails on the breaker's data (``damage.repair_for``) is run once more,
        checking the key types (after a WRONGTYPE: a key of another type resets the
        breaker) or resetting the breaker (after any other failure its data caused): the
        call goes on, on a fresh breaker, and the reset is logged."""
        store = self._store
        store.ensure_agent()  # (after a fork, the child's own)
        check, failure = "", ""
        while True:
            epoch = store.epoch
            pending, counted_in, counts = self._take_pending()
            # (common.lua ARGV[3])
            view = f";{check or 0};{self._incarnation};{self.generation};{counted_in.text()};{int(sending)}"
            head = [repr(now) if store.client_time else "", store.ttl_ms, pending + view]
            argv = [*head, policy or self._policy_text, self.name, self._key_arg, store.channel, *args]
            try:
                raw = store.run(script, self._keys if extra_keys is None else self._keys + extra_keys, argv)
            except StorageError as exc:
                self._give_back(counts, counted_in)
                level = "" if check else repair_for(exc.__cause__)
                if level:
                    check, failure = level, str(exc.__cause__)
                    continue
                raise
            break
        try:
            reply = decode_reply(raw)
            if reply is None:
                raise ValueError("absent, though asked with a policy")
        except (ValueError, LookupError, TypeError) as exc:
            raise StorageError(f"redis store {store.label}: {script} answered {raw!r}") from exc
        moved = self._apply(reply, now, epoch, failure=failure if check == RESET else "")
        return reply, NO_MOVES if moved is None else (moved,)

    def _apply(self, reply: Reply, now: float, epoch: int, *, failure: str = "") -> Transition | None:
        remaining = reply.remaining
        if reply.warnings:
            found = f"{reply.warnings}: {failure}" if failure else reply.warnings
            logger.warning(
                "breaker %s: reset unreadable state in Redis (%s)", shown_label(self.label), masked_in_text(found),
                extra={"breaker": self.name, "breaker_key": self.key},
            )  # fmt: skip
        if reply.policy:
            self._adopt(reply.policy)
        open_until = None if remaining is None else now + remaining
        lost = self._lost(reply, now)
        # A flush that found no breaker (deleted, or expired) made none: taken as the delete
        # is heard, so the next call asks Redis, which makes it, rather than pass unasked.
        gone = reply.verdict == GONE
        if gone:
            # (Not said yet: another process's delete, published before this flush ran, may
            # not be heard yet, the agent busy. Said by the read that makes it again, unless
            # the delete was heard by then.)
            self._gone_held, lost = lost or self._gone_held, None
        elif self._gone_held is not None:
            lost = lost or self._gone_held
            self._gone_held = None
        self._view(reply.incarnation, reply.generation, reply.state, open_until, epoch, heard=gone)
        if lost is not None:
            label = shown_label(self.label)
            action = _HELD.get(lost)
            logger.warning(
                "breaker %s: its %s state is gone from %s (the store restarted empty, was flushed or evicted it, "
                "a failover lost it, or it was deleted while this process did not hear it); it is %s now%s",
                label, lost.value, self._store.label, reply.state.value,
                f"; if the operator's {lost.value} must hold, set it again: celery breaker {action} "
                f"{shlex.quote(label)}" if action else "; it trips again on the next failures",
                extra={"breaker": self.name, "breaker_key": self.key},
            )  # fmt: skip
        self.last_used = now
        moved = reply.moved
        if moved is None:
            return None
        at = reply.now + self._offset
        target = moved.target
        return Transition(
            name=self.name,
            key=self.key,
            source=moved.source,
            target=target,
            reason=moved.reason,
            generation=moved.generation,
            at=at,
            open_until=at + remaining if target is State.OPEN and remaining is not None else None,
            failures=moved.failures,
            calls=moved.calls,
            trips=moved.trips,
        )

    def _lost(self, reply: Reply, now: float) -> State | None:
        """The state this process last saw, if ``reply`` (another incarnation, in another
        state, no repair) shows the breaker lost it where its keys cannot have expired: an
        operator's state (no TTL), an open period not over (they live past its end)."""
        was = self.state
        if not self._incarnation or reply.incarnation == self._incarnation or reply.state is was or reply.warnings:
            return None
        held = was in _HELD or (was is State.OPEN and self.open_until is not None and now < self.open_until)
        return was if held else None

    def _view(
        self, incarnation: str, generation: int, state: State, open_until: float | None, epoch: int, *, heard: bool
    ) -> None:
        """Take a newer view of the breaker (script replies and transitions may cross)."""
        with self._lock:
            if incarnation == self._incarnation and generation < self.generation:
                return  # older than what this process already knows
            if (heard and incarnation == self._incarnation and generation == self.generation
                    and open_until is not None and self.open_until is not None):  # fmt: skip
                # The same open period (only a move sets its end, and every move is a new
                # generation), heard after a reply had told it: the message's remaining time
                # was converted on hearing, later than the script counted it, so it ends no
                # later than first read (a thread starved of the GIL hears late; a fake
                # clock moved meanwhile, by whole seconds).
                open_until = min(open_until, self.open_until)
            if heard or incarnation != self._incarnation or generation != self.generation:
                self._full_until = 0.0  # (a message in the same generation: a probe slot freed)
                if not self.pending:  # (nothing counted before it waits)
                    self._counted = Counted(incarnation, generation, None)
            self._incarnation = incarnation
            self.generation = generation
            self.open_until = open_until
            self.state = state
            self._seen = time.monotonic()
            passing = state in _PASSING
            if passing and generation != self._ok_gen:
                # Successes counted under the old generation no longer count in the window.
                moved = tally(self._ok_tally) - self._ok_flushed
                if moved:
                    self._stale_ok += moved
                    self._counted = _with_stale(self._counted, self._ok_gen)
                self._ok_flushed += moved
                self._ok_gen = generation
            # Calls pass without asking only while this process hears every transition,
            # and only on a view read since it started hearing them. A transition heard,
            # not read: the next call asks once, for the policy it came with (a reset by
            # another process may have changed the rules this process counts by, its
            # slow-call limit included), which a message does not carry.
            self.passing = passing and not heard and self._store.live and epoch == self._store.epoch

    def hear(self, incarnation: str, generation: int, state: State, remaining: float | None) -> None:
        """A transition another process published (or a probe slot freed). One that no
        script could have sent (an open period longer than the policy allows) is ignored."""
        # (Bounded by what any policy allows, not this process's: another process may have
        # reset the breaker to a policy with longer open periods, which this one learns
        # only at its next script call.)
        if remaining is not None and remaining > LONGEST_SECONDS + CLOCK_SLACK:
            return
        if incarnation == DELETED:
            self._gone_held = None  # (the breaker was deleted: nothing was lost)
        now = self._clock.monotonic()
        open_until = None if remaining is None else now + remaining
        self._view(incarnation, generation, state, open_until, self._store.epoch, heard=True)

    def go_dark(self) -> None:
        """This process stopped hearing transitions: ask Redis again before passing calls."""
        with self._lock:
            self.passing = False

    def _adopt(self, text: str) -> None:
        # Another process created (or reset) this breaker with other rules: they win.
        try:
            self.policy = policy_from_text(text, self.policy)
        except (ConfigurationError, ValueError, LookupError, TypeError):
            logger.warning(
                "breaker %s: stored policy %r is unreadable here; Redis keeps using it", shown_label(self.label), text
            )
            return
        self._policy_text = text
        self._slow = self.policy.slow_call_duration

    # -- the Cell protocol ---------------------------------------------------

    def refresh(self, now: float) -> None:
        """Read the breaker's state (creating it if needed) into the local view, and send
        what was counted locally."""
        self._call("operate", now, "view")

    def note_rejection(self, now: float) -> None:
        next(self._rejections)  # sent with the next script call
        self.last_used = now

    def acquire(self, policy: BreakerPolicy, now: float, lease_for: float | None = None) -> tuple[Ticket, Moves]:
        if self.state is State.HALF_OPEN and now < self._full_until:
            # Every probe slot was taken when last asked, and no slot has freed since
            # (that would have been published): reject without asking.
            next(self._rejections)
            raise CircuitOpenError.rejected(self.name, self.key, State.HALF_OPEN, self._full_until - now)
        reply, moves = self._call("acquire", now, "" if lease_for is None else repr(lease_for))
        verdict = reply.verdict
        try:
            lease = int(reply.value) if verdict == "probe" else -1
            retry_after = opt_float(reply.value) if verdict == "reject" else None
        except ValueError as exc:
            raise StorageError(f"redis store {self._store.label}: acquire answered {reply!r}") from exc
        if verdict == "probe":
            # The lease names its incarnation: record.lua judges it only in that one.
            return Probe(reply.generation, lease, False, reply.incarnation), moves
        if verdict == "reject":
            state = reply.state
            if state is State.HALF_OPEN and retry_after is not None:
                self._full_until = now + retry_after
            raise CircuitOpenError.rejected(self.name, self.key, state, retry_after)
        return reply.generation, moves

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
        return self._record(ticket, outcome, duration, now, open_for, "1" if refused else "")[1]

    def finish_refusal(
        self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float, open_for: float | None
    ) -> tuple[bool, Moves]:
        # record.lua decides from the breaker's parked queue and claims (its own slot):
        # they go as KEYS only here, so no other call names them. Its reply says which it was.
        if isinstance(ticket, Probe):
            return False, self.finish(ticket, Outcome.FAILURE, duration, policy, now, open_for=open_for)
        tag = self._store.parking.tag(self.name, self.key)
        parked = [tag + PARKING_SUFFIXES[0], tag + PARKING_SUFFIXES[2]]  # (the queue and the claims)
        reply, moves = self._record(ticket, Outcome.FAILURE, duration, now, open_for, "2", parked)
        return reply.verdict == REFUSED, moves

    def _record(
        self, ticket: Ticket, outcome: Outcome, duration: float, now: float, open_for: float | None, refusal: str,
        extra_keys: list[str] | None = None,
    ) -> tuple[Reply, Moves]:  # fmt: skip
        """One ``record.lua`` call for ``ticket``'s outcome; ``refusal`` is its ARGV[15]
        (``'1'`` a released task's 429, ``'2'`` another call's, ``''`` neither)."""
        if isinstance(ticket, Probe):
            generation, lease, check = ticket.generation, ticket.lease, "1" if ticket.check else ""
            incarnation = ticket.incarnation
            # Its slot is free again once recorded (whatever the outcome): this process
            # must not keep refusing on "every slot taken" until its own message comes back.
            self._full_until = 0.0
        else:
            generation, lease, check, incarnation = ticket, -1, "", ""
        hint = "" if open_for is None else repr(float(open_for))
        # The jitter's draw comes from here: a script's math.random repeats itself.
        return self._call(
            "record", now, str(generation), str(lease), str(int(outcome)), repr(float(duration)), hint,
            repr(CHANCE.random()), check, refusal, incarnation, extra_keys=extra_keys,
        )  # fmt: skip

    def record_success(self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float) -> Moves:
        # The hot path: a success admitted without a probe is counted here and sent later
        # (it moves nothing). Probes and slow calls (which can trip) are sent now.
        if ticket.__class__ is int and (self._slow is None or duration < self._slow):
            self.last_used = now
            if ticket == self._ok_gen:
                next(self._ok_tally)
                return NO_MOVES
            with self._lock:
                self._stale_ok += 1
                self._counted = _with_stale(self._counted, ticket)  # (admitted before a reset: dropped)
            return NO_MOVES
        return self.finish(ticket, Outcome.SUCCESS, duration, policy, now)

    def force(self, target: State, policy: BreakerPolicy, now: float) -> Moves:
        return self._call("operate", now, "force", target.value)[1]

    def reset(self, policy: BreakerPolicy, now: float) -> Moves:
        text = policy_text(policy)
        moves = self._call("operate", now, "reset", policy=text)[1]
        self.policy, self._policy_text, self._slow = policy, text, policy.slow_call_duration
        return moves

    def note_deferral(self) -> None:
        next(self._df_tally)  # sent with the next script call or flush

    def flush(self) -> None:
        """Send what was counted locally (the store's flusher calls this), and read the
        view; a breaker that is gone is made again only for counts it is owed (counted
        since it was deleted or may have expired), not for those it drops. If its node
        cannot be reached, the view stops passing calls: the next one asks Redis, and
        meets ``breaker_on_storage_error``. On a Cluster with one node down, nothing else
        would tell it: the agent's subscription lives on another node, and stays up."""
        with self._sending:
            try:
                self._call("operate", self._clock.monotonic(), "view", sending=True)
            except StorageError:
                self.flush_failed = True
                self.go_dark()
                raise
            self.flush_failed = False

    def __del__(self) -> None:
        # The last breaker object using this cell is gone, with counts not yet sent
        # (successes, rejections, deferrals: the flusher sends them every second). Hand
        # them to the store, whose next flush sends them through the breaker's cell then.
        with contextlib.suppress(Exception):  # (at interpreter exit, what it refers to may be gone)
            if self.pending:  # (a fork leaves none: the parent sends what it counted)
                _, counted, counts = self._take_pending()
                self._store.orphans.append(Orphan(self.name, self.key, self.policy, self._clock, counts, counted))

    def wait_sent(self) -> None:
        """Return once a flush in flight on another thread (its counts taken, not yet in
        Redis) has finished."""
        with self._sending:
            pass

    def snapshot(self, now: float) -> BreakerSnapshot:
        with self._sending:
            return decode_snapshot(self._call("snapshot", now)[0], self._offset)

    def __repr__(self) -> str:
        return f"<RedisCell {self.label!r} {self.state.value} generation {self.generation}>"


def _with_stale(counted: Counted, generation: int) -> Counted:
    """``counted`` with a stale success admitted in ``generation``: the oldest is kept.
    (A negative generation is a stand-in's, of no reset: ``fallback._STALE``.)"""
    if generation < 0 or (counted.stale is not None and counted.stale <= generation):
        return counted
    return counted._replace(stale=generation)
