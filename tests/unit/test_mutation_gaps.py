"""Behaviour of the machine, its rules and windows, and the memory store that no other test pinned down
(each test kills a mutant of core/ or storage/memory.py that the rest of the suite let live)."""

from __future__ import annotations

import os
import sys

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, ConfigurationError, State
from celery_breaker.core import BreakerMachine, Outcome, Probe
from celery_breaker.core.rules import Rates
from celery_breaker.core.windows import TIME_BUCKETS, TimeWindow
from celery_breaker.storage import MemoryStore, is_shared_url
from celery_breaker.testing import FakeClock, fresh_store

from .support import HeldCall, down, fail, make, ok, state_of


def sweepable_store() -> MemoryStore:
    """A memory store of four breakers at most, idle after 100 s: the next breaker sweeps it."""
    return fresh_store(max_breakers=4, idle_ttl=100)


def sweep(store: MemoryStore, policy: BreakerPolicy, clock: FakeClock) -> None:
    """Four new per-key breakers of ``tenant``: the fourth makes a sweep (which keeps two)."""
    for key in ("a", "b", "c", "d"):
        CircuitBreaker("tenant", policy, storage=store, clock=clock, key=key)


# -- rules -----------------------------------------------------------------------------


def test_a_success_that_brings_the_window_to_the_minimum_is_still_never_judged(clock: FakeClock) -> None:
    # (rules.py Rates.observe: the early ``return None`` for a fast success.) One failure
    # in two calls is 50 %: judged on the failure that comes next, never on the success.
    rule = Rates(failure_rate=0.5, slow_rate=None, calls_to_judge=2, count_window=10, window=60.0)
    now = clock.monotonic()
    assert rule.observe(True, False, now) is None  # 1 call: too few to judge
    assert rule.observe(False, False, now) is None  # 1/2 = 50 %, but a fast success only lowers the rate
    assert rule.observe(True, False, now) == "failure rate 2/3 >= 50%"


# -- machine ---------------------------------------------------------------------------


def test_a_disabled_machine_admits_every_call_as_an_ordinary_one(clock: FakeClock) -> None:
    # (machine.py admit: ``state is CLOSED or state is DISABLED``.) The breaker object
    # passes a DISABLED breaker's calls itself; the machine is asked when its view was
    # stale (an operator disabled it meanwhile): still no probe, no slot, no rejection.
    policy = BreakerPolicy(failure_threshold=1, half_open_max_calls=1)
    machine = BreakerMachine("svc", None, policy, clock.monotonic())
    machine.operate(State.DISABLED, clock.monotonic())
    tickets = [machine.admit(policy, clock.monotonic()) for _ in range(3)]
    assert tickets == [machine.generation] * 3
    assert not any(isinstance(ticket, Probe) for ticket in tickets)
    assert machine.rejections == 0


def test_a_breaker_whose_probe_is_in_flight_is_not_idle() -> None:
    # (machine.py admit: ``self.last_used = now``.) Admitting a probe is a use: a sweep
    # must not rank the half-open breaker as idle since its trip and forget it while
    # the probe runs (its verdict would then close or reopen a dropped cell).
    clock = FakeClock()
    store = sweepable_store()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=30)
    probing = CircuitBreaker("tenant", policy, storage=store, clock=clock, key="probing")
    with pytest.raises(ConnectionError):
        probing.call(down)
    clock.advance(200)  # the trip is long past idle_ttl; the open period too
    probe = HeldCall(probing)  # the first probe: HALF_OPEN, a call in flight
    sweep(store, policy, clock)
    kept = {s.key for s in store.snapshots(clock)}
    assert "probing" in kept
    probe.succeed()
    assert probing.snapshot().state is State.HALF_OPEN  # 1 of 2 probes: still probing, on the live cell


