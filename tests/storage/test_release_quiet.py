"""A releaser leaves alone a breaker none of whose parked tasks can come due (real Redis).

Every releaser (one per worker) asked the store about every breaker with parked tasks
every tick, OPEN ones too: 2,000 per-key breakers held open took 1.1 s a pass and ~0.4 s
of Redis CPU each, per worker. ``release.lua`` now says how long nothing can come due
(``Claimed.quiet``): an OPEN breaker's time left, bounded by the next deadline; a
FORCED_OPEN one has none of its own. The releaser does not ask before then, nor more
than ``QUIET_AT_MOST`` later, so an operator's close is still heard.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from celery_breaker import CircuitBreaker
from celery_breaker.errors import StorageError
from celery_breaker.integration.deferral import release
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import QUIET_AT_MOST, UNREACHABLE_MOST, Releaser
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock

from ..servers import RedisServer
from ..unit.support import fail
from .conftest import following, unique_prefix

POLICY = {"failure_threshold": 1, "reset_timeout": 30.0, "half_open_max_calls": 1, "success_threshold": 1}


@pytest.fixture
def store(redis_url: str) -> RedisStore:
    return RedisStore.from_url(f"{redis_url}?time=client&key_prefix={unique_prefix()}")


def _tripped(store: RedisStore, clock: FakeClock, key: str | None = None) -> CircuitBreaker:
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock, key=key)
    fail(breaker)
    return breaker


def _park(store: RedisStore, key: str | None = None, deadline: float | None = None) -> str:
    store.parking.park("svc", key, f"t-{key}:1", 1.0, "payload", deadline)
    return store.parking.tag("svc", key)


def _quiet(store: RedisStore, tag: str, clock: FakeClock) -> float | None:
    return store.parking.release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic()).quiet


def test_an_open_breaker_is_quiet_until_its_probes_may_go(store: RedisStore) -> None:
    clock = FakeClock()
    _tripped(store, clock)
    tag = _park(store)
    assert _quiet(store, tag, clock) == pytest.approx(30.0)
    clock.advance(12.5)
    assert _quiet(store, tag, clock) == pytest.approx(17.5)
    clock.advance(17.5)  # (its time is up: the probe goes, nothing is quiet)
    claimed = store.parking.release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())
    assert [entry for entry, _ in claimed] == ["t-None:1"]
    assert claimed.quiet == 0.0


def test_a_deadline_sooner_than_the_open_time_bounds_the_quiet(store: RedisStore) -> None:
    clock = FakeClock()
    _tripped(store, clock)
    tag = _park(store, deadline=clock.monotonic() + 4.0)  # (it expires, or reaches its max defer age, in 4 s)
    assert _quiet(store, tag, clock) == pytest.approx(4.0)


def test_a_forced_open_breaker_is_quiet_for_ever_unless_a_deadline_comes(store: RedisStore) -> None:
    clock = FakeClock()
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).force_open()
    tag = _park(store)
    assert _quiet(store, tag, clock) is None
    store.parking.park("svc", None, "t-late:1", 2.0, "payload", clock.monotonic() + 8.0)  # (expires in 8 s)
    assert _quiet(store, tag, clock) == pytest.approx(8.0)


def test_a_closed_breaker_or_none_at_all_is_never_quiet(store: RedisStore) -> None:
    clock = FakeClock()
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).call(lambda: None)
    tag = _park(store)
    assert _quiet(store, tag, clock) == 0.0
    assert _quiet(store, _park(store, key="never-called"), clock) == 0.0


def _counting(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    asked: dict[str, int] = {}
    release_ = store.parking.release

    def counted(tag: str, **options: Any) -> Any:
        asked[tag] = asked.get(tag, 0) + 1
        return release_(tag, **options)

    monkeypatch.setattr(store.parking, "release", counted)
    return asked


def test_the_releaser_asks_a_quiet_breaker_again_only_when_it_may_have_tasks_due(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store on Redis time (the releaser gives it no clock); the releaser's own ticks on
    # a fake clock, which Redis time does not follow: the breakers stay as they are.
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    clock = FakeClock()
    monkeypatch.setattr(release, "time", SimpleNamespace(monotonic=clock.monotonic))
    app = Celery("quiet", broker="memory://", set_as_current=False)
    body = dict(app.signature("a.charge", args=(1,)))
    fail(CircuitBreaker("svc", POLICY, storage=store, key="open"))  # (open for 30 s)
    CircuitBreaker("svc", POLICY, storage=store, key="forced").force_open()
    tags = {}
    for key in ("open", "forced", "closed"):
        store.parking.park("svc", key, f"t-{key}:1", 1.0, encode_message(body, "json"), None)
        tags[key] = store.parking.tag("svc", key)
    asked = _counting(store, monkeypatch)
    releaser = Releaser(app, store.parking, rate=1000.0, ramp=0.0)

    def ticks(seconds: float) -> None:
        for _ in range(round(seconds / 0.2)):
            releaser.release_once()
            clock.advance(0.2)

    ticks(2.0)
    assert releaser.released == 1  # (the closed breaker's task, the only one due)
    assert (asked[tags["open"]], asked[tags["forced"]]) == (1, 1)  # (quiet: asked once in ten ticks)
    assert asked[tags["closed"]] >= 2  # (never quiet: asked until its task went)

    ticks(QUIET_AT_MOST - 2.0 + 0.2)  # (the most a quiet breaker goes unasked: a close by hand is heard)
    assert (asked[tags["open"]], asked[tags["forced"]]) == (2, 2)

    CircuitBreaker("svc", POLICY, storage=store, key="forced").close()  # (an operator's close)
    ticks(QUIET_AT_MOST + 1.0)
    assert releaser.released == 2  # (the forced breaker's task, once closed)
    assert asked[tags["open"]] == 3


def test_a_listening_releaser_asks_a_quiet_breaker_at_once_when_it_hears_it_move(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the releaser hears the store's transitions, a quiet breaker may wait up to
    # QUIET_HEARD_AT_MOST: a close by hand (here from another store object, as another
    # process's operator) wakes it at the next tick. Should the store stop hearing, the
    # long waits no longer hold.
    url = f"{redis_url}?key_prefix={unique_prefix()}"
    store = RedisStore.from_url(url)
    clock = FakeClock()
    monkeypatch.setattr(release, "time", SimpleNamespace(monotonic=clock.monotonic))
    app = Celery("heard", broker="memory://", set_as_current=False)
    body = dict(app.signature("a.charge", args=(1,)))
    for key in ("forced", "other"):
        CircuitBreaker("svc", POLICY, storage=store, key=key).force_open()
        store.parking.park("svc", key, f"t-{key}:1", 1.0, encode_message(body, "json"), None)
    forced, other = store.parking.tag("svc", "forced"), store.parking.tag("svc", "other")
    asked = _counting(store, monkeypatch)
    releaser = Releaser(app, store.parking, rate=1000.0, ramp=0.0)
    operator = RedisStore.from_url(url)
    try:
        releaser.listen()
        following(store)  # (its agent subscribed: transitions are heard)
        assert store.parking.hearing() is not None

        def ticks(seconds: float) -> None:
            for _ in range(round(seconds / 0.2)):
                releaser.release_once()
                clock.advance(0.2)

        ticks(QUIET_AT_MOST + 1.0)
        assert (asked[forced], asked[other]) == (1, 1)  # (heard: the long wait)

        CircuitBreaker("svc", POLICY, storage=operator, key="forced").close()
        assert store.sync()  # (every transition published so far heard here)
        ticks(1.0)
        assert releaser.released == 1  # (the breaker closed by hand, at once)
        assert asked[other] == 1

        store.go_dark(None)  # (the subscription lost: transitions may be missed)
        ticks(0.2)
        assert asked[other] == 2
    finally:
        operator.close()
        store.close()


def test_a_store_gone_whole_is_said_once_not_per_breaker_and_its_last_listing_is_kept(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # While the parking's index cannot be read the releaser goes on from its last listing
    # (a Cluster node down holds back only its own breakers). A store gone whole answers
    # for no breaker of it: that is one error for the loop to say, not one WARNING per
    # breaker (2,000 per-key breakers would have made 2,000).
    clock = FakeClock()
    monkeypatch.setattr(release, "time", SimpleNamespace(monotonic=clock.monotonic))
    with RedisServer() as server:
        server.start()
        store = RedisStore.from_url(f"{server.url}?key_prefix={unique_prefix()}&socket_timeout=0.3")
        app = Celery("gone", broker="memory://", set_as_current=False)
        body = encode_message(dict(app.signature("a.charge", args=(1,))), "json")
        for key in ("a", "b", "c"):
            CircuitBreaker("svc", POLICY, storage=store, key=key).force_open()
            store.parking.park("svc", key, f"t-{key}:1", 1.0, body, None)
        releaser = Releaser(app, store.parking, rate=1000.0, ramp=0.0)
        assert releaser.release_once() == 0  # (listed; all quiet: forced open)
        server.stop()
        clock.advance(QUIET_AT_MOST + 0.2)  # (each is asked again)
        with caplog.at_level("WARNING", logger="celery_breaker"):
            for _ in range(3):
                with pytest.raises(StorageError):
                    releaser.release_once()
                clock.advance(0.2)
        assert not [r for r in caplog.records if "parked behind" in r.getMessage()]
        assert len(releaser._unreachable) == 3  # (each listed breaker was asked, and waits now)
        server.start()  # (empty: nothing is parked any more)
        clock.advance(UNREACHABLE_MOST)
        assert releaser.release_once() == 0
        store.close()
