"""A worker whose own pool takes no more releases no more at the pace (real Redis, in-memory broker).

The adaptive release learns of busy workers only from the outcomes that come back, a
latency late: against 2.5 s calls it released far faster than the workers ran, and the
surplus waited in the broker ahead of every other task of its queue. A releaser given
its worker's backlog (``WorkerBacklog.room``) releases nothing at the pace in a pass
where that is 0, no more than its pool will take in a pass where it is bounded (shared
by its breakers in turn), and as before once it is neither. Probes and tasks past their
deadline go whatever the room.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_breaker import CircuitBreaker, State
from celery_breaker.core.pacing import PacingLaw
from celery_breaker.errors import StorageError
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.storage.redis import RedisStore

from .conftest import unique_prefix

ENTRIES = 6


def parked_releaser(
    redis_url: str,
    backlog: Callable[[], int | None] | None,
    *,
    law: PacingLaw | None = None,
    rate: float | None = None,
    breakers: tuple[str, ...] = ("svc",),
) -> tuple[Releaser, str, list[str]]:
    """A releaser of ``ENTRIES`` tasks parked behind each of ``breakers`` (no state:
    closed), the first one's tag, and the message ids it published."""
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    parking = store.parking
    assert parking is not None
    app = Celery("backlog", set_as_current=False, broker="memory://")
    app.conf.update(task_default_queue="backlog-queue")
    for name in breakers:
        for n in range(ENTRIES):
            body = dict(app.signature("a.charge", args=(n,)))
            parking.park(name, None, f"{name}-{n}:0:1", float(n), encode_message(body, "json"), None)
    if law is None and rate is None:
        law = PacingLaw(start=1000.0)  # (the whole backlog within a few ms once it may go)
    releaser = Releaser(app, parking, rate=rate, ramp=0.0, law=law, backlog=backlog)
    published: list[str] = []
    publish = releaser._publish

    def noted(tag: str, claimed: list[tuple[str, str]]) -> list[str]:
        sent = publish(tag, claimed)
        published.extend(sent)
        return sent

    releaser._publish = noted  # type: ignore[method-assign]
    return releaser, parking.tag(breakers[0], None), published


def release_for(releaser: Releaser, seconds: float, until: Callable[[], bool] | None = None) -> None:
    """Release passes for ``seconds``; with ``until``, until it holds (at most 20 s: the
    pace releases in milliseconds, but a busy machine may give the passes little time)."""
    deadline = time.monotonic() + (seconds if until is None else 20.0)
    while time.monotonic() < deadline and not (until is not None and until()):
        releaser.release_once()
        time.sleep(0.01)


def test_a_worker_whose_waiting_tasks_cover_its_pool_releases_nothing_until_it_has_room(redis_url: str) -> None:
    room: list[int | None] = [0]
    releaser, tag, published = parked_releaser(redis_url, lambda: room[0])
    release_for(releaser, 0.3)  # (the pace's tokens fill within a few ms: held, not empty)
    assert published == []
    assert releaser.parking.count(tag) == (ENTRIES, 0)  # every entry still parked, none claimed
    assert releaser.held_back > 0
    room[0] = None
    release_for(releaser, 0.3, until=lambda: len(published) >= ENTRIES)
    assert sorted(published) == sorted(f"svc-{n}:0:1" for n in range(ENTRIES))  # each once
    assert releaser.parking.count(tag) == (0, 0)


def test_the_fixed_pace_is_not_held_back(redis_url: str) -> None:
    # breaker_release_pace="fixed" is the rate its operator chose: it releases at it.
    releaser, _, published = parked_releaser(redis_url, lambda: 0, rate=1000.0)
    release_for(releaser, 0.3, until=lambda: len(published) >= ENTRIES)
    assert len(published) == ENTRIES
    assert releaser.held_back == 0


def test_a_backlog_that_cannot_be_read_releases_as_before(redis_url: str) -> None:
    def unreadable() -> bool:
        raise AttributeError("module 'celery.worker.state' has no attribute 'all_total_count'")

    releaser, _, published = parked_releaser(redis_url, unreadable)
    release_for(releaser, 0.3, until=lambda: len(published) >= ENTRIES)
    assert len(published) == ENTRIES