def test_the_machine_itself_rejects_while_open_and_while_forced_open(clock: FakeClock) -> None:
    # (machine.py admit: the two ``return self._reject(...)``.) The breaker object rejects
    # from its own view first; the machine is asked when that view was stale (a probe
    # failed meanwhile, an operator forced it open): it rejects too, and moves nothing.
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=30)
    machine = BreakerMachine("svc", None, policy, clock.monotonic())
    machine.record(machine.generation, Outcome.FAILURE, 0.1, policy, clock.monotonic())
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as info:
        machine.admit(policy, clock.monotonic())
    assert info.value.retry_after == pytest.approx(20.0)
    assert (machine.state, machine.rejections) == (State.OPEN, 1)
    machine.operate(State.FORCED_OPEN, clock.monotonic())
    clock.advance(100)  # long past any open period: forced open has none
    with pytest.raises(CircuitOpenError) as info:
        machine.admit(policy, clock.monotonic())
    assert info.value.retry_after is None
    assert (machine.state, machine.rejections, dict(machine.leases)) == (State.FORCED_OPEN, 2, {})


# -- windows ---------------------------------------------------------------------------


def test_a_late_outcome_in_the_oldest_bucket_of_a_time_window_still_counts() -> None:
    # (windows.py TimeWindow.add: ``epoch < self._head - TIME_BUCKETS + 1``.) An outcome
    # whose reading is older than the head (taken before another thread moved it) counts
    # while its bucket is one of the last TIME_BUCKETS, the oldest one included.
    window = TimeWindow(float(TIME_BUCKETS))  # one-second buckets
    window.add(25.0, False, False)
    window.add(25.0 - (TIME_BUCKETS - 1) + 0.5, True, False)  # the oldest bucket in the window
    window.add(25.0 - TIME_BUCKETS + 0.5, True, True)  # one bucket older: out
    assert window.totals(25.0) == (2, 1, 0)


def test_a_full_half_open_breaker_names_the_soonest_lease_to_expire(clock: FakeClock) -> None:
    # (machine.py _admit_probe: ``min(leases.values(), ...)``.) Every probe slot taken:
    # the rejection's retry_after is when the first of them frees, not the last.
    breaker = make(
        clock, failure_threshold=1, reset_timeout=30, half_open_max_wait=10, half_open_max_calls=2, success_threshold=2
    )
    fail(breaker)
    clock.advance(30)
    first = HeldCall(breaker)  # its lease ends at 40 s
    clock.advance(4)
    second = HeldCall(breaker)  # its lease ends at 44 s
    clock.advance(1)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == pytest.approx(5.0)
    assert breaker.snapshot().retry_after == pytest.approx(5.0)
    first.succeed()
    second.succeed()
    assert state_of(breaker) is State.CLOSED


def test_a_probe_lease_shorter_than_half_open_max_wait_frees_its_slot_then(clock: FakeClock) -> None:
    # (machine.py _admit_probe: ``0 < lease_for < longest``.) A lease of under a second
    # (any ``lease_for`` in (0, half_open_max_wait)) is the lease the probe gets.
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=30, half_open_max_calls=1, success_threshold=1)
    machine = BreakerMachine("svc", None, policy, clock.monotonic())
    machine.record(machine.generation, Outcome.FAILURE, 0.1, policy, clock.monotonic())
    clock.advance(30)
    assert isinstance(machine.admit(policy, clock.monotonic(), lease_for=0.5), Probe)
    clock.advance(0.25)
    with pytest.raises(CircuitOpenError) as info:
        machine.admit(policy, clock.monotonic())
    assert info.value.retry_after == pytest.approx(0.25)
    clock.advance(0.25)  # the lease is over: its slot is free
    assert isinstance(machine.admit(policy, clock.monotonic()), Probe)


def test_reset_zeroes_the_success_count_too(clock: FakeClock) -> None:
    # (machine.py renew: ``self.success_tally = itertools.count()``.) Every lifetime
    # counter starts again from zero, the successes as the failures and rejections.
    breaker = make(clock, failure_threshold=1)
    for _ in range(3):
        breaker.call(ok)
    fail(breaker)
    breaker.reset()
    snapshot = breaker.snapshot()
    assert (snapshot.successes, snapshot.failures, snapshot.trips, snapshot.last_success) == (0, 0, 0, None)


