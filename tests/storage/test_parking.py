"""Parked tasks in Redis (storage/lua/park.lua, release.lua) against a real redis-server.

The breaker runs on the ``time=client`` seam, and each release passes the same fake
clock's reading, so open periods and the release ramp move only when the test says.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import pytest
import redis
from celery import Celery

from celery_breaker import CircuitBreaker, State
from celery_breaker.core.pacing import PacingLaw
from celery_breaker.errors import StorageError
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis.parking import LIFE_SUFFIX, PARKING_SUFFIXES, RedisParking
from celery_breaker.testing import FakeClock

from ..servers import RedisCluster, poll
from ..unit.support import fail, ok
from .conftest import expire_now, key_ttls, unique_prefix

POLICY = {"failure_threshold": 1, "reset_timeout": 10.0, "half_open_max_calls": 2, "success_threshold": 1}


@pytest.fixture
def store(redis_url: str) -> RedisStore:
    return RedisStore.from_url(f"{redis_url}?time=client&key_prefix={unique_prefix()}")


def park_many(store: RedisStore, count: int, *, name: str = "svc", start: float = 100.0) -> list[str]:
    entries = [f"task-{i}:1" for i in range(count)]
    for i, entry in enumerate(entries):
        store.parking.park(name, None, entry, start + i, f"payload {i}", None)
    return entries


def release(
    store: RedisStore, clock: FakeClock, *, most: int = 100, pace: float = 10.0, ramp: float = 0.0
) -> list[str]:
    tag = store.parking.tag("svc", None)
    return [
        e for e, _ in store.parking.release(tag, most=most, pace=pace, ramp=ramp, lease=30.0, now=clock.monotonic())
    ]


def test_a_parked_entry_is_kept_once_with_its_payload(store: RedisStore) -> None:
    assert store.parking.park("svc", None, "t1:1", 5.0, "body", None) == 1
    assert store.parking.park("svc", None, "t1:1", 5.0, "body", None) == 1  # a redelivered message
    tag = store.parking.tag("svc", None)
    assert store.parking.tags() == [tag]
    assert store.parking.count(tag) == (1, 0)


def test_a_park_whose_reply_is_lost_is_parked_once_and_reported_parked(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis parked the entry, and its reply did not come within the socket timeout: the
    park raised, and the deferral published the task by countdown as well (it ran twice).
    Now it is asked again, and an entry is kept once."""
    real_eval = store.eval
    lost: list[str] = []

    def reply_lost_once(script: str, keys: Any, args: Any, *, doing: str) -> Any:
        reply = real_eval(script, keys, args, doing=doing)
        if script == "park" and not lost:
            lost.append(script)
            raise StorageError(f"redis store: {doing} failed: Timeout reading from socket") from redis.TimeoutError()
        return reply

    monkeypatch.setattr(store, "eval", reply_lost_once)
    assert store.parking.park("svc", None, "t1:0:1", 5.0, "body", None) == 1
    assert lost
    assert store.parking.count(store.parking.tag("svc", None)) == (1, 0)


def test_nothing_is_released_while_the_breaker_is_open(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker)
    park_many(store, 5)
    assert release(store, clock) == []
    clock.advance(9.9)
    assert release(store, clock) == []


def test_only_the_probes_go_when_it_may_half_open_once_per_open_period(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker)
    entries = park_many(store, 10)
    clock.advance(10.0)
    assert release(store, clock) == entries[:2]  # half_open_max_calls, oldest first
    assert release(store, clock) == []  # this open period's probes are out
    breaker.call(ok)  # (a new task) half-opens it ...
    fail(breaker)  # ... and a probe fails: open again, a new period
    assert breaker.state is State.OPEN
    assert release(store, clock) == []
    clock.advance(10.0)
    assert release(store, clock) == entries[2:4]


