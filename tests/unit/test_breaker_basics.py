"""Basic breaking: calls pass when closed, are rejected when open, and every way of guarding works.

Of the seed's ten test areas, fallback (7) is a Celery-level feature (``breaker_fallback`` on
BreakerTask) and performance (9) is a benchmark under ``bench/``: neither is tested here.
"""

from __future__ import annotations

import pickle
import uuid
from typing import Any

import pytest

from celery_breaker import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitBreakerError,
    CircuitOpenError,
    ConfigurationError,
    State,
)
from celery_breaker.testing import FakeClock, fresh_store

from .support import make


def down() -> None:
    raise ConnectionError("downstream down")


def trip(breaker: CircuitBreaker, failures: int = 5) -> None:
    for _ in range(failures):
        with pytest.raises(ConnectionError):
            breaker.call(down)
    assert breaker.state is State.OPEN


def test_closed_breaker_passes_calls_with_their_arguments_and_result(clock: FakeClock) -> None:
    breaker = make(clock)

    def add(a: int, b: int, *, times: int) -> int:
        return (a + b) * times

    assert breaker.call(add, 1, 2, times=3) == 9
    assert breaker.state is State.CLOSED
    assert breaker.snapshot().successes == 1


def test_failure_is_re_raised_unchanged(clock: FakeClock) -> None:
    breaker = make(clock)
    err = ConnectionError("boom")

    def raise_it() -> None:
        raise err

    with pytest.raises(ConnectionError) as info:
        breaker.call(raise_it)
    assert info.value is err
    assert breaker.snapshot().failures == 1


def test_open_breaker_rejects_without_running_the_call(clock: FakeClock) -> None:
    breaker = make(clock)
    trip(breaker)
    ran: list[int] = []
    with pytest.raises(CircuitOpenError):
        breaker.call(ran.append, 1)
    assert ran == []


def test_rejection_carries_name_key_state_and_retry_after(clock: FakeClock) -> None:
    breaker = CircuitBreaker("crm", storage=fresh_store(), clock=clock, key="tenant-7")
    trip(breaker)
    clock.advance(17.7)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(down)
    err = info.value
    assert err.name == "crm"
    assert err.key == "tenant-7"
    assert err.state is State.OPEN
    assert err.retry_after == pytest.approx(12.3)
    assert err.label == "crm[tenant-7]"
    assert isinstance(err, CircuitBreakerError)


def test_rejection_reads_as_a_sentence(clock: FakeClock) -> None:
    breaker = make(clock, name="x")
    trip(breaker)
    clock.advance(5)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(down)
    assert str(info.value) == "breaker 'x' open, next probe in 25.0 s"
    assert repr(info.value) == "CircuitOpenError: breaker 'x' open, next probe in 25.0 s"


def test_forced_open_rejection_has_no_retry_after(clock: FakeClock) -> None:
    breaker = make(clock, name="x")
    breaker.force_open()
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(down)
    assert info.value.retry_after is None
    assert info.value.state is State.FORCED_OPEN
    assert repr(info.value) == "CircuitOpenError: breaker 'x' forced_open"


def test_open_error_survives_pickling(clock: FakeClock) -> None:
    breaker = CircuitBreaker("crm", storage=fresh_store(), clock=clock, key="k")
    trip(breaker)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(down)
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.name, copy.key, copy.state, copy.retry_after) == ("crm", "k", State.OPEN, 30.0)
    assert str(copy) == str(info.value)


def test_open_error_built_by_hand_uses_message_or_detail() -> None:
    assert str(CircuitOpenError("custom text", name="a")) == "custom text"
    err = CircuitOpenError(name="crm", state=State.OPEN, retry_after=12.3, detail="deferred 12.3 s (deferral 3)")
    assert repr(err) == "CircuitOpenError: breaker 'crm' open, deferred 12.3 s (deferral 3)"
    assert str(CircuitOpenError(name="crm")) == "breaker 'crm' open"


# -- decorator ---------------------------------------------------------------------


def test_decorator_guards_a_sync_function_and_keeps_its_identity(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=2)
    calls: list[int] = []

    @breaker
    def fetch(n: int) -> int:
        """Fetch n."""
        calls.append(n)
        if n < 0:
            raise ConnectionError(n)
        return n * 2

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch n."
    assert fetch(4) == 8
    for _ in range(2):
        with pytest.raises(ConnectionError):
            fetch(-1)
    with pytest.raises(CircuitOpenError):
        fetch(5)
    assert calls == [4, -1, -1]


# -- context manager -------------------------------------------------------------


def test_with_block_records_success(clock: FakeClock) -> None:
    breaker = make(clock)
    with breaker as entered:
        assert entered is breaker
    assert breaker.snapshot().successes == 1