def test_a_probe_success_is_the_last_success(clock: FakeClock) -> None:
    # (machine.py record: ``self.last_success = now``.) A success recorded under the
    # lock (a probe's) is shown as the last success, as a CLOSED breaker's is.
    breaker = make(clock, failure_threshold=1, reset_timeout=30, success_threshold=2)
    fail(breaker)
    clock.advance(30)
    breaker.call(ok)  # the first of two probes: still HALF_OPEN
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.successes, snapshot.last_success) == (State.HALF_OPEN, 1, clock.time())


def test_a_call_is_judged_slow_by_the_policy_the_breaker_keeps(clock: FakeClock) -> None:
    # (machine.py record: ``policy = self.policy``.) A second breaker object of the same
    # name with another policy shares the first one's breaker, which keeps its policy:
    # a call is slow by that policy's slow_call_duration, not by the caller's.
    store = fresh_store()
    kept = BreakerPolicy(
        failure_threshold=None, slow_call_duration=1, slow_call_rate_threshold=0.5, minimum_calls=1, count_window=10
    )
    CircuitBreaker("svc", kept, storage=store, clock=clock)
    other = CircuitBreaker("svc", kept.replace(slow_call_duration=100), storage=store, clock=clock)
    other.call(lambda: clock.advance(5))
    assert state_of(other) is State.OPEN
    assert other.snapshot().window_slow_calls == 0  # (the trip cleared the window)


# -- policy ----------------------------------------------------------------------------


def test_max_reset_timeout_may_equal_reset_timeout() -> None:
    # (policy.py: ``max_reset_timeout < reset_timeout``.) "seconds >= reset_timeout": equal is a policy
    # whose every open period is reset_timeout, backoff or not.
    policy = BreakerPolicy(reset_timeout=30, max_reset_timeout=30)
    assert [policy.open_duration(streak, 0.5) for streak in (1, 2, 5)] == [30.0, 30.0, 30.0]
    with pytest.raises(ConfigurationError, match="max_reset_timeout"):
        BreakerPolicy(reset_timeout=30, max_reset_timeout=29.5)


def test_minimum_calls_beyond_count_window_matters_only_to_a_rate_rule() -> None:
    # (policy.py: ``self.uses_rates and ...``.) Without a rate rule neither field is read,
    # so their combination is no error; with one, it is.
    assert BreakerPolicy(failure_threshold=5, count_window=5, minimum_calls=10).calls_to_judge == 10
    with pytest.raises(ConfigurationError, match="minimum_calls"):
        BreakerPolicy(failure_rate_threshold=0.5, count_window=5, minimum_calls=10)


def test_only_a_class_named_timeout_in_gevent_or_eventlet_is_a_green_timeout() -> None:
    # (policy.py _green_timeout: ``cls.__name__ == "Timeout" and ...``.) Another
    # BaseException of those modules (an exit, a kill) is neutral like any other.
    Exit = type("GreenletExit", (BaseException,), {"__module__": "gevent"})
    Timeout = type("Timeout", (BaseException,), {"__module__": "gevent"})
    policy = BreakerPolicy()
    assert policy.classify(Exit()) is Outcome.IGNORED
    assert policy.classify(Timeout()) is Outcome.FAILURE


# -- machine: what each transition leaves behind ---------------------------------------


def test_forcing_open_marks_when_and_keeps_the_streak(clock: FakeClock) -> None:
    # (machine.py _move: ``target is OPEN or target is FORCED_OPEN``.) FORCED_OPEN is
    # opened now, with no open period, and is no close: the streak stays.
    breaker = make(clock, failure_threshold=1, reset_timeout=30)
    fail(breaker)
    clock.advance(30)
    fail(breaker)  # the probe fails: the second trip of a streak
    clock.advance(5)
    breaker.force_open()
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.opened_at, snapshot.streak) == (State.FORCED_OPEN, clock.time(), 2)
    assert (snapshot.open_until, snapshot.open_duration, snapshot.retry_after) == (None, None, None)


