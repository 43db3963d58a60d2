"""Deferral through a real (in-process) worker: an open breaker requeues the task, it never spends a retry."""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from celery.canvas import Signature
from celery.exceptions import Retry
from celery.signals import task_retry
from kombu.exceptions import OperationalError

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.integration.deferral import countdown
from celery_breaker.integration.deferral.plan import DEFERRALS_HEADER, MINIMUM_DELAY, PARKED_HEADER, SINCE_HEADER

from . import tasks
from .support import DEFER_SPREAD, DEFERRED, TIMEOUT, deferral_text, wait_for

Operate = Callable[[CircuitBreaker], CircuitBreaker]


def deferred_match(result: Any) -> dict[str, str]:
    """The parts of a deferred task's reason; fails the test if it does not read as one."""
    text = deferral_text(result)
    match = DEFERRED.fullmatch(text)
    assert match is not None, f"not a deferral reason: {text!r}"
    return match.groupdict()


def get(result: Any) -> Any:
    return result.get(timeout=TIMEOUT, interval=0.02)


# -- 1. a forced-open breaker defers, the task keeps its id and its retries -----


def test_forced_open_breaker_defers_the_task_with_same_id_and_unchanged_retries(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.forced_task.breaker)
    breaker.force_open()

    result = tasks.forced_task.delay(21)
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")

    reason = result.info
    assert isinstance(reason, CircuitOpenError)
    parts = deferred_match(result)
    assert parts["label"] == "t-forced"
    assert parts["state"] == "forced_open"
    assert parts["count"] == "1"
    # Forced open has no reopening time: the delay is one reset_timeout (0.3 s) plus up to
    # one spread, and never under the anti-busy-loop minimum.
    assert MINIMUM_DELAY <= float(parts["delay"]) <= max(MINIMUM_DELAY, 0.3 + DEFER_SPREAD)

    # It stays deferred (not failed) while the breaker stays open.
    wait_for(lambda: breaker.snapshot().deferrals >= 2, "a second deferral")
    assert result.state == "RETRY"
    assert "(deferral " in deferral_text(result)

    breaker.close()
    value = get(result)
    assert result.state == "SUCCESS"
    assert value["value"] == 42
    assert value["id"] == result.id  # republished with the same task id
    assert value["retries"] == 0  # not charged to the retry budget
    deferrals = breaker.snapshot().deferrals
    assert deferrals >= 2
    assert value["deferrals"] == deferrals  # the header counted every deferral


def test_a_deferral_is_freed_when_its_run_ends_not_left_for_the_cyclic_gc(app: Any, operate: Operate) -> None:
    """Regression: a deferral's ``Retry`` held Celery's running tracer frame through its
    traceback, and that frame held the ``Retry`` and the ``ExceptionInfo`` with billiard's
    copy of the traceback (about 0.5 MB on Python 3.11+): a pool process grew by 100+ MB
    before a full GC ran. With the cyclic GC off, the first deferral's ``ExceptionInfo``
    must be gone by the time the second deferral runs: freed by reference counting.
    (Celery's ``Retry`` itself stays a small cycle: its ``args`` hold it.)"""
    breaker = operate(tasks.forced_task.breaker)
    breaker.force_open()
    einfos: list[weakref.ref[Any]] = []

    def capture(sender: Any = None, reason: Any = None, einfo: Any = None, **_: Any) -> None:
        if isinstance(getattr(reason, "exc", None), CircuitOpenError):
            einfos.append(weakref.ref(einfo))

    task_retry.connect(capture, weak=False)
    gc.collect()
    gc.disable()
    try:
        result = tasks.forced_task.delay(5)
        wait_for(lambda: len(einfos) >= 2, "a second deferral")
        assert einfos[0]() is None, [type(r).__name__ for r in gc.get_referrers(einfos[0]())]
    finally:
        gc.enable()
        task_retry.disconnect(capture)
    breaker.close()
    assert get(result)["value"] == 10


# -- 2. max_retries=0 does not stop deferral -----------------------------------


def test_task_with_max_retries_zero_survives_several_deferrals(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.no_retries_task.breaker)
    breaker.force_open()

    result = tasks.no_retries_task.delay()
    wait_for(lambda: breaker.snapshot().deferrals >= 3, "three deferrals")
    assert result.state == "RETRY"

    breaker.close()
    value = get(result)
    assert value["retries"] == 0
    assert value["deferrals"] >= 3
    assert value["id"] == result.id


# -- 3. autoretry_for and self.retry never spend a retry on CircuitOpenError ----