def test_with_block_records_failure_and_re_raises(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    with pytest.raises(ConnectionError), breaker:
        down()
    snap = breaker.snapshot()
    assert snap.failures == 1
    assert snap.state is State.OPEN


def test_with_block_on_open_breaker_does_not_run_the_body(clock: FakeClock) -> None:
    breaker = make(clock)
    trip(breaker)
    ran = False
    with pytest.raises(CircuitOpenError), breaker:
        ran = True
    assert ran is False


def test_nested_with_records_the_failure_in_both_breakers(clock: FakeClock) -> None:
    store = fresh_store()
    outer = CircuitBreaker("outer", storage=store, clock=clock)
    inner = CircuitBreaker("inner", storage=store, clock=clock)
    with pytest.raises(ConnectionError), outer, inner:
        down()
    assert outer.snapshot().failures == 1
    assert inner.snapshot().failures == 1
    with outer, inner:
        pass
    assert (outer.snapshot().successes, inner.snapshot().successes) == (1, 1)


def test_nested_open_breaker_is_neutral_for_the_outer_one(clock: FakeClock) -> None:
    store = fresh_store()
    outer = CircuitBreaker("outer", {"failure_threshold": 1}, storage=store, clock=clock)
    inner = CircuitBreaker("inner", storage=store, clock=clock)
    trip(inner)
    for _ in range(3):
        with pytest.raises(CircuitOpenError), outer, inner:
            pass
    snap = outer.snapshot()
    assert snap.state is State.CLOSED
    assert (snap.failures, snap.successes) == (0, 0)


def test_nested_blocks_attribute_outcomes_to_the_right_breaker(clock: FakeClock) -> None:
    store = fresh_store()
    outer = CircuitBreaker("outer", storage=store, clock=clock)
    inner = CircuitBreaker("inner", storage=store, clock=clock)

    def inner_succeeds_then_outer_fails() -> None:
        with outer:
            with inner:
                pass
            down()

    with pytest.raises(ConnectionError):
        inner_succeeds_then_outer_fails()
    assert (outer.snapshot().failures, outer.snapshot().successes) == (1, 0)
    assert (inner.snapshot().failures, inner.snapshot().successes) == (0, 1)


# -- identity: the same name on the same store is the same breaker ----------------------


def test_same_name_on_same_store_is_the_same_breaker(clock: FakeClock) -> None:
    store = fresh_store()
    first = CircuitBreaker("crm", {"failure_threshold": 2}, storage=store, clock=clock)
    second = CircuitBreaker("crm", {"failure_threshold": 2}, storage=store, clock=clock)
    trip(first, 2)
    assert second.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        second.call(down)
    assert first.snapshot().rejections == 1


def test_same_name_on_another_store_is_independent(clock: FakeClock) -> None:
    first = CircuitBreaker("crm", storage=fresh_store(), clock=clock)
    second = CircuitBreaker("crm", storage=fresh_store(), clock=clock)
    trip(first)
    assert second.state is State.CLOSED


def test_keys_separate_breakers_of_one_name(clock: FakeClock) -> None:
    store = fresh_store()
    a = CircuitBreaker("crm", storage=store, clock=clock, key="a")
    b = CircuitBreaker("crm", storage=store, clock=clock, key="b")
    trip(a)
    assert b.state is State.CLOSED
    assert b.call(lambda: 1) == 1


def test_equal_store_urls_share_breakers(clock: FakeClock) -> None:
    url = f"memory://unit-{uuid.uuid4().hex}"
    first = CircuitBreaker("crm", storage=url, clock=clock)
    second = CircuitBreaker("crm", storage=url, clock=clock)
    assert first.store is second.store
    trip(first)
    assert second.state is State.OPEN


# -- construction ------------------------------------------------------------------


def test_policy_may_be_a_dict_over_the_defaults(clock: FakeClock) -> None:
    breaker = CircuitBreaker("svc", {"failure_threshold": 2}, storage=fresh_store(), clock=clock)
    assert breaker.policy == BreakerPolicy(failure_threshold=2)
    trip(breaker, 2)


def test_bad_policy_dict_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="reset_timout"):
        CircuitBreaker("svc", {"reset_timout": 5}, storage=fresh_store())


@pytest.mark.parametrize("name", ["", None, 5])
def test_name_must_be_a_non_empty_string(name: Any) -> None:
    with pytest.raises(ValueError, match="name"):
        CircuitBreaker(name, storage=fresh_store())


def test_storage_must_be_a_url_or_a_store() -> None:
    with pytest.raises(ConfigurationError, match="storage"):
        CircuitBreaker("svc", storage=42)  # type: ignore[arg-type]


def test_repr_and_label_name_the_breaker_its_state_and_store(clock: FakeClock) -> None:
    breaker = CircuitBreaker("crm", storage=fresh_store(), clock=clock, key="t1")
    assert breaker.label == "crm[t1]"
    assert repr(breaker) == "<CircuitBreaker 'crm[t1]' closed on memory://test>"
    trip(breaker)
    assert "open" in repr(breaker)