def test_open_until_is_gone_once_the_breaker_is_no_longer_open(clock: FakeClock) -> None:
    # (machine.py _move: ``self.open_until = None`` for HALF_OPEN and for CLOSED.)
    breaker = make(clock, failure_threshold=1, reset_timeout=30, success_threshold=2)
    fail(breaker)
    assert breaker.snapshot().open_until == pytest.approx(clock.time() + 30)
    clock.advance(30)
    probe = HeldCall(breaker)
    assert (breaker.snapshot().state, breaker.snapshot().open_until) == (State.HALF_OPEN, None)
    probe.fail()
    assert breaker.snapshot().open_until is not None
    breaker.close()  # an operator closes the OPEN breaker
    assert (breaker.snapshot().state, breaker.snapshot().open_until) == (State.CLOSED, None)


def test_a_failed_probe_ends_the_half_open_period_of_the_probes_still_running(clock: FakeClock) -> None:
    # (machine.py _move: ``if target is not HALF_OPEN: self.leases.clear()``.) Reopened,
    # the breaker has no probe in flight: the other probe's lease belonged to the period
    # that ended, and its late verdict moves nothing.
    breaker = make(clock, failure_threshold=1, reset_timeout=30, half_open_max_calls=2, success_threshold=2)
    fail(breaker)
    clock.advance(30)
    first, second = HeldCall(breaker), HeldCall(breaker)
    assert breaker.snapshot().probes_in_flight == 2
    first.fail()
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.probes_in_flight) == (State.OPEN, 0)
    second.succeed()
    assert state_of(breaker) is State.OPEN


def test_disabling_a_closed_breaker_forgets_its_window(clock: FakeClock) -> None:
    # (machine.py _move: ``... or source is CLOSED``: the rules forget every outcome on
    # a move out of CLOSED.) DISABLED shows no window counts left from CLOSED.
    breaker = make(clock, failure_threshold=5)
    fail(breaker, 2)
    assert breaker.snapshot().window_failures == 2
    breaker.disable()
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.window_failures, snapshot.failures) == (State.DISABLED, 0, 2)


def test_reset_of_a_breaker_at_rest_still_zeroes_its_counters_and_times(clock: FakeClock) -> None:
    # (machine.py is_fresh: the counters and ``opened_at`` in the test.) A breaker whose
    # window holds nothing is not fresh while it has counted a call or been opened.
    breaker = make(clock, failure_threshold=5)
    for _ in range(3):
        breaker.call(ok)
    breaker.reset()
    assert (breaker.snapshot().successes, breaker.snapshot().last_success) == (0, None)
    breaker.force_open()
    breaker.close()
    assert breaker.snapshot().opened_at is not None
    breaker.reset()
    assert breaker.snapshot().opened_at is None


def test_a_reported_probe_success_keeps_its_slot_in_retry_after(clock: FakeClock) -> None:
    # (machine.py retry_after: ``len(live) + self.half_open_successes``.) One probe
    # succeeded and one runs: both slots are used, so the snapshot says when the running
    # one's lease ends, as the rejection does.
    breaker = make(clock, failure_threshold=1, reset_timeout=30, half_open_max_calls=2, success_threshold=2)
    fail(breaker)
    clock.advance(30)
    breaker.call(ok)  # the first probe succeeds: 1 of 2
    running = HeldCall(breaker)  # the second: its lease ends 60 s from now (half_open_max_wait)
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == pytest.approx(30.0)  # (capped at one open period)
    assert breaker.snapshot().retry_after == pytest.approx(30.0)
    running.succeed()
    assert state_of(breaker) is State.CLOSED


