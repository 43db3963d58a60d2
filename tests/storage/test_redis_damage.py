"""Bad data in Redis, case by case: each is reset or repaired for its breaker alone, with one
WARNING naming it, and the call that met it goes on (issue 14; test_redis_bad_data.py tries
arbitrary values)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from redis.exceptions import ResponseError

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.core import Outcome
from celery_breaker.errors import StorageError
from celery_breaker.storage import Listing
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis.damage import CHECK_TYPES, RESET, classify, repair_for
from celery_breaker.storage.redis.parking import PARKING_SUFFIXES, WHOLE
from celery_breaker.testing import FakeClock

from ..unit.support import fail, ok, state_of
from .conftest import Closing, following, replace, unique_prefix

POLICY = {"failure_threshold": 2, "reset_timeout": 5.0, "half_open_max_calls": 2, "success_threshold": 1}


@pytest.fixture
def store(redis_url: str) -> RedisStore:
    return RedisStore.from_url(f"{redis_url}?time=client&key_prefix={unique_prefix()}")


def warnings_naming(caplog: pytest.LogCaptureFixture, label: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and label in r.getMessage()]


def state_key(store: RedisStore, name: str = "svc", key: str | None = None) -> str:
    return store.keys_for(name, key)[0]


# -- the named cases ---------------------------------------------------------------


def test_a_nan_generation_is_reset_and_the_breaker_trips_again(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A generation of 'nan' equals no ticket's: the breaker never tripped again."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    neighbour = CircuitBreaker("other", POLICY, storage=store, clock=clock)
    fail(neighbour)
    fail(breaker)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(state_key(store), "gen", "nan")
        fail(breaker, 2)
    assert state_of(breaker) is State.OPEN
    assert any("gen='nan'" in m for m in warnings_naming(caplog, "breaker svc: reset unreadable state in Redis"))
    assert not warnings_naming(caplog, "other")
    assert (neighbour.snapshot().failures, state_of(neighbour)) == (1, State.CLOSED)


def test_an_infinite_open_until_is_reset_and_the_breaker_closes_again(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker, 2)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(state_key(store), "ou", "inf")
        clock.advance(5.0)
        assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED
    assert any("ou='inf'" in m for m in warnings_naming(caplog, "breaker svc"))
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN


@pytest.mark.parametrize("open_until", ["inf", "1e300", "1e12"])
def test_parked_tasks_of_a_breaker_open_for_ever_are_released(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, open_until: str
) -> None:
    """Nobody calls a breaker whose tasks are all parked: the releaser alone must notice
    an open_until no script could have written, or its tasks wait for ever."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker, 2)
    store.parking.park("svc", None, "t1:1", 1.0, "one", None)
    tag = store.parking.tag("svc", None)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(state_key(store), "ou", open_until)
        release = store.parking.release
        assert release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic()) == []  # (the ramp starts)
        clock.advance(1.0)
        assert release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic()) == [("t1:1", "one")]
    assert any(f"ou='{open_until}'" in m for m in warnings_naming(caplog, "breaker svc"))
    # This process's view (open until its own reading said) ends; then it finds it reset, CLOSED.
    clock.advance(5.0)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED


def test_a_reset_made_by_a_release_is_heard_by_every_process(redis_url: str, server: redis.Redis) -> None:
    """A release that resets an unreadable state tells every process, as a deletion is
    told: a view still holding the breaker OPEN stops rejecting at once."""
    url = f"{redis_url}?key_prefix={unique_prefix()}"
    here = RedisStore.from_url(url)
    breaker = CircuitBreaker("svc", {"failure_threshold": 1, "reset_timeout": 600.0}, storage=here)
    following(here)
    fail(breaker)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)  # (rejected by this process's view: OPEN for 600 s)
    server.hset(state_key(here), "gen", "x")  # (unreadable: the release resets the breaker)
    there = RedisStore.from_url(url)
    there.parking.park("svc", None, "t1:1", 1.0, "one", None)
    there.parking.release(there.parking.tag("svc", None), most=10, pace=100.0, ramp=0.0, lease=30.0)
    assert not server.exists(state_key(here))
    assert here.sync()  # (heard everything published until now)
    assert breaker.call(ok) == "ok"
    assert state_of(breaker) is State.CLOSED
    here.close(timeout=0)
    there.close(timeout=0)


