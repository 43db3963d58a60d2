"""The in-memory store: bounded however many keys appear, eviction order, URLs and the scheme registry."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, ConfigurationError, State
from celery_breaker.storage import MemoryStore, resolve_store, store_from_url
from celery_breaker.storage.memory import MemoryCell
from celery_breaker.testing import FakeClock, fresh_store

from .support import HeldCall, down, ok, state_of

POLICY = BreakerPolicy(failure_threshold=1)


def trip(breaker: CircuitBreaker) -> None:
    with pytest.raises(ConnectionError):
        breaker.call(down)
    assert breaker.state is State.OPEN


def keyed(store: MemoryStore, clock: FakeClock, key: str) -> CircuitBreaker:
    return CircuitBreaker("tenant", POLICY, storage=store, clock=clock, key=key)


def held(store: MemoryStore, name: str, key: str | None = None) -> bool:
    return (name, key) in {(s.name, s.key) for s in store.snapshots(FakeClock())}


# -- bounds ------------------------------------------------------------------------------


def test_per_key_breakers_a_hundred_times_max_breakers_stay_within_it() -> None:
    # (A hundred times the bound, as a million keys against the default 10,000 would be,
    # at a fifth of that size: 36 s of the suite before, ~3 s now.)
    clock = FakeClock()
    store = MemoryStore("memory://bounded", max_breakers=2_000)
    first = keyed(store, clock, "0")
    first_cell = store.cell("tenant", "0", POLICY, clock)
    peak = 0
    for i in range(1, 200_000):
        CircuitBreaker("tenant", POLICY, storage=store, clock=clock, key=str(i))
        peak = max(peak, len(store))
    assert peak <= 2_000
    assert len(store) <= 2_000
    assert first_cell.evicted is True
    assert first.call(ok) == "ok"  # the holder transparently gets a fresh cell
    assert store.cell("tenant", "0", POLICY, clock) is not first_cell


def test_open_breakers_are_evicted_after_at_rest_ones() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=10)
    open_ones = [keyed(store, clock, f"open-{i}") for i in range(3)]
    for breaker in open_ones:
        trip(breaker)  # created first: the least recently used of all
    for i in range(40):
        clock.advance(1)
        keyed(store, clock, f"rest-{i}")
        assert len(store) <= 10
    for i in range(3):
        assert held(store, "tenant", f"open-{i}")
    assert all(b.state is State.OPEN for b in open_ones)


def test_when_nothing_is_at_rest_the_least_recently_used_go() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4)
    breakers = []
    for i in range(4):
        clock.advance(1)
        breaker = keyed(store, clock, str(i))
        trip(breaker)
        breakers.append(breaker)
    clock.advance(1)
    keyed(store, clock, "new")  # sweep keeps half: the two most recently used stay
    assert [held(store, "tenant", str(i)) for i in range(4)] == [False, False, True, True]
    assert breakers[0].state is State.CLOSED  # forgotten: a fresh breaker


def test_closed_breaker_with_recent_failures_is_not_at_rest() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4)
    policy = BreakerPolicy(failure_threshold=5)
    worried = CircuitBreaker("worried", policy, storage=store, clock=clock)
    with pytest.raises(ConnectionError):
        worried.call(down)
    for name in ("a", "b", "c", "d"):
        clock.advance(1)
        CircuitBreaker(name, policy, storage=store, clock=clock)
    assert held(store, "worried")
    assert worried.snapshot().window_failures == 1


def test_idle_breakers_are_evicted_first_even_when_open() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4, idle_ttl=100)
    idle = keyed(store, clock, "idle")
    trip(idle)
    clock.advance(200)
    for key in ("a", "b", "c", "d"):
        keyed(store, clock, key)
    assert not held(store, "tenant", "idle")
    assert held(store, "tenant", "d")


def test_evicted_cell_is_flagged_and_its_holder_gets_a_fresh_one() -> None:
    clock = FakeClock()
    store = fresh_store()
    breaker = CircuitBreaker("svc", storage=store, clock=clock)
    breaker.call(ok)
    old = store.cell("svc", None, breaker.policy, clock)
    store.clear()
    assert (old.evicted, old.passing) == (True, False)
    assert len(store) == 0
    assert breaker.call(ok) == "ok"
    assert breaker.snapshot().successes == 1  # a fresh breaker, the old success forgotten
    assert store.cell("svc", None, breaker.policy, clock) is not old


@pytest.mark.parametrize("use", ["with", "state", "snapshot", "force_open"])
def test_every_entry_point_refreshes_an_evicted_cell(use: str) -> None:
    clock = FakeClock()
    store = fresh_store()
    breaker = CircuitBreaker("svc", storage=store, clock=clock)
    old = store.cell("svc", None, breaker.policy, clock)
    store.clear()
    if use == "with":
        with breaker:
            pass
    elif use == "state":
        assert breaker.state is State.CLOSED
    elif use == "snapshot":
        assert breaker.snapshot().state is State.CLOSED
    else:
        breaker.force_open()
        assert old.state is State.CLOSED
    assert len(store) == 1
    assert store.cell("svc", None, breaker.policy, clock) is not old


def test_call_on_an_evicted_forced_open_cell_asks_the_store_again() -> None:
    clock = FakeClock()
    store = fresh_store()
    breaker = CircuitBreaker("svc", storage=store, clock=clock)
    breaker.force_open()
    store.clear()  # the store forgot it: the breaker is CLOSED again for everyone
    assert breaker.call(ok) == "ok"


def test_forced_open_breaker_survives_a_sweep_while_it_keeps_rejecting() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4, idle_ttl=3600)
    forced = CircuitBreaker("forced", storage=store, clock=clock)
    forced.force_open()
    for _ in range(120):  # two hours of traffic, all rejected
        clock.advance(60)
        with pytest.raises(CircuitOpenError):
            forced.call(ok)
    for name in ("a", "b", "c", "d"):
        CircuitBreaker(name, storage=store, clock=clock)
    assert forced.state is State.FORCED_OPEN


def test_operator_states_are_never_evicted_even_when_they_fill_the_store() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4, idle_ttl=100)
    forced = [keyed(store, clock, f"forced-{i}") for i in range(3)]
    disabled = [keyed(store, clock, f"disabled-{i}") for i in range(2)]
    for breaker in forced:
        breaker.force_open()
    for breaker in disabled:
        breaker.disable()
    clock.advance(1000)  # all of them idle ten times over
    for i in range(20):
        keyed(store, clock, f"new-{i}")
        others = [s for s in store.snapshots(clock) if s.state not in (State.FORCED_OPEN, State.DISABLED)]
        assert len(others) <= 4  # the rest of the store stays bounded
    assert all(held(store, "tenant", f"forced-{i}") for i in range(3))
    assert all(held(store, "tenant", f"disabled-{i}") for i in range(2))
    assert {b.state for b in forced} == {State.FORCED_OPEN}
    assert {b.state for b in disabled} == {State.DISABLED}
    with pytest.raises(CircuitOpenError):
        forced[0].call(ok)


@pytest.mark.parametrize("move", ["force_open", "disable"])  # (a dropped breaker is already CLOSED)
def test_an_operators_move_lands_even_when_a_sweep_drops_the_breaker_at_that_moment(
    move: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4, idle_ttl=100)
    target = keyed(store, clock, "target")
    trip(target)  # OPEN: a close or reset has something to undo
    clock.advance(1000)  # idle: first in line for the next sweep
    original = {"force": MemoryCell.force}
    swept: list[bool] = []

    def sweep_first(name: str) -> Any:
        def move_cell(cell: MemoryCell, *args: Any) -> Any:
            if not swept:  # the sweep lands between the holder's check and its move
                swept.append(True)
                for i in range(8):
                    keyed(store, clock, f"other-{i}")
                assert cell.evicted
            return original[name](cell, *args)

        return move_cell

    for name in original:
        monkeypatch.setattr(MemoryCell, name, sweep_first(name))
    getattr(target, move)()
    assert swept
    expected = {"force_open": State.FORCED_OPEN, "disable": State.DISABLED}[move]
    assert target.state is expected
    assert CircuitBreaker("tenant", POLICY, storage=store, clock=clock, key="target").state is expected
    for i in range(8):
        keyed(store, clock, f"later-{i}")
    assert held(store, "tenant", "target")


def test_a_closed_operator_breaker_is_evicted_again() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4, idle_ttl=100)
    breaker = keyed(store, clock, "maintenance")
    breaker.force_open()
    clock.advance(1000)
    for i in range(8):
        keyed(store, clock, f"during-{i}")
    assert held(store, "tenant", "maintenance")
    breaker.close()
    clock.advance(1000)
    for i in range(8):
        keyed(store, clock, f"after-{i}")
    assert not held(store, "tenant", "maintenance")


def test_breaker_failing_below_threshold_is_not_idle() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4, idle_ttl=100)
    failing = CircuitBreaker("failing", {"failure_threshold": 5}, storage=store, clock=clock)
    for _ in range(30):  # one failure every 16 s: never 5 within 60 s
        clock.advance(16)
        with pytest.raises(ConnectionError):
            failing.call(down)
    for name in ("a", "b", "c", "d"):
        CircuitBreaker(name, storage=store, clock=clock)
    assert held(store, "failing")


def sweep_away(store: MemoryStore, clock: FakeClock, key: str) -> MemoryCell:
    """Fill the store with newer breakers until a sweep drops ``key``'s; return its old cell."""
    cell = store.cell("tenant", key, POLICY, clock)
    clock.advance(1)
    for other in ("a", "b", "c", "d"):
        keyed(store, clock, other).call(ok)
    assert cell.evicted
    assert not held(store, "tenant", key)
    return cell


