"""``status`` (table and JSON) and ``watch`` against a breaker whose stored state is
unreadable, with no worker running: the breaker is shown as unreadable, with what is
wrong and the command that repairs it, and nothing in Redis is written (decision 107).
Before, the listing reset it: its keys deleted, an operator's ``forced_open`` with them,
and the breaker gone from every view."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_breaker import State
from celery_breaker.labels import visible
from celery_breaker.ops import control
from celery_breaker.storage import close_stores
from celery_breaker.storage.redis import RedisStore

from . import cliproj
from .conftest import breaker, run, stored, trip


@pytest.fixture
def server(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def keys_of(server: redis.Redis, url: str, name: str, key: str | None = None) -> list[str]:
    """The breaker's keys and its parking's."""
    store = RedisStore.from_url(url)
    tag = store.parking.tag(name, key)
    return [*store.keys_for(name, key), *(k.decode() for k in server.scan_iter(match=f"{tag}*"))]


def dumped(server: redis.Redis, keys: list[str]) -> dict[str, tuple[Any, int]]:
    return {key: (server.dump(key), server.pttl(key)) for key in keys}


def unchanged(before: dict[str, tuple[Any, int]], after: dict[str, tuple[Any, int]]) -> bool:
    """The same values, and no TTL given back or taken (each may only have run down; a
    PERSIST reads -1, below any TTL left, and is a write too)."""
    return {k: v for k, (v, _) in before.items()} == {k: v for k, (v, _) in after.items()} and all(
        0 < after[k][1] <= before[k][1] or after[k][1] == before[k][1] < 0 for k in before
    )


#: (what is written, what the line says is wrong, the state the hash still names)
DAMAGES = {
    "garbage state": ({"st": "garbage"}, "unreadable st='garbage'", None),
    "open for ever": ({"st": "open", "ou": "1e300"}, "unreadable ou='1e300'", "open"),
    "forced open, a nan count": ({"ok": "nan"}, "unreadable ok='nan'", "forced_open"),
    "a string": (None, "holds a string, expected a hash", None),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_status_shows_an_unreadable_breaker_and_changes_nothing(
    store_url: str, server: redis.Redis, damage: str
) -> None:
    written, said, held = DAMAGES[damage]
    breaker(store_url, "held").force_open()  # (an operator's: what a reset lost)
    trip(breaker(store_url, "other"))
    RedisStore.from_url(store_url).parking.park("held", None, "task-1:1", 1.0, "payload", None)
    close_stores()  # (no holder left in this process to repair it, as a worker's call would)
    state_key = RedisStore.from_url(store_url).keys_for("held", None)[0]
    if written is None:
        server.delete(state_key)
        server.set(state_key, "junk")
    else:
        for field, value in written.items():
            server.hset(state_key, field, value)
    keys = keys_of(server, store_url, "held")
    for key in keys:  # (shorter than a script gives back: a refreshed TTL would show)
        server.expire(key, 600)
    before = dumped(server, keys)

    table = run("status")
    listed = run("status", "--json")
    alone = run("status", "held")  # (looked up alone, not listed)

    assert unchanged(before, dumped(server, keys))
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == ["held", "unreadable", "?"]  # (in its place, by name)
    parked_end = lines[0].index("PARKED") + len("PARKED")  # (a count, aligned right under its title)
    assert lines[1][:parked_end].split()[-1] == "1"  # (its parking is read apart: the task waits)
    assert lines[2].split()[:2] == ["other", "open"]
    assert "2 breakers: 1 unreadable, 1 open" in lines
    (line,) = [line for line in lines if line.startswith("Unreadable: held: ")]
    assert said in line
    assert "; 1 task parked behind it; left as it is" in line
    assert state_key in line
    repair = "open" if held == "forced_open" else "reset"
    assert line.endswith(f"or now: celery breaker {repair} held")
    assert len(table.stdout.split("held")) == 2 + line.count("held")  # (no second row, a new closed one)

    rows = json.loads(listed.stdout)
    assert [(row["name"], row["state"]) for row in rows] == [("held", "unreadable"), ("other", "open")]
    assert set(rows[0]) == set(rows[1])  # (the documented shape: one field more, on every row)
    assert rows[1]["unreadable"] is None
    assert rows[0]["trips"] is None
    assert (rows[0]["parked"], rows[0]["claimed"]) == (1, 0)  # (its parking is read: the task waits)
    found = rows[0]["unreadable"]
    assert said in found["problem"]
    assert found["stored_state"] == held
    assert found["repair"] == f"celery breaker {repair} held"

    assert alone.exit_code == 0, alone.output
    assert alone.stdout.splitlines()[1].split()[:2] == ["held", "unreadable"]


@pytest.mark.parametrize(
    ("name", "key"),
    [("pay ments'x*", None), ("crm pay*", "t 1?"), ("crm\\x", "a\\b"), ("réseau", "t[1]"), ("-x", None), ("-y", "-k")],
)
@pytest.mark.parametrize("held", [False, True])
def test_the_repair_the_line_suggests_is_a_command_the_shell_reads_back(
    store_url: str, server: redis.Redis, name: str, key: str | None, held: bool
) -> None:
    """Quoted as the shell reads it (a space, a quote, a glob, a backslash, brackets; a
    name that starts with ``-`` after ``--``, or it was taken for an option): run, it
    repairs the breaker; one an operator forced open stays forced open."""
    held_open = breaker(store_url, name, key=key)
    if held:
        held_open.force_open()
    else:
        held_open.call(lambda: None)
    # (its success sent, and no holder of it left in this process: a flush, or a view
    # refreshed, meeting the damage would repair it, as a worker's call does)
    close_stores()
    state_key = RedisStore.from_url(store_url).keys_for(name, key)[0]
    server.hset(state_key, "gen", "nan")
    table = run("status")
    (line,) = [line for line in table.stdout.splitlines() if line.startswith("Unreadable: ")]
    suggested = re.search(r"or now: (celery breaker .*)$", line)
    assert suggested is not None, line
    words = shlex.split(suggested.group(1))
    action = "open" if held else "reset"
    keyed = ["--key", visible(key)] if key is not None else []
    named = [*keyed, "--", name] if name.startswith("-") else [name, *keyed]
    assert words == ["celery", "breaker", action, *named]
    repaired = run(action, *(["--yes"] if action == "reset" else []), *words[3:])
    assert repaired.exit_code == 0, repaired.output
    assert stored(store_url, name, key).state is (State.FORCED_OPEN if held else State.CLOSED)
    assert "unreadable" not in run("status").stdout


def test_watch_shows_an_unreadable_breaker_and_changes_nothing(store_url: str, server: redis.Redis) -> None:
    breaker(store_url, "held").force_open()
    breaker(store_url, "other").call(lambda: None)
    close_stores()  # (no holder left in this process to repair it, as a worker's call would)
    state_key = RedisStore.from_url(store_url).keys_for("held", None)[0]
    server.hset(state_key, "tr", "-1")
    before = dumped(server, keys_of(server, store_url, "held"))
    result = run("watch", "--once")
    assert result.exit_code == 0, result.output
    assert unchanged(before, dumped(server, keys_of(server, store_url, "held")))
    assert "2 breakers: 1 unreadable, 1 closed" in result.stdout
    assert re.search(r"^held +unreadable", result.stdout, re.MULTILINE)
    assert "Unreadable: held: unreadable state in the store (unreadable tr='-1'" in result.stdout
    assert "or now: celery breaker open held" in result.stdout


@pytest.mark.parametrize("patterns", [None, ["held"], ["he*"]])
def test_inspect_breakers_gives_an_unreadable_breaker_a_row_of_its_own(
    store_url: str, server: redis.Redis, patterns: list[str] | None
) -> None:
    """``celery inspect breakers`` (the worker's reply, as ``status --json`` rows): the
    breaker is there, state ``unreadable``, and its keys are as they were."""
    breaker(store_url, "held").force_open()
    breaker(store_url, "other").call(lambda: None)
    close_stores()
    state_key = RedisStore.from_url(store_url).keys_for("held", None)[0]
    server.hset(state_key, "st", "ajar")
    before = dumped(server, keys_of(server, store_url, "held"))
    state = SimpleNamespace(consumer=SimpleNamespace(app=cliproj.app, controller=None))
    reply = control.breakers(state, patterns)
    assert unchanged(before, dumped(server, keys_of(server, store_url, "held")))
    assert isinstance(reply, list), reply
    shown = [(row["name"], row["state"]) for row in reply]
    assert shown == ([("held", "unreadable"), ("other", "closed")] if patterns is None else [("held", "unreadable")])
    assert reply[0]["unreadable"]["problem"] == f"unreadable st='ajar' in {state_key}"
    assert reply[0]["unreadable"]["repair"] == "celery breaker reset held"


def test_a_label_looked_up_alone_finds_an_unreadable_breaker(
    store_url: str, server: redis.Redis, listings: list[RedisStore]
) -> None:
    """``status 'crm[t1]'`` reads that breaker alone (``Store.find``): found unreadable, it
    is shown as such, not taken for missing (which listed the whole store to say so)."""
    breaker(store_url, "crm", key="t1").call(lambda: None)
    close_stores()
    state_key = RedisStore.from_url(store_url).keys_for("crm", "t1")[0]
    server.hset(state_key, "ok", "-1")
    before = dumped(server, keys_of(server, store_url, "crm", "t1"))
    result = run("status", "crm[t1]")
    assert unchanged(before, dumped(server, keys_of(server, store_url, "crm", "t1")))
    assert result.stdout.splitlines()[1].split() == ["crm", "t1", "unreadable", *["?"] * 6, "0", "?"]  # (PARKED: read)
    assert "or now: celery breaker reset crm --key t1" in result.stdout
    assert listings == []  # (no listing of the store)


def test_celery_control_repairs_an_unreadable_per_key_breaker_of_a_name_the_app_does_not_give(
    store_url: str, server: redis.Redis
) -> None:
    """``celery control breaker_reset NAME KEY`` knows a name the app does not give by the
    store's listing: a name whose only breaker was unreadable was refused as unknown
    ("this worker knows: ..."), though ``status`` showed it and told to repair it."""
    breaker(store_url, "orphan", key="t1").call(lambda: None)  # (made by a program, not a task)
    close_stores()
    state_key = RedisStore.from_url(store_url).keys_for("orphan", "t1")[0]
    server.hset(state_key, "gen", "nan")
    reply = control.operate(cliproj.app, "reset", "orphan", "t1")
    assert (reply["name"], reply["key"], reply["state"]) == ("orphan", "t1", "closed")
    assert server.hget(state_key, "gen") != b"nan"  # (repaired: a reset, as the line suggests)


def test_what_the_cli_asks_before_it_acts_writes_nothing(store_url: str, server: redis.Redis) -> None:
    """``delete``'s plan (its dry run, before "Delete held?") and the caution ``close`` asks
    about first read the breaker with a policy, which repairs it as a call does: an
    operator's forced-open breaker with a window key of another type was reset to a new
    closed one (published to every worker, whose releaser then let its parked tasks go)
    before the operator had answered. A read writes nothing (decision 107): the move
    repairs it, once made."""
    from celery_breaker.ops import operator

    breaker(store_url, "held").force_open()
    RedisStore.from_url(store_url).parking.park("held", None, "task-1:1", 1.0, "payload", None)
    close_stores()
    store = RedisStore.from_url(store_url)
    window = store.keys_for("held", None)[1]
    server.delete(window)
    server.set(window, "junk")
    keys = keys_of(server, store_url, "held")
    before = dumped(server, keys)

    plan = operator.delete(cliproj.app, "held", None, purge=True, dry_run=True, store=store)
    warning = operator.assess(cliproj.app, "close", "held", store=store)

    assert unchanged(before, dumped(server, keys))
    assert (plan.discarded, plan.warning, warning) == (1, None, None)
    assert server.hget(store.keys_for("held", None)[0], "st") == b"forced_open"
