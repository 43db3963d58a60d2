"""The adaptive release in Redis (storage/lua/pacing.lua, release.lua) against a real redis-server.

``release.lua`` keeps core/pacing.py's law step for step: the contract test feeds both the
same clock readings and breaker counts and compares every release and the stored pace.
Stores run on the ``time=client`` seam, so the pace moves only when the test says.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import pytest
import redis

from celery_breaker import CircuitBreaker, State, TooManyRequests
from celery_breaker.core.pacing import (
    DOUBLINGS_MOST,
    KEPT_MOST,
    KEPT_UP,
    LIMIT_HELD,
    Outcomes,
    Pace,
    PacingLaw,
    advance,
    allowed,
    beyond_the_law,
    took,
)
from celery_breaker.monitoring import BreakerStatus, ReleasePace, collect_metrics
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock

from ..unit.support import ROUND_LAW as LAW
from ..unit.support import fail, ok, state_of
from .conftest import unique_prefix

POLICY = {"failure_threshold": 1, "reset_timeout": 10.0, "half_open_max_calls": 1, "success_threshold": 1}


def new_store(redis_url: str, prefix: str) -> RedisStore:
    return RedisStore.from_url(f"{redis_url}?time=client&key_prefix={prefix}")


@pytest.fixture
def store(redis_url: str) -> RedisStore:
    return new_store(redis_url, unique_prefix())


def park(store: RedisStore, count: int) -> str:
    for i in range(count):
        store.parking.park("svc", None, f"task-{i}:1", 100.0 + i, f"payload {i}", None)
    return store.parking.tag("svc", None)


def release(store: RedisStore, now: float, *, law: PacingLaw = LAW, most: int = 100_000, lease: float = 30.0) -> int:
    tag = store.parking.tag("svc", None)
    return len(store.parking.release(tag, most=most, pace=0.0, ramp=0.0, lease=lease, now=now, law=law))


def stored(store: RedisStore) -> dict[str, str]:
    return store.parking.pace(store.parking.tag("svc", None))


def counts(client: redis.Redis, state_key: str) -> Outcomes:
    found = client.hmget(state_key, "gen", "ok", "ko", "sl", "rf")
    generation, successes, failures, slow, refused = (int(value or 0) for value in found)
    held = client.hget(state_key, "rh")
    return Outcomes(generation=generation, successes=successes, failures=failures, slow=slow, refused=refused,
                    held_until=float(held) if held else None)  # fmt: skip


def assert_stored(store: RedisStore, law: PacingLaw, pace: Pace, name: str) -> None:
    """The pace release.lua stored is ``pace``, the law's in Python, field for field; and
    one release.lua reads back (within what the law writes: ``beyond_the_law``)."""
    found = stored(store)
    assert beyond_the_law(law, pace) is None, name  # (release.lua would restart it: the bounds too tight)
    assert (int(found["a_gen"]), float(found["a_at"]), float(found["jat"])) == (
        pace.generation, pace.at, pace.judged_at
    ), name  # fmt: skip
    seen_counts = (pace.seen.successes, pace.seen.failures, pace.seen.slow, pace.seen.refused)
    assert tuple(int(found[field]) for field in ("sok", "sko", "ssl", "srf")) == seen_counts, name
    assert float(found["rate"]) == pace.rate, name
    assert (float(found["thr"]) if found["thr"] else None) == pace.threshold, name
    assert float(found["a_tokens"]) == pytest.approx(pace.tokens, abs=1e-9), name
    assert int(found["used"]) == pace.used, name
    assert int(found["infl"]) == pace.in_flight, name
    assert (float(found["cut"]) if found["cut"] else None) == pace.cut_at, name
    assert (float(found["lim"]) if found["lim"] else None) == pace.limit, name
    assert int(found["owe"]) == pace.owed, name
    assert (float(found["sut"]) if found["sut"] else None) == pace.settle_until, name
    assert (float(found["csh"]) if found["csh"] else None) == pace.cut_share, name
    assert int(found["alm"]) == pace.at_limit, name
    assert int(found["lkp"]) == pace.kept, name
    assert (int(found["ubd"]), int(found["usn"])) == (pace.usual_bad, pace.usual_seen), name
    assert float(found["dlv"]) == pace.delivered, name


def test_python_and_lua_agree_on_every_step(store: RedisStore, redis_url: str) -> None:
    """Random clock steps and breaker counts (successes, failures, slow calls, refusals
    and their waits, new generations), the same for both: the same releases, and the
    same pace stored. Then a refusal and a long run of successes: the limit it set creeps,
    then is dropped (the plateau), in both alike. Then a cut whose tasks do not come back:
    nothing more goes while it settles, in both alike. Then a downstream slow at 10 %
    whatever the load: the pace grows through what was bad news, in both alike. Along
    the way, judgements whose tasks queued (fewer back than went) held the rate in both.
    Last, a rate limiter met from the ceiling, at random (decision 94): limits measured
    again at LIMIT_AGAIN, kept ones, their plateau doubling up to KEPT_MOST, in both alike.
    Every field of the pacing hash is compared after every step (~600 steps, ~2 s)."""
    clock = FakeClock()
    # (claims go back to the queue after 2 s: at 400/s at most, some 1,200 are out at once)
    tag = park(store, 2_500)
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).call(ok)  # a CLOSED breaker's state hash
    store.flush()  # (its success in Redis now: sent by the agent a second later, it lands mid-test)
    client = redis.Redis.from_url(redis_url)
    state_key = tag + ":s"
    law = PacingLaw(ceiling=400.0)  # (the defaults)
    rng = random.Random(16)
    pace: Pace | None = None
    seen = {
        "thresholded": False, "limited": False, "owing": False, "eased": False, "plateau": False, "dropped": False,
        "crowded": False, "usual": False, "tolerated": False, "queueing": False, "kept": False,
        "measured again": False, "kept again": False, "kept most": False, "ceiling": False, "held": False,
    }  # fmt: skip

    def step(name: str) -> None:
        nonlocal pace
        outcomes = counts(client, state_key)
        before = pace
        pace = advance(law, pace, outcomes, clock.monotonic())
        expected = allowed(pace)
        pace = took(pace, expected)
        assert release(store, clock.monotonic(), law=law, lease=2.0) == expected, name
        assert_stored(store, law, pace, name)
        seen["queueing"] = seen["queueing"] or (  # (a judgement of good news whose tasks queued: no growth)
            before is not None and pace.judged_at != before.judged_at and pace.cut_at == before.cut_at
            and pace.delivered <= before.delivered and pace.rate == before.rate
            and outcomes.successes + outcomes.failures - before.seen.successes - before.seen.failures
            < KEPT_UP * before.used
        )  # fmt: skip
        seen["usual"] = seen["usual"] or pace.usual > 0
        seen["eased"] = seen["eased"] or (
            before is not None and before.cut_share is not None and pace.cut_at == before.cut_at
            and pace.cut_share is not None and pace.cut_share < before.cut_share
        )  # fmt: skip
        seen["thresholded"] = seen["thresholded"] or pace.threshold is not None
        seen["limited"] = seen["limited"] or pace.limit is not None
        seen["owing"] = seen["owing"] or pace.owed > 0
        seen["crowded"] = seen["crowded"] or (  # (settling with too much in flight: nothing went)
            pace.cut_at is not None and pace.in_flight > law.in_flight_s * pace.rate and expected == 0
            and pace.tokens == 0
        )  # fmt: skip
        seen["plateau"] = seen["plateau"] or pace.at_limit > law.plateau
        seen["kept"] = seen["kept"] or pace.kept > 0
        seen["kept again"] = seen["kept again"] or pace.kept > 1
        seen["kept most"] = seen["kept most"] or (  # (refused at the cap: kept again, its plateau no longer)
            before is not None and before.kept == pace.kept == KEPT_MOST and pace.cut_at == clock.monotonic()
            and outcomes.refused > before.seen.refused and pace.limit == before.rate
        )  # fmt: skip
        seen["ceiling"] = seen["ceiling"] or pace.rate == law.ceiling
        seen["held"] = seen["held"] or (  # (a look within a refusal's wait: nothing went)
            outcomes.held_until is not None and clock.monotonic() < outcomes.held_until and pace.tokens == 0
            and before is not None and before.tokens > 0
        )  # fmt: skip
        seen["measured again"] = seen["measured again"] or (  # (a refusal at a limit held under LIMIT_HELD)
            before is not None and before.limit is not None and before.at_limit < LIMIT_HELD
            and outcomes.refused > before.seen.refused and pace.cut_at == clock.monotonic() != before.cut_at
            and pace.kept == 0
        )  # fmt: skip
        seen["dropped"] = seen["dropped"] or (
            before is not None and before.generation == pace.generation and before.limit is not None
            and pace.limit is None
        )  # fmt: skip

    def forget() -> None:  # (a function: the pace is begun again by the next step)
        nonlocal pace
        pace = None

    for i in range(400):
        clock.advance(rng.choice((0.05, 0.2, 0.25, 0.5, 1.0, 1.7)))
        kind = rng.random()
        if kind < 0.03:
            client.hincrby(state_key, "gen", 2)  # reopened and closed again
        elif kind < 0.15:
            client.hincrby(state_key, "ko", rng.randint(1, 10))
        elif kind < 0.25:
            client.hincrby(state_key, "sl", rng.randint(1, 10))
        elif kind < 0.32:
            client.hincrby(state_key, "rf", 1)
            client.hincrby(state_key, "ko", 1)
            client.hset(state_key, "rh", repr(clock.monotonic() + rng.choice((0.1, 0.5, 1.0, 2.0))))
        # (outcomes lag the releases at times: tasks in flight, owed after a cut)
        client.hincrby(state_key, "ok", rng.randint(0, 60) if rng.random() < 0.6 else rng.randint(0, 3))
        step(f"step {i}")
    client.hincrby(state_key, "rf", 1)
    client.hincrby(state_key, "ko", 1)
    refused_again = False
    for i in range(120):  # every task released comes back a success at once
        clock.advance(0.5)
        assert pace is not None
        client.hincrby(state_key, "ok", pace.used + pace.in_flight)
        if not refused_again and pace.at_limit == 3:
            # refused again at the limit, after the rate held there: the limit is kept,
            # does not creep for twice the plateau, then is dropped as any
            refused_again = True
            client.hincrby(state_key, "rf", 1)
            client.hincrby(state_key, "ko", 1)
            client.hset(state_key, "rh", repr(clock.monotonic() + 0.5))
        step(f"success {i}")
        if seen["dropped"]:
            break
    client.hincrby(state_key, "ko", 500)  # bad news: a cut, then nothing comes back while it settles
    for i in range(16):
        clock.advance(0.25)
        step(f"lagging {i}")
        if seen["crowded"]:
            break
    # A new pace (from the start rate: the last one was cut to its floor), whose downstream
    # is slow at 10 % whatever the load.
    client.delete(tag + ":p")
    forget()
    returned = 0
    for i in range(40):
        clock.advance(0.5)
        back = 0 if pace is None else pace.used + pace.in_flight
        slow = (returned + back) // 10 - returned // 10
        returned += back
        client.hincrby(state_key, "ok", back)
        client.hincrby(state_key, "sl", slow)
        rate = None if pace is None else pace.rate
        step(f"usually slow {i}")
        grown = pace is not None and rate is not None and pace.rate > rate
        seen["tolerated"] = seen["tolerated"] or (slow >= law.least_bad and grown)
    # A rate limiter (decision 94), met from the ceiling: every task released comes back
    # (all at once, or some), with looks between the judgements. First refused now and
    # then whatever the rate (its limit measured, again at LIMIT_AGAIN of the rate when set),
    # then only once the rate has held its limit: kept limits, their plateau doubling up to
    # KEPT_MOST, and refused there again. A wait each time, and now and then a burst of
    # failures (a cut that keeps the limit).
    assert pace is not None
    assert pace.rate == law.ceiling
    rng = random.Random(94)
    for i in range(300):
        clock.advance(rng.choice((0.05, 0.25, 0.5, 0.5, 0.75)))
        assert pace is not None
        back = pace.used + pace.in_flight
        client.hincrby(state_key, "ok", back if rng.random() < 0.7 else rng.randint(0, back))
        roll = rng.random()
        held = pace.limit is not None and pace.at_limit >= LIMIT_HELD
        if (held and roll < (0.2 if i < 150 else 0.7)) or (i < 150 and roll < 0.03):
            client.hincrby(state_key, "rf", 1)
            client.hincrby(state_key, "ko", 1)
            client.hset(state_key, "rh", repr(clock.monotonic() + rng.choice((0.1, 0.5, 1.0))))
        elif roll > 0.99:
            client.hincrby(state_key, "ko", rng.randint(1, 20))
        step(f"limiter {i}")
    assert all(seen.values()), seen  # (each part of the law was met, and compared, along the way)


def test_python_and_lua_agree_on_a_limit_held_without_creep(store: RedisStore, redis_url: str) -> None:
    """A law without creep holds a limit for good, and counts its judgements there only up
    to DOUBLINGS_MOST past the plateau. Counted on, after 1,023 judgements at the limit
    (8.5 minutes at the defaults) ``creep * 2**at_limit`` was no float: the law in Python
    raised OverflowError, and release.lua's lift was 0 * inf, NaN, which made the limit NaN
    (stored as 'nan', an unreadable pace that restarted at the next look). Neither was
    right: a limit without creep is kept as it is."""
    clock = FakeClock()
    tag = park(store, 500)
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).call(ok)
    store.flush()  # (its success in Redis now: sent by the agent a second later, it lands mid-test)
    client = redis.Redis.from_url(redis_url)
    state_key = tag + ":s"
    law = PacingLaw(ceiling=40.0, creep=0.0, plateau=0)
    pace: Pace | None = None
    for i in range(1_100):
        clock.advance(law.judge_every)
        if pace is not None:
            client.hincrby(state_key, "ok", pace.used + pace.in_flight)  # every task released succeeds
            if i == 20:  # (at the ceiling by then) refused once: a limit is set
                client.hincrby(state_key, "rf", 1)
                client.hincrby(state_key, "ko", 1)
        pace = advance(law, pace, counts(client, state_key), clock.monotonic())
        expected = allowed(pace)
        pace = took(pace, expected)
        assert release(store, clock.monotonic(), law=law, lease=2.0) == expected, f"step {i}"
        assert_stored(store, law, pace, f"step {i}")
    assert pace is not None
    assert pace.limit is not None
    assert pace.at_limit == DOUBLINGS_MOST


def test_two_workers_share_one_pace(store: RedisStore, redis_url: str) -> None:
    """Two store instances (two workers) releasing the same breaker: together they release
    what one pace allows, not twice as much."""
    clock = FakeClock()
    park(store, 5_000)
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).call(ok)
    store.flush()
    other = new_store(redis_url, store.key_prefix)
    released = {"one": 0, "other": 0}
    release(store, clock.monotonic())  # the pace begins
    for i in range(8):  # 2 s; the two look every 0.25 s, in turn
        clock.advance(0.25)
        released["one" if i % 2 else "other"] += release(store if i % 2 else other, clock.monotonic())
    assert released["one"] > 0
    assert released["other"] > 0
    # 5/s for 2 s (no success came back: no growth)
    assert released["one"] + released["other"] == 10


def test_released_tasks_that_succeed_grow_the_pace_for_every_worker(store: RedisStore, redis_url: str) -> None:
    clock = FakeClock()
    park(store, 5_000)
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.call(ok)
    other = new_store(redis_url, store.key_prefix)
    release(store, clock.monotonic())
    for i in range(16):  # 4 s in 0.25 s ticks, the two workers in turn
        clock.advance(0.25)
        for _ in range(release(store if i % 2 else other, clock.monotonic())):
            breaker.call(ok)
        store.flush()  # (a worker sends its successes every second)
    assert float(stored(store)["rate"]) == 80.0  # 5, 10, 20, 40, 80


def test_slow_calls_counted_by_the_breaker_cut_the_pace(store: RedisStore) -> None:
    clock = FakeClock()
    park(store, 5_000)
    policy = dict(POLICY, slow_call_duration=1.0, slow_call_rate_threshold=1.0, minimum_calls=1000)
    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock)

    def slow() -> None:
        clock.advance(1.5)

    breaker.call(ok)
    release(store, clock.monotonic())
    clock.advance(1.0)
    assert release(store, clock.monotonic()) == 5
    for _ in range(5):
        breaker.call(ok)
    store.flush()
    clock.advance(1.0)
    release(store, clock.monotonic())
    assert float(stored(store)["rate"]) == 10.0
    for _ in range(3):
        breaker.call(slow)  # (the clock moves 4.5 s)
    assert breaker.snapshot().state is State.CLOSED
    release(store, clock.monotonic())
    assert float(stored(store)["rate"]) == 7.0  # 10 * 0.7
    assert float(stored(store)["thr"]) == 7.0


def held_as_refused_at_40(store: RedisStore, clock: FakeClock) -> None:
    """After a refusal asking 1.5 s of a pace ``grown_to_40``, releases every quarter
    second: nothing for 1.5 s, then 19/s from empty. The limit is what came back with the
    refusal (the tasks released since the pace doubled to 40/s went at 20/s), the cut
    95 % of it."""
    held = []
    for _ in range(7):
        clock.advance(0.25)
        held.append(release(store, clock.monotonic()))
    assert held == [0] * 5 + [4, 5]
    found = stored(store)
    assert (float(found["lim"]), float(found["rate"]), float(found["thr"])) == (20.0, 19.0, 19.0)


def grown_to_40(store: RedisStore, clock: FakeClock) -> CircuitBreaker:
    """5,000 parked tasks, released for 3 s while each succeeds: the pace at 40/s (5, 10, 20, 40)."""
    park(store, 5_000)
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.call(ok)
    release(store, clock.monotonic())
    for _ in range(12):
        clock.advance(0.25)
        for _ in range(release(store, clock.monotonic())):
            breaker.call(ok)
        store.flush()
    assert float(stored(store)["rate"]) == 40.0
    return breaker


def test_a_reopened_breaker_stops_the_release_at_once_and_restarts_it_lower(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = grown_to_40(store, clock)
    fail(breaker)
    assert state_of(breaker) is State.OPEN
    # Hear the trip's own message now: heard after the fake clock moved on, its open
    # period would count from then.
    assert store.sync()
    clock.advance(1.0)
    assert release(store, clock.monotonic()) == 0  # nothing while open
    clock.advance(POLICY["reset_timeout"])
    assert release(store, clock.monotonic()) == 1  # the probe
    breaker.call(ok)
    assert state_of(breaker) is State.CLOSED
    assert release(store, clock.monotonic()) == 0  # the pace begins again
    assert (float(stored(store)["rate"]), float(stored(store)["thr"])) == (5.0, 28.0)


def paced(store: RedisStore, clock: FakeClock) -> str:
    """100 parked tasks behind a closed breaker, and a pace begun a second ago that has
    released 5 of them (5/s, nothing back yet); returns the breaker's tag."""
    tag = park(store, 100)
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).call(ok)
    store.flush()  # (its success in Redis now: sent by the agent's flush later, it came back mid-test)
    release(store, clock.monotonic())
    clock.advance(1.0)
    assert release(store, clock.monotonic()) == 5
    return tag