@pytest.mark.parametrize("rate", [False, True])
def test_a_failure_in_flight_when_a_sweep_drops_its_breaker_is_counted_by_the_breaker(rate: bool) -> None:
    # Nothing counts calls in flight: a sweep may drop a breaker while one of its calls
    # runs (at rest, used longest ago). Its failure landed on the dropped cell, which
    # tripped (announcing a transition) while the breaker every caller uses stayed CLOSED
    # with no failure: the failure was lost. On Redis, whose keys outlive the view, it counts.
    clock = FakeClock()
    store = fresh_store(max_breakers=4)
    policy = BreakerPolicy(failure_rate_threshold=0.5, minimum_calls=1) if rate else POLICY
    breaker = CircuitBreaker("tenant", policy, storage=store, clock=clock, key="busy")
    heard: list[State] = []
    breaker.add_listener(lambda transition: heard.append(transition.target))
    late = HeldCall(breaker)  # admitted, still running
    old = sweep_away(store, clock, "busy")
    late.fail()
    assert old.state is State.CLOSED  # the dropped cell judged nothing
    assert state_of(breaker) is State.OPEN
    assert heard == [State.OPEN]
    assert breaker.snapshot().failures == 1
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)


def test_a_success_in_flight_when_a_sweep_drops_its_breaker_is_counted_by_the_breaker() -> None:
    clock = FakeClock()
    store = fresh_store(max_breakers=4)
    breaker = keyed(store, clock, "busy")
    late = HeldCall(breaker)
    sweep_away(store, clock, "busy")
    late.succeed()
    assert breaker.snapshot().successes == 1
    assert state_of(breaker) is State.CLOSED