def test_a_held_pass_still_forgets_what_an_earlier_pass_published(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Entries published by a pass whose ``done`` failed are forgotten by the next pass,
    # before their claim's lease runs out and they are published again: a held pass too.
    releaser, tag, published = parked_releaser(redis_url, lambda: 0)
    forgotten: list[tuple[str, list[str]]] = []
    done = releaser.parking.done

    def noting(tag: str, found: list[str]) -> Any:
        forgotten.append((tag, list(found)))
        return done(tag, found)

    monkeypatch.setattr(releaser.parking, "done", noting)
    releaser._undone[tag] = ["svc-0:0:1"]
    releaser.release_once()
    assert [(t, found) for t, found in forgotten if found] == [(tag, ["svc-0:0:1"])]
    assert tag not in releaser._undone
    assert published == []


def test_a_pass_publishes_no_more_than_the_pool_will_take_across_its_breakers(redis_url: str) -> None:
    # A pool of long calls, full but for what frees each tick: a pass publishes what it will
    # take (3 here), over every breaker together, not a second's worth of the pace in one go.
    releaser, _, published = parked_releaser(redis_url, lambda: 3, breakers=("svc", "other"))
    releaser.release_once()  # (each breaker's pace begins: no token yet)
    time.sleep(0.05)  # (50 tokens each, at 1,000/s)
    for passes in range(1, 4):
        releaser.release_once()
        assert len(published) == 3 * passes
    assert releaser.bounded == 4
    assert releaser.held_back == 0


def test_a_small_room_is_shared_by_the_breakers_in_turn(redis_url: str) -> None:
    # Room for 2 a pass: the breaker listed first took it on every pass, and the others
    # (their probes and expired tasks too, before those went whatever the room) waited
    # until it had drained.
    releaser, _, published = parked_releaser(redis_url, lambda: 2, breakers=("alpha", "beta"))
    assert four_passes(releaser, published) == {"alpha": 4, "beta": 4}


def four_passes(releaser: Releaser, published: list[str]) -> dict[str, int]:
    """What alpha and beta published in four passes, once their paces have tokens."""
    releaser.release_once()  # (each breaker's pace begins: no token yet)
    time.sleep(0.05)
    for _ in range(4):
        releaser.release_once()
    return {name: sum(1 for entry in published if entry.startswith(f"{name}-")) for name in ("alpha", "beta")}


def test_breakers_with_nothing_to_release_between_them_take_no_turn_from_the_others(redis_url: str) -> None:
    # The turn moved by place: open breakers listed between two with work handed the turn
    # to the one after them on almost every pass (36 to 4 over 20 passes of room 2).
    releaser, _, published = parked_releaser(redis_url, lambda: 2, breakers=("alpha", "beta", "m1", "m2", "m3"))
    store = releaser.parking.store  # type: ignore[attr-defined]
    for name in ("m1", "m2", "m3"):  # (listed after both: a start that lands on one fell through to alpha)
        breaker = CircuitBreaker(name, {"failure_threshold": 1, "reset_timeout": 60}, storage=store)
        with pytest.raises(ConnectionError):
            breaker.call(_refused)
    assert four_passes(releaser, published) == {"alpha": 4, "beta": 4}
    assert not [entry for entry in published if entry.startswith("m")]  # (open: nothing of theirs)


def test_tasks_past_their_deadline_count_against_the_room_of_their_own_call(redis_url: str) -> None:
    releaser, _, published = parked_releaser(redis_url, lambda: 2)
    signature = dict(releaser.app.signature("a.charge", args=(-1,)))
    for n in range(3):
        releaser.parking.park("svc", None, f"expired-{n}:0:1", -1.0, encode_message(signature, "json"), time.time() - 1)
    releaser.release_once()  # (the pace begins: the expired ones go whatever the room)
    assert sorted(published) == ["expired-0:0:1", "expired-1:0:1", "expired-2:0:1"]
    time.sleep(0.05)
    releaser.release_once()
    assert len(published) == 5  # (room 2: two at the pace)
    releaser.parking.park("svc", None, "expired-3:0:1", -1.0, encode_message(signature, "json"), time.time() - 1)
    time.sleep(0.05)
    releaser.release_once()
    assert published[5:] == ["expired-3:0:1", "svc-2:0:1"]  # (the expired one took a place of the two)


def test_an_unreadable_paced_count_is_an_error_not_no_bound(redis_url: str) -> None:
    # (release.lua read -1, 1.5 or "abc" as no bound at all: every entry the pace allowed)
    releaser, tag, _ = parked_releaser(redis_url, None)
    parking: Any = releaser.parking
    for bad in ("-1", "1.5", "abc"):
        args = [5, "0.0", "0.0", "30.0", PacingLaw().text(), "", "", bad]
        with pytest.raises(StorageError, match="unreadable paced count"):
            parking._script("release", tag, args, doing="releasing", state=True)
    assert parking.count(tag) == (ENTRIES, 0)  # nothing claimed


def test_a_held_worker_still_releases_probes_and_tasks_past_their_deadline(redis_url: str) -> None:
    # A worker whose pool is full of other tasks is held on every pass (room 0). It used to
    # skip the breakers altogether: an open breaker got no probe and never closed (its
    # fresh tasks parked too), and tasks past their deadline were never revoked, for as
    # long as the other work kept every worker busy.
    releaser, tag, published = parked_releaser(redis_url, lambda: 0)
    store = releaser.parking.store  # type: ignore[attr-defined]
    breaker = CircuitBreaker("svc", {"failure_threshold": 1, "reset_timeout": 2.0, "half_open_max_calls": 2},
                             storage=store)  # fmt: skip
    with pytest.raises(ConnectionError):
        breaker.call(_refused)
    app_signature = dict(releaser.app.signature("a.charge", args=(-1,)))
    releaser.parking.park("svc", None, "expired:0:1", -1.0, encode_message(app_signature, "json"), time.time() - 1)
    releaser.release_once()
    snapshot = breaker.snapshot()
    if snapshot.state is State.OPEN and (snapshot.retry_after or 0.0) > 0:  # (still open as it released)
        assert published == ["expired:0:1"]  # (only what can wait no longer)
    deadline = time.monotonic() + 10.0
    while len(published) < 3:  # (its open time runs out: a real clock's, with a deadline)
        assert time.monotonic() < deadline, f"no probes released, only {published}"
        releaser.release_once()
        time.sleep(0.02)
    assert published == ["expired:0:1", "svc-0:0:1", "svc-1:0:1"]  # its probes, held or not
    assert breaker.snapshot().state in (State.OPEN, State.HALF_OPEN)
    assert releaser.held_back >= 2
    assert releaser.parking.count(tag)[0] == ENTRIES - 2


def _refused() -> None:
    raise ConnectionError("downstream down")