def test_an_unreadable_pace_restarts_with_one_warning(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    tag = paced(store, clock)
    client = redis.Redis.from_url(redis_url)
    for field, bad in (
        ("lkp", "-1"),
        ("rate", "inf"),
        ("rate", "1e300"),  # (finite, but no release writes a rate above RATE_MOST: the backlog went at once)
        ("a_tokens", "1e300"),  # (more than a second's worth)
        ("thr", "-3"),
        ("jat", "1e300"),
        ("used", "1.5"),
        ("a_tokens", "nan"),
        ("srf", "-2"),
        ("lim", "0"),
        ("owe", "-1"),
        ("sut", "1e300"),
        ("csh", "nan"),
        ("alm", "-1"),
        ("ubd", "-1"),
        ("usn", "2.5"),
        ("dlv", "-1"),
        ("dlv", "nan"),
    ):
        client.hset(tag + ":p", field, bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            assert release(store, clock.monotonic()) == 0  # begun again: nothing held
        [record] = caplog.records
        assert f"{field}='{bad}'" in record.getMessage()
        assert "(the pace restarts)" in record.getMessage()
        assert float(stored(store)["rate"]) == 5.0
        assert stored(store)["thr"] == ""
        clock.advance(1.0)
        assert release(store, clock.monotonic()) == 5


def test_a_pace_holding_what_no_release_writes_restarts_with_one_warning(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Readable, but beyond what any step of the law writes (decision 97): restarted as an
    unreadable pace is, with one warning naming the field. Before, each was taken as it
    stood: a kept count of 10**9 held its limit from creeping for good; a usual share of 1
    made no failure news; a judgement, a cut or a settling minutes ahead held the pace."""
    clock = FakeClock()
    tag = paced(store, clock)
    client = redis.Redis.from_url(redis_url)
    generation = stored(store)["a_gen"]
    at_bounds = {"lim": "80", "lkp": str(KEPT_MOST), "alm": str(LAW.plateau * 2**KEPT_MOST + DOUBLINGS_MOST)}
    # (a float: that many seconds from now)
    cases: list[tuple[str, dict[str, str | float]]] = [
        ("lkp", {"lim": "80", "lkp": "1000000000"}),
        ("lkp", {"lim": "80", "lkp": str(KEPT_MOST + 1)}),
        ("alm", {"lim": "80", "alm": "1000000000"}),
        ("alm", {"lim": "80", "lkp": "1", "alm": str(2 * LAW.plateau + DOUBLINGS_MOST + 1)}),
        ("thr", {"thr": "1e300"}),
        ("thr", {"thr": "1e-05"}),  # (below any ceiling: growth as after a cut)
        ("lim", {"lim": "1e300"}),
        ("lim", {"lim": "1e-300", "lkp": "3"}),  # (held for 80 s)
        ("jat", {"jat": 200.0}),
        ("cut", {"cut": 200.0}),
        ("sut", {"cut": 0.0, "owe": "50", "sut": 290.0}),
        ("used", {"used": "1000000000"}),
        ("ubd", {"ubd": "60", "usn": "60", "ugen": generation}),
    ]
    for field, damage in cases:
        now = clock.monotonic()
        written = {name: value if isinstance(value, str) else repr(now + value) for name, value in damage.items()}
        for name, value in written.items():
            client.hset(tag + ":p", name, value)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            assert release(store, now) == 0  # begun again: nothing held
        [record] = caplog.records
        assert f"{field}='{written[field]}'" in record.getMessage()
        assert f"({field}: beyond what the law writes) (the pace restarts)" in record.getMessage()
        assert (float(stored(store)["rate"]), stored(store)["thr"], stored(store)["lim"]) == (5.0, "", "")
        clock.advance(1.0)
        assert release(store, clock.monotonic()) == 5
    # At the bounds: read as written, no warning.
    for name, value in at_bounds.items():
        client.hset(tag + ":p", name, value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        clock.advance(1.0)
        release(store, clock.monotonic())
    assert caplog.records == []
    assert (stored(store)["lkp"], stored(store)["lim"]) == (str(KEPT_MOST), "80")


@pytest.mark.parametrize("reader_ceiling", [0.5, None])
def test_a_pace_under_a_ceiling_below_the_floor_is_read_as_written(
    store: RedisStore, reader_ceiling: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    """``breaker_release_rate=0.5`` (below the law's floor of 1/s): the law bounds every
    rate to the ceiling, so a reopened breaker's pace begins with a threshold of 0.5/s.
    Read back by the same law, or by workers that raised ``breaker_release_rate`` (a
    rolling deploy: ``None``), it is a pace the law wrote, taken with no warning. Before
    decision 103, each look after a reopen restarted it with a WARNING."""
    clock = FakeClock()
    slow = replace(LAW, ceiling=0.5)
    park(store, 100)
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.call(ok)
    store.flush()
    release(store, clock.monotonic(), law=slow)
    clock.advance(2.0)
    assert release(store, clock.monotonic(), law=slow) == 1
    fail(breaker)
    assert store.sync()
    clock.advance(POLICY["reset_timeout"] + 1.0)
    assert release(store, clock.monotonic(), law=slow) == 1  # the probe
    breaker.call(ok)
    store.flush()
    assert release(store, clock.monotonic(), law=slow) == 0  # the pace begins again
    assert (float(stored(store)["rate"]), float(stored(store)["thr"])) == (0.5, 0.5)
    reader = replace(LAW, ceiling=reader_ceiling)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        for _ in range(4):
            clock.advance(1.0)
            release(store, clock.monotonic(), law=reader)
    assert caplog.records == []
    assert float(stored(store)["thr"]) == 0.5


def test_a_refusal_recorded_by_a_released_task_cuts_the_pace_and_holds_it(store: RedisStore) -> None:
    """record.lua counts the refusal and its wait; release.lua cuts at once and releases
    nothing until the wait is over; the breaker stays CLOSED throughout."""
    clock = FakeClock()
    breaker = grown_to_40(store, clock)
    run = breaker.begin_run(lambda e: e)
    run.released = True
    with run:
        run.settle(TooManyRequests(1.5))
    assert run.refused_for == 1.5
    assert state_of(breaker) is State.CLOSED
    held_as_refused_at_40(store, clock)
    assert state_of(breaker) is State.CLOSED


def test_a_refusal_on_a_disabled_breaker_holds_the_release_too(store: RedisStore) -> None:
    """An operator's DISABLED breaker releases its backlog as a CLOSED one does: a refused
    released task makes it wait as long as asked, rather than being released straight
    back into the 429 several times a second."""
    clock = FakeClock()
    breaker = grown_to_40(store, clock)
    breaker.disable()
    run = breaker.begin_run(lambda e: e)
    run.released = True
    with run:
        run.settle(TooManyRequests(1.5))
    assert run.refused_for == 1.5
    held = []
    for _ in range(7):
        clock.advance(0.25)
        held.append(release(store, clock.monotonic()))
    assert held[:5] == [0] * 5  # nothing for 1.5 s ...
    assert min(held[5:]) > 0  # ... then the release goes on
    assert state_of(breaker) is State.DISABLED


@pytest.mark.parametrize("operator", [False, True])
def test_the_fixed_pace_waits_for_a_refusal_too(store: RedisStore, operator: bool) -> None:
    """``breaker_release_pace="fixed"``: a refusal's Retry-After holds the release (CLOSED
    or DISABLED), then the pace goes on from empty."""
    clock = FakeClock()
    tag = park(store, 1_000)
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.call(ok)
    if operator:
        breaker.disable()

    def fixed() -> int:
        return len(store.parking.release(tag, most=1_000, pace=20.0, ramp=0.0, lease=30.0, now=clock.monotonic()))

    fixed()  # (the pace starts empty)
    clock.advance(0.5)
    assert fixed() == 10
    run = breaker.begin_run(lambda e: e)
    run.released = True
    with run:
        run.settle(TooManyRequests(2.0))
    held = []
    for _ in range(5):
        clock.advance(0.5)
        held.append(fixed())
    assert held == [0, 0, 0, 10, 10]  # held for 2 s (nothing saved up), then 20/s again


@pytest.fixture(params=["redis", "cluster"])
def either_store(request: pytest.FixtureRequest) -> RedisStore:
    """``store`` on a standalone Redis and on a Cluster: record.lua reads the parking's keys."""
    return new_store(request.getfixturevalue("redis_cluster_url" if request.param == "cluster" else "redis_url"),
                     unique_prefix())  # fmt: skip


def fresh_refusal(breaker: CircuitBreaker, exc: BaseException) -> float | None:
    """``exc`` met by a run that was not released from the parking (a fresh task's); what
    the run was told to wait for (``None``: it is the failure it is)."""
    run = breaker.begin_run(lambda e: e)
    with run:
        run.settle(exc)
    return run.refused_for


def refuse(exc: BaseException) -> None:
    raise exc


def test_a_fresh_task_refused_while_the_release_is_under_way_is_a_refusal(either_store: RedisStore) -> None:
    """A 429 met by a task that was not parked, while parked tasks are being released:
    the release and the fresh traffic were too fast together. record.lua finds the parked
    queue and answers 'refused': the breaker stays CLOSED, the release cuts and holds for
    the Retry-After exactly as for a released task (the same numbers as
    ``test_a_refusal_recorded_by_a_released_task_cuts_the_pace_and_holds_it``), and the
    run is told to wait. A plain guarded call (no task) opens nothing either."""
    store, clock = either_store, FakeClock()
    breaker = grown_to_40(store, clock)
    assert fresh_refusal(breaker, TooManyRequests(1.5)) == 1.5
    assert state_of(breaker) is State.CLOSED
    held_as_refused_at_40(store, clock)
    with pytest.raises(TooManyRequests):
        breaker.call(refuse, TooManyRequests(1.0))
    assert state_of(breaker) is State.CLOSED
    assert breaker.snapshot().trips == 0


def test_a_fresh_task_told_to_stop_for_longer_than_the_breaker_opens_opens_it(either_store: RedisStore) -> None:
    """A fresh task's 429 during a release whose Retry-After is longer than the breaker's
    own ``reset_timeout`` (10 s here) says "stop", not "slow down" (a quota spent for the
    day): counted as a refusal, the breaker stayed CLOSED and the fresh traffic went on
    meeting the 429 at its own rate while only the release waited. It opens the breaker
    for that long, as it does with nothing parked; the run is not told it was refused."""
    store, clock = either_store, FakeClock()
    breaker = grown_to_40(store, clock)
    assert fresh_refusal(breaker, TooManyRequests(3600)) is None
    assert state_of(breaker) is State.OPEN
    assert breaker.snapshot().retry_after == pytest.approx(100)  # (as long as it opens: max_reset_timeout)
    # At reset_timeout exactly it is still a slow-down, not a stop.
    other = grown_to_40(new_store(store.url.split("?")[0], unique_prefix()), clock)
    assert fresh_refusal(other, TooManyRequests(10)) == 10
    assert state_of(other) is State.CLOSED


def test_a_fresh_task_refused_during_the_release_leaves_the_parked_tasks_no_expiry(either_store: RedisStore) -> None:
    """record.lua reads the parked queue and claims (KEYS 6 and 7) to tell a fresh 429's
    verdict; the save that renews the breaker's own keys' idle TTL (every key of the call,
    once the state hash's TTL has run down) gave those two the idle TTL too: the parked
    tasks (and claims) then vanished once it ran out, while the breaker kept them parked
    (the next outage, an operator's force_open). Only the breaker's five keys are renewed."""
    store, clock = either_store, FakeClock()
    breaker = CircuitBreaker("svc", {**POLICY, "failure_threshold": 5}, storage=store, clock=clock)
    breaker.call(ok)
    tag = park(store, 3)
    claimed: list[tuple[str, str]] = []
    while not claimed:  # (the pace starts empty)
        claimed = store.parking.release(tag, most=1, pace=100.0, ramp=0.0, lease=30.0, now=clock.monotonic())
        clock.advance(1.0)
    store.flush()  # (no counts left for the agent to send meanwhile: that would renew the state first)
    client = store.client()
    state_key = store.keys_for("svc", None)[0]
    client.pexpire(state_key, 1000)  # (the state's TTL has run down: this save renews every key it was given)
    assert fresh_refusal(breaker, TooManyRequests(1.5)) == 1.5
    assert client.pttl(state_key) > 1000  # (renewed)
    assert (client.pttl(tag + ":q"), client.pttl(tag + ":c")) == (-1, -1)


def test_fresh_refusals_long_after_the_release_held_back_open_the_breaker(either_store: RedisStore) -> None:
    """Fresh traffic alone beyond what the downstream takes, while tasks stay parked: each
    fresh 429 held the release back again, so it sent nothing, and the breaker never
    opened (a review: 90 fresh tasks/s against 60/s, 25 % of the downstream's calls
    refused, for as long as it lasted). A fresh 429 counts as the release's doing only
    while the release has held back for at most twice the wait asked (3 s at least: the
    released tasks still queued when it began); after that it is the fresh traffic's
    own, and opens the breaker for its Retry-After, which relieves the downstream."""
    store, clock = either_store, FakeClock()
    breaker = grown_to_40(store, clock)
    assert fresh_refusal(breaker, TooManyRequests(1.0)) == 1.0  # (the hold begins)
    for _ in range(6):  # every half second for 3 s: each still within the grace, each holding on
        clock.advance(0.5)
        assert fresh_refusal(breaker, TooManyRequests(1.0)) == 1.0
    assert state_of(breaker) is State.CLOSED
    clock.advance(0.5)  # 3.5 s held back: the fresh traffic's own 429
    assert fresh_refusal(breaker, TooManyRequests(1.0)) is None
    assert state_of(breaker) is State.OPEN
    assert breaker.snapshot().retry_after == pytest.approx(1.0)


def test_a_hold_that_ended_gives_fresh_refusals_their_grace_again(either_store: RedisStore) -> None:
    """The grace runs from when the release began holding back, not from its first
    refusal ever: a hold that ended (the release sent again) starts the next from zero."""
    store, clock = either_store, FakeClock()
    breaker = grown_to_40(store, clock)
    assert fresh_refusal(breaker, TooManyRequests(1.0)) == 1.0
    clock.advance(10.0)  # (that hold over long ago: the release sent again since)
    assert fresh_refusal(breaker, TooManyRequests(1.0)) == 1.0  # (a new hold begins)
    for _ in range(5):  # 0.5 to 2.5 s into it: within its grace, 12.5 s after the first
        clock.advance(0.5)
        assert fresh_refusal(breaker, TooManyRequests(1.0)) == 1.0
    assert state_of(breaker) is State.CLOSED


@pytest.mark.parametrize("parked", ["none", "released and done", "claimed"])
def test_a_fresh_task_refused_with_nothing_being_released_opens_the_breaker(
    either_store: RedisStore, parked: str
) -> None:
    """With no task parked or claimed (none ever, or all released and published), a fresh
    task's 429 opens the breaker for its Retry-After, as before. Claimed entries (being
    published by a releaser) are a release under way."""
    store, clock = either_store, FakeClock()
    breaker = CircuitBreaker("svc", {**POLICY, "failure_threshold": 5}, storage=store, clock=clock)
    breaker.call(ok)
    if parked != "none":
        tag = park(store, 3)
        for _ in range(2):  # (the pace starts empty)
            claimed = store.parking.release(tag, most=10, pace=100.0, ramp=0.0, lease=30.0, now=clock.monotonic())
            clock.advance(1.0)
        assert len(claimed) == 3
        if parked == "released and done":
            store.parking.done(tag, [entry for entry, _ in claimed])
    waits = fresh_refusal(breaker, TooManyRequests(1.5))
    if parked == "claimed":
        assert (waits, state_of(breaker)) == (1.5, State.CLOSED)
        return
    assert (waits, state_of(breaker)) == (None, State.OPEN)
    assert breaker.snapshot().retry_after == pytest.approx(1.5)


def test_a_lower_ceiling_holds_a_stored_pace_at_once(store: RedisStore) -> None:
    """release.lua as the law in Python: a pace grown to 40/s, then read by workers whose
    ``breaker_release_rate`` is 10: 10/s from the next look, with no released task answering."""
    clock = FakeClock()
    grown_to_40(store, clock)
    capped = replace(LAW, ceiling=10.0)
    released = 0
    for _ in range(8):  # 2 s
        clock.advance(0.25)
        released += release(store, clock.monotonic(), law=capped)
    assert float(stored(store)["rate"]) == 10.0
    assert released <= 10 * 2 + 10


def test_unreadable_counts_in_the_breaker_state_reset_it(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    tag = park(store, 100)
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).call(ok)
    store.flush(everything=True)  # (sent now: a flush by the agent would read the damaged state first)
    redis.Redis.from_url(redis_url).hset(tag + ":s", "sl", "-1")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        release(store, clock.monotonic())
    assert "sl='-1'" in caplog.text
    assert "the breaker was reset" in caplog.text


def test_the_fixed_pace_ignores_the_adaptive_fields_and_the_other_way_round(store: RedisStore) -> None:
    """Workers of both kinds on one breaker (a rolling upgrade) each keep their own pace."""
    clock = FakeClock()
    tag = park(store, 1_000)
    CircuitBreaker("svc", POLICY, storage=store, clock=clock).call(ok)
    store.flush()
    release(store, clock.monotonic())
    store.parking.release(tag, most=100, pace=20.0, ramp=0.0, lease=30.0, now=clock.monotonic())
    clock.advance(1.0)
    assert release(store, clock.monotonic()) == 5
    assert len(store.parking.release(tag, most=100, pace=20.0, ramp=0.0, lease=30.0, now=clock.monotonic())) == 20


@pytest.mark.parametrize("at_limit", [None, "7"])
def test_a_pace_stored_before_owed_outcomes_reads_as_owing_nothing(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture, at_limit: str | None
) -> None:
    """A pace written by a release.lua older than ``owe``, ``sut``, ``csh``, ``alm``, ``ubd``,
    ``usn`` and ``lkp`` (a rolling upgrade) goes on where it was, with no warning; a ``csh`` an
    older writer left behind with no cut is dropped, and an ``alm`` with no limit."""
    clock = FakeClock()
    tag = paced(store, clock)
    client = redis.Redis.from_url(redis_url)
    client.hdel(tag + ":p", "owe", "sut", "alm", "ubd", "usn", "lkp")
    client.hset(tag + ":p", "csh", "0.9")
    if at_limit is not None:
        client.hset(tag + ":p", "alm", at_limit)
    clock.advance(1.0)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert release(store, clock.monotonic()) == 5  # (no success back: no growth, no restart)
    assert caplog.records == []
    found = stored(store)
    assert (found["owe"], found["sut"], found["csh"], found["alm"], found["lkp"]) == ("0", "", "", "0", "0")
    assert (found["ubd"], found["usn"]) == ("0", "0")
    assert float(found["dlv"]) == 0.0


@pytest.mark.parametrize(
    ("fields", "generation_field"),
    [({"ubd": "3", "usn": "60"}, "ugen"), ({"dlv": "500"}, "dgen")],
    ids=["usual share", "delivery"],
)
def test_what_a_pace_learnt_under_another_generation_is_not_this_paces(
    store: RedisStore, redis_url: str, fields: dict[str, str], generation_field: str
) -> None:
    """A release.lua older than a field (``ubd``/``usn``, the usual share; ``dlv``, the
    delivery) that begins a new pace, or judges one, leaves the last pace's value in the
    hash: read under another generation (``ugen``, ``dgen``), it is none (0)."""
    clock = FakeClock()
    tag = paced(store, clock)
    client = redis.Redis.from_url(redis_url)
    generation = stored(store)["a_gen"]
    for written, kept in ((generation, True), (str(int(generation) + 2), False), (None, False)):
        for name, value in fields.items():
            client.hset(tag + ":p", name, value)
        if written is None:
            client.hdel(tag + ":p", generation_field)
        else:
            client.hset(tag + ":p", generation_field, written)
        clock.advance(0.2)
        release(store, clock.monotonic())
        found = stored(store)
        for name, value in fields.items():
            assert float(found[name]) == (float(value) if kept else 0.0), (name, written)
        assert found[generation_field] == generation


# -- the pace as people see it (pace.lua, collect_metrics) ---------------------------------


def release_row(store: RedisStore, clock: FakeClock) -> BreakerStatus:
    [row] = collect_metrics(store, clock=clock)
    return row


def test_the_status_shows_the_pace_while_it_releases(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = grown_to_40(store, clock)
    row = release_row(store, clock)
    assert row.release == ReleasePace(row.snapshot.generation, 40.0, None, None)
    assert {k: v for k, v in row.as_dict().items() if k.startswith("release_")} == {
        "release_rate": 40.0, "release_limit": None, "release_held_for": None, "release_usual_bad_share": None,
    }  # fmt: skip
    run = breaker.begin_run(lambda e: e)
    run.released = True
    with run:
        run.settle(TooManyRequests(1.5))
    clock.advance(0.25)
    assert release(store, clock.monotonic()) == 0
    release_now = release_row(store, clock).release
    assert release_now is not None
    assert (release_now.rate, release_now.limit) == (19.0, 20.0)  # cut below its limit: what came back
    assert release_now.held_for == pytest.approx(1.25)  # of the 1.5 s asked for
    clock.advance(1.5)
    release(store, clock.monotonic())
    assert release_row(store, clock).release == ReleasePace(row.snapshot.generation, 19.0, 20.0, None)
    clock.advance(5.5)  # no release for longer than pace.lua's IDLE: no worker releases at it
    assert release_row(store, clock).release is None
    release(store, clock.monotonic())
    assert release_row(store, clock).release is not None


def test_the_status_shows_the_usual_share_once_learnt_under_this_pace(store: RedisStore, redis_url: str) -> None:
    """``usual_bad_share``: ``ubd / usn`` once ``USUAL_LEAST`` outcomes are in, and only
    when learnt under the pace's own generation (as ``pacing.lua`` reads it). A share no
    release learns (above ``USUAL_MOST``) restarts the pace: none is shown."""
    clock = FakeClock()
    grown_to_40(store, clock)
    tag = store.parking.tag("svc", None)
    client = redis.Redis.from_url(redis_url)
    generation = stored(store)["a_gen"]
    for ubd, usn, ugen, shown in (
        (4, 50, generation, 0.08),
        (0, 60, generation, 0.0),
        (4, 49, generation, None),
        (4, 50, str(int(generation) + 2), None),
        (12, 50, generation, 0.24),
        (13, 50, generation, "no pace"),
        (51, 50, generation, "no pace"),
        (13, 50, str(int(generation) + 2), None),  # (another generation's: not read)
    ):
        client.hset(tag + ":p", mapping={"ubd": ubd, "usn": usn, "ugen": ugen})
        release = release_row(store, clock).release
        if shown == "no pace":
            assert release is None, (ubd, usn, ugen)
            continue
        assert release is not None
        assert release.usual_bad_share == (None if shown is None else pytest.approx(shown)), (ubd, usn, ugen)
    assert release_row(store, clock).as_dict()["release_usual_bad_share"] is None


def test_the_status_shows_no_pace_without_a_release_under_way(
    store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the first release, while the breaker is open (the pace then is of an earlier
    generation, and over), and once nothing is parked; none of it is worth a warning."""
    caplog.set_level(logging.WARNING, logger="celery_breaker")
    clock = FakeClock()
    tag = park(store, 3)
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.call(ok)
    assert release_row(store, clock).release is None  # parked, never released
    release(store, clock.monotonic())
    assert release_row(store, clock).release is not None
    fail(breaker)
    assert store.sync()
    assert release_row(store, clock).snapshot.state is State.OPEN
    assert release_row(store, clock).release is None
    assert store.parking.release_paces([tag], clock.monotonic()) == {}  # (pace.lua: another generation)
    clock.advance(POLICY["reset_timeout"])
    breaker.call(ok)  # the probe closes it: a new generation, no pace begun under it yet
    assert state_of(breaker) is State.CLOSED
    assert release_row(store, clock).release is None
    clock.advance(1.0)
    assert release(store, clock.monotonic()) == 0  # begun again
    clock.advance(1.0)
    assert release(store, clock.monotonic()) == 3
    assert release_row(store, clock).parked == 0
    store.parking.done(tag, [f"task-{i}:1" for i in range(3)])
    assert release_row(store, clock).release is None  # nothing left to release
    assert [r.getMessage() for r in caplog.records if "pace" in r.getMessage()] == []  # (the trip warns)


def test_an_unreadable_pace_is_shown_as_none_and_fails_nothing(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    tag = paced(store, clock)
    client = redis.Redis.from_url(redis_url)
    for field, bad in (("rate", "inf"), ("rate", "-1"), ("a_gen", "x"), ("a_at", "1e300"), ("lim", "nan")):
        client.hset(tag + ":p", field, bad)
        assert release_row(store, clock).release is None
        release(store, clock.monotonic())  # (repaired: the pace restarts)
        assert release_row(store, clock).release is not None
    client.hset(tag + ":s", "rh", "1e300")  # (the listing resets such a breaker; pace.lua only reads)
    assert store.parking.release_paces([tag], clock.monotonic()) == {tag: ReleasePace(0, 5.0, None, None)}
    client.hdel(tag + ":s", "rh")
    client.delete(tag + ":p")
    client.set(tag + ":p", "not a hash")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        row = release_row(store, clock)
    assert row.release is None
    assert row.parked > 0
    assert "left svc's release pace out" in caplog.text


def test_a_pace_the_next_release_restarts_is_shown_as_none(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A pace ``release.lua`` restarts (a field unreadable, or beyond what the law writes:
    decisions 97 and 103) is no pace in the status either, as the release takes it; the
    pace the release begins again is shown from then on. Before, pace.lua read five fields
    and bounded none of them as the release does: a rate of 1e308, a limit of 1e-300 or
    NaN, a kept count of 10**9 were shown (on the page, the CLI and the metrics) until the
    next release restarted the pace. At the bounds, the pace is shown as stored."""
    clock = FakeClock()
    tag = paced(store, clock)
    client = redis.Redis.from_url(redis_url)
    generation = stored(store)["a_gen"]
    # (a float: that many seconds from now)
    cases: list[dict[str, str | float]] = [
        {"rate": "1e308"},
        {"rate": "nan"},
        {"rate": "-5"},
        {"lim": "nan"},
        {"lim": "-1"},
        {"lim": "1e-300"},
        {"lim": "80", "lkp": "1000000000"},
        {"lim": "80", "alm": "1000000000"},
        {"thr": "1e-300"},
        {"a_tokens": "1e300"},
        {"sok": "x"},
        {"jat": 200.0},
        {"ubd": "60", "usn": "60", "ugen": generation},
    ]
    for damage in cases:
        now = clock.monotonic()
        for name, value in damage.items():
            client.hset(tag + ":p", name, value if isinstance(value, str) else repr(now + value))
        assert release_row(store, clock).release is None, damage
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            assert release(store, now) == 0  # begun again: nothing held
        [record] = caplog.records  # (the same bounds: the release restarts each)
        assert "(the pace restarts)" in record.getMessage(), damage
        row = release_row(store, clock)
        assert row.release == ReleasePace(row.snapshot.generation, 5.0, None, None), damage
        clock.advance(1.0)
        assert release(store, clock.monotonic()) == 5
    # At the bounds (a threshold below the floor: a low ceiling's, decision 103): shown as stored.
    most_at_limit = LAW.plateau * 2**KEPT_MOST + DOUBLINGS_MOST
    for name, value in {"thr": "0.5", "lim": "80", "lkp": str(KEPT_MOST), "alm": str(most_at_limit)}.items():
        client.hset(tag + ":p", name, value)
    row = release_row(store, clock)
    assert row.release == ReleasePace(row.snapshot.generation, 5.0, 80.0, None)


def test_a_redis_clock_that_steps_back_holds_nothing_back(store: RedisStore) -> None:
    """Redis's clock steps back 100 s (a failover to a server whose clock is behind): the
    pace's times move back with it. Kept ahead of the clock, they released nothing for
    100 s (nor grew the pace); the fixed ramp never did."""
    clock = FakeClock()
    breaker = grown_to_40(store, clock)
    now = clock.monotonic() - 100.0
    assert release(store, now) == 0  # (the step itself lasted no time)
    released = []
    for _ in range(4):
        now += 0.25
        released.append(release(store, now))
        for _ in range(released[-1]):
            breaker.call(ok)  # (the breaker's clock is the workers': it did not step back)
        store.flush()
    assert released == [10, 10, 10, 10]  # 40/s at once
    assert float(stored(store)["rate"]) == 80.0  # and grown a second later
    assert float(stored(store)["a_at"]) == now