def test_after_closing_the_backlog_goes_at_a_ramp_in_order(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    entries = park_many(store, 200)
    released: list[str] = []
    per_second = []
    # pace 20/s, reached after 10 s (a tenth of it at first); one release per 0.1 s.
    for _second in range(12):
        count = 0
        for _tick in range(10):
            clock.advance(0.1)
            got = release(store, clock, pace=20.0, ramp=10.0)
            released += got
            count += len(got)
        per_second.append(count)
    assert released == entries[: len(released)]  # oldest first, none twice
    assert per_second[0] <= 4  # about a tenth of the pace at first
    assert 17 <= per_second[-1] <= 21  # the full pace once the ramp is over
    assert per_second == sorted(per_second) or max(per_second[:3]) < min(per_second[-3:])
    assert breaker.state is State.CLOSED


def test_a_breaker_that_reopens_keeps_the_rest_parked(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    park_many(store, 50)
    assert release(store, clock, pace=100.0) == []  # the ramp starts when the releaser first sees it closed
    clock.advance(1.0)
    first = release(store, clock, pace=100.0)
    assert first
    fail(breaker)
    clock.advance(0.5)
    assert release(store, clock, pace=100.0) == []
    tag = store.parking.tag("svc", None)
    assert store.parking.count(tag)[0] == 50 - len(first)


def test_entries_past_their_deadline_go_whatever_the_breaker_says(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.force_open()
    now = clock.monotonic()
    store.parking.park("svc", None, "expiring:1", 1.0, "x", now + 5.0)
    store.parking.park("svc", None, "patient:1", 0.5, "y", None)
    assert release(store, clock) == []
    clock.advance(5.0)
    assert release(store, clock) == ["expiring:1"]
    assert release(store, clock) == []


def test_a_forced_open_breaker_holds_its_backlog_past_the_idle_ttl(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.force_open()
    entries = park_many(store, 5)
    assert set(key_ttls(store, "svc").values()) == {-1}  # state and parking: none expires
    expire_now(store, "svc")  # the idle TTL passing: nothing goes, the breaker still reads forced_open
    for _ in range(3):
        clock.advance(1.0)
        assert release(store, clock) == []
    breaker.close()
    assert release(store, clock) == []  # the ramp starts when the releaser first sees it closed
    clock.advance(1.0)
    assert release(store, clock) == entries


def test_a_claim_not_published_in_time_is_released_again_in_order(store: RedisStore) -> None:
    clock = FakeClock()
    CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    entries = park_many(store, 3)
    tag = store.parking.tag("svc", None)
    assert release(store, clock, pace=1.0) == []  # the ramp starts
    clock.advance(1.0)
    claimed = store.parking.release(tag, most=1, pace=1.0, ramp=0.0, lease=30.0, now=clock.monotonic())
    assert [e for e, _ in claimed] == entries[:1]
    assert store.parking.count(tag) == (2, 1)
    # The releaser died before publishing: after the lease the entry is back, first in line.
    clock.advance(30.0)
    again = store.parking.release(tag, most=1, pace=1.0, ramp=0.0, lease=30.0, now=clock.monotonic())
    assert [e for e, _ in again] == entries[:1]
    store.parking.done(tag, [entries[0]])
    assert store.parking.count(tag) == (2, 0)


def test_the_index_forgets_a_breaker_only_when_it_holds_nothing(store: RedisStore, redis_url: str) -> None:
    clock = FakeClock()
    CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    park_many(store, 1)
    tag = store.parking.tag("svc", None)
    store.parking.forget(tag)
    assert store.parking.tags() == [tag]  # still holds an entry
    release(store, clock)  # the ramp starts
    clock.advance(1.0)
    claimed = release(store, clock)
    store.parking.done(tag, claimed)
    store.parking.forget(tag)
    assert store.parking.tags() == []
    assert not redis.Redis.from_url(redis_url).exists(tag + ":q", tag + ":m", tag + ":c")


@pytest.mark.parametrize("pace_kind", ["fixed", "adaptive"])
def test_a_breakers_release_pace_lives_the_idle_ttl_past_its_last_release(
    store: RedisStore, redis_url: str, pace_kind: str
) -> None:
    """The pacing hash names no entry: once the breaker has released everything, it goes
    with the breaker's own keys (it was kept for good, one per breaker and key that ever
    parked a task: per-tenant breakers grew Redis without bound)."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker)
    park_many(store, 1)
    tag = store.parking.tag("svc", None)
    law = PacingLaw() if pace_kind == "adaptive" else None
    clock.advance(10.0)
    assert store.parking.release(
        tag, most=5, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic(), law=law
    )  # a probe
    assert breaker.call(ok) == "ok"  # the probe closes it
    store.parking.done(tag, ["task-0:1"])
    store.parking.release(tag, most=5, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic(), law=law)
    store.parking.forget(tag)
    assert store.parking.tags() == []
    client = redis.Redis.from_url(redis_url)
    assert client.exists(tag + ":p")
    assert 0 < client.pttl(tag + ":p") <= store.idle_ttl * 1000


def test_parked_entries_never_expire_and_outlive_their_breakers_state(store: RedisStore, redis_url: str) -> None:
    """Parked entries have no TTL (a TTL would drop tasks); the breaker's own keys do. Once
    those expire (a breaker nobody uses), its entries go at the paced ramp, as if closed."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker)
    entries = park_many(store, 3)
    assert release(store, clock) == []
    client = redis.Redis.from_url(redis_url)
    tag = store.parking.tag("svc", None)
    assert client.ttl(tag + ":q") == client.ttl(tag + ":m") == -1  # kept until released
    state = [key for key in store.keys_for("svc", None) if client.exists(key)]
    assert state
    assert all(client.ttl(key) > 0 for key in state)  # the breaker's state has its idle TTL
    client.delete(*state)  # what that TTL does to a breaker nobody uses
    assert release(store, clock) == []  # the ramp starts
    clock.advance(1.0)
    assert release(store, clock) == entries


def test_parking_keys_never_clash_with_the_breakers_own_keys() -> None:
    """Regression: the pacing hash was ``:r``, the count window's ring too (WRONGTYPE:
    a count-window breaker's parked tasks were never released)."""
    from celery_breaker.storage.redis.parking import PARKING_SUFFIXES
    from celery_breaker.storage.redis.store import _KEY_SUFFIXES

    assert not set(PARKING_SUFFIXES) & set(_KEY_SUFFIXES)
    assert len(set(PARKING_SUFFIXES)) == len(PARKING_SUFFIXES)


def test_a_count_window_breakers_backlog_is_released(store: RedisStore) -> None:
    clock = FakeClock()
    policy = {"failure_rate_threshold": 0.5, "count_window": 10, "minimum_calls": 5, "reset_timeout": 10.0}
    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock)
    fail(breaker)  # a failure goes to Redis at once: the count window's ring exists
    entries = park_many(store, 3)
    assert release(store, clock) == []  # the ramp starts
    clock.advance(1.0)
    assert release(store, clock) == entries
    snapshot = breaker.snapshot()
    assert (snapshot.window_failures, snapshot.window_calls) == (1, 1)  # the window is intact


def test_purge_discards_in_bounded_chunks_oldest_first(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_breaker.storage.redis import parking

    monkeypatch.setattr(parking, "PURGE_CHUNK", 2)  # five entries: three script calls
    park_many(store, 5)
    tag = store.parking.tag("svc", None)
    assert store.parking.purge(tag) == 5
    assert store.parking.count(tag) == (0, 0)
    assert not store.client().exists(tag + ":q", tag + ":m", tag + ":d")
    assert store.parking.purge(tag) == 0  # nothing left: nothing to do


@pytest.mark.parametrize("pace_kind", ["fixed", "adaptive"])
def test_a_pace_below_one_task_a_second_still_releases(store: RedisStore, pace_kind: str) -> None:
    """``breaker_release_rate=0.5``: one task every two seconds. (The allowance was capped
    at one second's worth, 0.5 of a task: nothing ever went.)"""
    clock = FakeClock()
    entries = park_many(store, 3)
    tag = store.parking.tag("svc", None)
    law = PacingLaw(ceiling=0.5) if pace_kind == "adaptive" else None
    went: list[tuple[int, str]] = []
    for second in range(13):
        claimed = store.parking.release(tag, most=100, pace=0.5, ramp=0.0, lease=30.0, now=clock.monotonic(), law=law)
        went += [(second, entry) for entry, _ in claimed]
        clock.advance(1.0)
    assert [entry for _, entry in went] == entries
    seconds = [second for second, _ in went]
    assert all(later - earlier >= 2 for earlier, later in itertools.pairwise(seconds))  # (never faster than 0.5/s)


def test_probes_that_never_ran_go_again_after_a_lease(store: RedisStore) -> None:
    """The probes released were published, then revoked or lost: nobody called the
    breaker, which stayed OPEN with its time up. The next probes go a lease later,
    rather than the backlog waiting for the breaker state's idle TTL (a day)."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker)
    entries = park_many(store, 6)
    clock.advance(10.0)
    probes = release(store, clock)
    assert probes == entries[:2]
    store.parking.done(store.parking.tag("svc", None), probes)  # (published, and never ran)
    clock.advance(29.0)
    assert release(store, clock) == []  # (within the lease: they may still be on their way)
    clock.advance(2.0)
    assert release(store, clock) == entries[2:4]
    assert breaker.snapshot().state is State.OPEN  # (the release moves no breaker)


def test_a_probe_slot_freed_by_a_lease_running_out_gets_a_probe_before_the_claim_lease(store: RedisStore) -> None:
    """A probe's worker died with it (SIGKILL): its slot's lease runs out (here 8 s, as a
    task's time limit sets it, decision 85), and nothing reports. The next probe went only
    once the releaser's 30 s claim lease had run out (30 s to recover where 8 s would do).
    Now a slot found free again gets a probe, 5 s at least after the period's first."""
    clock = FakeClock()
    policy = {**POLICY, "half_open_max_calls": 1}
    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock)
    fail(breaker)
    entries = park_many(store, 4)
    clock.advance(10.0)
    (probe,) = release(store, clock)
    assert probe == entries[0]
    store.parking.done(store.parking.tag("svc", None), [probe])  # (published)
    cell = store._cells[("svc", None)]
    cell.acquire(breaker.policy, clock.monotonic(), 8.0)  # (its task took the slot for 8 s, and died)
    clock.advance(6.0)
    assert release(store, clock) == []  # (the slot is taken: its lease runs)
    clock.advance(3.0)  # (9 s: the lease has run out)
    assert release(store, clock) == entries[1:2]
    assert release(store, clock) == []  # (once: that slot's probe is on its way)
    assert breaker.snapshot().state is State.HALF_OPEN


def test_entries_past_their_deadline_take_no_probes_place(store: RedisStore) -> None:
    """As many entries past their deadline as a tick may release (``most``) fell due when
    the open time was up: they went, and so did the probes. The probes were counted as
    sent but none went: the breaker stayed OPEN a lease longer (30 s)."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker)
    entries = park_many(store, 10)
    due = clock.monotonic() + 10.0
    expiring = [f"expiring-{i}:1" for i in range(5)]
    for i, entry in enumerate(expiring):
        store.parking.park("svc", None, entry, 50.0 + i, "x", due)
    clock.advance(10.0)
    assert release(store, clock, most=5) == expiring + entries[:2]  # the probes too
    assert breaker.snapshot().state is State.OPEN


def test_a_redis_clock_that_steps_back_keeps_the_fixed_pace(store: RedisStore) -> None:
    """Redis's clock steps back 100 s (a failover to a server whose clock is behind): the
    fixed pace goes on at 100/s. Its ramp's start stayed ahead of the clock, and the
    pace fell to a tenth (10/s) for 100 s, then ramped up again for 30 s."""
    clock = FakeClock()
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).call(ok)
    park_many(store, 5_000)
    tag = store.parking.tag("svc", None)

    def released(now: float) -> int:
        return len(store.parking.release(tag, most=1000, pace=100.0, ramp=30.0, lease=30.0, now=now))

    now = clock.monotonic()
    released(now)
    now += 31.0
    released(now)  # (the ramp is over)
    assert released(now + 1.0) == 100
    now = now + 1.0 - 100.0
    assert released(now) == 0  # (the step itself lasted no time)
    assert [released(now + s) for s in (1.0, 2.0, 3.0)] == [100, 100, 100]


def test_a_half_open_breaker_short_of_successes_gets_more_probes(store: RedisStore) -> None:
    """One probe came back (a success), the other never ran: HALF_OPEN, one success short
    of closing, and nobody else calls it. More probes go a lease later; and however few
    entries a tick may release (``most``), a probe batch is never cut below what closing takes."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", {**POLICY, "success_threshold": 2}, storage=store, clock=clock)
    fail(breaker)
    entries = park_many(store, 6)
    clock.advance(10.0)
    assert release(store, clock, most=1) == entries[:2]  # (both probes, though most=1)
    store.parking.done(store.parking.tag("svc", None), entries[:2])
    breaker.call(ok)  # the first probe ran and succeeded: HALF_OPEN, short of closing
    assert breaker.snapshot().state is State.HALF_OPEN
    clock.advance(31.0)
    assert release(store, clock, most=1) == entries[2:4]


def test_a_parking_lost_in_a_restart_is_reported_even_if_this_process_parks_again_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The epoch that names a parking's life was made once per process and written back on
    # every park: the first park after Redis restarted empty restored the lost parking's
    # epoch, and no releaser that had read it reported the loss.
    import logging
    import time

    from celery import Celery

    from celery_breaker.integration.deferral.release import Releaser

    from ..servers import RedisServer

    with RedisServer() as server:
        server.start()
        store = RedisStore.from_url(f"{server.url}/0?key_prefix={unique_prefix()}")
        parking = store.parking
        assert parking is not None
        releaser = Releaser(Celery("loss", broker="memory://", set_as_current=False), parking, rate=10.0, ramp=0.0)
        for i in range(5):
            parking.park("crm", None, f"e{i}", float(i), "{}", None)
        assert releaser.watch_for_loss(time.monotonic()) == 0  # (counted: 5 parked)
        server.kill()
        server.start()  # (no persistence: the 5 are gone)
        parking.park("crm", None, "after", 10.0, "{}", None)  # (this process parks first)
        with caplog.at_level(logging.ERROR, logger="celery_breaker"):
            assert releaser.watch_for_loss(time.monotonic()) == 5
        assert "lost its parked tasks" in caplog.text
        assert "crm: 5" in caplog.text
        store.close()


def test_an_entry_parked_again_while_claimed_keeps_its_new_message(store: RedisStore) -> None:
    """Released, the task ran, was retried and parked again under the same entry before
    the releaser finished its batch: the releaser's ``done`` forgets its claim only, and
    the new message is released next (deleting it lost the task without a word)."""
    clock = FakeClock()
    CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    entries = park_many(store, 2)
    tag = store.parking.tag("svc", None)
    release(store, clock)  # the ramp starts
    clock.advance(1.0)
    claimed = release(store, clock)
    assert claimed == entries
    store.parking.park("svc", None, entries[0], 200.0, "the retry", None)
    store.parking.done(tag, claimed)
    assert store.parking.count(tag) == (1, 0)
    clock.advance(1.0)
    again = store.parking.release(tag, most=100, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())
    assert again == [(entries[0], "the retry")]


def test_a_retry_parks_as_another_entry_and_a_redelivery_as_the_same() -> None:
    from celery_breaker.integration.deferral.parking import entry_id

    first = entry_id("t-1", 0, 1)
    assert entry_id("t-1", 0, 1) == first  # the same delivery again: parked once
    assert entry_id("t-1", None, 1) == first  # (a request without retries: attempt 0)
    assert entry_id("t-1", 1, 1) != first  # Celery's retry of it: its own entry
    assert entry_id("t-1", 0, 2) != first


def test_a_log_line_about_parked_tasks_names_the_biggest_backlogs_only(
    store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    # An outage that tripped 20,000 per-key breakers, one task parked behind each, made the
    # releaser's "task(s) parked" INFO line 388,936 characters long, in every worker.
    import logging
    import time

    from celery import Celery

    from celery_breaker.integration.deferral.release import NAMED_IN_LOG, Releaser

    parking = store.parking
    for i in range(NAMED_IN_LOG + 20):
        parking.park("crm", f"t-{i}", f"e{i}", float(i), "{}", None)
    for n in range(7):
        parking.park("crm", "big", f"b{n}", float(100 + n), "{}", None)
    releaser = Releaser(Celery("many", broker="memory://", set_as_current=False), parking, rate=10.0, ramp=0.0)
    with caplog.at_level(logging.INFO, logger="celery_breaker"):
        releaser.watch_for_loss(time.monotonic())
    (line,) = [r.getMessage() for r in caplog.records if "task(s) parked" in r.getMessage()]
    assert line.startswith(f"celery-breaker releaser: {NAMED_IN_LOG + 27} task(s) parked (crm[big]: 7, crm[t-0]: 1, ")
    assert line.endswith(", and 21 more breakers)")
    assert line.count(": 1") == NAMED_IN_LOG - 1


def loss_watcher(store: RedisStore) -> Releaser:
    """A releaser of ``store``'s parking whose loss watch the test runs by hand."""
    return Releaser(Celery("loss", broker="memory://", set_as_current=False), store.parking, rate=10.0, ramp=0.0)


def test_one_breakers_lost_parking_is_reported_naming_it_and_a_drained_one_is_not(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One breaker's parking keys gone (deleted, evicted, a Cluster node restarted empty),
    the parking's epoch untouched: its tasks went without a word. Another breaker drained
    by its releases in the same second is no loss."""
    clock = FakeClock()
    parking = store.parking
    CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    park_many(store, 3, name="svc")
    park_many(store, 4, name="gone")
    park_many(store, 2, name="kept")
    watcher = loss_watcher(store)
    assert watcher.watch_for_loss(0.0) == 0  # (counted: 9 parked)
    server = redis.Redis.from_url(redis_url)
    gone = parking.tag("gone", None)
    server.delete(*(gone + suffix for suffix in (*PARKING_SUFFIXES, LIFE_SUFFIX)))
    release(store, clock)  # (svc's pace starts)
    clock.advance(1.0)
    drained = release(store, clock)
    parking.done(parking.tag("svc", None), drained)
    assert release(store, clock) == []
    parking.forget(parking.tag("svc", None))  # (what the releaser does next)
    with caplog.at_level(logging.INFO, logger="celery_breaker"):
        assert watcher.watch_for_loss(1.0) == 4
        assert watcher.watch_for_loss(2.0) == 0  # (once)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "lost the tasks parked behind 1 breaker(s)" in errors[0]
    assert "4 task(s) were parked" in errors[0]
    assert "(gone: 4)" in errors[0]
    assert 0 < server.pttl(parking.tag("svc", None) + LIFE_SUFFIX) <= 86_400_000  # (forgotten: the idle TTL)
    park_many(store, 1, name="svc")
    assert server.pttl(parking.tag("svc", None) + LIFE_SUFFIX) == -1  # (parked again: kept for good)


def test_a_breaker_parked_again_after_its_loss_is_still_reported(store: RedisStore, redis_url: str) -> None:
    parking = store.parking
    park_many(store, 5, name="crm")
    watcher = loss_watcher(store)
    watcher.watch_for_loss(0.0)
    tag = parking.tag("crm", None)
    redis.Redis.from_url(redis_url).delete(*(tag + suffix for suffix in (*PARKING_SUFFIXES, LIFE_SUFFIX)))
    park_many(store, 1, name="crm", start=500.0)  # (before the next count: 1 parked, as if nothing went)
    assert watcher.watch_for_loss(1.0) == 5


def test_a_life_gone_alone_while_its_tasks_stay_is_no_loss(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    parking = store.parking
    park_many(store, 3, name="crm")
    watcher = loss_watcher(store)
    watcher.watch_for_loss(0.0)
    redis.Redis.from_url(redis_url).delete(parking.tag("crm", None) + LIFE_SUFFIX)  # (evicted, say)
    with caplog.at_level(logging.ERROR, logger="celery_breaker"):
        assert watcher.watch_for_loss(1.0) == 0
        park_many(store, 1, name="crm", start=500.0)  # (a life again: a new one, the tasks kept)
        assert watcher.watch_for_loss(2.0) == 0
        assert watcher.watch_for_loss(3.0) == 0
    assert caplog.text == ""


@pytest.mark.parametrize("marker_too", [False, True], ids=["life", "life and marker"])
def test_a_life_gone_alone_and_written_again_before_the_next_count_is_no_loss(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture, marker_too: bool
) -> None:
    # An acceptance tester deleted a breaker's life (as an eviction would) with 49 tasks
    # parked, and parked 5 more before the next count: the new life was taken for a new
    # parking, and an ERROR said the 49 were lost (they all ran). With the parking's
    # marker gone too, "the breaker store lost its parked tasks".
    parking = store.parking
    park_many(store, 3, name="crm")
    watcher = loss_watcher(store)
    watcher.watch_for_loss(0.0)
    server = redis.Redis.from_url(redis_url)
    server.delete(parking.tag("crm", None) + LIFE_SUFFIX)
    if marker_too:
        server.delete(parking.marker)
    parking.park("crm", None, "new-task:1", 500.0, "payload", None)  # (a life again, over the 3 still parked)
    with caplog.at_level(logging.ERROR, logger="celery_breaker"):
        assert watcher.watch_for_loss(1.0) == 0
        assert watcher.watch_for_loss(2.0) == 0
    assert caplog.text == ""
    # Lost afterwards with its entries, it is reported as before.
    tag = parking.tag("crm", None)
    server.delete(*(tag + suffix for suffix in (*PARKING_SUFFIXES, LIFE_SUFFIX)))
    parking.park("crm", None, "newer-task:1", 900.0, "payload", None)
    assert watcher.watch_for_loss(3.0) == 4


def test_two_parks_racing_after_the_store_restarted_empty_still_report_the_loss(
    store: RedisStore, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (A review of the KEPT_LIFE change: the life was written in a round trip after the
    # entry, marked kept when that park's count was above 1. Two processes parking after
    # the store restarted empty, A's life write held back behind B's whole park: B's life,
    # "kept", hid the loss of the 3 tasks parked before. park.lua now writes it with the entry.)
    other = RedisStore.from_url(store.url)  # (another process's store)
    park_many(store, 3, name="crm")
    watcher = loss_watcher(store)
    watcher.watch_for_loss(0.0)
    redis.Redis.from_url(redis_url).flushall()
    real = RedisParking._own_keys
    rounds: list[str] = []

    def late_second_round(parking: RedisParking, doing: str, queue: Any) -> Any:
        if parking is store.parking and "new-a" in doing:
            rounds.append(doing)
            if len(rounds) == 2:  # (A's round trip after its park script: B parks first)
                other.parking.park("crm", None, "new-b:1", 201.0, "payload", None)
        return real(parking, doing, queue)

    monkeypatch.setattr(RedisParking, "_own_keys", late_second_round)
    store.parking.park("crm", None, "new-a:1", 200.0, "payload", None)
    assert len(rounds) == 2
    assert watcher.watch_for_loss(1.0) == 3
    other.close()


@pytest.mark.slow
@pytest.mark.parametrize("victim_holds_the_marker", [False, True])
def test_a_cluster_node_restarted_empty_is_reported_with_the_breakers_it_held(
    caplog: pytest.LogCaptureFixture, victim_holds_the_marker: bool
) -> None:
    """The parking's epoch lives on one node: a primary restarted without its data took the
    tasks parked behind its breakers with it, and no releaser said so (20 of 60 in a run);
    when that node held the epoch, every task was reported lost (60), the 35 kept too."""
    with RedisCluster() as cluster:
        cluster.start()
        store = RedisStore.from_url(f"{cluster.url}?key_prefix={unique_prefix()}")
        try:
            parking = store.parking
            client: Any = store.client()
            holders: set[int] = set()
            for n in itertools.count():  # (12 breakers at least, and some on every primary)
                park_many(store, 2, name=f"crm{n}")
                holders.add(client.get_node_from_key(parking.tag(f"crm{n}", None) + ":q").port)
                if n >= 11 and len(holders) == len(cluster.nodes):
                    break
            watcher = loss_watcher(store)
            assert watcher.watch_for_loss(0.0) == 0
            marker = client.get_node_from_key(parking.marker).port
            victim = next(node for node in cluster.nodes if (node.port == marker) == victim_holds_the_marker)
            held = sorted(tag for tag in parking.tags() if client.get_node_from_key(tag + ":q").port == victim.port)
            victim.kill()
            victim.start()  # (no persistence: its slots come back empty)
            poll(lambda: victim.admin().cluster("INFO")["cluster_state"] == "ok", "the node back in the cluster")
            with caplog.at_level(logging.ERROR, logger="celery_breaker"):
                poll(lambda: _watched(watcher), "a loss watch that reaches every node")
        finally:
            store.close()
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"lost the tasks parked behind {len(held)} breaker(s)" in error
    assert f"{2 * len(held)} task(s) were parked" in error
    assert all(f"{parking.label(tag)}: 2" in error for tag in held)
    assert "the other breakers' are kept" in error


def _watched(watcher: Releaser) -> bool:
    try:
        watcher.watch_for_loss(1.0)
    except StorageError:
        return False  # (the client has not found the node back yet)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("victim_holds", ["index", "marker", "lookout_key"])
def test_a_cluster_node_down_holds_back_only_the_tasks_parked_behind_its_breakers(victim_holds: str) -> None:
    """With `cluster-require-full-coverage no` the other primaries serve their breakers, but
    the parking's index, its marker and the lookout live on a slot each: on 3 primaries,
    any one down stopped every release (0 of 200 on healthy nodes in a review's run). The
    releaser now goes on from its last listing, watches for losses apart, and asks a
    breaker it cannot reach again only after a growing wait."""
    with RedisCluster() as cluster:
        cluster.start()
        for node in cluster.nodes:
            node.admin().config_set("cluster-require-full-coverage", "no")
        prefix = unique_prefix()
        store = RedisStore.from_url(f"{cluster.url}?key_prefix={prefix}")
        releaser: Releaser | None = None
        try:
            parking = store.parking
            client: Any = store.client()
            victim_port = client.get_node_from_key(getattr(parking, victim_holds)).port
            app = Celery("partial", broker="memory://", set_as_current=False)
            payload = encode_message(dict(app.signature("a.charge", args=(1,))), "json")
            names: dict[str, int] = {}  # (12 breakers at least, and some on every primary)
            for n in itertools.count():
                name = f"crm{n}"
                CircuitBreaker(name, storage=store).force_open()  # (nothing goes before the node is down)
                parking.park(name, None, f"t-{n}:1", 1.0, payload, None)
                names[name] = client.get_node_from_key(parking.tag(name, None) + ":q").port
                if n >= 11 and len(set(names.values())) == len(cluster.nodes):
                    break
            releaser = Releaser(app, parking, rate=1000.0, ramp=0.0, tick=0.05)
            releaser.start()
            poll(lambda: releaser is not None and releaser._listed is not None, "the releaser's first listing")
            killed_at = time.monotonic()
            next(node for node in cluster.nodes if node.port == victim_port).kill()
            # (a loss watch after the kill: a failed one held back every release)
            poll(lambda: releaser is not None and (releaser._counted_at or 0.0) > killed_at, "a loss watch")
            served = [name for name, port in names.items() if port != victim_port]
            # An operator's close, on nodes still up, from a store of its own (as from another
            # process: redis-py 5.1's cluster client, shared with the releaser's thread while
            # a node is down, closed a connection the other thread was reading from).
            operator = RedisStore.from_url(f"{cluster.url}?key_prefix={prefix}")
            for name in served:
                CircuitBreaker(name, storage=operator).close()
            operator.close()
            poll(lambda: releaser is not None and releaser.released >= len(served), "the served breakers' tasks")
            assert releaser.released == len(served)
        finally:
            if releaser is not None:
                releaser.stop()
            store.close()
