"""``WorkerBacklog``: whether a worker's own waiting tasks cover its pool (Celery's worker state, faked)."""

from __future__ import annotations

from types import SimpleNamespace

import celery.worker.state

from celery_breaker.integration.deferral.backlog import WorkerBacklog


def worker_state(reserved: int = 0, active: int = 0, accepted: int = 0) -> SimpleNamespace:
    """What ``WorkerBacklog`` reads of ``celery.worker.state``: reserved requests (taken from
    the broker, not finished), the active ones among them, and how many were ever started."""
    return SimpleNamespace(
        reserved_requests={f"r{n}" for n in range(reserved)},
        active_requests={f"r{n}" for n in range(active)},
        all_total_count=[accepted],
    )


def set_to(state: SimpleNamespace, reserved: int, active: int, accepted: int) -> None:
    state.reserved_requests = {f"r{n}" for n in range(reserved)}
    state.active_requests = {f"r{n}" for n in range(active)}
    state.all_total_count[0] = accepted


def test_a_pool_with_room_is_not_full() -> None:
    state = worker_state()
    backlog = WorkerBacklog(4, state)
    set_to(state, reserved=3, active=3, accepted=3)
    assert backlog.waiting() == 0
    assert backlog.room() is None


def test_a_whole_pools_worth_waiting_behind_a_slow_pool_is_full() -> None:
    # 4 slots busy with long calls, 4 more taken and waiting, 1 started since the last ask.
    state = worker_state(accepted=10)
    backlog = WorkerBacklog(4, state)
    set_to(state, reserved=8, active=4, accepted=11)
    assert backlog.waiting() == 4
    assert backlog.room() == 0


def test_fewer_waiting_than_the_pool_is_not_full() -> None:
    state = worker_state()
    backlog = WorkerBacklog(4, state)
    set_to(state, reserved=7, active=4, accepted=2)  # (3 waiting; 2 started in the last tick)
    assert backlog.room() is None


def test_a_fast_pool_is_not_full_while_it_would_run_dry_within_two_ticks() -> None:
    # 6 slots of 20 ms calls start ~60 tasks a tick: 24 waiting last under half a tick, so
    # holding the release for a tick would leave the pool idle.
    state = worker_state(accepted=1000)
    backlog = WorkerBacklog(6, state)
    set_to(state, reserved=30, active=6, accepted=1060)
    assert backlog.room() is None
    set_to(state, reserved=30, active=6, accepted=1070)  # (10 started since: 24 waiting cover two ticks)
    assert backlog.room() == 0


def test_it_reads_celerys_own_worker_state_by_default() -> None:
    backlog = WorkerBacklog(0)
    assert backlog.state is celery.worker.state
    assert backlog.slots == 1  # (a pool has at least one slot)
    assert backlog.waiting() == max(
        0, len(celery.worker.state.reserved_requests) - len(celery.worker.state.active_requests)
    )


def test_a_pool_that_prefetches_one_a_slot_takes_what_frees_while_its_long_calls_run() -> None:
    # worker_prefetch_multiplier=1: nothing ever waits in the worker. Its 50 slots busy with
    # 2.5 s calls start ~4 a tick: it takes no more than its free slots and half that by
    # the next pass (slots a queue in the broker refills stay busy: free ones are the
    # sign it is empty), not a second's worth of the pace.
    state = worker_state(accepted=100)
    backlog = WorkerBacklog(50, state, prefetch=1)
    set_to(state, reserved=50, active=50, accepted=104)
    assert backlog.waiting() == 0
    assert backlog.room() == 2  # (half what started: a queue the ramp left in the broker drains)
    set_to(state, reserved=46, active=46, accepted=104)  # (4 slots free, none started since)
    assert backlog.room() == 4
    set_to(state, reserved=10, active=10, accepted=110)  # (mostly free: no bound)
    assert backlog.room() is None


def test_a_busy_pool_of_short_calls_takes_what_it_started() -> None:
    # 6 slots of 20 ms calls, full as a pass begins (the tasks of the last pass ran long
    # ago: a queue in the broker keeps it full) and starting ~60 a tick: what it took is
    # replaced, and no more. Unbounded, passes while pools of 0.5 s calls filled published
    # a second's worth of the pace each: 1,810 tasks waited in the broker.
    state = worker_state(accepted=0)
    backlog = WorkerBacklog(6, state, prefetch=1)
    set_to(state, reserved=6, active=6, accepted=60)
    assert backlog.room() == 60
    set_to(state, reserved=6, active=6, accepted=62)  # (2 started in the last tick: long calls)
    assert backlog.room() == 1
    set_to(state, reserved=5, active=5, accepted=122)  # (a slot free, 60 started: what it takes by the next)
    assert backlog.room() == 61
    set_to(state, reserved=2, active=2, accepted=182)  # (under half busy: room to spare, no bound)
    assert backlog.room() is None


def test_a_pool_of_one_slot_is_bounded_whenever_its_call_runs() -> None:
    # A slot busy is a full pool: one call that just started was never "long" (1 > 2 * 1
    # is false), so no bound held, and a second's worth of the pace went at once.
    state = worker_state(accepted=0)
    backlog = WorkerBacklog(1, state, prefetch=1)
    set_to(state, reserved=1, active=1, accepted=1)  # (its call started since the last ask)
    assert backlog.room() == 1
    set_to(state, reserved=1, active=1, accepted=1)  # (still running: long)
    assert backlog.room() == 0
    set_to(state, reserved=0, active=0, accepted=2)  # (idle again: no bound)
    assert backlog.room() is None


def test_a_worker_that_prefetches_more_is_bounded_only_by_what_waits_in_it() -> None:
    # With a larger prefetch, a queue shows as tasks waiting in the worker (held back above):
    # a full pool with nothing waiting means the broker is empty, and bounding it by its
    # free slots left slots idle (3,000 tasks of 2.5 s: 86.8 s against 81.4 s).
    state = worker_state(accepted=100)
    backlog = WorkerBacklog(50, state, prefetch=4)
    set_to(state, reserved=50, active=50, accepted=104)
    assert backlog.room() is None
    set_to(state, reserved=100, active=50, accepted=108)  # (a pool's worth waiting)
    assert backlog.room() == 0