def test_a_nan_half_open_slot_count_is_reset(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """'nan' probes succeeded: every probe slot looked taken for ever."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker, 2)
    clock.advance(5.0)
    store._cells[("svc", None)].acquire(breaker.policy, clock.monotonic())  # HALF_OPEN, one probe out
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(state_key(store), "hos", "nan")
        assert breaker.call(ok) == "ok"
    assert any("hos='nan'" in m for m in warnings_naming(caplog, "breaker svc"))
    assert state_of(breaker) is State.CLOSED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gen", "inf"), ("gen", "-1"), ("gen", "1.5"), ("gen", "1e300"), ("nl", "nan"), ("ok", "-inf"),
        ("tr", ""), ("stk", "nan"), ("run", "1e999"), ("oa", "nan"), ("ls", "-inf"), ("lf", "1e300"),
        ("od", "inf"), ("od", "-5"), ("hos", "nan"), ("st", "ajar"), ("inc", "nan"), ("inc", "1\n2"),
        ("nm", "someone else"), ("ky", "+k"), ("pol", '{"v":3,"rules":[],"reset_timeout":1}'),
        ("rg", "nan"), ("rg", "99"),  # (a reset's generation beyond the breaker's would drop every count)
    ],
)  # fmt: skip
def test_every_field_of_the_state_hash_is_checked(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, field: str, value: str
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(state_key(store), field, value)
        assert breaker.snapshot().failures == 0  # (a script call: the reset one's)
    (warning,) = warnings_naming(caplog, "breaker svc: reset unreadable state in Redis")
    assert state_key(store) in warning
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN


@pytest.mark.parametrize("held", [State.FORCED_OPEN, State.DISABLED])
@pytest.mark.parametrize(
    ("field", "value"),
    [("rj", "abc"), ("ok", "-inf"), ("gen", "nan"), ("oa", "1e300"), ("inc", "1\n2"), ("pol", "{garbage")],
)  # fmt: skip
def test_an_operators_state_outlives_damage_to_the_rest_of_its_hash(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, held: State, field: str, value: str
) -> None:
    # An operator held a breaker open with tasks parked behind it; one unreadable counter
    # (rejections 'abc') reset the whole breaker, CLOSED, and the releaser sent every
    # parked task to the downstream the operator held off. The operator's state is kept,
    # the rest mended, with a WARNING; the release (which may read the hash first) keeps it too.
    clock = FakeClock()
    operator = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    operator.force_open() if held is State.FORCED_OPEN else operator.disable()
    store.parking.park("svc", None, "t1:1", 1.0, "one", None)
    tag = store.parking.tag("svc", None)
    # (heard from the moment of the damage: the store's agent may meet it first, in its flush)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(state_key(store), field, value)
        release = store.parking.release
        claimed = release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())
        assert server.hget(state_key(store), "st") == held.value.encode()
        if held is State.FORCED_OPEN:
            assert claimed == []  # (nothing goes while an operator holds it open)
        found = CircuitBreaker("svc", POLICY, storage=store, clock=clock).snapshot()  # (a breaker script)
    assert found.state is held
    (warning,) = [m for m in warnings_naming(caplog, "breaker svc") if "unreadable" in m]
    assert f"unreadable {field}=" in warning
    assert f"kept {held.value}, an operator's" in warning
    server.hset(state_key(store), "rj", "7")  # (what is mended is read again as written)
    assert CircuitBreaker("svc", POLICY, storage=store, clock=clock).snapshot().rejections == 7
    operator.close()  # (only an operator leaves it)
    assert state_of(operator) is State.CLOSED


def test_a_generation_mended_under_an_operators_state_is_told_once_and_followed(
    redis_url: str, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that had not read the breaker mended its unreadable generation to 0, in the
    same incarnation: a process whose view was ahead ignored the breaker's next moves (an
    operator's close: it went on rejecting), and its next script found the generation gone
    back, a second WARNING for the same damage. (The previous test failed so, 1 run in 4 of
    tests/storage/test_redis*.py: the store's agent flushed with a view taken before its
    first read, and that flush reached Redis after the damage.)"""
    url = f"{redis_url}?time=client&key_prefix={unique_prefix()}"
    here, there = RedisStore.from_url(url), RedisStore.from_url(url)
    clock = FakeClock()  # (not moved: the new incarnation cannot be a new time's)
    operator = CircuitBreaker("svc", POLICY, storage=here, clock=clock)
    operator.disable()
    operator.force_open()  # (this process's view: generation 2)
    following(here)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(state_key(here), "gen", "nan")
        worker = CircuitBreaker("svc", POLICY, storage=there, clock=clock)  # (its first read mends it)
        worker.close()
        assert here.sync()
        assert state_of(operator) is State.CLOSED  # (heard, not read: the view followed)
        assert operator.snapshot().state is State.CLOSED  # (a script, with this process's view)
    (warning,) = [m for m in warnings_naming(caplog, "breaker svc") if "unreadable" in m]
    assert "unreadable gen='nan'" in warning
    here.close(timeout=0)
    there.close(timeout=0)


@pytest.mark.parametrize(
    ("policy", "corrupt", "named"),
    [
        pytest.param(POLICY, lambda r, k: r.rpush(k[1], "nan"), "'nan'", id="failure-time-nan"),
        pytest.param(POLICY, lambda r, k: r.rpush(k[1], "1e300"), "'1e300'", id="failure-time-future"),
        pytest.param(
            {"failure_threshold": None, "failure_rate_threshold": 0.9, "minimum_calls": 2},
            lambda r, k: r.hset(k[3], "h", "99999999999999"), "h=", id="bucket-head-ahead",
        ),
        pytest.param(
            {"failure_threshold": None, "failure_rate_threshold": 0.9, "minimum_calls": 2},
            lambda r, k: r.hset(k[3], "0", "0:1:5:0"), "'0:1:5:0'", id="bucket-more-failures-than-calls",
        ),
        pytest.param(
            {"failure_threshold": None, "failure_rate_threshold": 0.9, "count_window": 2, "minimum_calls": 2},
            lambda r, k: r.set(k[2], "xx"), "byte", id="ring-byte-unwritten",
        ),
        pytest.param(
            {"failure_threshold": None, "failure_rate_threshold": 0.9, "count_window": 4, "minimum_calls": 2},
            lambda r, k: r.hset(k[0], "wc", "3"), "count window", id="ring-totals-disagree",
        ),
    ],
)  # fmt: skip
def test_windows_holding_values_no_script_wrote_are_cleared(
    store: RedisStore,
    server: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    policy: dict[str, Any],
    corrupt: Any,
    named: str,
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", policy, storage=store, clock=clock)
    breaker.call(ok)
    fail(breaker)  # (a count window of 2 is full: its next outcome evicts one)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        corrupt(server, store.keys_for("svc", None))
        breaker.call(ok)
        fail(breaker)
        breaker.snapshot()
    assert any(named in m for m in warnings_naming(caplog, "breaker svc"))
    for _ in range(12):
        if state_of(breaker) is State.OPEN:
            break
        fail(breaker)
    assert state_of(breaker) is State.OPEN


def test_unreadable_probe_leases_are_dropped(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", {**POLICY, "half_open_max_calls": 1}, storage=store, clock=clock)
    fail(breaker, 2)
    clock.advance(5.0)
    store._cells[("svc", None)].acquire(breaker.policy, clock.monotonic())  # the one slot taken
    leases = store.keys_for("svc", None)[4]
    ((lease, _),) = server.hgetall(leases).items()
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(leases, lease, "inf")  # a slot held for ever
        assert breaker.call(ok) == "ok"  # the slot is free again: a probe, which closes it
    assert any("'inf'" in m and leases in m for m in warnings_naming(caplog, "breaker svc"))
    assert state_of(breaker) is State.CLOSED


def test_a_generation_that_went_back_is_moved_past_what_views_saw(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole but lower generation (a foreign write, a failover losing writes): a process
    whose view is ahead would ignore every reply and fence every outcome it admitted."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker, 2)
    clock.advance(5.0)
    assert breaker.call(ok) == "ok"  # generation 2: HALF_OPEN, then 3: CLOSED
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        server.hset(state_key(store), "gen", "0")
        for _ in range(3):  # (the first failure was admitted under the view's generation: fenced)
            fail(breaker)
            if state_of(breaker) is State.OPEN:
                break
    assert state_of(breaker) is State.OPEN
    assert any("went back from 3" in m for m in warnings_naming(caplog, "breaker svc"))


def test_a_script_failing_on_its_data_is_run_again_and_resets_the_breaker(
    store: RedisStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure no check foresaw (a Lua error on some value) resets the breaker once; the call goes on."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker)
    run, sent = store.run, []

    def failing_once(script: str, keys: list[Any], args: list[Any]) -> list[Any]:
        sent.append(args[2])
        if len(sent) == 1:
            raise StorageError("acquire failed") from ResponseError("user_script:9: attempt to compare nil with number")
        return run(script, keys, args)

    monkeypatch.setattr(store, "run", failing_once)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert breaker.snapshot().failures == 0  # a fresh breaker
    assert [text.split(";")[5] for text in sent[:2]] == ["0", RESET]
    (warning,) = warnings_naming(caplog, "breaker svc: reset unreadable state in Redis")
    assert "attempt to compare nil" in warning
    monkeypatch.undo()
    fail(breaker, 2)
    assert state_of(breaker) is State.OPEN


def test_a_listing_shows_a_breaker_a_script_fails_on_and_runs_nothing_more(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a call resets (above), a listing shows the breaker as unreadable, with Redis's
    error, and does not run the script again to reset it (decision 107)."""
    clock = FakeClock()
    fail(CircuitBreaker("svc", POLICY, storage=store, clock=clock))
    fail(CircuitBreaker("other", POLICY, storage=store, clock=clock))
    svc = state_key(store, "svc").encode()
    run_many, again = store.run_many, []

    def failing(script: str, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        answers = run_many(script, calls)
        cause = ResponseError("user_script:9: attempt to compare nil with number")
        failed = StorageError("snapshot failed")
        failed.__cause__ = cause
        return [failed if keys[0] == svc else answer for (keys, _), answer in zip(calls, answers, strict=True)]

    monkeypatch.setattr(store, "run_many", failing)
    monkeypatch.setattr(store, "run", lambda *args: again.append(args))
    before = server.dump(state_key(store, "svc"))
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        listing = store.snapshots(clock)
    assert [s.name for s in listing] == ["other"]
    assert isinstance(listing, Listing)
    (found,) = listing.unreadable
    assert found.name == "svc"
    assert "a script failed on its data: user_script:9: attempt to compare nil" in found.problem
    assert not again
    assert server.dump(state_key(store, "svc")) == before
    assert warnings_naming(caplog, "breaker svc: unreadable state in Redis")


def test_an_operators_state_is_shown_unreadable_and_kept_by_the_next_call(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A forced-open breaker with a count no script writes: a listing shows what it holds
    and leaves it; its holder (a worker's call, its own snapshot) mends it as before,
    forced open still."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.force_open()
    following(store)  # (else its agent, subscribing, may read its view again after the damage: a mend)
    server.hset(state_key(store), "ok", "nan")
    listing = store.snapshots(clock)
    assert isinstance(listing, Listing)
    assert [(f.name, f.problem, f.stored_state) for f in listing.unreadable] == [
        ("svc", f"unreadable ok='nan' in {state_key(store)}", State.FORCED_OPEN)
    ]
    found = store.find("svc", None, clock)
    assert found == listing.unreadable[0]
    assert server.hget(state_key(store), "ok") == b"nan"
    assert server.ttl(state_key(store)) == -1  # (an operator's state keeps no TTL: none given)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert breaker.snapshot().state is State.FORCED_OPEN  # (its holder asks Redis, as a call would)
    assert any("mended" in m for m in warnings_naming(caplog, "breaker svc: reset unreadable state in Redis"))
    (shown,) = store.snapshots(clock)
    assert (shown.state, shown.successes) == (State.FORCED_OPEN, 0)


@pytest.mark.parametrize(
    ("message", "damage"),
    [
        ("WRONGTYPE Operation against a key holding the wrong kind of value script: 1, on @user_script:3.", "types"),
        ("user_script:9: attempt to compare nil with number script: 1, on @user_script:9.", "data"),
        ("value is not a valid float script: 1, on @user_script:4.", "data"),
        ("user_script:720: celery-breaker: unparsable policy script: 1", "refused"),
        ("celery-breaker: park needs a finite numeric order", "refused"),
        ("BUSY Redis is busy running a script.", "store"),
        ("MASTERDOWN Link with MASTER is down", "store"),
        ("The user executing the script can't publish to the channel mentioned in the command script: 1", "store"),
        ("The user executing the script can't run this command or subcommand script: 1, on @user_script:9.", "store"),
        ("The user executing the script can't access at least one of the keys mentioned in the command", "store"),
    ],
)
def test_failures_are_told_apart(message: str, damage: str) -> None:
    assert classify(ResponseError(message)) == damage
    assert repair_for(ResponseError(message)) == {"types": CHECK_TYPES, "data": RESET}.get(damage, "")
    assert classify(redis.ConnectionError("gone")) == "store"
    assert classify(redis.exceptions.ReadOnlyError("READONLY")) == "store"


def test_a_script_the_redis_user_may_not_run_resets_no_breaker(
    redis_url: str, server: redis.Redis, store: RedisStore, closing: Closing
) -> None:
    """Redis 7 gives a user made by ``ACL SETUSER`` no channel unless told (``&*``): its
    scripts fail on PUBLISH as a trip is announced. That is the user's doing, not the
    breaker's data: the call falls back, and the breaker stored for every worker is not
    reset (it was, by a run that asked for a reset and failed on PUBLISH again)."""
    user = f"user-{unique_prefix()}"
    server.acl_setuser(user, enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all"])  # (no channel)
    try:
        clock = FakeClock()
        fail(CircuitBreaker("svc", POLICY, storage=store, clock=clock))  # a worker allowed everything
        incarnation = server.hget(state_key(store), "inc")
        url = redis_url.replace("redis://", f"redis://{user}:secret@", 1)
        denied = closing(RedisStore.from_url(f"{url}?time=client&key_prefix={store.key_prefix}"))
        clock.advance(1.0)  # (a reset would stamp another incarnation)
        policy = BreakerPolicy.coerce(POLICY)
        cell = denied.cell("svc", None, policy, clock)  # (reading it publishes nothing)
        with pytest.raises(StorageError, match="can't publish"):
            cell.finish(cell.generation, Outcome.FAILURE, 0.0, policy, clock.monotonic())  # the second failure trips
        assert server.hget(state_key(store), "inc") == incarnation  # not reset
        assert int(server.hget(state_key(store), "ko") or 0) == 2  # both failures kept
    finally:
        server.acl_deluser(user)


def test_a_transition_no_script_could_publish_is_ignored(store: RedisStore) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    assert breaker.call(ok) == "ok"
    cell = store._cells[("svc", None)]
    incarnation = cell._incarnation
    for forged in (b"\nx\n-1\nopen\n1", b"\nx\n9\nopen\nnan", b"\nx\n9\nopen\ninf", b"\nx\n9\nopen\n1e300"):
        store.hear(state_key(store).encode() + forged)
    assert (cell._incarnation, cell.state) == (incarnation, State.CLOSED)


def test_a_trip_heard_late_never_moves_the_end_of_its_open_period(store: RedisStore) -> None:
    """The trip's own message, heard after the reply that told it: its remaining time was
    turned into an end on hearing, later than the script counted it. With a fake clock
    moved on meanwhile (1 test run in 3 in tests/storage/test_parking.py), the view kept
    the breaker open 10 s past its end and rejected the probe; in production a listening
    thread starved of the GIL delays probes by as long."""
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    fail(breaker, 2)  # (POLICY trips on the second failure)
    cell = store._cells[("svc", None)]
    assert cell.state is State.OPEN
    end = cell.open_until
    assert end is not None
    published = end - clock.monotonic()  # (what the trip's message says: seconds left)
    clock.advance(published)
    store.hear(f"{state_key(store)}\n{cell._incarnation}\n{cell.generation}\nopen\n{published:g}".encode())
    assert cell.open_until == end
    assert breaker.call(ok) == "ok"  # the probe, at the period's end


# -- parking -----------------------------------------------------------------------


#: Each parking key (parking.py PARKING_SUFFIXES) and the type it holds.
PARKING_TYPES = {":q": "zset", ":m": "hash", ":c": "zset", ":d": "zset", ":p": "hash"}
KINDS = ("string", "list", "set", "zset", "hash")


@pytest.mark.parametrize(
    ("suffix", "kind"),
    [(suffix, kind) for suffix in PARKING_SUFFIXES for kind in KINDS if kind != PARKING_TYPES[suffix]],
)
def test_a_parking_key_of_another_type_is_repaired_by_a_release_and_loses_no_task(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, suffix: str, kind: str
) -> None:
    clock = FakeClock()
    CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    for i in range(3):
        store.parking.park("svc", None, f"t{i}:1", 100.0 + i, f"payload {i}", None)
    store.parking.park("other", None, "o:1", 1.0, "other", None)
    tag = store.parking.tag("svc", None)
    wanted = PARKING_TYPES[suffix]
    release = store.parking.release
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        replace(server, tag + suffix, kind)
        first = release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())
        clock.advance(1.0)
        second = release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())
    warnings = warnings_naming(caplog, "breaker svc: repaired what no script writes in Redis, while handling")
    assert f"{tag}{suffix} held a {kind}, expected a {wanted}" in warnings[0]
    released = [entry for entry, _ in first + second]
    # Every entry whose message survived goes; only a replaced messages hash loses them,
    # and that is said once, with the repair that replaced it.
    assert released == ([] if suffix == ":m" else ["t0:1", "t1:1", "t2:1"])
    lost = [line for line in warnings if "3 parked task(s) lost, e.g. 't0:1'" in line]
    assert (len(warnings), len(lost)) == ((1, 1) if suffix == ":m" else (1, 0))
    assert store.parking.count(store.parking.tag("other", None)) == (1, 0)


@pytest.mark.parametrize("suffix", [":q", ":c"])
def test_counting_and_purging_repair_a_parking_key_of_another_type(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, suffix: str
) -> None:
    for name in ("a", "b", "c"):
        store.parking.park(name, None, f"{name}:1", 1.0, name, None)
    tags = store.parking.tags()
    bad = store.parking.tag("b", None)
    replace(server, bad + suffix, "string")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert store.parking.counts(tags) == dict.fromkeys(tags, (1, 0))  # b's entry requeued from its message
    assert warnings_naming(caplog, "breaker b: repaired")
    replace(server, bad + suffix, "string")
    assert store.parking.count(bad) == (1, 0)
    replace(server, bad + suffix, "string")
    assert store.parking.purge(bad) == 1


def test_wrong_claims_deadlines_orders_and_pacing_are_repaired(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", POLICY, storage=store, clock=clock)
    breaker.force_open()
    tag = store.parking.tag("svc", None)
    for i in range(4):
        store.parking.park("svc", None, f"t{i}:1", 100.0 + i, f"p{i}", None)
    server.zadd(tag + ":c", {"t0:1": float("inf")})  # claimed for ever
    server.zrem(tag + ":q", "t0:1")
    server.zadd(tag + ":d", {"t1:1": float("-inf")})  # a deadline no caller gave
    server.zadd(tag + ":q", {"t2:1": float("inf")})  # an order no caller gave
    server.hset(tag + ":m", "t3:1", "nan\np3")  # an order no caller gave, in its message
    server.zadd(tag + ":c", {"t3:1": 0.0})  # (its lease ran out: requeued from its message)
    server.zrem(tag + ":q", "t3:1")
    server.hset(tag + ":p", mapping={"gen": "x", "since": "inf", "tokens": "nan", "at": "inf"})
    release = store.parking.release
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic()) == []  # forced open
        breaker.close()
        assert release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic()) == []
        clock.advance(1.0)
        released = release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())
    assert sorted(entry for entry, _ in released) == ["t0:1", "t1:1", "t2:1", "t3:1"]
    text = " ".join(warnings_naming(caplog, "breaker svc: repaired"))
    for named in ("claim deadline 'inf'", "deadline '-inf'", "order 'inf'", "order 'nan'", "pacing gen='x'"):
        assert named in text


def test_the_index_and_the_marker_of_another_type_are_replaced(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    parking = store.parking
    parking.park("a", None, "a:1", 1.0, "a", None)
    parking.park("b", "k", "b:1", 1.0, "b", None)
    replace(server, parking.index, "string")
    replace(server, parking.marker, "list")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert [parking.label(tag) for tag in parking.tags()] == ["a", "b[k]"]  # rebuilt from the parked entries
        assert parking.epoch() is None  # (its epoch is gone with it)
        parking.park("c", None, "c:1", 1.0, "c", None)
        assert parking.epoch() is not None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"{parking.index} held a string, expected a set" in messages
    assert f"{parking.marker} held a list, expected a hash" in messages
    replace(server, parking.index, "hash")
    parking.park("d", None, "d:1", 1.0, "d", None)  # (its index entry: after the repair)
    assert [parking.label(tag) for tag in parking.tags()] == ["a", "b[k]", "c", "d"]


def test_index_members_that_name_no_breaker_are_dropped(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    parking = store.parking
    parking.park("a", None, "a:1", 1.0, "a", None)
    server.sadd(parking.index, "foo", b"\xff{x}", "{other-prefix:a}", "{" + store.quoted_prefix + ":a b}")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert [parking.label(tag) for tag in parking.tags()] == ["a"]
    assert "dropped 4 member(s)" in caplog.text
    assert "rebuilt it from the parked entries" in caplog.text
    assert set(server.smembers(parking.index)) == {parking.tag("a", None).encode(), WHOLE}  # (a list on redis-py 5)
    with pytest.raises(StorageError, match="no breaker of this store"):
        parking.release("foo", most=1, pace=1.0, ramp=0.0, lease=1.0)


def test_one_tags_failure_leaves_the_others_released(
    store: RedisStore, server: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``release`` raises for its own tag only: Redis failing on that tag's keys."""
    clock = FakeClock()
    for name in ("a", "b", "c"):
        store.parking.park(name, None, f"{name}:1", 1.0, name, None)
    bad = store.parking.tag("b", None)
    eval_ = store.eval

    def failing_for_b(script: str, keys: Any, args: Any, *, doing: str) -> Any:
        if keys[0].startswith(bad):
            raise StorageError(f"{doing} failed") from redis.exceptions.ReadOnlyError("READONLY")
        return eval_(script, keys, args, doing=doing)

    monkeypatch.setattr(store, "eval", failing_for_b)
    released: list[tuple[str, str]] = []
    failed: list[str] = []
    for _ in range(2):
        for tag in store.parking.tags():
            try:
                released += store.parking.release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())
            except StorageError:
                failed.append(tag)
        clock.advance(1.0)
    assert sorted(entry for entry, _ in released) == ["a:1", "c:1"]
    assert set(failed) == {bad}


# -- listings ----------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["redis", "cluster"])
@pytest.mark.parametrize("which", [0, 1, 4])  # (keys a snapshot reads: state, failure times, leases)
def test_one_wrong_typed_breaker_never_stops_a_listing(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, topology: str, which: int
) -> None:
    """It is listed as unreadable, its key left as it is: a listing writes nothing (decision 107)."""
    url = request.getfixturevalue("redis_url" if topology == "redis" else "redis_cluster_url")
    store = RedisStore.from_url(f"{url}?time=client&key_prefix={unique_prefix()}")
    client: Any = store.client()
    clock = FakeClock()
    names = [f"b{i}" for i in range(6)]
    for name in names:
        fail(CircuitBreaker(name, POLICY, storage=store, clock=clock))
    bad = store.keys_for("b3", None)[which]
    client.delete(bad)
    client.set(bad, "junk")
    for listed in range(2):  # (the same each time: nothing was reset)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            listing = store.snapshots(clock)
        assert sorted(s.name for s in listing) == [n for n in names if n != "b3"]
        assert isinstance(listing, Listing)
        (found,) = listing.unreadable
        assert (found.name, found.key, found.stored_state) == ("b3", None, None if which == 0 else State.CLOSED)
        assert f"{bad} holds a string, expected a" in found.problem
        warnings = warnings_naming(caplog, "breaker b3")
        if listed == 0:
            (warning,) = warnings
            assert f"{bad} holds a string" in warning
        else:
            assert warnings == []  # (told once a minute: a page or a scrape lists every few seconds)
        assert client.get(bad) == b"junk"


def test_a_listing_shows_what_it_cannot_read_and_lists_the_rest(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    for name in ("a", "b", "c", "d"):
        fail(CircuitBreaker(name, POLICY, storage=store, clock=clock))
    server.hset(state_key(store, "b"), "gen", "nan")  # unreadable: shown as such, left as it is
    server.hset(state_key(store, "c"), "nm", "someone")  # another breaker's hash: left alone
    server.hset("{" + store.quoted_prefix + ":a b}:s", "st", "closed")  # no key this store writes
    server.hset("{" + store.quoted_prefix + ":%zz}:s", "st", "closed")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        listing = store.snapshots(clock)
    assert sorted(s.name for s in listing) == ["a", "d"]
    assert isinstance(listing, Listing)
    assert [(f.name, f.problem, f.stored_state) for f in listing.unreadable] == [
        ("b", f"unreadable gen='nan' in {state_key(store, 'b')}", State.CLOSED)
    ]
    assert any("gen='nan'" in m for m in warnings_naming(caplog, "breaker b: unreadable state in Redis"))
    assert server.hget(state_key(store, "b"), "gen") == b"nan"  # untouched
    assert warnings_naming(caplog, "left {" + store.quoted_prefix + ":c}:s out of the listing")
    assert len(warnings_naming(caplog, "not a key this store writes")) == 2
    assert server.hget(state_key(store, "c"), "nm") == b"someone"  # untouched


def test_a_listing_leaves_an_earlier_colliding_prefixs_breakers_alone(
    redis_url: str, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Before prefixes were quoted, prefix ``P:x`` kept breaker ``y`` under ``{P:x:y}``,
    which prefix ``P`` now reads as its breaker ``x`` with key ``y``: never reset by a listing."""
    base = unique_prefix()
    clock = FakeClock()
    old = RedisStore.from_url(f"{redis_url}?time=client&key_prefix={base}")
    CircuitBreaker("mine", POLICY, storage=old, clock=clock).call(ok)
    theirs = "{" + base + ":x:y}:s"  # what the earlier release wrote for prefix P:x, breaker y
    server.hset(theirs, mapping={"st": "forced_open", "nm": "y", "ky": "-", "gen": "4"})
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert [s.name for s in old.snapshots(clock)] == ["mine"]
    assert warnings_naming(caplog, f"left {theirs} out of the listing")
    assert server.hgetall(theirs) == {b"st": b"forced_open", b"nm": b"y", b"ky": b"-", b"gen": b"4"}


def test_a_foreign_history_is_reported_when_read_and_replaced_when_written(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    history = store.history
    server.set(history.key("crm", "t/1"), "junk")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert history.read("crm", "t/1") == []
        history.append("crm", "t/1", '{"state":"closed"}', ttl=60.0, now=1000.0)
    messages = warnings_naming(caplog, "breaker crm[t/1]")
    assert "none read (the next record replaces it)" in messages[0]
    assert "held a string, not a history; replaced it" in messages[1]
    server.zadd(history.key("crm", "t/1"), {'{"at":1e300}': 1e300})
    server.zadd(history.key("crm", "t/1"), {b"\xff\xfe": 1000.0})
    history.append("crm", "t/1", '{"state":"open"}', ttl=60.0, now=1001.0)
    assert len(history.read("crm", "t/1")) == 3  # the entry from the far future is gone; bytes read as text


def scans(server: redis.Redis) -> int:
    """How many SCAN commands the server has run (``INFO commandstats``)."""
    return int(server.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


@pytest.mark.parametrize("topology", ["redis", "cluster"])
def test_a_deleted_index_is_rebuilt_from_the_parked_entries(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, topology: str
) -> None:
    """An index deleted (``DEL``, an ``allkeys-*`` eviction) while entries stay parked:
    the next listing finds them all, not only those parked since."""
    url = request.getfixturevalue("redis_url" if topology == "redis" else "redis_cluster_url")
    store = RedisStore.from_url(f"{url}?time=client&key_prefix={unique_prefix()}")
    parking = store.parking
    parking.park("a", None, "a:1", 1.0, "a", None)
    parking.park("b", "k", "b:1", 1.0, "b", None)
    assert [parking.label(tag) for tag in parking.tags()] == ["a", "b[k]"]
    store.client().delete(parking.index)
    parking.park("c", None, "c:1", 1.0, "c", None)  # (the index now names c alone)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert [parking.label(tag) for tag in parking.tags()] == ["a", "b[k]", "c"]
    (warning,) = warnings_naming(caplog, "rebuilt it from the parked entries")
    assert "did not name 2 breaker(s) with parked tasks (a, b[k])" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        for _ in range(3):  # (found again by every later listing, with nothing logged)
            assert [parking.label(tag) for tag in parking.tags()] == ["a", "b[k]", "c"]
    assert caplog.text == ""
    store.close(timeout=0)


def test_a_tag_a_releaser_dropped_and_put_back_is_not_reported_lost(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A releaser's ``forget`` drops a tag it found empty, then puts it back when an entry
    arrived meanwhile. A first listing (the index not yet whole) that read the index in
    between rebuilt it and warned that the index "was deleted, evicted or lost", though
    nothing was: seen in a recovery bench run on a fresh store. The tag is back in the
    index by the time the scan ends, and that is no loss."""
    parking = store.parking
    parking.park("a", None, "a:1", 1.0, "a", None)
    tag = parking.tag("a", None)
    server.srem(parking.index, tag)  # (forget's SREM: the index as the listing reads it)
    client = store.client()
    scan_iter = client.scan_iter

    def scan_then_put_back(*args: Any, **kwargs: Any) -> Any:
        yield from scan_iter(*args, **kwargs)
        server.sadd(parking.index, tag)  # (forget's second look: the entry is there, the tag back)

    monkeypatch.setattr(client, "scan_iter", scan_then_put_back)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert [parking.label(found) for found in parking.tags()] == ["a"]
    assert caplog.text == ""
    monkeypatch.undo()
    assert server.sismember(parking.index, "~whole")  # (whole from now on: not scanned again)


def test_an_index_with_nothing_missing_is_not_rebuilt_twice(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that has an index, or nothing parked at all: listings do not SCAN Redis
    (once, to learn that the index is whole), and nothing is logged."""
    parking = store.parking
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert parking.tags() == []
        before = scans(server)
        assert parking.tags() == []
        parking.park("a", None, "a:1", 1.0, "a", None)
        parking.forget(parking.tag("b", None))
        assert [parking.label(tag) for tag in parking.tags()] == ["a"]
        assert scans(server) == before
    assert caplog.text == ""
    server.delete(parking.index)  # (and the SCANs are counted: a deleted index is rebuilt)
    assert [parking.label(tag) for tag in parking.tags()] == ["a"]
    assert scans(server) > before


def test_an_entry_parked_by_a_park_that_failed_after_writing_it_is_released(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry is written, then the connection drops before the park's last round trip
    (the index): the park says it parked (it raised, and the task went by countdown as
    well: it ran twice), and the entry it wrote is found and released."""
    parking = store.parking
    tag = parking.tag("svc", None)
    parking.park("svc", None, "t0:1", 1.0, "earlier", None)
    parking.purge(tag)
    parking.forget(tag)  # (drained: the releaser dropped it from the index)
    assert parking.tags() == []
    own_keys, script = parking._own_keys, parking._script
    written: list[str] = []

    def writing(name: str, *args: Any, **kwargs: Any) -> list[Any]:
        written.append(name)
        return script(name, *args, **kwargs)

    def failing_after_the_entry(doing: str, queue: Any) -> list[Any]:
        if written:  # (the first round trip after the park script)
            raise StorageError("redis store: parking t1:1 failed: Connection reset by peer")
        return own_keys(doing, queue)

    monkeypatch.setattr(parking, "_script", writing)
    monkeypatch.setattr(parking, "_own_keys", failing_after_the_entry)
    assert parking.park("svc", None, "t1:1", 2.0, "payload", None) == 1
    monkeypatch.undo()
    assert parking.count(tag) == (1, 0)
    assert parking.tags() == [tag]


@pytest.mark.parametrize("lost", [":q", ":c", ":q and the index"])
def test_messages_whose_queue_or_claims_vanished_are_released(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, lost: str
) -> None:
    """The queue (or the claims) deleted or evicted while the messages hash survived: the
    messages are queued again by the next script, and released; none waits for ever."""
    clock = FakeClock()
    parking = store.parking
    tag = parking.tag("svc", None)
    for n in range(3):
        parking.park("svc", None, f"t{n}:1", 100.0 + n, f"payload {n}", None)
    release = parking.release
    if lost == ":c":
        clock.advance(1.0)
        release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())  # (the ramp starts)
        clock.advance(1.0)
        assert len(release(tag, most=2, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())) == 2
    server.delete(tag + lost[:2])
    if lost.endswith("index"):
        parking.forget(tag)  # (finds the queue gone: must not drop the breaker from the index)
        server.delete(parking.index)
    assert tag in parking.tags()
    went: list[str] = []
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        for _ in range(3):
            clock.advance(1.0)
            went += [e for e, _ in release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())]
    assert sorted(went) == ["t0:1", "t1:1", "t2:1"]  # (t0 and t1 again, after their claims were lost)
    assert "neither queued nor claimed (queued again)" in caplog.text


@pytest.mark.parametrize("where", ["queued", "claimed"])
def test_tasks_whose_messages_vanished_are_reported_lost_with_their_breaker(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """The messages hash deleted or evicted (allkeys-lru evicts it alone: 6 of 50 breakers
    in one run) while the queue, or the claims, survived: counted as parked, the entries
    were dropped by the next release without a word, and the tasks never ran."""
    clock = FakeClock()
    parking = store.parking
    tag = parking.tag("svc", None)
    for n in range(3):
        parking.park("svc", None, f"t{n}:1", 100.0 + n, f"payload {n}", None)
    parking.park("svc", None, "t3:1", 103.0, "payload 3", None)
    release = parking.release
    if where == "claimed":
        clock.advance(1.0)
        release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())  # (the ramp starts)
        clock.advance(1.0)
        assert len(release(tag, most=3, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())) == 3
        clock.advance(31.0)  # (their leases run out: the releaser died)
    server.hdel(tag + ":m", "t0:1", "t1:1", "t2:1")  # (t3's message stays)
    went: list[str] = []
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        for _ in range(3):
            clock.advance(1.0)
            went += [e for e, _ in release(tag, most=10, pace=10.0, ramp=0.0, lease=30.0, now=clock.monotonic())]
    assert went == ["t3:1"]
    assert parking.count(tag) == (0, 1)
    lost = [line for line in warnings_naming(caplog, "svc") if "parked task(s) lost" in line]
    assert len(lost) == 1
    assert "3 parked task(s) lost, e.g. 't0:1'" in lost[0]
    assert f"without their message in {tag}:m" in lost[0]


def test_a_messages_hash_gone_as_a_whole_is_one_loss_said_once_with_the_total(
    store: RedisStore, server: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Each release tick found the loss among the entries it claimed, and said so for
    # those alone: 40 lost tasks made 20 WARNINGs, and no total (an acceptance tester's
    # run); a backlog of 100,000 would make thousands.
    clock = FakeClock()
    parking = store.parking
    tag = parking.tag("svc", None)
    for n in range(40):
        parking.park("svc", None, f"t{n}:1", 100.0 + n, f"payload {n}", None if n % 2 else 1e9)
    server.delete(tag + ":m")
    went: list[str] = []
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        for _ in range(5):
            clock.advance(1.0)
            went += [e for e, _ in parking.release(tag, most=2, pace=2.0, ramp=0.0, lease=30.0, now=clock.monotonic())]
    assert went == []
    assert parking.count(tag) == (0, 0)
    lost = [line for line in warnings_naming(caplog, "svc") if "parked task(s) lost" in line]
    assert len(lost) == 1
    assert "40 parked task(s) lost, e.g. 't0:1'" in lost[0]
    assert server.exists(tag + ":d") == 0  # (their deadlines went with them)
