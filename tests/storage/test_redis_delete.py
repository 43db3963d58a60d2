"""A deleted breaker stays deleted: counts a process sends after the delete make no breaker.

A worker sends its rejections, deferrals and quiet successes up to a second after it
counted them, and a dropped breaker object's counts (an orphan) later still. Counted
under the deleted breaker, they are dropped (decision 87); their send made the breaker
again all the same, closed and empty, and an operator saw the breaker they had deleted
come back in ``status``, the page and the metrics. Counts the breaker made again is
owed (untold: counted after the process heard the delete, or after the keys may have
expired idle) still make it, and a call still makes it at once.
"""

from __future__ import annotations

import pytest
import redis

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock

from ..unit.support import fail, ok
from .test_redis_hot_path import Trips, live_breaker


def keys_of(server: redis.Redis, store: RedisStore, name: str) -> list[bytes | str]:
    """Every key under the breaker's hash tag: state, windows, leases, history."""
    tag = store.keys_for(name, None)[0][: -len(":s")]
    return list(server.keys(tag.replace("{", "\\{").replace("}", "\\}") + "*"))


def delete_unheard(store: RedisStore, name: str) -> None:
    """An operator's delete whose message this process has not heard yet (in flight, or
    missed while its subscription was down): ``forget.lua`` publishing nothing."""
    keys = [*store.keys_for(name, None), store.history.key(name, None)]
    assert store.eval("forget", keys, [""], doing="deleting") == [1]


def reject_and_defer(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(CircuitOpenError):
            breaker.call(ok)  # (rejected from the local view: counted here)
        breaker.note_deferral()


@pytest.mark.parametrize("heard", [True, False], ids=["heard", "unheard"])
def test_counts_sent_after_a_delete_do_not_make_the_breaker_again(url: str, server: redis.Redis, heard: bool) -> None:
    clock = FakeClock()
    there, there_store, cell = live_breaker(url, {"failure_threshold": 1}, clock)
    fail(there)
    assert there_store.sync()
    here_store = RedisStore.from_url(url)
    with cell._sending:  # (the agent's flush waits: the counts stay unsent until after the delete)
        reject_and_defer(there, 5)
        assert cell.pending
        clock.advance(1.0)  # (a breaker made again is a new incarnation: this test's clock)
        if heard:
            assert here_store.delete("svc", None)
        else:
            delete_unheard(here_store, "svc")
    if heard:
        assert there_store.sync()
    there_store.flush()
    assert here_store.snapshots(clock) == []
    assert keys_of(server, here_store, "svc") == []
    # Its next call makes it afresh, and what it counts from then on is kept.
    assert there.call(ok) == "ok"
    there.note_deferral()
    there_store.flush()
    (fresh,) = here_store.snapshots(clock)
    assert (fresh.state, fresh.successes, fresh.deferrals, fresh.rejections, fresh.trips) == (State.CLOSED, 1, 1, 0, 0)
    here_store.close()
    there_store.close()


def test_counts_of_a_dropped_breaker_object_do_not_make_a_deleted_breaker_again(url: str, server: redis.Redis) -> None:
    # Code that makes a breaker object per call leaves its counts to the store when the
    # last object goes (RedisCell.__del__): the store's next flush read the breaker to
    # send them, and the read alone made it again.
    store = RedisStore.from_url(url)
    breaker = CircuitBreaker("svc", {"failure_threshold": 1}, storage=store)
    breaker.force_open()
    cell = store._cells[("svc", None)]
    with store._sending_orphans, cell._sending:  # (held: the delete comes before they are sent)
        reject_and_defer(breaker, 5)
        cell.__del__()  # (what the garbage collector runs when the last breaker object goes)
        del store._cells[("svc", None)]  # (and the store forgets the cell: the next is a new one)
        assert len(store.orphans) == 1
        here_store = RedisStore.from_url(url)
        assert here_store.delete("svc", None)
    store.flush()
    assert store.orphans == []
    assert here_store.snapshots(SYSTEM_CLOCK) == []
    assert keys_of(server, here_store, "svc") == []
    store.close()
    here_store.close()


def test_a_process_reading_its_views_again_does_not_make_a_deleted_breaker_again(url: str, server: redis.Redis) -> None:
    # A process whose subscription was down missed the delete; subscribed again, its
    # agent reads every view it holds (flush(everything=True)) before trusting them.
    clock = FakeClock()
    there, there_store, cell = live_breaker(url, {"failure_threshold": 1}, clock)
    there.call(ok)
    there_store.flush()
    assert cell.passing
    clock.advance(1.0)
    delete_unheard(there_store, "svc")
    there_store.flush(everything=True)
    assert there_store.snapshots(clock) == []
    assert keys_of(server, there_store, "svc") == []
    # Read as a delete is heard: its next call asks Redis, which makes the breaker afresh.
    assert (cell.state, cell.passing) == (State.CLOSED, False)
    trips = Trips(there_store)
    assert there.call(ok) == "ok"
    assert trips.count == 1
    there_store.flush()
    (fresh,) = there_store.snapshots(clock)
    assert (fresh.state, fresh.successes) == (State.CLOSED, 1)
    there_store.close()


def test_successes_counted_after_an_idle_breaker_expired_make_it_again_by_their_send(
    url: str, server: redis.Redis
) -> None:
    # Keys that expire idle tell nobody: a process whose view is older than idle_ttl sends
    # its counts untold, as the new breaker's (decision 87), and their send alone, with no
    # failure or other script call before it, makes the breaker and counts them.
    clock = FakeClock()
    there, there_store, cell = live_breaker(f"{url}&idle_ttl=60", {"failure_threshold": 3}, clock)
    there.call(ok)
    there_store.flush()
    server.delete(*cell._keys)  # (the keys expire: nothing is published)
    cell._seen -= 61.0  # (nothing read or heard of the breaker for longer than idle_ttl)
    clock.advance(61.0)
    for _ in range(4):
        there.call(ok)
    there_store.flush()
    (made,) = there_store.snapshots(clock)
    assert (made.state, made.successes) == (State.CLOSED, 4)
    there_store.close()
