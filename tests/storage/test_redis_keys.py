"""The Redis key scheme (storage/redis/keys.py): every (prefix, name, key) has keys of its own (Hypothesis)."""

from __future__ import annotations

import itertools
import logging
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_breaker import BreakerPolicy, CircuitBreaker, State
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis.history import HISTORY_SUFFIX
from celery_breaker.storage.redis.keys import breaker_of
from celery_breaker.storage.redis.parking import PARKING_SUFFIXES
from celery_breaker.testing import FakeClock

from ..unit.support import fail
from .conftest import unique_prefix

#: Any prefix the store accepts: non-empty, without braces (they delimit the Cluster hash tag).
PREFIXES = st.text(min_size=1, max_size=30).filter(lambda text: "{" not in text and "}" not in text)
NAMES = st.text(max_size=30)
#: None (no key) or any text, "" included.
KEYS = st.none() | st.text(max_size=30)
#: What the scheme writes as it is.
SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-~"

Triple = tuple[str, str, str | None]


def offline_store(prefix: str) -> RedisStore:
    """A store that is never connected: its keys are computed, not used."""
    return RedisStore("redis://127.0.0.1:1", key_prefix=prefix)


def breaker_keys(store: RedisStore, name: str, key: str | None) -> set[str]:
    """Every key of one breaker: state, parking, history."""
    tag = store.parking.tag(name, key)
    return {*store.keys_for(name, key), *(tag + suffix for suffix in PARKING_SUFFIXES), tag + HISTORY_SUFFIX}


def prefix_keys(store: RedisStore) -> set[str]:
    """The keys and channel a prefix has once, whatever its breakers."""
    return {store.parking.index, store.parking.marker, store.channel}


@settings(max_examples=150, deadline=None)
@given(PREFIXES, NAMES, KEYS, PREFIXES, NAMES, KEYS)
def test_distinct_triples_never_share_a_key(
    prefix_a: str, name_a: str, key_a: str | None, prefix_b: str, name_b: str, key_b: str | None
) -> None:
    a, b = (prefix_a, name_a, key_a), (prefix_b, name_b, key_b)
    store_a, store_b = offline_store(prefix_a), offline_store(prefix_b)
    keys_a, keys_b = breaker_keys(store_a, name_a, key_a), breaker_keys(store_b, name_b, key_b)
    assert len(keys_a) == len(store_a.keys_for(name_a, key_a)) + len(PARKING_SUFFIXES) + 1
    if a == b:
        assert keys_a == keys_b
    else:
        assert not keys_a & keys_b
    # A prefix's own keys and channel: its own, and never a breaker's.
    assert (prefix_keys(store_a) == prefix_keys(store_b)) == (prefix_a == prefix_b)
    assert not (prefix_keys(store_a) | prefix_keys(store_b)) & (keys_a | keys_b)


@settings(max_examples=150, deadline=None)
@given(PREFIXES, NAMES, KEYS)
def test_a_tag_reads_back_as_its_breaker_and_only_under_its_prefix(prefix: str, name: str, key: str | None) -> None:
    store = offline_store(prefix)
    tag = store.parking.tag(name, key)
    assert breaker_of(tag, store.quoted_prefix) == (name, key)
    assert all(k.startswith(tag) for k in store.keys_for(name, key))
    other = offline_store(prefix + ":x")
    assert breaker_of(tag, other.quoted_prefix) is None


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=SAFE, min_size=1, max_size=20), NAMES, KEYS)
def test_a_prefix_of_safe_characters_keeps_its_keys(prefix: str, name: str, key: str | None) -> None:
    """Existing data stays valid: the keys are those of the scheme before prefixes were quoted."""
    store = offline_store(prefix)
    tag = f"{prefix}:{quote(name, safe='')}" + ("" if key is None else f":{quote(key, safe='')}")
    assert store.keys_for(name, key) == [f"{{{tag}}}{suffix}" for suffix in (":s", ":f", ":r", ":b", ":l")]
    assert (store.channel, store.parking.index, store.parking.marker) == (
        f"{prefix}:transitions",
        f"{prefix}:parked",
        f"{prefix}:parking",
    )


def test_no_key_and_the_empty_key_are_two_breakers() -> None:
    store = offline_store("p")
    assert store.keys_for("n", None)[0] == "{p:n}:s"
    assert store.keys_for("n", "")[0] == "{p:n:}:s"
    assert breaker_of("{p:n:}", "p") == ("n", "")


# -- on a real Redis ------------------------------------------------------------------

_RUN = itertools.count()


def test_prefixes_that_once_shared_a_hash_tag_no_longer_collide(redis_url: str) -> None:
    """Prefix ``P`` with breaker ``x`` key ``y`` and prefix ``P:x`` with breaker ``y``
    were both ``{P:x:y}``: forcing one opened the other, and each listed the other's."""
    base = unique_prefix()
    clock = FakeClock()
    outer = RedisStore.from_url(f"{redis_url}?time=client&key_prefix={base}")
    inner = RedisStore.from_url(f"{redis_url}?time=client&key_prefix={quote(base + ':x', safe='')}")
    assert inner.key_prefix == base + ":x"
    keyed = CircuitBreaker("x", {"failure_threshold": 1}, storage=outer, clock=clock, key="y")
    plain = CircuitBreaker("y", {"failure_threshold": 1}, storage=inner, clock=clock)
    keyed.force_open()
    assert (keyed.snapshot().state, plain.snapshot().state) == (State.FORCED_OPEN, State.CLOSED)
    fail(plain)
    assert (keyed.snapshot().state, plain.snapshot().state) == (State.FORCED_OPEN, State.OPEN)
    assert [(s.name, s.key) for s in outer.snapshots(clock)] == [("x", "y")]
    assert [(s.name, s.key) for s in inner.snapshots(clock)] == [("y", None)]
    outer.parking.park("x", "y", "outer:1", 1.0, "o", None)
    inner.parking.park("y", None, "inner:1", 1.0, "i", None)
    assert [outer.parking.label(t) for t in outer.parking.tags()] == ["x[y]"]
    assert [inner.parking.label(t) for t in inner.parking.tags()] == ["y"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=12).filter(lambda t: "{" not in t and "}" not in t), NAMES, KEYS)
def test_a_listing_reads_every_breaker_back_as_it_was_named(
    redis_url: str, caplog: pytest.LogCaptureFixture, prefix: str, name: str, key: str | None
) -> None:
    """The scripts read a tag back (checks.lua breaker_of) exactly as Python writes it."""
    prefix = f"{unique_prefix()}-{next(_RUN)}{prefix}"
    store = RedisStore(redis_url, key_prefix=prefix, client_time=True)
    clock = FakeClock()
    try:
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            caplog.clear()
            store.cell(name, key, BreakerPolicy(failure_threshold=1), clock)  # (any name: the store checks none)
            listed = store.snapshots(clock)
        assert [(s.name, s.key) for s in listed] == [(name, key)]
        # (a previous example's store may log its agent's end: only what the listing says counts)
        assert not [r for r in caplog.records if "listing" in r.getMessage() or "unreadable" in r.getMessage()]
    finally:
        store.close(timeout=0)  # (its agent thread ends by itself within a heartbeat)