def test_autoretry_for_exception_does_not_spend_a_retry_on_an_open_breaker(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(tasks.CALLS, "t-autoretry", 0)
    breaker = operate(tasks.autoretry_task.breaker)
    breaker.force_open()

    result = tasks.autoretry_task.delay()
    # max_retries=0: one spent retry would have failed the task (MaxRetriesExceeded).
    wait_for(lambda: breaker.snapshot().deferrals >= 2, "two deferrals")
    assert result.state == "RETRY"
    assert deferred_match(result)["label"] == "t-autoretry"
    assert tasks.CALLS["t-autoretry"] == 0  # the downstream was never called

    breaker.close()
    value = get(result)
    assert value == {"id": result.id, "retries": 0, "deferrals": value["deferrals"], "value": "t-autoretry ok"}
    assert value["deferrals"] >= 2
    assert tasks.CALLS["t-autoretry"] == 1


def test_autoretry_for_exception_defers_on_a_nested_breaker_raising_inside_the_body(app: Any, operate: Operate) -> None:
    # The task's own breaker admits it; CircuitOpenError comes out of the body, through
    # Celery's autoretry wrapper (dont_autoretry_for), and defers the task.
    dependency = operate(CircuitBreaker("t-autoretry-nested-dep", storage=tasks.STORE_URL))
    own = operate(tasks.autoretry_nested_task.breaker)
    dependency.force_open()

    result = tasks.autoretry_nested_task.delay()
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    parts = deferred_match(result)
    assert parts["label"] == "t-autoretry-nested-dep"
    assert parts["state"] == "forced_open"

    dependency.close()
    value = get(result)
    assert value["retries"] == 0
    assert value["deferrals"] >= 1
    # A rejection by another breaker says nothing about this one's downstream.
    snapshot = own.snapshot()
    assert snapshot.state is State.CLOSED
    assert snapshot.failures == 0


def test_users_own_self_retry_with_circuit_open_error_defers_instead_of_retrying(app: Any, operate: Operate) -> None:
    dependency = operate(CircuitBreaker("t-own-retry-dep", storage=tasks.STORE_URL))
    dependency.force_open()

    result = tasks.own_retry_task.delay()
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == "t-own-retry-dep"
    # A Celery retry (countdown 0.1 s, max_retries 5) would show as a plain CircuitOpenError
    # reason, not as a deferral, and would use up the budget while the breaker is open.
    wait_for(lambda: "(deferral 2)" in deferral_text(result), "a second deferral")

    dependency.close()
    value = get(result)
    assert value["retries"] == 0
    assert value["deferrals"] >= 2


def test_autoretry_for_exception_defers_when_the_failure_trips_the_breaker(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.autoretry_trip_task.breaker)
    monkeypatch.setitem(tasks.DOWN, "t-autoretry-trip", True)

    result = tasks.autoretry_trip_task.delay()
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == "t-autoretry-trip"
    assert breaker.snapshot().trips >= 1

    monkeypatch.setitem(tasks.DOWN, "t-autoretry-trip", False)
    value = get(result)
    assert value["retries"] == 0  # autoretry (max_retries=0) never spent a retry
    assert value["deferrals"] >= 1


def test_a_call_made_in_a_thread_the_body_starts_is_the_runs_own_call(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The body hands self.breaker's call to a ThreadPoolExecutor thread, which starts with a
    # context of its own. Its failure trips the breaker and the task waits; the run does not
    # count itself besides its call; once the downstream is back, the half-open run's call
    # in the thread uses the run's own probe (one slot, half_open_max_calls=1) and closes
    # the breaker. Before, the run counted a second failure, and in half-open the thread's
    # call was rejected by the probe its own run held: deferred again and again, never closed.
    breaker = operate(tasks.threaded_calls_task.breaker)
    monkeypatch.setitem(tasks.DOWN, "t-threaded", True)

    result = tasks.threaded_calls_task.delay()
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == "t-threaded"
    snapshot = breaker.snapshot()
    assert (snapshot.failures, snapshot.successes, snapshot.trips) == (1, 0, 1)  # its call, counted once

    monkeypatch.setitem(tasks.DOWN, "t-threaded", False)
    value = get(result)
    assert value["retries"] == 0
    assert breaker.state is State.CLOSED
    snapshot = breaker.snapshot()
    assert (snapshot.failures, snapshot.successes) == (1, 1)


def test_a_task_called_directly_whose_failure_trips_the_shared_breaker_defers_its_caller(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The inner task (same breaker) takes the outer run's ticket; its guarded call fails and
    # trips the breaker. A direct call cannot wait, so the inner raises; the outer, whose
    # ticket recorded that failure, waits for the breaker. Before, the outer never heard of
    # the failure and ended FAILURE with the breaker open.
    breaker = operate(tasks.nested_outer_task.breaker)
    monkeypatch.setitem(tasks.DOWN, "t-nested", True)

    result = tasks.nested_outer_task.delay()
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == "t-nested"
    assert breaker.snapshot().failures == 1

    monkeypatch.setitem(tasks.DOWN, "t-nested", False)
    value = get(result)
    assert value["value"] == "t-nested ok"
    assert value["retries"] == 0


@pytest.mark.parametrize(
    ("task", "answer"),
    [
        ("self_nesting_task", "depth 1 (depth 0 (leaf))"),  # self(0) in its body
        ("mutual_x_task", "depth 1 (y depth 0 (leaf))"),  # x(1) -> y(0) -> x(0): two runs in
    ],
)
def test_a_task_calling_itself_directly_is_deferred_with_its_own_arguments(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch, task: str, answer: str
) -> None:
    # The nested call runs on the worker's request, so it was deferred itself: the task
    # came back under its id with the nested call's arguments (0,), and the run around it,
    # job(1), was lost. A direct call cannot wait: the nested call raises the rejection
    # into the body, and the task is deferred with its own arguments.
    guarded = getattr(tasks, task)
    breaker = operate(guarded.breaker)
    monkeypatch.setattr(tasks, "SELF_NESTED", [])
    monkeypatch.setitem(tasks.DOWN, "t-self-nested", True)  # (the body opens the breaker, once)
    result = guarded.delay(1)
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    breaker.close()
    value = get(result)
    assert value["value"] == answer
    assert value["retries"] == 0
    assert tasks.SELF_NESTED == [(1, [1]), (1, [1]), (0, [1])]  # (its nested call runs on its request)


def test_a_run_that_failed_and_left_its_breaker_open_is_deferred_to_the_back(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run that failed and tripped (or reopened) its breaker is deferred as "failed", and
    # parked at the back; one rejected at its admission keeps its place.
    from celery_breaker.integration.deferral.defer import defer as real_defer

    asked: list[bool] = []

    def noting(*args: Any, failed: bool = False, **kwargs: Any) -> Any:
        asked.append(failed)
        return real_defer(*args, failed=failed, **kwargs)

    monkeypatch.setattr("celery_breaker.integration.task.defer", noting)
    breaker = operate(tasks.trip_task.breaker)
    monkeypatch.setitem(tasks.DOWN, "t-trip", True)
    result = tasks.trip_task.delay()
    wait_for(lambda: len(asked) >= 1, "the failed run's deferral")
    breaker.force_open()  # (its next run is turned away at its admission, not admitted as a probe)
    wait_for(lambda: len(asked) >= 2, "the rejected run's deferral")
    assert asked[:2] == [True, False]  # it failed and tripped it; then it was turned away
    monkeypatch.setitem(tasks.DOWN, "t-trip", False)
    breaker.close()
    assert get(result)["retries"] == 0


def test_the_parking_puts_a_failed_run_at_the_back_and_a_rejected_one_in_its_place(app: Any) -> None:
    from celery_breaker.integration.deferral.parking import ParkInStore
    from celery_breaker.integration.deferral.plan import DeferralPlan
    from celery_breaker.integration.deferral.strategy import Deferral

    class Parking:
        def __init__(self) -> None:
            self.orders: list[float] = []

        def park(self, name: str, key: Any, entry: str, order: float, payload: str, deadline: Any) -> int:
            self.orders.append(order)
            return len(self.orders)

    parking = Parking()
    store = type("Store", (), {"parking": parking, "down": False})()
    breaker = type("Breaker", (), {"name": "t-park-order", "key": None, "store": store})()
    task = tasks.forced_task
    first_deferral, now = 1_000.0, 2_000.0
    plan = DeferralPlan(delay=1.0, count=3, since=first_deferral)
    task.push_request(id="park-order", args=(1,), kwargs={}, headers={}, retries=0)
    try:
        for failed in (False, True):
            deferral = Deferral(
                task=task, breaker=breaker, rejected=CircuitOpenError("open", name="t-park-order"), state="open",
                args=(1,), kwargs={}, headers={}, plan=plan, expires_in=None, max_defer_age=None, now=now,
                failed=failed,
            )  # fmt: skip
            assert ParkInStore().deliver(deferral) == 1.0
    finally:
        task.pop_request()
    assert parking.orders == [first_deferral, now]


def test_self_retry_inside_the_guarded_block_defers_when_its_failure_trips_the_breaker(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Celery publishes a retry before raising it: had it been sent from inside the block,
    # the failure that tripped the breaker (recorded when the Retry left the block) would
    # have spent a retry, and the retry would have waited for recovery with retries 1.
    breaker = operate(tasks.retry_inside_block_task.breaker)
    monkeypatch.setitem(tasks.CALLS, "t-retry-inside", 0)
    monkeypatch.setitem(tasks.DOWN, "t-retry-inside", True)

    result = tasks.retry_inside_block_task.delay()
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == "t-retry-inside"
    assert breaker.snapshot().trips == 1

    monkeypatch.setitem(tasks.DOWN, "t-retry-inside", False)
    value = get(result)
    assert value["retries"] == 0  # deferred, not retried
    assert value["deferrals"] >= 1
    assert tasks.CALLS["t-retry-inside"] == 2  # the failure, then the run after recovery


def test_self_retry_inside_the_guarded_block_still_retries_while_the_breaker_stays_closed(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.retry_inside_closed_block_task.breaker)
    monkeypatch.setitem(tasks.CALLS, "t-retry-inside-closed", 0)
    monkeypatch.setitem(tasks.DOWN, "t-retry-inside-closed", True)

    result = tasks.retry_inside_closed_block_task.delay()
    wait_for(lambda: tasks.CALLS["t-retry-inside-closed"] >= 2, "the task to be retried")
    monkeypatch.setitem(tasks.DOWN, "t-retry-inside-closed", False)
    value = get(result)
    assert value["retries"] >= 1  # a failure that leaves the breaker closed is Celery's retry
    assert value["deferrals"] is None
    assert breaker.snapshot().trips == 0


def test_self_retry_inside_the_guarded_block_out_of_retries_fails_with_the_error(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.retry_inside_closed_block_task.breaker)
    monkeypatch.setitem(tasks.CALLS, "t-retry-inside-closed", 0)
    monkeypatch.setitem(tasks.DOWN, "t-retry-inside-closed", True)

    result = tasks.retry_inside_closed_block_task.delay(max_retries=0)
    with pytest.raises(ConnectionError, match="t-retry-inside-closed is down"):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    assert "_PendingRetry" not in (result.traceback or "")  # the error, as Celery raises it
    assert tasks.CALLS["t-retry-inside-closed"] == 1
    assert breaker.snapshot().failures == 1  # recorded once, by the block


@pytest.mark.parametrize("task", ["bare_retry_inside_block_task", "bare_retry_after_block_task"])
def test_a_bare_self_retry_counts_the_error_being_handled_and_defers_once_it_trips_the_breaker(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    # self.retry() without exc, in the except clause: the error it handles is the retry's
    # cause. Inside the block it was not counted at all (a Retry without exc is neutral),
    # so the breaker never tripped; after the block, the trip spent a retry.
    guarded = getattr(tasks, task)
    name = guarded.breaker.name
    breaker = operate(guarded.breaker)
    monkeypatch.setitem(tasks.CALLS, name, 0)
    monkeypatch.setitem(tasks.DOWN, name, True)

    result = guarded.delay()
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == name
    assert breaker.snapshot().trips == 1

    monkeypatch.setitem(tasks.DOWN, name, False)
    value = get(result)
    assert value["retries"] == 0
    assert tasks.CALLS[name] == 2


@pytest.mark.parametrize("task", ["retry_the_rest_task", "retry_the_rest_inside_block_task"])
def test_a_retry_with_new_arguments_deferred_instead_keeps_them(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    # self.retry(args=...) asks for the next attempt to run with other arguments (here: the
    # items not yet processed). Deferred instead, because its failure opened the breaker,
    # the task used to be republished with the arguments of the run that failed, and
    # processed the first items a second time after recovery.
    batch = getattr(tasks, task)
    name = batch.breaker.name
    breaker = operate(batch.breaker)
    monkeypatch.setitem(tasks.CALLS, name, 0)
    monkeypatch.setitem(tasks.DOWN, name, False)
    monkeypatch.setitem(tasks.PROCESSED, name, [])
    calls = tasks.CALLS

    def down_at_the_third_item(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setitem(tasks.DOWN, name, calls[name] >= 2)
        return original(*args, **kwargs)

    original = tasks.call_downstream
    monkeypatch.setattr(tasks, "call_downstream", down_at_the_third_item)

    result = batch.delay(["a", "b", "c", "d"])
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == name  # deferred, not retried
    assert breaker.snapshot().trips == 1

    monkeypatch.setattr(tasks, "call_downstream", original)
    monkeypatch.setitem(tasks.DOWN, name, False)
    value = get(result)
    assert value["value"] == ["c", "d"]  # the arguments the retry asked for
    assert value["retries"] == 0  # and still no retry spent
    assert value["deferrals"] >= 1
    assert tasks.PROCESSED[name] == ["a", "b", "c", "d"]  # none twice


def test_a_retry_deferred_instead_comes_back_with_the_options_it_asked_for(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # self.retry(priority=..., time_limit=..., headers=...) held back inside the guarded
    # block, whose failure then tripped the breaker: deferred instead, the run came back
    # with the priority, limits and headers it had been sent with, not the retry's.
    breaker = operate(tasks.retry_asks_task.breaker)
    monkeypatch.setitem(tasks.CALLS, "t-retry-asks", 0)
    monkeypatch.setitem(tasks.DOWN, "t-retry-asks", True)

    result = tasks.retry_asks_task.apply_async(priority=2)
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == "t-retry-asks"
    assert breaker.snapshot().trips == 1

    monkeypatch.setitem(tasks.DOWN, "t-retry-asks", False)
    value = get(result)
    assert value["retries"] == 0  # deferred, not retried
    assert value["deferrals"] == 1
    assert (value["priority"], value["timelimit"], value["trace"]) == (7, [40, 30], "retry")


def test_a_retry_for_a_nested_breaker_deferred_instead_comes_back_with_the_options_it_asked_for(
    app: Any, operate: Operate
) -> None:
    dependency = operate(CircuitBreaker("t-retry-asks-nested-dep", storage=tasks.STORE_URL))
    dependency.force_open()

    result = tasks.retry_asks_nested_task.apply_async(priority=2)
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["label"] == "t-retry-asks-nested-dep"

    dependency.close()
    value = get(result)
    assert value["retries"] == 0
    assert value["deferrals"] >= 1
    assert (value["priority"], value["timelimit"], value["trace"]) == (7, [40, 30], "retry")


def test_arguments_hidden_by_argsrepr_stay_hidden_after_a_deferral(app: Any, operate: Operate) -> None:
    # apply_async(argsrepr=..., kwargsrepr=...) keeps secrets out of the worker's events and
    # logs (Flower shows them). Celery's signature_from_request leaves both out, so the
    # deferred copy was sent with reprs of the real arguments: the card number and the
    # token showed in its task-received event.
    breaker = operate(tasks.hidden_arguments_task.breaker)
    breaker.force_open()
    result = tasks.hidden_arguments_task.apply_async(
        ("4111 1111 1111 1111",), {"token": "s3cr3t"}, argsrepr="('****',)", kwargsrepr="{'token': '***'}"
    )
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    breaker.close()
    value = get(result)
    assert value["deferrals"] >= 1
    assert (value["argsrepr"], value["kwargsrepr"]) == ("('****',)", "{'token': '***'}")


def test_a_deferred_task_keeps_the_compression_it_was_sent_with(app: Any, operate: Operate) -> None:
    # Celery's signature_from_request leaves the compression out: the deferred copy of a
    # task sent with compression="gzip" went out uncompressed, megabytes larger.
    breaker = operate(tasks.as_sent_task.breaker)
    breaker.force_open()
    result = tasks.as_sent_task.apply_async(compression="gzip")
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    breaker.close()
    value = get(result)
    assert value["deferrals"] >= 1
    assert value["compression"] == "application/x-gzip"


def test_a_deferred_task_sent_from_no_task_is_not_made_its_own_child(app: Any, operate: Operate) -> None:
    # Published from the rejected run, the copy took that run's id for its missing
    # parent_id (Celery's send_task): the task came back as its own child.
    breaker = operate(tasks.as_sent_task.breaker)
    breaker.force_open()
    result = tasks.as_sent_task.apply_async()
    wait_for(lambda: breaker.snapshot().deferrals >= 2, "two deferrals")
    breaker.close()
    value = get(result)
    assert (value["parent_id"], value["root_id"]) == (None, result.id)


def test_a_bare_self_retry_in_a_direct_call_does_not_count_its_callers_exception(operate: Operate) -> None:
    # Called directly from the caller's own except clause: the exception being handled
    # there is not the task's, and must not count against its breaker.
    breaker = operate(tasks.bare_retry_poll_task.breaker)
    for _ in range(3):
        try:
            raise ConnectionError("another downstream is down")
        except ConnectionError:
            with pytest.raises(Retry):
                tasks.bare_retry_poll_task()
    snap = breaker.snapshot()
    assert (snap.state, snap.failures) == (State.CLOSED, 0)


def test_a_bare_self_retry_counts_what_its_body_handles_in_eager_mode_too(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.bare_retry_whole_run_task.breaker)
    monkeypatch.setitem(tasks.DOWN, "t-bare-retry-eager", True)
    # Eager retries run at once, nested: each attempt's ConnectionError counts, and the
    # third opens the breaker (counted as neutral, only the final MaxRetriesExceededError
    # would have counted: the breaker stayed closed).
    result = tasks.bare_retry_whole_run_task.apply()
    assert result.state == "FAILURE"
    assert breaker.snapshot().state is State.OPEN


def test_a_held_back_retry_goes_through_every_retry_in_the_mro(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    operate(tasks.retry_through_the_mro_task.breaker)
    monkeypatch.setitem(tasks.CALLS, "t-retry-inside-closed", 0)
    monkeypatch.setitem(tasks.DOWN, "t-retry-inside-closed", True)
    tasks.JitterRetry.retried_through.clear()

    result = tasks.retry_through_the_mro_task.delay()
    wait_for(lambda: tasks.CALLS["t-retry-inside-closed"] >= 2, "the task to be retried")
    monkeypatch.setitem(tasks.DOWN, "t-retry-inside-closed", False)
    value = get(result)
    assert value["retries"] >= 1
    assert result.id in tasks.JitterRetry.retried_through  # the next class's retry sent it


def test_a_fallback_that_asks_for_a_retry_is_retried_not_lost(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fallback runs after the body, outside the block: a retry it holds back is sent
    # by the task, not left as a RETRY nobody republished.
    dependency = operate(CircuitBreaker("t-fallback-retry-dep", storage=tasks.STORE_URL))
    dependency.force_open()
    monkeypatch.setitem(tasks.DOWN, "t-fallback-retry-cache", True)

    result = tasks.fallback_retry_task.delay("ACME")
    wait_for(lambda: result.state == "RETRY", "the fallback's retry")
    monkeypatch.setitem(tasks.DOWN, "t-fallback-retry-cache", False)
    assert get(result) == {"fallback": "cached", "retries": 1}


# -- 4. a failure that trips the breaker defers; one that does not, fails -------


def test_failure_that_trips_the_breaker_defers_the_task_until_recovery(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.trip_task.breaker)
    monkeypatch.setitem(tasks.CALLS, "t-trip", 0)
    monkeypatch.setitem(tasks.DOWN, "t-trip", True)

    result = tasks.trip_task.delay()
    wait_for(lambda: result.state == "RETRY", "the failing task to be deferred")
    parts = deferred_match(result)
    assert parts["label"] == "t-trip"
    assert parts["state"] in ("open", "half_open")
    snapshot = breaker.snapshot()
    assert snapshot.trips >= 1
    assert snapshot.failures >= 1
    assert result.state != "FAILURE"

    monkeypatch.setitem(tasks.DOWN, "t-trip", False)  # the downstream recovers
    value = get(result)
    assert value["value"] == "t-trip ok"
    assert value["retries"] == 0
    assert value["deferrals"] >= 1
    assert tasks.CALLS["t-trip"] >= 2  # the failed call, then the successful probe


def test_a_retry_after_opens_the_breaker_that_long_and_the_task_waits_for_it(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.retry_after_task.breaker)  # failure_threshold 5: only the hint trips it
    monkeypatch.setitem(tasks.CALLS, "t-retry-after", 0)

    result = tasks.retry_after_task.delay()
    wait_for(lambda: result.state == "RETRY", "the rate-limited task to be deferred")
    parts = deferred_match(result)
    assert parts["state"] == "open"
    assert 1.5 <= float(parts["delay"]) <= 2.0 + DEFER_SPREAD + 0.05  # the downstream's 2 s, not reset_timeout
    snapshot = breaker.snapshot()
    assert (snapshot.trips, snapshot.failures) == (1, 1)
    value = get(result)
    assert value["value"] == "t-retry-after ok"
    assert (value["retries"], value["deferrals"]) == (0, 1)


@pytest.mark.parametrize("task_name", ["refused_task", "refused_autoretry_task"])
def test_a_task_released_from_the_parking_that_the_downstream_refuses_is_deferred_again(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch, task_name: str
) -> None:
    """A 429 met by a task released from the parking (its message says so): the release
    was too fast for the downstream. The breaker stays CLOSED (failure_threshold 5; the
    Retry-After would open it otherwise), the task waits the 0.5 s asked for (a countdown
    here: the memory store parks nothing), no retry is spent."""
    task = getattr(tasks, task_name)
    breaker = operate(task.breaker)
    monkeypatch.setitem(tasks.CALLS, breaker.name, 0)

    headers = {DEFERRALS_HEADER: 1, SINCE_HEADER: time.time() - 5, PARKED_HEADER: 1}
    result = task.apply_async(headers=headers)
    wait_for(lambda: result.state == "RETRY", "the refused task to be deferred again")
    text = deferral_text(result)
    assert text.startswith(f"breaker '{breaker.name}' closed, deferred ")
    assert text.endswith("(deferral 2): the downstream refused it")
    assert 0.5 <= float(text.split("deferred ")[1].split(" s")[0]) <= 0.5 + DEFER_SPREAD + 0.05
    value = get(result)
    assert (value["retries"], value["deferrals"]) == (0, 2)
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.trips, snapshot.failures) == (State.CLOSED, 0, 1)


@pytest.mark.parametrize(
    "headers",
    [{}, {DEFERRALS_HEADER: 1, SINCE_HEADER: 1.0}],
    ids=["never deferred", "back from a countdown"],
)
def test_a_429_met_by_a_task_that_was_not_parked_opens_the_breaker_and_defers_it(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch, headers: dict[str, Any]
) -> None:
    """No pace to slow: the Retry-After opens the breaker (failure_threshold 5 would not),
    which holds every task for it."""
    breaker = operate(tasks.refused_task.breaker)
    monkeypatch.setitem(tasks.CALLS, breaker.name, 0)
    result = tasks.refused_task.apply_async(headers={**headers, SINCE_HEADER: time.time() - 5} if headers else None)
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    assert deferred_match(result)["state"] == "open"
    assert breaker.snapshot().trips == 1
    assert get(result)["retries"] == 0


def test_failure_while_the_breaker_stays_closed_fails_the_task_normally(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.stays_closed_task.breaker)  # failure_threshold 2
    monkeypatch.setitem(tasks.DOWN, "t-stays-closed", True)

    result = tasks.stays_closed_task.delay()
    with pytest.raises(ConnectionError, match="t-stays-closed is down"):
        get(result)
    assert result.state == "FAILURE"
    snapshot = breaker.snapshot()
    assert snapshot.state is State.CLOSED
    assert snapshot.failures == 1
    assert snapshot.deferrals == 0


# -- 6. exhausted deferral budgets fail with a clear CircuitOpenError ----------


def test_breaker_max_deferrals_exhausted_fails_the_task(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.max_deferrals_task.breaker)
    breaker.force_open()

    result = tasks.max_deferrals_task.delay()
    with pytest.raises(CircuitOpenError, match=r"giving up \(breaker_max_deferrals=2\)") as info:
        get(result)
    assert "breaker 't-max-deferrals' still forced_open after 2 deferral(s)" in str(info.value)
    assert result.state == "FAILURE"
    assert breaker.snapshot().deferrals == 2


def test_breaker_max_defer_age_exceeded_fails_the_task(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.max_defer_age_task.breaker)
    breaker.force_open()

    result = tasks.max_defer_age_task.delay()
    with pytest.raises(CircuitOpenError, match=r"giving up \(breaker_max_defer_age=1 s\)") as info:
        get(result)
    assert "breaker 't-max-defer-age' still forced_open after" in str(info.value)
    assert result.state == "FAILURE"
    assert breaker.snapshot().deferrals >= 1


# -- a broker that will not take the deferred copy ------------------------------


def refuse_publishing(
    monkeypatch: pytest.MonkeyPatch, times: int | None, message: str = "broker refused the publish"
) -> list[str]:
    """Make publishing a deferral (``Signature.apply_async``) fail ``times`` times (None:
    always), with an ``OperationalError`` saying ``message``."""
    attempts: list[str] = []
    publish = Signature.apply_async

    def flaky(signature: Signature, *args: Any, **kwargs: Any) -> Any:
        attempts.append(signature.task)
        if times is None or len(attempts) <= times:
            raise OperationalError(message)
        return publish(signature, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", flaky)
    return attempts


def test_a_deferral_the_broker_refuses_fails_the_task_when_it_was_acknowledged(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.unpublishable_task.breaker)
    breaker.force_open()
    attempts = refuse_publishing(monkeypatch, None)

    result = tasks.unpublishable_task.delay()
    with pytest.raises(CircuitOpenError) as info:
        get(result)
    assert str(info.value) == (
        "breaker 't-unpublishable' forced_open and the task could not be deferred: "
        "OperationalError('broker refused the publish')"
    )
    assert result.state == "FAILURE"
    assert attempts == ["tests.celery.tasks.unpublishable_task"]  # once: no retry spent, no loop
    assert breaker.snapshot().deferrals == 0


def test_a_deferral_the_broker_refuses_is_requeued_with_acks_late(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = operate(tasks.unpublishable_late_task.breaker)
    breaker.force_open()
    monkeypatch.setattr(countdown, "REQUEUE_PAUSE", 0.05)
    attempts = refuse_publishing(monkeypatch, 2)

    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        result = tasks.unpublishable_late_task.delay()
        wait_for(lambda: result.state == "RETRY", "the deferral published on the third attempt")
    assert len(attempts) == 3
    refused = [r.getMessage() for r in caplog.records if "could not defer" in r.getMessage()]
    assert len(refused) == 2
    assert all("requeueing it" in line for line in refused)
    breaker.close()
    assert get(result)["retries"] == 0  # it ran, once, without spending a retry


#: What a broker's client may say of its connection: its URL, the password in it.
LEAKY = "Error connecting to redis://:hunter2@broker.example:6379/0"


def test_a_refused_deferral_logs_no_password_from_the_brokers_error(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # (kombu's and redis-py's errors may quote the URL they connect to; the lines below
    # quoted the error with %r, the password in it too)
    breaker = operate(tasks.unpublishable_late_task.breaker)
    breaker.force_open()
    monkeypatch.setattr(countdown, "REQUEUE_PAUSE", 0.05)
    attempts = refuse_publishing(monkeypatch, 1, LEAKY)

    with caplog.at_level(logging.DEBUG):
        result = tasks.unpublishable_late_task.delay()
        wait_for(lambda: result.state == "RETRY", "the deferral published on the second attempt")
    assert len(attempts) == 2
    refused = [r.getMessage() for r in caplog.records if "could not defer" in r.getMessage()]
    assert refused, caplog.text
    assert "redis://:***@broker.example:6379/0" in refused[0]
    assert "hunter2" not in caplog.text
    breaker.close()
    assert get(result)["retries"] == 0


def test_a_deferral_refused_with_a_password_in_the_error_fails_without_it(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = operate(tasks.unpublishable_task.breaker)
    breaker.force_open()
    refuse_publishing(monkeypatch, None, LEAKY)

    with caplog.at_level(logging.DEBUG):
        result = tasks.unpublishable_task.delay()
        with pytest.raises(CircuitOpenError) as info:
            get(result)
    assert "could not be deferred: OperationalError('Error connecting to redis://:***@broker.example" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in caplog.text


# -- 7. a deferral never outlives the task's expires ---------------------------


def test_deferral_never_pushes_a_task_past_its_expiry(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.expiring_task.breaker)  # reset_timeout 60 s
    breaker.force_open()

    # (Under a second and a half: with more, behind a forced open breaker, it looks again
    # just before its expiry first: test_a_task_behind_a_forced_open_breaker_looks_again...)
    result = tasks.expiring_task.apply_async(expires=1.4)
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    text = deferral_text(result)
    assert "breaker 't-expires' forced_open, task expires first" in text
    assert "(deferral 1)" in text

    # It arrives just after its expiry and the worker revokes it: it is not held for 60 s.
    wait_for(lambda: result.state == "REVOKED", "the worker to revoke the expired task")
    assert breaker.snapshot().deferrals == 1


# -- 11. malformed deferral headers never crash the worker ----------------------

MALFORMED = {DEFERRALS_HEADER: "abc", SINCE_HEADER: "yesterday"}


def test_malformed_deferral_headers_are_ignored_while_the_breaker_is_closed(app: Any, operate: Operate) -> None:
    operate(tasks.header_task.breaker)
    value = get(tasks.header_task.apply_async(headers=MALFORMED))
    assert value["retries"] == 0
    assert value["deferrals"] == "abc"  # the task just ran; the header is only read to defer
    assert value["value"] == "yesterday"


def test_malformed_deferral_headers_restart_the_count_and_log_a_warning(
    app: Any, operate: Operate, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_breaker")
    breaker = operate(tasks.header_task.breaker)
    breaker.force_open()

    result = tasks.header_task.apply_async(headers=MALFORMED)
    wait_for(lambda: result.state == "RETRY", "the task to be deferred")
    parts = deferred_match(result)
    assert parts["label"] == "t-headers"
    assert parts["count"] == "1"  # "abc" counted as 0 deferrals so far

    def warnings() -> list[str]:
        return [
            record.getMessage()
            for record in caplog.records
            if record.name == "celery_breaker" and record.levelno == logging.WARNING
        ]

    wait_for(lambda: len(warnings()) >= 2, "warnings about both headers")
    assert any(f"{DEFERRALS_HEADER}='abc'" in message for message in warnings())
    assert any(f"{SINCE_HEADER}='yesterday'" in message for message in warnings())
    assert any(result.id in message for message in warnings())

    breaker.close()
    value = get(result)
    assert value["retries"] == 0
    assert value["deferrals"] == breaker.snapshot().deferrals >= 1
    assert isinstance(value["value"], float)  # the deferral age restarted from a valid time


def test_a_celery_retry_starts_a_fresh_deferral_budget(app: Any, operate: Operate) -> None:
    """Deferred once in one outage (its whole budget), then run and retried by Celery for
    a reason of its own: the retry is a new attempt. Meeting a second outage, it is
    deferred again, rather than failing at once on the first outage's count (or age)."""
    breaker = operate(tasks.retried_after_an_outage_task.breaker)
    breaker.force_open()
    result = tasks.retried_after_an_outage_task.delay()
    tasks.RETRY_ONCE.add(result.id)
    wait_for(lambda: breaker.snapshot().deferrals == 1, "the first deferral")
    breaker.close()
    wait_for(lambda: tasks.CALLS.get("t-retry-budget", 0) == 1, "the run that retries")
    breaker.force_open()  # (the second outage, before the retry arrives)
    wait_for(lambda: breaker.snapshot().deferrals == 2 or result.state == "FAILURE", "the retry to meet it")
    assert result.state != "FAILURE", result.info
    breaker.close()
    value = get(result)
    assert value["retries"] == 1  # (Celery's own retry, spent on its own reason)
    assert value["deferrals"] == 1  # (the second outage's count, not 2)
