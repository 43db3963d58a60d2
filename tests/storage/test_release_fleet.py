"""What a fleet of releasers costs Redis while breakers hold parked tasks (real Redis).

Every worker's releaser counted every parked breaker's tasks every second, to notice a
store that lost them, and listed the breakers every tick: with 2,000 breakers holding
parked tasks, about 1 % of a Redis core per worker (8.7 % for 16), and each worker
logged the same loss. Now the releaser holding the store's lookout
(``Parking.lookout``) counts, the others only ask for it, and the breakers are listed
again when their number changes, or once a second.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_breaker import CircuitBreaker
from celery_breaker.integration.deferral import release
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import LIST_EVERY, LOOKOUT_GRACE, LOOKOUT_LEASE, Releaser
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock

from ..servers import poll
from .conftest import unique_prefix


@pytest.fixture
def url(redis_url: str) -> str:
    return redis_url  # (a client's; the stores' own has the key prefix)


@pytest.fixture
def stores(redis_url: str) -> Any:
    prefix = unique_prefix()
    made = [RedisStore.from_url(f"{redis_url}?key_prefix={prefix}") for _ in range(3)]  # (three workers' stores)
    yield made
    for store in made:
        store.close()


def _releaser(store: RedisStore) -> Releaser:
    return Releaser(Celery("lookout", broker="memory://", set_as_current=False), store.parking, rate=10.0, ramp=0.0)


def _park(store: RedisStore, count: int, name: str = "crm") -> None:
    for i in range(count):
        store.parking.park(name, None, f"{name}-{i}", float(i), "{}", None)


def _counting(releasers: list[Releaser], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counted = [0] * len(releasers)
    for n, releaser in enumerate(releasers):
        counts = releaser.parking.counts

        def spy(tags: list[str], n: int = n, counts: Any = counts) -> Any:
            counted[n] += 1
            return counts(tags)

        monkeypatch.setattr(releaser.parking, "counts", spy)
    return counted


def test_one_releaser_of_a_fleet_counts_the_parked_tasks(
    stores: list[RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    _park(stores[0], 5)
    releasers = [_releaser(store) for store in stores]
    counted = _counting(releasers, monkeypatch)
    for second in range(4):
        for releaser in releasers[second % 3 :] + releasers[: second % 3]:  # (each asks first in turn)
            releaser.keep_lookout(float(second))
    assert counted == [4, 0, 0]  # (the first to ask keeps it; the others never count)
    assert releasers[0]._known == {stores[0].parking.tag("crm", None): 5}
    assert releasers[1]._known == releasers[2]._known == {}


def test_the_last_holder_takes_the_lookout_back_from_a_store_that_lost_everything(
    stores: list[RedisStore], url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A Redis restarted empty lost the lookout with the tasks. Were another releaser, which
    # never counted them, to take it first, the loss would go unreported.
    _park(stores[0], 5)
    holder, other, late = (_releaser(store) for store in stores)
    assert holder.keep_lookout(0.0) == 0  # (counted: 5)
    other.keep_lookout(0.0)
    late.keep_lookout(0.0)
    client = redis.Redis.from_url(url)
    prefix = stores[0].quoted_prefix
    client.delete(*client.scan_iter(match=f"*{prefix}*"))  # (everything of this store's: gone)
    with caplog.at_level(logging.ERROR, logger="celery_breaker"):
        assert other.keep_lookout(1.0) == 0  # (free, but it saw a holder: it waits)
        assert holder.keep_lookout(1.0) == 5
        assert late.keep_lookout(1.0) == 0
    (error,) = [r.getMessage() for r in caplog.records]
    assert "lost its parked tasks" in error
    assert "crm: 5" in error


def test_a_lookout_its_holder_left_is_taken_after_the_grace(stores: list[RedisStore], url: str) -> None:
    _park(stores[0], 3)
    holder, other = _releaser(stores[0]), _releaser(stores[1])
    holder.keep_lookout(0.0)
    other.keep_lookout(0.0)
    redis.Redis.from_url(url).delete(stores[0].parking.lookout_key)  # (its lease ran out: the worker died)
    other.keep_lookout(20.0)
    other.keep_lookout(20.0 + LOOKOUT_GRACE - 0.5)
    assert other._known == {}  # (not yet: the last holder may still come back)
    other.keep_lookout(20.0 + LOOKOUT_GRACE)
    assert other._known == {stores[1].parking.tag("crm", None): 3}
    holder.keep_lookout(25.0)
    assert holder._known == {}  # (stood aside: a turn it takes later starts from a count of its own)


def test_a_releaser_that_stops_gives_the_lookout_up_to_the_next_at_once(stores: list[RedisStore], url: str) -> None:
    # A rolling restart stops the holder: the others, which saw it hold the lookout,
    # would otherwise leave the parking unwatched for a grace after each stop.
    _park(stores[0], 2)
    client = redis.Redis.from_url(url)
    key = stores[0].parking.lookout_key
    releaser, other = _releaser(stores[0]), _releaser(stores[1])
    releaser.start()
    try:
        poll(lambda: client.get(key) is not None, "the lookout taken")
        assert 0 < client.pttl(key) <= LOOKOUT_LEASE * 1000
        other.keep_lookout(0.0)
        assert other._known == {}  # (another holds it)
    finally:
        releaser.stop()
    assert not releaser.is_alive()
    assert client.get(key) == b""  # (given up)
    other.keep_lookout(1.0)  # (long before the grace)
    assert other._known == {stores[1].parking.tag("crm", None): 2}
    # Giving up a lookout another holds leaves it with that one.
    stores[2].parking.stand_down("another", LOOKOUT_LEASE)
    assert client.get(key) == other._lookout_id.encode()


@pytest.mark.parametrize(
    ("held", "taken"),
    [
        ("hash", True),  # another type
        ("no expiry", True),  # no releaser writes one
        ("too long", True),  # an expiry no lease gives
        ("leased", False),  # another releaser's, as written
    ],
)
def test_what_the_lookout_key_holds_is_not_trusted(stores: list[RedisStore], url: str, held: str, taken: bool) -> None:
    client = redis.Redis.from_url(url)
    parking = stores[0].parking
    key = parking.lookout_key
    if held == "hash":
        client.hset(key, "x", "1")
    elif held == "no expiry":
        client.set(key, "stray")
    else:
        client.set(key, "stray", px=int(LOOKOUT_LEASE * 1000 * (10 if held == "too long" else 0.5)))
    assert parking.lookout("me", LOOKOUT_LEASE, take_free=False) is (None if taken else False)
    assert parking.lookout("me", LOOKOUT_LEASE) is taken
    assert (client.get(key) == b"me") is taken
    with pytest.raises(ValueError, match="lookout lease must be a positive number of seconds, got 0"):
        parking.lookout("me", 0)


def test_the_breakers_are_listed_again_when_their_number_changes_or_a_second_passed(
    stores: list[RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(release, "time", SimpleNamespace(monotonic=clock.monotonic))
    app = Celery("listing", broker="memory://", set_as_current=False)
    body = encode_message(dict(app.signature("a.charge", args=(1,))), "json")
    parking = stores[0].parking
    CircuitBreaker("svc", storage=stores[0], key="a").force_open()
    parking.park("svc", "a", "t-a:1", 1.0, body, None)  # (held: its breaker is forced open)
    tags = parking.tags
    tags()  # (the first listing makes the index whole: one member more, which lists again once)
    listed = [0]

    def spy() -> list[str]:
        listed[0] += 1
        return tags()

    monkeypatch.setattr(parking, "tags", spy)
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
    asked: list[str] = []
    ask = parking.release

    def asking(tag: str, **options: Any) -> Any:
        asked.append(tag)
        return ask(tag, **options)

    monkeypatch.setattr(parking, "release", asking)
    for _ in range(4):
        releaser.release_once()
        clock.advance(0.2)
    assert listed == [1]
    parking.park("svc", "b", "t-b:1", 1.0, body, None)  # (a breaker parks its first task)
    releaser.release_once()
    assert listed == [2]
    assert asked[-1] == parking.tag("svc", "b")  # (asked at once)
    clock.advance(LIST_EVERY)
    releaser.release_once()
    assert listed == [3]