def test_reset_jitter_refuses_a_bool() -> None:
    # (policy.py _jitter: ``isinstance(value, bool) or ...``.) ``False`` is no fraction.
    with pytest.raises(ConfigurationError, match="reset_jitter"):
        BreakerPolicy(reset_jitter=False)


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("failure_rate_threshold", 1.5, "; for 1.5% write 0.015"),
        ("failure_rate_threshold", 100, "; for 100% write 1"),
        ("failure_rate_threshold", 101, None),
        ("reset_jitter", 1, "; for 1% write 0.01"),
        ("reset_jitter", 99, "; for 99% write 0.99"),
        ("reset_jitter", 100, None),
    ],
)
def test_a_percentage_for_a_fraction_is_answered_with_the_fraction_up_to_100(
    field: str, value: float, hint: str | None
) -> None:
    # (policy.py _rate and _jitter: the hint's range.) 1.5 or 100 reads as a percentage
    # and the error says which fraction to write; 101 cannot be one.
    with pytest.raises(ConfigurationError) as info:
        BreakerPolicy.from_mapping({field: value})
    text = str(info.value)
    assert text.endswith(hint) if hint is not None else "write" not in text


# -- memory store ----------------------------------------------------------------------


def test_clear_brings_the_sweep_back_to_max_breakers(clock: FakeClock) -> None:
    # (memory.py clear: ``self._sweep_at = self.max_breakers``.) Operator states kept past
    # the bound raise the size that triggers a sweep; once they are cleared, the bound
    # holds again.
    store = fresh_store(max_breakers=4)
    for key in ("a", "b", "c", "d", "e"):
        CircuitBreaker("forced", storage=store, clock=clock, key=key).force_open()
    store.clear()
    for i in range(8):
        CircuitBreaker("fresh", storage=store, clock=clock, key=str(i))
        assert len(store) <= 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_unheld_locks(clock: FakeClock) -> None:
    # (memory.py _reinit_locks_after_fork and its registration.) A lock another thread
    # held at fork time would stay held for ever in the child (a prefork worker).
    store = fresh_store()
    breaker = CircuitBreaker("svc", storage=store, clock=clock)
    cell = store.cell("svc", None, breaker.policy, clock)
    with store._lock, cell.lock:
        pid = os.fork()
        if pid == 0:  # the child: report, and leave at once
            free = store._lock.acquire(blocking=False) and cell.lock.acquire(blocking=False)
            sys.stdout.flush()
            os._exit(0 if free else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_memory_store_is_not_shared_between_processes() -> None:
    # (memory.py ``register_scheme("memory", shared=False)``.) The worker's prefork
    # warning, Flower and the settings checks ask this.
    assert is_shared_url("memory://") is False
    assert is_shared_url("memory://named?max_breakers=5") is False


def test_a_late_outcome_from_an_earlier_state_of_a_swept_breaker_is_judged_by_no_rule() -> None:
    # (memory.py ``_STALE = -1``: a generation no cell ever has.) The call was admitted
    # at generation 0, the breaker tripped meanwhile and was swept while idle: its failure
    # counts on the breaker made again (also at generation 0) but trips nothing.
    clock = FakeClock()
    store = sweepable_store()
    policy = BreakerPolicy(failure_threshold=1)
    breaker = CircuitBreaker("tenant", policy, storage=store, clock=clock, key="x")
    late = HeldCall(breaker)  # admitted at generation 0
    fail(breaker)  # generation 1: OPEN
    clock.advance(1000)
    sweep(store, policy, clock)  # (the idle breaker is dropped)
    assert "x" not in {s.key for s in store.snapshots(clock)}
    late.fail()
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.failures, snapshot.generation) == (State.CLOSED, 1, 0)