def test_a_call_in_flight_through_a_trip_after_a_sweep_judges_nothing() -> None:
    # Admitted by the dropped cell; the breaker tripped meanwhile: stale, counted only.
    clock = FakeClock()
    store = fresh_store(max_breakers=4)
    breaker = CircuitBreaker("tenant", {"failure_threshold": 2}, storage=store, clock=clock, key="busy")
    late = HeldCall(breaker)
    sweep_away(store, clock, "busy")
    for _ in range(2):
        with pytest.raises(ConnectionError):
            breaker.call(down)
    assert state_of(breaker) is State.OPEN
    clock.advance(60)  # may half-open: a stale outcome must not close it
    late.succeed()
    assert state_of(breaker) is State.OPEN
    assert breaker.snapshot().successes == 1


# -- MemoryStore options and URLs -----------------------------------------------------------


def test_from_url_reads_options() -> None:
    store = MemoryStore.from_url("memory://named?max_breakers=50&idle_ttl=12.5")
    assert (store.max_breakers, store.idle_ttl, store.url) == (50, 12.5, "memory://named?max_breakers=50&idle_ttl=12.5")
    default = MemoryStore.from_url("memory://")
    assert (default.max_breakers, default.idle_ttl) == (10_000, 3600.0)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://?size=5", "unknown option 'size'; allowed: max_breakers, idle_ttl"),
        ("memory://?max_breakers=lots", "max_breakers='lots' is not a whole number"),
        ("memory://?max_breakers=", "max_breakers='' is not a whole number"),
        ("memory://?max_breakers=0", "max_breakers must be a whole number >= 1, got 0"),
        ("memory://?max_breakers=-3", "max_breakers must be a whole number >= 1, got -3"),
        ("memory://?idle_ttl=0", "idle_ttl must be seconds > 0, at most 315360000 (ten years), got 0.0"),
        ("memory://?idle_ttl=-1", "idle_ttl must be seconds > 0, at most 315360000 (ten years), got -1.0"),
        ("memory://?idle_ttl=1e15", "at most 315360000 (ten years), got 1000000000000000.0"),
        ("memory://?idle_ttl=soon", "idle_ttl='soon' is not a number of seconds"),
    ],
)
def test_from_url_bad_options(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        MemoryStore.from_url(url)
    assert message in str(info.value)


@pytest.mark.parametrize("url", ["memory://?password=s3cret-pw", "memory://?token=s3cret-pw&max_breakers=x"])
def test_a_bad_option_is_refused_without_showing_a_secret(url: str) -> None:
    # A value no memory store reads may be a password put in the wrong URL: the error
    # masks it, as it masks any store URL's (it was shown, at the worker's CRITICAL).
    with pytest.raises(ConfigurationError) as info:
        store_from_url(url)
    assert "s3cret-pw" not in str(info.value)
    assert "unknown option" in str(info.value)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_breakers": True}, "max_breakers"),
        ({"max_breakers": 1.5}, "max_breakers"),
        ({"max_breakers": 0}, "max_breakers"),
        ({"idle_ttl": 0}, "idle_ttl"),
        ({"idle_ttl": True}, "idle_ttl"),
        ({"idle_ttl": "5"}, "idle_ttl"),
    ],
)
def test_constructor_rejects_bad_options(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        MemoryStore(**options)


@pytest.mark.parametrize("via", ["url", "constructor"])
def test_nan_idle_ttl_is_rejected(via: str) -> None:
    def build() -> MemoryStore:
        if via == "url":
            return MemoryStore.from_url("memory://?idle_ttl=nan")
        return MemoryStore(idle_ttl=math.nan)

    with pytest.raises(ConfigurationError, match="idle_ttl"):
        build()


def test_store_from_url_returns_one_store_per_url() -> None:
    name = uuid.uuid4().hex
    first = store_from_url(f"memory://{name}")
    assert store_from_url(f"memory://{name}") is first
    assert store_from_url(f"memory://{name}-other") is not first
    assert isinstance(first, MemoryStore)


def test_store_from_url_applies_options() -> None:
    store = store_from_url(f"memory://{uuid.uuid4().hex}?max_breakers=7")
    assert isinstance(store, MemoryStore)
    assert store.max_breakers == 7


def test_unknown_scheme_is_a_configuration_error_naming_the_scheme() -> None:
    with pytest.raises(ConfigurationError) as info:
        store_from_url("bogus://localhost:1234/0")
    message = str(info.value)
    assert "breaker_storage_url" in message
    assert "'bogus'" in message
    assert "memory://" in message  # lists what this build supports


@pytest.mark.parametrize(
    ("url", "meant"),
    [
        ("reddis://localhost:6379/0", "redis://"),  # a typo of a scheme
        ("redis+sentinal://s1:26379/mymaster", "redis+sentinel://"),
        ("memory", "memory://"),  # a scheme without "://"
        ("localhost:6379", "redis://localhost:6379"),  # a host and port without a scheme
    ],
)
def test_an_unknown_scheme_names_the_one_probably_meant(url: str, meant: str) -> None:
    # (the list of every scheme this build supports came alone: fifteen names to compare)
    with pytest.raises(ConfigurationError) as info:
        store_from_url(url)
    assert f"did you mean {meant}" in str(info.value)


def test_an_unknown_scheme_near_no_known_one_suggests_none() -> None:
    with pytest.raises(ConfigurationError) as info:
        store_from_url("amqp://guest@rabbit//")
    assert "did you mean" not in str(info.value)


def test_non_string_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="URL string"):
        store_from_url(42)  # type: ignore[arg-type]


