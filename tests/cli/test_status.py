"""``celery breaker status`` through Celery's own main command, against a real Redis store."""

from __future__ import annotations

import contextlib
import json

from celery.bin.celery import celery as celery_main
from click.testing import CliRunner

from celery_breaker import CircuitOpenError
from celery_breaker.monitoring import collect_metrics
from celery_breaker.ops.cli import EXIT_CONFIG, EXIT_UNAVAILABLE
from celery_breaker.storage import flush_stores
from celery_breaker.storage.redis import RedisStore
from tests.servers import free_port

from . import cliproj
from .conftest import APP, breaker, run, trip


def populate(url: str) -> None:
    """partner-api open with 2 parked tasks and 3 deferrals, crm[tenant-7] closed after 4 calls, billing closed."""
    partner = breaker(url, "partner-api")
    trip(partner)
    for _ in range(3):
        partner.note_deferral()
    with contextlib.suppress(CircuitOpenError):
        partner.call(lambda: None)
    crm = breaker(url, "crm", key="tenant-7", policy={"failure_rate_threshold": 0.5, "minimum_calls": 10})
    for _ in range(4):
        crm.call(lambda: None)
    breaker(url, "billing").call(lambda: None)
    parking = RedisStore.from_url(url).parking
    for n in range(2):
        parking.park("partner-api", None, f"task-{n}:1", float(n), "payload", None)
    flush_stores()


def test_the_table_shows_every_breaker_sorted_with_its_numbers(store_url: str) -> None:
    populate(store_url)
    result = run("status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KEY", "STATE", "FAIL%", "CALLS", "FAILS", "OPEN", "UNTIL", "TRIPS",
                                "DEFERRED", "PARKED", "RELEASE"]  # fmt: skip
    assert [line.split()[0] for line in lines[1:4]] == ["billing", "crm", "partner-api"]
    assert lines[2].split() == ["crm", "tenant-7", "closed", "0%", "4", "0", "-", "0", "0", "0", "-"]
    partner = lines[3].split()
    assert partner[:6] == ["partner-api", "-", "open", "-", "0", "0"]  # a trip starts the windows afresh
    assert partner[6] == "in"
    assert 25 < float(partner[7]) <= 30
    assert partner[8] == "s"
    assert partner[9:] == ["1", "3", "2", "-"]  # trips, deferred, parked; no release while open
    assert lines[-1] == "3 breakers: 1 open, 2 closed"
    assert "\x1b[" not in result.stdout  # not a terminal: no colour
    assert result.stderr == ""


def test_json_is_the_monitoring_rows(store_url: str) -> None:
    populate(store_url)
    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    expected = [{**row.as_dict(), "unreadable": None} for row in collect_metrics(store_url)]
    volatile = {"retry_after"}  # seconds until the probe: moves between the two reads
    assert [{k: v for k, v in r.items() if k not in volatile} for r in rows] == [
        {k: v for k, v in r.items() if k not in volatile} for r in expected
    ]
    partner = rows[2]
    assert (partner["name"], partner["state"], partner["parked"], partner["deferrals"]) == ("partner-api", "open", 2, 3)
    assert partner["rejections"] == 1


def test_globs_filter_by_name_or_label(store_url: str) -> None:
    populate(store_url)
    assert [line.split()[0] for line in run("status", "crm*", "bill*").stdout.splitlines()[1:3]] == ["billing", "crm"]
    only = run("status", "--json", "crm[tenant-*]")
    assert [(r["name"], r["key"]) for r in json.loads(only.stdout)] == [("crm", "tenant-7")]
    none = run("status", "nothing*")
    assert none.exit_code == 0
    assert none.stdout.startswith("No breaker matches nothing* (3 in redis://")


