"""A breaker's health-check admission: the check run in place of a call that wins a probe slot; ``check_health``."""

from __future__ import annotations

import contextlib
import functools
import logging
import shlex
import time
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from ..core import Outcome, Probe, State, Ticket
from ..core.retry_after import retry_after_of
from ..errors import CircuitOpenError
from ..health import (
    LEAST_PROBE_TIMEOUT,
    Checked,
    CheckResult,
    CheckRun,
    CheckStillHung,
    HealthCheck,
    HealthState,
    PendingCheck,
    ProbeTimeout,
    checking,
)
from ..labels import shown_label
from ..storage import Cell, describe_url, forced_why
from ..storage.masking import MaskedText
from .check_limits import CHECK_LEASE_MARGIN, CHECK_WITHIN, check_time
from .runs import RUN
from .steps import GuardSteps, primary

if TYPE_CHECKING:
    from .runs import RunAdmission

__all__ = ["HealthCheckAdmission", "bound_checks_in_runs", "lease_runs_by"]

logger = logging.getLogger("celery_breaker")

SUCCESS, FAILURE, IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED
OPEN, FORCED_OPEN, HALF_OPEN = State.OPEN, State.FORCED_OPEN, State.HALF_OPEN
_ADMITTING = (State.CLOSED, State.DISABLED)

_run_get = RUN.get  # (bound once: see ``RUN``)

#: Below this many seconds left of ``check_within``, no further check is started.
_LEAST_CHECK_TIME = 0.05


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


class HealthCheckAdmission(GuardSteps):
    """A breaker's health check: run in place of a call that wins a probe slot (``_check_instead``,
    ``_acheck_instead``), or by ``check_health``; its verdict recorded as a probe's."""

    __slots__ = ()

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
        within = CHECK_WITHIN.get()
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
        told = _TOLD_SHORT.setdefault(primary(self.store), {})
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
                "freed when its lease runs out", shown_label(self.label), name, MaskedText(exc),
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
            bound = None if wait is None else CHECK_WITHIN.set(wait)
            try:
                # (no slot left for a next check, or the check goes on without this caller)
                with contextlib.suppress(CircuitOpenError):
                    self._run_checks(cell, ticket, counted=False)
            finally:
                if bound is not None:
                    CHECK_WITHIN.reset(bound)
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
