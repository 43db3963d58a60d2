"""Arbitrary values in a breaker's Redis keys (Hypothesis, against a real redis-server).

Whatever a foreign writer leaves in one breaker's keys (text, numbers as text, 'nan',
'inf', huge numbers, another Redis type), every operation through the public API goes on:
nothing escapes but what the breaker itself says (``CircuitOpenError``, the call's own
error), the breaker works afterwards (it trips, rejects and closes again), a neighbour
under the same prefix is untouched, and what was reset or repaired is logged naming the
breaker. Each example has a key prefix of its own.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis
from hypothesis import example as hypothesis_example
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_breaker import CircuitBreaker, CircuitOpenError, State
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock

from .conftest import replace, unique_prefix

#: Every open period, lease and clock slack is over after this many seconds (policies
#: below: open at most 5 s, a lease 10 s; a stored time may lie 300 s ahead).
PAST_EVERYTHING = 400.0
_OPEN = {"reset_timeout": 5.0, "max_reset_timeout": 5.0, "half_open_max_calls": 1, "half_open_max_wait": 10.0}
POLICIES: dict[str, dict[str, Any]] = {
    "threshold": {"failure_threshold": 2, **_OPEN},
    "count-rate": {"failure_threshold": None, "failure_rate_threshold": 0.5, "count_window": 4, "minimum_calls": 2,
                   **_OPEN},
    "time-rate": {"failure_threshold": None, "failure_rate_threshold": 0.5, "minimum_calls": 2, "window": 30.0,
                  **_OPEN},
    "consecutive": {"failure_threshold": None, "consecutive_failures": 2, **_OPEN},
}  # fmt: skip
STATE_FIELDS = ("st", "pol", "gen", "hos", "nl", "ok", "ko", "rj", "df", "tr", "wn", "wl", "wc", "wf", "ws", "oa",
                "ou", "ls", "lf", "stk", "od", "run", "sl", "rf", "rh", "rs", "rg", "inc", "nm", "ky")  # fmt: skip
#: What no field of the state hash may hold: each must reset the breaker, with a warning.
NEVER_VALID = ("nan", "inf", "-inf")
TEXTS = st.sampled_from(
    [*NEVER_VALID, "-nan", "Infinity", "1e308", "-1e308", "1e999", "-1", "", "0", "1", "2", "1.5", "0x10", " 7",
     "9007199254740992", "9007199254740993", "1e15", "1e12", "abc", "{}", "closed", "open", "half_open", "\n",
     "0:1:1:0"]
)  # fmt: skip
VALUES = st.one_of(
    TEXTS,
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=12),
    st.binary(max_size=8),
)
SCORES = st.one_of(
    st.sampled_from([float("inf"), float("-inf"), 1e308, -1e308, 0.0, 1e12, -1.0]), st.floats(allow_nan=False)
)
KINDS = st.sampled_from(["string", "list", "set", "zset", "hash"])

_EXAMPLES = itertools.count()


def kind_of(client: redis.Redis, key: str) -> str:
    """The type ``key`` holds (``none`` when it is absent)."""
    found = client.type(key)
    return found.decode() if isinstance(found, bytes) else str(found)


def state_of(breaker: CircuitBreaker) -> State:
    """The state read afresh (a call, so type checkers do not narrow it across calls)."""
    return breaker.state


class Warnings(logging.Handler):
    """The WARNINGs celery-breaker logs about what it reset, repaired or could not use."""

    MARKS = ("reset unreadable", "repaired", "left ", "dropped", "unreachable", "replaced", "none read")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(mark in message for mark in self.MARKS):
            self.messages.append(message)


@contextmanager
def example(redis_url: str) -> Iterator[tuple[RedisStore, FakeClock, Warnings]]:
    """A store under a prefix of its own, a clock, and what it warns about."""
    store = RedisStore(redis_url, key_prefix=f"{unique_prefix()}-bad{next(_EXAMPLES)}", client_time=True)
    seen = Warnings()
    logger = logging.getLogger("celery_breaker")
    level = logger.level
    logger.setLevel(logging.WARNING)  # (a worker started in this process may have set the root's to ERROR)
    logger.addHandler(seen)
    try:
        yield store, FakeClock(), seen
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
        store.close(timeout=0)  # (its agent thread ends by itself within a heartbeat)


class Down(Exception):
    """The downstream failing."""


def down() -> None:
    raise Down


def ok() -> str:
    return "ok"


def attempt(operation: Callable[[], Any]) -> None:
    """Run ``operation``: nothing may escape but what a breaker says of its calls."""
    with suppress(CircuitOpenError, Down):
        operation()


def works(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """The breaker closes (after any open period or lease runs out), trips, rejects, and closes again."""
    if state_of(breaker) in (State.FORCED_OPEN, State.DISABLED):
        breaker.close()  # (an operator's state is a state: left by an operator)
    for _ in range(4):
        clock.advance(PAST_EVERYTHING)
        attempt(lambda: breaker.call(ok))
        if state_of(breaker) is State.CLOSED:
            break
    assert state_of(breaker) is State.CLOSED
    for _ in range(12):  # (an outcome admitted under a view the reset made stale is fenced)
        attempt(lambda: breaker.call(down))
        if state_of(breaker) is State.OPEN:
            break
    assert state_of(breaker) is State.OPEN
    try:
        breaker.call(ok)
        raise AssertionError("an open breaker admitted a call")
    except CircuitOpenError:
        pass
    clock.advance(PAST_EVERYTHING)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED


def contents(client: redis.Redis, keys: list[str]) -> dict[str, Any]:
    """What ``keys`` hold (not their TTLs)."""
    found: dict[str, Any] = {}
    for key in keys:
        kind = kind_of(client, key)
        read = {
            "hash": client.hgetall,
            "list": lambda k: client.lrange(k, 0, -1),
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "string": client.get,
            "set": client.smembers,
        }.get(kind)
        found[key] = (kind, read(key) if read else None)
    return found


def set_up(store: RedisStore, clock: FakeClock, policy: dict[str, Any], start: str) -> tuple[CircuitBreaker, ...]:
    """The breaker under test (``victim[k]``, in state ``start``, every key of it written)
    and its neighbour (one failure, one parked task)."""
    victim = CircuitBreaker("victim", policy, storage=store, clock=clock, key="k")
    neighbour = CircuitBreaker("neighbour", policy, storage=store, clock=clock)
    attempt(lambda: neighbour.call(down))
    store.parking.park("neighbour", None, "n:1", 1.0, "neighbour's", None)
    for _ in range(3):
        attempt(lambda: victim.call(ok))
        attempt(lambda: victim.call(down))
    victim.store.flush()  # (the successes counted locally, in Redis)
    if start == "closed" and state_of(victim) is not State.CLOSED:
        clock.advance(PAST_EVERYTHING)
        victim.call(ok)  # (its probe closes it)
    elif start != "closed":
        for _ in range(12):
            attempt(lambda: victim.call(down))
        assert state_of(victim) is State.OPEN
    if start == "half_open":
        clock.advance(5.0)
        store._cells[("victim", "k")].acquire(victim.policy, clock.monotonic())  # its one probe out
    store.parking.park("victim", "k", "v:1", 2.0, "victim's", clock.monotonic() + 50.0)
    return victim, neighbour


def neighbour_keys(store: RedisStore) -> list[str]:
    tag = store.parking.tag("neighbour", None)
    return [*store.keys_for("neighbour", None), tag + ":q", tag + ":m"]


# -- the breaker's own keys --------------------------------------------------------

CORRUPTIONS = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(STATE_FIELDS), VALUES),
    st.tuples(st.just("drop"), st.sampled_from(STATE_FIELDS), st.just("")),
    st.tuples(st.just("failure time"), st.just(""), VALUES),
    st.tuples(st.just("bucket"), st.sampled_from(["h", "0", "7", "19", "20", "-1", "x"]), VALUES),
    st.tuples(st.just("ring"), st.just(""), VALUES),
    st.tuples(st.just("lease"), st.sampled_from(["0", "1", "7", "-1", "x"]), VALUES),
    st.tuples(st.just("type"), st.sampled_from(["s", "f", "r", "b", "l"]), KINDS),
)
OPERATIONS = ("call", "fail", "snapshot", "listing", "force_open", "reset", "disable", "park", "release")


#: The type of each of a breaker's keys (store.py _KEY_SUFFIXES).
KEY_TYPES = {"s": "hash", "f": "list", "r": "string", "b": "hash", "l": "hash"}
#: The keys a policy's scripts read, beyond the state hash and the leases: the others may
#: hold anything, never read (a reset deletes them).
READS = {"threshold": "f", "count-rate": "r", "time-rate": "b", "consecutive": ""}


def overwritten(corruption: tuple[str, str, Any], later: list[tuple[str, str, Any]]) -> bool:
    """Whether a later corruption undid this one (the same field written or dropped, the state hash replaced)."""
    return any((what in ("field", "drop") and where == corruption[1]) or (what, where) == ("type", "s")
               for what, where, _ in later)  # fmt: skip


def corrupt(client: redis.Redis, store: RedisStore, corruption: tuple[str, str, Any]) -> bool:
    """Write one corruption into the victim's keys; True if it must be reported (every
    script reads the state hash first: a value none may hold is always found)."""
    what, where, value = corruption
    state, fails, ring, buckets, leases = store.keys_for("victim", "k")
    try:
        return _corrupt(client, (state, fails, ring, buckets, leases), what, where, value)
    except redis.ResponseError:
        return False  # (an earlier corruption gave the key another type)


def _corrupt(client: redis.Redis, keys: tuple[str, ...], what: str, where: str, value: Any) -> bool:
    state, fails, ring, buckets, leases = keys
    if what == "field":
        client.hset(state, where, value)
        return value in NEVER_VALID
    if what == "drop":
        client.hdel(state, where)
    elif what == "failure time":
        client.rpush(fails, value)
    elif what == "bucket":
        client.hset(buckets, where, value)
    elif what == "ring":
        client.set(ring, value)
    elif what == "lease":
        client.hset(leases, where, value)
    else:
        key = dict(zip("sfrbl", keys, strict=True))[where]
        if kind_of(client, key) != value:
            # (found when a command meets it; one a script deletes first, as every move
            # deletes the leases, is simply gone)
            replace(client, key, value)
    return False


@settings(max_examples=100, deadline=None)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    start=st.sampled_from(["closed", "open", "half_open"]),
    corruptions=st.lists(CORRUPTIONS, min_size=1, max_size=3),
    operations=st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=6),
)
def test_a_breaker_survives_whatever_its_keys_hold(
    redis_url: str, policy: str, start: str, corruptions: list[tuple[str, str, Any]], operations: list[str]
) -> None:
    client = redis.Redis.from_url(redis_url)
    with example(redis_url) as (store, clock, seen):
        victim, neighbour = set_up(store, clock, POLICIES[policy], start)
        before = contents(client, neighbour_keys(store))
        reported = [
            corrupt(client, store, corruption) and not overwritten(corruption, corruptions[i + 1 :])
            for i, corruption in enumerate(corruptions)
        ]
        tag = store.parking.tag("victim", "k")
        run = {
            "call": lambda: victim.call(ok),
            "fail": lambda: victim.call(down),
            "snapshot": victim.snapshot,
            "listing": lambda: store.snapshots(clock),
            "force_open": victim.force_open,
            "reset": victim.reset,
            "disable": victim.disable,
            "park": lambda: store.parking.park("victim", "k", "v:2", 3.0, "again", None),
            "release": lambda: store.parking.release(
                tag, most=10, pace=10.0, ramp=0.0, lease=10.0, now=clock.monotonic()
            ),
        }
        for operation in operations:
            attempt(run[operation])
        assert "neighbour" in {s.name for s in store.snapshots(clock)}
        works(victim, clock)
        # Only the victim was reset or repaired, and said so if it had to be.
        assert not [m for m in seen.messages if "neighbour" in m or "unreachable" in m], seen.messages
        if any(reported):
            assert [m for m in seen.messages if "victim" in m], corruptions
        victim.snapshot()  # (reads the leases)
        for suffix, key in zip(KEY_TYPES, store.keys_for("victim", "k"), strict=True):
            if suffix in "sl" + READS[policy]:
                assert kind_of(client, key) in ("none", KEY_TYPES[suffix])  # replaced when met
        after = contents(client, neighbour_keys(store))
        assert after == before
        assert (state_of(neighbour), neighbour.snapshot().failures) == (State.CLOSED, 1)
    client.close()


def dumped(client: redis.Redis, keys: list[str]) -> dict[str, tuple[bytes | None, int]]:
    """Each key's serialized value and TTL: what any write would change (a refreshed TTL
    too, given one shorter than a script gives back)."""
    return {key: (client.dump(key), client.pttl(key)) for key in keys}


@settings(max_examples=30, deadline=None)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    start=st.sampled_from(["closed", "open", "half_open", "forced_open"]),
    corruptions=st.lists(CORRUPTIONS, min_size=1, max_size=3),
)
def test_a_listing_never_writes_and_never_loses_a_breaker(
    redis_url: str, policy: str, start: str, corruptions: list[tuple[str, str, Any]]
) -> None:
    """Whatever a breaker's keys hold, a listing (``status``, ``watch``, the page,
    Prometheus, ``inspect``) and a lookup change nothing in them, and show the breaker,
    read or unreadable (decision 107): a reset deleted an operator's ``forced_open``
    with the keys, and the breaker vanished from every view."""
    client = redis.Redis.from_url(redis_url)
    with example(redis_url) as (holder, clock, _):
        victim, _ = set_up(holder, clock, POLICIES[policy], "closed" if start == "forced_open" else start)
        if start == "forced_open":
            victim.force_open()
        holder.flush()
        holder.close(timeout=5.0)  # (its holders gone: none repairs the keys behind the listing's back)
        store = RedisStore(redis_url, key_prefix=holder.key_prefix, client_time=True)  # (as status opens it)
        state = store.keys_for("victim", "k")[0]
        named = client.hmget(state, "nm", "ky")
        for corruption in corruptions:
            corrupt(client, store, corruption)
        # (a hash naming another breaker is that breaker's, a colliding prefix's: left out, alone)
        foreign = kind_of(client, state) == "hash" and any(
            now is not None and now != then for now, then in zip(client.hmget(state, "nm", "ky"), named, strict=True)
        )
        keys = [*store.keys_for("victim", "k"), *neighbour_keys(store)]
        for key in keys:  # (shorter than a script's: a refresh of the idle TTL would show)
            if client.pttl(key) > 0:
                client.pexpire(key, 600_000)
        before = dumped(client, keys)
        listing = store.snapshots(clock)
        found = store.find("victim", "k", clock)
        listed = {(s.name, s.key) for s in listing}
        unreadable = {(f.name, f.key) for f in getattr(listing, "unreadable", ())}
        after = dumped(client, keys)
        assert {key: value for key, (value, _) in after.items()} == {key: value for key, (value, _) in before.items()}
        # (no TTL given back, none taken: a PERSIST reads -1, below any TTL left)
        assert all(0 < after[key][1] <= before[key][1] or after[key][1] == before[key][1] < 0 for key in keys), (
            before,
            after,
        )
        assert ("neighbour", None) in listed
        if foreign:
            assert ("victim", "k") not in listed | unreadable
            assert found is None
        else:
            assert ("victim", "k") in listed | unreadable
            assert found is not None
            assert (found.name, found.key) == ("victim", "k")
        store.close(timeout=0)
    client.close()


# -- its parked tasks --------------------------------------------------------------

PARKING_CORRUPTIONS = st.one_of(
    st.tuples(st.just("queue order"), st.just("v:1"), SCORES),
    st.tuples(st.just("message"), st.sampled_from(["v:1", "ghost"]), VALUES),
    st.tuples(st.just("claim"), st.sampled_from(["v:1", "ghost"]), SCORES),
    st.tuples(st.just("deadline"), st.sampled_from(["v:1", "ghost"]), SCORES),
    st.tuples(st.just("pacing"), st.sampled_from(["gen", "since", "tokens", "at", "probe_trip", "probe_at"]), VALUES),
    st.tuples(st.just("type"), st.sampled_from([":q", ":m", ":c", ":d", ":p"]), st.one_of(KINDS, st.just("none"))),
    st.tuples(st.just("index"), st.just(""), st.one_of(KINDS, st.just("none"), st.binary(max_size=12))),
    st.tuples(st.just("marker"), st.just(""), st.one_of(KINDS, st.binary(max_size=12))),
)
PARKING_OPERATIONS = ("park", "release", "count", "counts", "tags", "epoch", "done", "forget", "fail", "call")


def corrupt_parking(client: redis.Redis, store: RedisStore, corruption: tuple[str, str, Any]) -> None:
    with suppress(redis.ResponseError):  # (an earlier corruption gave the key another type)
        _corrupt_parking(client, store, *corruption)


def _corrupt_parking(client: redis.Redis, store: RedisStore, what: str, where: str, value: Any) -> None:
    tag = store.parking.tag("victim", "k")
    if what == "queue order":
        client.zadd(tag + ":q", {where: value})
    elif what == "message":
        client.hset(tag + ":m", where, value)
    elif what == "claim":
        client.zadd(tag + ":c", {where: value})
    elif what == "deadline":
        client.zadd(tag + ":d", {where: value})
    elif what == "pacing":
        client.hset(tag + ":p", where, value)
    elif what == "type":
        if value == "none":
            client.delete(tag + where)  # (deleted, or evicted)
        elif kind_of(client, tag + where) != value:
            replace(client, tag + where, value)
    else:
        key = store.parking.index if what == "index" else store.parking.marker
        if value == "none":
            client.delete(key)  # (deleted, or evicted, with the entries left parked)
        elif not isinstance(value, bytes):
            if kind_of(client, key) != value:
                replace(client, key, value)
        elif what == "index" and kind_of(client, key) in ("set", "none"):
            client.sadd(key, value)  # a member naming no breaker
        elif what == "marker" and kind_of(client, key) in ("hash", "none"):
            client.hset(key, "epoch", value)


@settings(max_examples=100, deadline=None)
@given(
    corruptions=st.lists(PARKING_CORRUPTIONS, min_size=1, max_size=3),
    operations=st.lists(st.sampled_from(PARKING_OPERATIONS), min_size=1, max_size=6),
)
@hypothesis_example(corruptions=[("index", "", "none")], operations=["park"])  # deleted, then a park
def test_parked_tasks_survive_whatever_their_keys_hold(
    redis_url: str, corruptions: list[tuple[str, str, Any]], operations: list[str]
) -> None:
    client = redis.Redis.from_url(redis_url)
    with example(redis_url) as (store, clock, seen):
        victim, _ = set_up(store, clock, POLICIES["threshold"], "closed")
        parking = store.parking
        tag, theirs = parking.tag("victim", "k"), parking.tag("neighbour", None)
        before = contents(client, [theirs + ":q", theirs + ":m"])
        for corruption in corruptions:
            corrupt_parking(client, store, corruption)
        release = parking.release
        run = {
            "park": lambda: parking.park("victim", "k", "v:2", 3.0, "again", clock.monotonic() + 1.0),
            "release": lambda: release(tag, most=10, pace=10.0, ramp=0.0, lease=10.0, now=clock.monotonic()),
            "count": lambda: parking.count(tag),
            "counts": lambda: parking.counts(parking.tags()),
            "tags": parking.tags,
            "epoch": parking.epoch,
            "done": lambda: parking.done(tag, ["v:1"]),
            "forget": lambda: parking.forget(tag),
            "fail": lambda: victim.call(down),
            "call": lambda: victim.call(ok),
        }
        for operation in operations:
            attempt(run[operation])
            clock.advance(1.0)
        # Its parking works: a task parked now is released once the breaker is closed.
        assert theirs in parking.tags()
        parking.park("victim", "k", "fresh:1", 4.0, "fresh", None)
        works(victim, clock)
        released: list[str] = []
        for _ in range(4):
            clock.advance(PAST_EVERYTHING)
            released += [entry for entry, _ in release(tag, most=1000, pace=100.0, ramp=0.0, lease=10.0,
                                                       now=clock.monotonic())]  # fmt: skip
        assert "fresh:1" in released
        assert parking.counts([theirs]) == {theirs: (1, 0)}
        assert contents(client, [theirs + ":q", theirs + ":m"]) == before
        assert not [m for m in seen.messages if "neighbour" in m or "unreachable" in m], seen.messages
    client.close()
