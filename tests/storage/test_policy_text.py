"""The Redis policy text (version 3, keyed; versions 1 and 2, positional) and keyed script replies."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.storage.redis import RedisStore, policy_text
from celery_breaker.storage.redis.replies import decode_reply, decode_snapshot, policy_from_text
from celery_breaker.testing import FakeClock

from ..unit.support import fail, ok, state_of
from .conftest import following, unique_prefix
from .test_redis_backoff import v1_text

#: Every field with a value other than its default (classification aside: it cannot be stored).
EVERY_FIELD: dict[str, Any] = {
    "failure_threshold": 4,
    "window": 30.5,
    "consecutive_failures": 6,
    "failure_rate_threshold": 0.4,
    "minimum_calls": 8,
    "count_window": 20,
    "slow_call_duration": 2.5,
    "slow_call_rate_threshold": 0.75,
    "reset_timeout": 7.0,
    "backoff_multiplier": 3.0,
    "max_reset_timeout": 100.0,
    "reset_jitter": 0.25,
    "half_open_max_calls": 4,
    "success_threshold": 3,
    "half_open_max_wait": 9.0,
}


def v2_text(policy: BreakerPolicy) -> str:
    """The policy as the release before keyed policy texts wrote it (version 1's fields, then backoff)."""
    values = [policy.backoff_multiplier, policy.max_reset_timeout, policy.reset_jitter, policy.longest_open]
    return "2;" + v1_text(policy)[2:] + ";" + ";".join("" if value is None else repr(value) for value in values)


@pytest.fixture
def server(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def store(redis_url: str) -> RedisStore:
    return RedisStore.from_url(f"{redis_url}?time=client&key_prefix={unique_prefix()}")


# -- version 3 ----------------------------------------------------------------------


def test_every_field_round_trips_through_a_version_3_text() -> None:
    policy = BreakerPolicy(**EVERY_FIELD)
    assert set(EVERY_FIELD) == set(policy.as_dict()) - {"record_exceptions", "ignore_exceptions"}
    assert policy_from_text(policy_text(policy), BreakerPolicy()) == policy
    for name, value in EVERY_FIELD.items():  # each field alone, over the defaults
        if name in ("slow_call_duration", "slow_call_rate_threshold"):
            alone = BreakerPolicy(slow_call_duration=2.5, slow_call_rate_threshold=0.75)
        elif name in ("success_threshold", "max_reset_timeout"):
            alone = BreakerPolicy(**{name: value, "half_open_max_calls": 4})
        else:
            alone = BreakerPolicy(**{name: value})
        assert policy_from_text(policy_text(alone), BreakerPolicy(reset_timeout=1)) == alone, name


def test_classification_comes_from_the_base_policy() -> None:
    base = BreakerPolicy(ignore_exceptions=(KeyError,), record_exceptions=(OSError,))
    adopted = policy_from_text(policy_text(BreakerPolicy(consecutive_failures=3)), base)
    assert (adopted.consecutive_failures, adopted.ignore_exceptions, adopted.record_exceptions) == (
        3,
        (KeyError,),
        (OSError,),
    )


def test_the_text_is_keyed_and_deterministic() -> None:
    policy = BreakerPolicy(**EVERY_FIELD)
    text = policy_text(policy)
    described = json.loads(text)
    assert text == json.dumps(described, sort_keys=True, separators=(",", ":"))
    assert text == policy_text(BreakerPolicy(**dict(reversed(EVERY_FIELD.items()))))
    assert described["v"] == 3
    assert described["rules"] == [
        {"kind": "failures_within", "threshold": 4, "window": 30.5},
        {"kind": "consecutive_failures", "threshold": 6},
        {
            "kind": "rates",
            "failure_rate_threshold": 0.4,
            "slow_call_rate_threshold": 0.75,
            "calls_to_judge": 8,
            "count_window": 20,
        },
    ]
    opened = ("reset_timeout", "backoff_multiplier", "longest_open", "reset_jitter", "slow_call_duration")
    halfopen = ("half_open_max_calls", "probes_to_close", "half_open_max_wait")
    assert {name: described[name] for name in opened + halfopen} == {
        "reset_timeout": 7.0, "backoff_multiplier": 3.0, "longest_open": 100.0, "reset_jitter": 0.25,
        "slow_call_duration": 2.5, "half_open_max_calls": 4, "probes_to_close": 3, "half_open_max_wait": 9.0,
    }  # fmt: skip
    assert described["fields"] == EVERY_FIELD


def test_the_default_policy_has_one_rule_and_no_slow_calls() -> None:
    described = json.loads(policy_text(BreakerPolicy()))
    assert described["rules"] == [{"kind": "failures_within", "threshold": 5, "window": 60.0}]
    assert "slow_call_duration" not in described
    assert "consecutive_failures" not in described["fields"]  # unset fields are left out: None


def test_a_time_window_rate_rule_carries_the_window() -> None:
    described = json.loads(policy_text(BreakerPolicy(failure_threshold=None, failure_rate_threshold=0.5)))
    assert described["rules"] == [
        {"kind": "rates", "failure_rate_threshold": 0.5, "calls_to_judge": 10, "window": 60.0},
    ]


def test_unreadable_texts_raise() -> None:
    for text in ('{"v":4,"rules":[]}', '{"v":3}', "[1]", "3;1;2", "{nope"):
        with pytest.raises((ValueError, LookupError)):
            policy_from_text(text, BreakerPolicy())


# -- versions 1 and 2 (earlier releases) ---------------------------------------------


def test_a_version_2_policy_reads_as_what_it_says() -> None:
    policy = BreakerPolicy(**{**EVERY_FIELD, "consecutive_failures": None})
    assert v2_text(policy).count(";") == 17
    assert policy_from_text(v2_text(policy), BreakerPolicy()) == policy


def test_a_breaker_stored_with_a_version_2_text_keeps_working(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    policy = BreakerPolicy(
        failure_threshold=3, failure_rate_threshold=0.5, count_window=4, minimum_calls=4, reset_timeout=10
    )
    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock)
    server.hset(store.keys_for("svc", None)[0], "pol", v2_text(policy))
    other = CircuitBreaker("other", policy, storage=store, clock=clock)  # (not the same breaker)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        breaker.call(ok)
        breaker.call(ok)
        fail(breaker, 2)  # 2/4: the rate rule of the version-2 text trips it
    assert "unreadable" not in caplog.text
    assert state_of(breaker) is State.OPEN
    assert breaker.snapshot().window_calls == 0  # (cleared by the trip)
    assert state_of(other) is State.CLOSED


def test_parked_probes_follow_half_open_max_calls_in_either_text(store: RedisStore, server: redis.Redis) -> None:
    clock = FakeClock()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, half_open_max_calls=3, success_threshold=1)
    for name, text in (("keyed", policy_text(policy)), ("positional", v2_text(policy))):
        breaker = CircuitBreaker(name, policy, storage=store, clock=clock)
        server.hset(store.keys_for(name, None)[0], "pol", text)
        fail(breaker)
        entries = [f"{name}-{i}:1" for i in range(5)]
        for i, entry in enumerate(entries):
            store.parking.park(name, None, entry, 100.0 + i, f"payload {i}", None)
        clock.advance(10)
        tag = store.parking.tag(name, None)
        released = store.parking.release(tag, most=100, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())
        assert [entry for entry, _ in released] == entries[:3], text


# -- a newer release's text ---------------------------------------------------------


def test_a_stored_rule_of_an_unknown_kind_resets_the_breaker_with_a_warning(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", {"failure_threshold": 2}, storage=store, clock=clock)
    fail(breaker)
    newer = json.loads(policy_text(breaker.policy))
    newer["rules"].append({"kind": "failures_per_tenant", "threshold": 9})
    # (The store's agent thread may be the one to meet it: capture from the change on.)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(store.keys_for("svc", None)[0], "pol", json.dumps(newer, sort_keys=True, separators=(",", ":")))
        fail(breaker)
        store.flush()  # (a flush in flight that met it first has logged when this returns)
    assert "reset unreadable state in Redis (unreadable policy" in caplog.text
    assert state_of(breaker) is State.CLOSED  # a fresh breaker: one failure so far
    fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_a_consecutive_failures_policy_is_adopted_from_redis(store: RedisStore) -> None:
    clock = FakeClock()
    first = CircuitBreaker("svc", {"failure_threshold": None, "consecutive_failures": 2}, storage=store, clock=clock)
    following(store)  # (first hears transitions: else sync() has nothing to wait for, and its view is old)
    other = RedisStore.from_url(store.url)
    try:
        second = CircuitBreaker("svc", {"failure_threshold": 9}, storage=other, clock=clock)
        assert second._cell.policy.consecutive_failures == 2  # the stored policy wins
        fail(second, 2)
        assert store.sync()
        assert state_of(first) is State.OPEN
        with pytest.raises(CircuitOpenError):
            second.call(ok)
    finally:
        other.close()


# -- keyed replies -------------------------------------------------------------------


def test_replies_are_read_by_name(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", {"failure_threshold": None, "consecutive_failures": 2}, storage=store, clock=clock)
    fail(breaker)
    keys = store.keys_for("svc", None)
    argv = [repr(clock.monotonic()), store.ttl_ms, "0", policy_text(breaker.policy), "svc", "-", ""]
    raw = store.run("snapshot", keys, argv)
    fields = dict(zip(raw[::2], raw[1::2], strict=True))
    assert (fields[b"st"], fields[b"gen"], fields[b"wko"], fields[b"ko"]) == (b"closed", 0, 1, 1)
    reply = decode_reply(raw)
    assert reply is not None
    assert (reply.state, reply.generation, reply.moved, reply.verdict) == (State.CLOSED, 0, None, "ok")
    snap = decode_snapshot(reply, 0.0)
    assert (snap.name, snap.key, snap.window_failures, snap.failures) == ("svc", None, 1, 1)
    # A listing (no policy) of a breaker that is gone: absent, and left out of the list.
    gone = store.keys_for("gone", None)
    assert decode_reply(store.run("snapshot", gone, [*argv[:3], "", "gone", "-", ""])) is None
    assert [s.name for s in store.snapshots(clock)] == ["svc"]


def test_the_record_script_applies_aggregated_successes_before_its_outcome(
    store: RedisStore, server: redis.Redis
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", {"failure_threshold": None, "consecutive_failures": 2}, storage=store, clock=clock)
    fail(breaker)
    keys = store.keys_for("svc", None)
    assert server.hget(keys[0], "run") == b"1"
    # A failure sent with one success counted locally under generation 0, as RedisCell sends them.
    head = [repr(clock.monotonic()), store.ttl_ms, "0;0;0;1;0", policy_text(breaker.policy), "svc", "-", ""]
    reply = decode_reply(store.run("record", keys, [*head, "0", "-1", "1", "0.0", "", "0.5"]))
    assert reply is not None
    assert (reply.state, reply.moved) == (State.CLOSED, None)  # the success ended the run first
    assert server.hget(keys[0], "run") == b"1"
    assert int(server.hget(keys[0], "ok") or 0) == 1
    reply = decode_reply(store.run("record", keys, [*head[:2], "", *head[3:], "0", "-1", "1", "0.0", "", "0.5"]))
    assert reply is not None
    assert reply.moved is not None
    assert (reply.state, reply.moved.reason, reply.moved.failures) == (State.OPEN, "2 consecutive failures", 2)
