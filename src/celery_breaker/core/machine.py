"""The state machine of one breaker: admission, outcomes, trips and recovery, on an injected time.

A ``BreakerMachine`` is plain data plus rules. It never reads a clock (every method
takes ``now``) and takes no locks: the store that owns it makes each call atomic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NoReturn

from ..errors import CircuitOpenError
from .chance import CHANCE
from .counters import tally
from .policy import BreakerPolicy, Outcome
from .rules import TripRule, rules_for
from .snapshot import BreakerSnapshot, Probe, Transition
from .state import State, check_transition

__all__ = ["BreakerMachine", "Ticket"]

#: What an admitted call carries to its outcome: the generation (an int) for an
#: ordinary call, or a ``Probe`` lease for a HALF_OPEN probe.
Ticket = int | Probe

CLOSED, OPEN, HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN
FORCED_OPEN, DISABLED = State.FORCED_OPEN, State.DISABLED
FAILURE, IGNORED = Outcome.FAILURE, Outcome.IGNORED


class BreakerMachine:
    """One breaker's state. Every method is one atomic step for the store that owns it.

    The policy is the one the breaker was created with (``reset`` replaces it): callers
    pass theirs, but a caller with a different policy cannot make the windows restart.

    Generations fence outcomes: every transition increments ``generation``, and an
    outcome whose ticket carries an older generation is counted in the metrics but
    cannot move the state (gobreaker's rule).
    """

    __slots__ = (
        "name", "key", "policy", "state", "generation", "opened_at", "open_until",
        "rules", "shown", "success_steps", "quiet_varies", "leases", "next_lease", "half_open_successes",
        "success_tally", "failures", "rejection_tally", "deferrals", "trips",
        "last_success", "last_failure", "last_used", "moves", "wall_offset", "passing", "quiet_success",
        "streak", "open_duration", "draw", "reset_generation",
        "unlocked_success", "timed",
    )  # fmt: skip

    def __init__(self, name: str, key: str | None, policy: BreakerPolicy, now: float) -> None:
        self.name = name
        self.key = key
        self.state = CLOSED
        self.passing = True  # calls pass without a decision: CLOSED or DISABLED
        self.quiet_success = True
        self.generation = 0
        self.reset_generation = 0  # (outcomes admitted before it are not counted: record)
        self.opened_at: float | None = None
        self.open_until: float | None = None
        self.streak = 0  # consecutive trips: a failed probe adds one, closing ends it
        self.open_duration: float | None = None  # of the current or latest open period
        self.draw = CHANCE.random  # the jitter's random source (tests may replace it)
        self.leases: dict[int, float] = {}
        self.next_lease = 0
        self.half_open_successes = 0
        # Successes and rejections are the hot-path counters: itertools.count's
        # next() is one atomic C call, so they are exact without taking the lock.
        self.success_tally = itertools.count()
        self.rejection_tally = itertools.count()
        self.failures = self.deferrals = self.trips = 0
        self.last_success: float | None = None
        self.last_failure: float | None = None
        self.last_used = now
        self.moves: list[Transition] = []  # made since the last take_moves()
        self.wall_offset = 0.0  # epoch - monotonic, for the times shown to people
        self._use_policy(policy)

    # -- policy --------------------------------------------------------------

    @property
    def successes(self) -> int:
        """Successes counted since the breaker was made or reset."""
        return tally(self.success_tally)

    @property
    def rejections(self) -> int:
        """Calls rejected since the breaker was made or reset."""
        return tally(self.rejection_tally)

    def _use_policy(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.timed = policy.slow_call_duration is not None  # (else no duration is looked at)
        self.rules: tuple[TripRule, ...] = rules_for(policy)
        # The rule whose counts transitions and snapshots show (see rules_for).
        self.shown: TripRule = self.rules[-1]
        # What a fast success must do: each rule that minds one counts it, and whether
        # one is quiet again is worth asking only of a rule whose quietness varies.
        self.success_steps = tuple(rule.succeed for rule in self.rules if rule.minds_successes)
        self.quiet_varies = any(rule.quiet_varies for rule in self.rules)
        self._update_quiet()

    def _update_quiet(self) -> None:
        # A success changes nothing but counters: CLOSED or DISABLED, and no rule minds one
        # (no rate window, no run of consecutive failures to end). Else, in CLOSED, when
        # the one rule that minds a success can count it without the lock (a rate
        # window), ``unlocked_success`` is how: the memory store's fast path calls it.
        # Not beside a rule whose quietness varies: a failure that starts a run of them
        # must see every success that came before it.
        minding = [rule for rule in self.rules if not rule.quiet] if self.passing else None
        self.quiet_success = minding == []
        unlocked: Callable[[float], bool] | None = None
        if minding is not None and len(minding) == 1 and self.state is CLOSED and not self.quiet_varies:
            unlocked = minding[0].unlocked_success()
        self.unlocked_success = unlocked

    # -- admission -----------------------------------------------------------

    def admit(self, policy: BreakerPolicy, now: float, lease_for: float | None = None) -> Ticket:
        """Admit a call (returning its ticket) or raise ``CircuitOpenError``. ``lease_for``:
        seconds a probe's lease lasts if shorter than ``half_open_max_wait`` (a health
        check's: its timeout and a margin)."""
        self.last_used = now
        state = self.state
        if state is CLOSED or state is DISABLED:
            return self.generation
        if state is OPEN:
            assert self.open_until is not None
            if now < self.open_until:
                return self._reject(self.open_until - now)
            self._move(HALF_OPEN, now)
        elif state is FORCED_OPEN:
            return self._reject(None)
        return self._admit_probe(now, lease_for)

    def _admit_probe(self, now: float, lease_for: float | None = None) -> Ticket:
        policy = self.policy
        leases = self.leases
        for lease, deadline in list(leases.items()):
            if deadline <= now:
                del leases[lease]  # a probe that never reported frees its slot
        if len(leases) + self.half_open_successes < policy.half_open_max_calls:
            lease = self.next_lease
            self.next_lease = lease + 1
            longest = policy.half_open_max_wait
            leases[lease] = now + (longest if lease_for is None or not 0 < lease_for < longest else lease_for)
            return Probe(self.generation, lease)
        # Every slot is taken: the next chance is when a lease expires, and probes
        # usually report sooner, so do not wait longer than one open period.
        soonest = min(leases.values(), default=now + policy.reset_timeout)
        return self._reject(min(soonest - now, policy.reset_timeout))

    def _reject(self, retry_after: float | None) -> NoReturn:
        next(self.rejection_tally)
        raise CircuitOpenError.rejected(self.name, self.key, self.state, retry_after)

    # -- outcomes ------------------------------------------------------------

    def record(
        self,
        ticket: Ticket,
        outcome: Outcome,
        duration: float,
        policy: BreakerPolicy,
        now: float,
        open_for: float | None = None,
        refused: bool = False,
    ) -> None:
        """Count one finished call and apply any transition the policy calls for.

        ``open_for``: a failure's Retry-After; it opens a CLOSED breaker (or reopens a
        HALF_OPEN one, as a failed probe) at once for that long, capped by ``max_reset_timeout``.
        ``refused``: the failure is the downstream refusing a task released from the
        parking (a 429: ``core.retry_after.refusal_of``). In CLOSED it is counted
        as a failure and nothing more: no rule sees it and it opens nothing (the release
        was too fast for the downstream, which was not down; the store's release slows
        down and waits instead, in DISABLED too, where nothing opens anyway). In any
        other state it is the failure it is.
        """
        self.last_used = now
        is_probe = type(ticket) is Probe
        generation: int = ticket.generation if is_probe else ticket  # type: ignore[union-attr,assignment]
        current = generation == self.generation
        # Admitted before an operator's reset: the breaker that was reset's, not counted.
        # (A negative generation is a stand-in's, of no reset: fallback._STALE.)
        if not current and 0 <= generation < self.reset_generation:
            return
        if outcome is IGNORED:
            if current and is_probe:
                self.leases.pop(ticket.lease, None)  # type: ignore[union-attr]
            return
        failed = outcome is FAILURE
        if failed:
            self.failures += 1
            self.last_failure = now
        else:
            next(self.success_tally)
            self.last_success = now
        if not current:
            return  # started under an earlier state: counted, but cannot move this one
        policy = self.policy
        slow_limit = policy.slow_call_duration
        slow = slow_limit is not None and duration >= slow_limit
        state = self.state
        if state is CLOSED:
            if refused and failed:
                return
            self._record_closed(failed, slow, now, open_for if failed else None)
        elif state is HALF_OPEN and is_probe:  # (only probes speak in HALF_OPEN)
            self.leases.pop(ticket.lease, None)  # type: ignore[union-attr]
            self._record_probe(ticket.check, failed, slow, now, open_for if failed else None)  # type: ignore[union-attr]

    def _record_probe(self, check: bool, failed: bool, slow: bool, now: float, open_for: float | None) -> None:
        # A probe's verdict: a health check's (``check``) counts exactly as a real call's
        # would, and the transition it causes says which it was.
        kind = "health check" if check else "probe"
        if failed or slow:
            self._trip(now, f"{kind} failed" if failed else f"slow {kind}", open_for)
            return
        self.half_open_successes += 1
        successes = self.half_open_successes
        if successes >= self.policy.probes_to_close:
            if check and successes == 1:
                self._move(CLOSED, now, "health check succeeded")
            else:
                self._move(CLOSED, now, f"{successes} {kind}s succeeded")

    def _record_closed(self, failed: bool, slow: bool, now: float, open_for: float | None) -> None:
        # Every rule sees every outcome (a rate window counts it even when another rule
        # trips); the first rule with a reason names the trip.
        reason = None
        for rule in self.rules:
            said = rule.observe(failed, slow, now)
            if reason is None:
                reason = said
        self._update_quiet()
        if open_for is not None:
            self._trip(now, "", open_for)  # a Retry-After opens at once, whatever the rules say
        elif reason is not None:
            self._trip(now, reason, None)

    def _trip(self, now: float, reason: str, open_for: float | None) -> None:
        """Open the breaker: for ``open_for`` (a Retry-After), else the backed-off duration."""
        policy = self.policy
        streak = self.streak + 1 if self.state is HALF_OPEN else 1
        if open_for is None:
            seconds = policy.open_duration(streak, self.draw())
        else:
            seconds = min(open_for, policy.longest_open)
            hint = f"retry-after {open_for:g} s" + (f" (capped at {seconds:g} s)" if seconds < open_for else "")
            reason = f"{reason}, {hint}" if reason else hint
        self._move(OPEN, now, reason, seconds)
        self.streak = streak

    # -- operators -----------------------------------------------------------

    def operate(self, target: State, now: float) -> None:
        """An operator moves the breaker to CLOSED, FORCED_OPEN or DISABLED; a move that
        would change nothing is none (no generation, no transition): the breaker is in
        ``target`` already and, for CLOSED, its windows hold nothing to forget. So an
        action every worker takes (``celery control``) makes one transition, not one each."""
        if self.state is target and (target is not CLOSED or self.is_at_rest(now)):
            return
        self._move(target, now, "operator")

    def renew(self, policy: BreakerPolicy, now: float) -> None:
        """Back to a fresh CLOSED breaker: state, windows and lifetime counters cleared,
        under ``policy`` (the one way to change an existing breaker's policy). A breaker
        that is such a one already is left as it is, as by ``operate``."""
        if self.is_fresh(policy, now):
            return
        self._use_policy(policy)
        self._move(CLOSED, now, "reset")
        self.reset_generation = self.generation
        self.success_tally = itertools.count()
        self.rejection_tally = itertools.count()
        self.failures = self.deferrals = self.trips = 0
        self.last_success = self.last_failure = self.opened_at = None

    def observe_success(self, now: float) -> None:
        """A CLOSED breaker's success, in its current generation and not slow: counted by
        every rule it changes (none trips on it), with no transition to evaluate."""
        for succeed in self.success_steps:
            succeed(now)
        if self.quiet_varies:
            self._update_quiet()  # (a run of consecutive failures ended)

    def note_deferral(self) -> None:
        """Count one task deferred because this breaker rejected it."""
        self.deferrals += 1

    def take_moves(self) -> tuple[Transition, ...]:
        """The transitions made since the last call, oldest first (the caller announces them)."""
        moves = self.moves
        if not moves:
            return ()
        self.moves = []
        return tuple(moves)

    # -- transitions ---------------------------------------------------------

    def _move(self, target: State, now: float, reason: str | None = None, open_for: float = 0.0) -> None:
        source = self.state
        why = check_transition(source, target)
        shown = self.shown
        calls, failures = shown.calls(now), shown.failures(now)
        self.generation += 1
        self.state = target
        self.passing = target is CLOSED or target is DISABLED
        if target is OPEN or target is FORCED_OPEN:
            self.opened_at = now
            self.trips += target is OPEN
            self.open_until = now + open_for if target is OPEN else None
            self.open_duration = open_for if target is OPEN else None
        elif target is HALF_OPEN:
            self.open_until = None
            self.leases.clear()
            self.half_open_successes = 0
        else:
            self.open_until = None
            self.open_duration = None
            self.streak = 0  # CLOSED or DISABLED: the next trip starts a new streak
        if target is not HALF_OPEN:
            self.leases.clear()
        if target is OPEN or target is CLOSED or source is CLOSED:
            for rule in self.rules:
                rule.clear()
        self._update_quiet()
        offset = self.wall_offset
        self.moves.append(
            Transition(
                name=self.name,
                key=self.key,
                source=source,
                target=target,
                reason=reason or why,
                generation=self.generation,
                at=now + offset,
                open_until=None if self.open_until is None else self.open_until + offset,
                failures=failures,
                calls=calls,
                trips=self.trips,
            )
        )

    # -- reading -------------------------------------------------------------

    def is_fresh(self, policy: BreakerPolicy, now: float) -> bool:
        """True when ``renew(policy, now)`` would change nothing: CLOSED under ``policy``,
        its windows at rest, its counters zero and no time of a call or a trip kept."""
        return (
            self.is_at_rest(now)
            and self.policy == policy
            and self.failures == self.deferrals == self.trips == self.successes == self.rejections == 0
            and self.last_success is None
            and self.last_failure is None
            and self.opened_at is None
        )

    def is_at_rest(self, now: float) -> bool:
        """True when forgetting this breaker loses nothing that decides anything."""
        if self.state is not CLOSED:
            return False
        return all(rule.at_rest(now) for rule in self.rules)

    def retry_after(self, now: float) -> float | None:
        """Seconds until a probe may be admitted: 0 if calls pass, None if forced open."""
        if self.state is OPEN and self.open_until is not None:
            return max(0.0, self.open_until - now)
        if self.state is FORCED_OPEN:
            return None
        if self.state is HALF_OPEN:
            live = [d for d in self.leases.values() if d > now]
            if len(live) + self.half_open_successes >= self.policy.half_open_max_calls:
                return min(min(live, default=now) - now, self.policy.reset_timeout)
        return 0.0

    def snapshot(self, now: float) -> BreakerSnapshot:
        """The breaker as of ``now`` (monotonic seconds): state, window totals and counters."""
        shown = self.shown
        calls, failures, slow = shown.calls(now), shown.failures(now), shown.slow_calls(now)
        offset = self.wall_offset

        def wall(t: float | None) -> float | None:
            return None if t is None else t + offset

        return BreakerSnapshot(
            name=self.name,
            key=self.key,
            state=self.state,
            generation=self.generation,
            failures=self.failures,
            successes=self.successes,
            rejections=self.rejections,
            deferrals=self.deferrals,
            trips=self.trips,
            last_failure=wall(self.last_failure),
            last_success=wall(self.last_success),
            opened_at=wall(self.opened_at),
            open_until=wall(self.open_until),
            retry_after=self.retry_after(now),
            window_calls=calls,
            window_failures=failures,
            window_slow_calls=slow,
            probes_in_flight=sum(1 for d in self.leases.values() if d > now),
            streak=self.streak,
            open_duration=self.open_duration,
        )