def test_unhashable_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        store_from_url(["memory://"])  # type: ignore[arg-type]


def test_resolve_store_passes_store_objects_through() -> None:
    store = fresh_store()
    assert resolve_store(store) is store
    with pytest.raises(ConfigurationError, match="or a store object, got a object"):
        resolve_store(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "storage", [["redis://:s3cret-pw@h/0"], b"redis://:s3cret-pw@h/0", {"url": "redis://:s3cret-pw@h/0"}]
)
def test_a_storage_of_another_type_is_refused_by_its_type_alone(storage: Any) -> None:
    # (the refusal showed its repr: a list or bytes of URLs, passwords and all)
    with pytest.raises(ConfigurationError) as info:
        CircuitBreaker("svc", storage=storage)
    assert "s3cret-pw" not in str(info.value)
    assert f"store URL (a str such as 'redis://host:6379/0') or a store object, got a {type(storage).__name__}" in str(
        info.value
    )


def test_fresh_stores_share_nothing() -> None:
    clock = FakeClock()
    a, b = fresh_store(), fresh_store()
    assert a is not b
    trip(CircuitBreaker("svc", POLICY, storage=a, clock=clock))
    assert CircuitBreaker("svc", POLICY, storage=b, clock=clock).state is State.CLOSED


def test_repr_counts_breakers() -> None:
    store = fresh_store()
    CircuitBreaker("a", storage=store)
    assert repr(store) == "MemoryStore('memory://test', breakers=1)"