def test_a_breaker_unused_for_exactly_idle_ttl_is_idle() -> None:
    # (memory.py _sweep rank: ``used > idle_before``.) Idle "for idle_ttl seconds"
    # includes the boundary: ranked before breakers at rest that were used just now.
    clock = FakeClock()
    store = sweepable_store()
    policy = BreakerPolicy(failure_threshold=5, window=1000)
    worried = CircuitBreaker("tenant", policy, storage=store, clock=clock, key="worried")
    with pytest.raises(ConnectionError):
        worried.call(down)  # not at rest: a failure in its window, its last use
    clock.advance(100)
    sweep(store, policy, clock)
    assert "worried" not in {s.key for s in store.snapshots(clock)}


def test_operator_states_over_the_bound_leave_room_for_new_breakers_between_sweeps(clock: FakeClock) -> None:
    # (memory.py _sweep: ``self._sweep_at = max(...)``.) Three forced-open breakers are
    # kept past the bound; the next sweep waits until as many new breakers came as
    # without them, instead of dropping each new one as the next arrives.
    store = fresh_store(max_breakers=4)
    for key in ("f1", "f2", "f3"):
        CircuitBreaker("forced", storage=store, clock=clock, key=key).force_open()
    CircuitBreaker("new", storage=store, clock=clock, key="0")
    CircuitBreaker("new", storage=store, clock=clock, key="1")  # a sweep drops "0"
    CircuitBreaker("new", storage=store, clock=clock, key="2")  # no sweep yet
    held = {(s.name, s.key) for s in store.snapshots(clock)}
    assert {("new", "1"), ("new", "2")} <= held
    assert len(store) == 5


def test_a_deleted_breaker_is_made_again_by_its_holders_next_call(clock: FakeClock) -> None:
    # (memory.py delete: ``cell.passing = False``.) A CLOSED breaker's holder takes the
    # fast path only while its cell passes calls: a deleted one must send it to the store.
    store = fresh_store()
    breaker = CircuitBreaker("svc", storage=store, clock=clock)
    breaker.call(ok)
    assert store.delete("svc", None) is True
    breaker.call(ok)
    found = store.find("svc", None, clock)
    assert found is not None
    assert found.successes == 1


def test_a_late_outcome_from_before_a_trip_and_recovery_of_a_swept_breaker_is_judged_by_no_rule() -> None:
    # (memory.py _passed: ``ticket == self.generation and ...``.) The dropped cell was
    # CLOSED again, but in a later generation than the call's: its failure is stale.
    clock = FakeClock()
    store = sweepable_store()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=30, success_threshold=1)
    breaker = CircuitBreaker("tenant", policy, storage=store, clock=clock, key="x")
    late = HeldCall(breaker)  # admitted at generation 0
    fail(breaker)  # OPEN
    clock.advance(30)
    breaker.call(ok)  # the probe closes it: CLOSED, generation 3, at rest
    clock.advance(1000)
    sweep(store, policy, clock)  # (it is dropped)
    assert "x" not in {s.key for s in store.snapshots(clock)}
    late.fail()
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.failures) == (State.CLOSED, 1)


def test_a_probe_that_ends_after_a_sweep_dropped_its_breaker_is_counted_on_the_live_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (memory.py MemoryCell.finish: ``type(ticket) is not int`` sent a probe's outcome to
    # the dropped cell.) Its failure announced half_open -> open for a breaker nobody
    # held, and the live breaker read CLOSED with no failure. Now it is counted there,
    # judged by no rule (the live one is another breaker's state), and nothing is announced.
    clock = FakeClock()
    store = sweepable_store()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=30)
    probing = CircuitBreaker("tenant", policy, storage=store, clock=clock, key="probing")
    fail(probing)
    clock.advance(30)
    probe = HeldCall(probing)  # the probe: HALF_OPEN, in flight
    clock.advance(500)  # it runs longer than idle_ttl
    sweep(store, policy, clock)
    assert "probing" not in {found.key for found in store.snapshots(clock)}  # (swept)
    with caplog.at_level("INFO", logger="celery_breaker"):
        probe.fail(ConnectionError("late"))
    assert not [r for r in caplog.records if "half_open -> open" in r.getMessage()]
    found = probing.snapshot()
    assert found.failures == 1
    assert found.state is State.CLOSED