def test_a_pattern_matching_nothing_is_echoed_without_its_control_characters(store_url: str) -> None:
    """``status PATTERN`` echoed the pattern as typed: one pasted from a task's key, with
    an escape sequence in it (``\x1b]0;owned\x07`` sets a terminal's title), ran in the
    operator's terminal. It is shown as status shows names and keys."""
    populate(store_url)
    result = run("status", "crm[\x1b]0;owned\x07*]", "pay\x1b[2Jments")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert "\x07" not in result.stdout
    assert result.stdout.startswith("No breaker matches crm[\\x1b]0;owned\\x07*] pay\\x1b[2Jments (3 in redis://"), (
        result.stdout
    )


def test_wide_adds_the_time_an_open_breaker_may_probe(store_url: str) -> None:
    populate(store_url)
    lines = run("status", "--wide").stdout.splitlines()
    assert "OPEN UNTIL (TIME)" in lines[0]
    assert "REJECTED" in lines[0]
    partner = next(line for line in lines if line.startswith("partner-api"))
    assert partner.count(":") == 2  # HH:MM:SS


def test_colour_on_request_and_never_with_celery_no_color(store_url: str) -> None:
    populate(store_url)
    assert "\x1b[31m\x1b[1mopen\x1b[0m" in run("status", "--color").stdout
    plain = CliRunner().invoke(celery_main, ["-A", APP, "--no-color", "breaker", "status"], catch_exceptions=False)
    assert plain.exit_code == 0
    assert "\x1b[" not in plain.stdout


def test_an_empty_store_says_so(store_url: str) -> None:
    result = run("status")
    assert result.exit_code == 0
    assert result.stdout.startswith("No breakers in redis://127.0.0.1:")
    assert json.loads(run("status", "--json").stdout) == []


def test_a_memory_store_is_refused_because_the_cli_cannot_see_workers_breakers() -> None:
    cliproj.use_store("memory://")
    for args in (["status"], ["status", "--json"], ["watch", "--once"]):
        result = run(*args)
        assert result.exit_code == EXIT_CONFIG
        assert result.stdout == ""
        assert "a memory store holds only the breakers of the process that uses it" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_an_unreachable_store_is_one_line_naming_the_masked_url(redis_url: str) -> None:
    port = free_port()  # nothing listens there
    cliproj.use_store(f"redis://:hunter2@127.0.0.1:{port}/0")
    try:
        for args in (["status"], ["status", "--json"], ["watch", "-n", "2"]):
            result = run(*args)
            assert result.exit_code == EXIT_UNAVAILABLE, result.output
            assert result.stderr.startswith(f"Error: cannot reach the breaker store redis://:***@127.0.0.1:{port}/0: ")
            assert "hunter2" not in result.output
            assert "Traceback" not in result.output
            assert len(result.stderr.strip().splitlines()) == 1
    finally:
        cliproj.use_store("memory://")


def test_a_label_without_a_glob_is_looked_up_alone(store_url: str, listings: list[RedisStore]) -> None:
    # `status 'crm[tenant-7]'` listed every breaker in the store, then kept one: 6.3 s with
    # 40,000 per-key breakers in Redis.
    populate(store_url)
    store = RedisStore.from_url(store_url)
    store.parking.park("crm", "gone", "task-1:1", 1.0, "payload", None)  # (tasks parked, no state: listed too)
    table = run("status", "crm[tenant-7]", "crm[gone]")
    assert table.exit_code == 0, table.output
    assert [line.split()[:3] for line in table.stdout.splitlines()[1:3]] == [
        ["crm", "gone", "closed"], ["crm", "tenant-7", "closed"],
    ]  # fmt: skip
    rows = json.loads(run("status", "--json", "crm[gone]").stdout)
    assert [(row["key"], row["parked"]) for row in rows] == [("gone", 1)]
    assert listings == []
    # A glob, a name alone, or a label not found: the store is listed, as before.
    assert "crm[tenant-8]" in run("status", "crm[tenant-8]").stdout  # ("No breaker matches ... (N in ...)")
    assert len(listings) == 1
    assert run("status", "crm[tenant-*]").stdout.count("tenant-7") == 1
    assert len(listings) == 2
