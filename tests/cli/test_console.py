"""What the CLI prints, from hand-made rows and a fake clock: the status table and the watch view's arithmetic."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import click
import pytest

from celery_breaker import State
from celery_breaker.core import BreakerSnapshot
from celery_breaker.errors import StorageError
from celery_breaker.monitoring import BreakerStatus
from celery_breaker.ops.console import clock_time, duration, open_until_text, release_text, status_text, summary
from celery_breaker.ops.watch import Watch, fit, run_watch, watch_frame
from celery_breaker.storage import ReleasePace
from celery_breaker.testing import FakeClock


def snap(name: str = "crm", key: str | None = None, **fields: Any) -> BreakerSnapshot:
    values: dict[str, Any] = {
        "name": name, "key": key, "state": State.CLOSED, "generation": 0, "failures": 0, "successes": 0,
        "rejections": 0, "deferrals": 0, "trips": 0, "last_failure": None, "last_success": None,
        "opened_at": None, "open_until": None, "retry_after": 0.0, "window_calls": 0, "window_failures": 0,
        "window_slow_calls": 0, "probes_in_flight": 0,
    }  # fmt: skip
    values.update(fields)
    return BreakerSnapshot(**values)


def row(snapshot: BreakerSnapshot, parked: int = 0) -> BreakerStatus:
    return BreakerStatus(snapshot, parked)


def changed(snapshot: BreakerSnapshot, **fields: Any) -> BreakerSnapshot:
    return dataclasses.replace(snapshot, **fields)


def test_durations_read_at_every_scale() -> None:
    assert [duration(s) for s in (0, 4.25, 59.9, 61, 3 * 3600 + 7 * 60, 2 * 86400 + 4 * 3600, -3)] == [
        "0.0 s", "4.2 s", "59.9 s", "1m01s", "3h07m", "2d04h", "0.0 s",
    ]  # fmt: skip


def test_open_until_says_what_each_state_waits_for() -> None:
    assert open_until_text(snap(state=State.OPEN, retry_after=12.34)) == "in 12.3 s"
    assert open_until_text(snap(state=State.OPEN, retry_after=0.0)) == "probe due"
    assert open_until_text(snap(state=State.FORCED_OPEN, retry_after=None)) == "until closed"
    assert open_until_text(snap(state=State.HALF_OPEN)) == "probing"
    assert open_until_text(snap(state=State.CLOSED)) == "-"


def test_status_table_aligns_columns_and_drops_the_key_column_when_no_breaker_has_a_key() -> None:
    rows = [
        row(snap("billing", window_calls=10, window_failures=3)),
        row(snap("partner-api", state=State.OPEN, retry_after=9.0, trips=2, deferrals=7), parked=4),
    ]
    lines = status_text(rows, now=1_700_000_000.0).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "FAIL%", "CALLS", "FAILS", "OPEN", "UNTIL", "TRIPS", "DEFERRED",
                                "PARKED", "RELEASE"]  # fmt: skip
    assert lines[1].split() == ["billing", "closed", "30%", "10", "3", "-", "0", "0", "0", "-"]
    assert lines[2].split() == ["partner-api", "open", "-", "0", "0", "in", "9.0", "s", "2", "7", "4", "-"]
    assert lines[-1] == "2 breakers: 1 open, 1 closed"
    assert len({len(line) for line in lines[:3]}) <= 2  # numbers right-aligned under their titles
    assert "\x1b[" not in "\n".join(lines)

    keyed = status_text([row(snap("crm", "tenant-7"))], now=0.0, wide=True)
    assert keyed.splitlines()[0].split()[:3] == ["NAME", "KEY", "STATE"]
    assert "OPEN UNTIL (TIME)" in keyed
    assert "REJECTED" in keyed
    assert "GEN" in keyed


def test_the_release_column_shows_the_pace_its_wait_and_its_limit() -> None:
    assert release_text(None) == "-"
    assert release_text(ReleasePace(3, 146.4, None, None)) == "146/s"
    assert release_text(ReleasePace(3, 5.55, None, None)) == "5.5/s"
    assert release_text(ReleasePace(3, 9.96, None, None)) == "10/s"
    assert release_text(ReleasePace(3, 28.0, 40.0, 1.25)) == "held 1.2 s, then 28/s (limit 40/s)"
    assert release_text(ReleasePace(3, 38.0, 40.0, None)) == "38/s (limit 40/s)"
    assert release_text(ReleasePace(3, 38.0, 40.0, None, 0.08)) == "38/s (limit 40/s; 8% usually bad)"
    assert release_text(ReleasePace(3, 90.0, None, None, 0.004)) == "90/s (<1% usually bad)"
    assert release_text(ReleasePace(3, 90.0, None, None, 0.0)) == "90/s"  # (nothing usual to tell)
    releasing = BreakerStatus(snap("partner-api"), 120, 8, ReleasePace(0, 28.0, 40.0, 1.25))
    lines = status_text([releasing], now=0.0).splitlines()
    assert lines[1].endswith("120  held 1.2 s, then 28/s (limit 40/s)")
    wide = status_text([releasing], now=0.0, wide=True).splitlines()
    assert wide[0].split()[-5:] == ["REJECTED", "CLAIMED", "STREAK", "GEN", "RELEASE"]  # (last: it has spaces)
    assert wide[1].endswith("0  held 1.2 s, then 28/s (limit 40/s)")


def test_colour_marks_states_only_when_asked() -> None:
    rows = [row(snap("a", state=State.OPEN, retry_after=3.0)), row(snap("b"))]
    coloured = status_text(rows, now=0.0, color=True)
    assert click.style("open", fg="red", bold=True) in coloured
    assert click.unstyle(coloured) == status_text(rows, now=0.0)
    assert summary([r.snapshot for r in rows], color=False) == "2 breakers: 1 open, 1 closed"


def test_watch_computes_rates_since_the_last_refresh_and_logs_transitions() -> None:
    clock = FakeClock()
    watch = Watch(clock)
    first = snap("partner-api", successes=100, failures=2, deferrals=5, rejections=1, generation=4)
    [shown] = watch.observe([row(first)])
    assert shown.rates is None
    assert shown.since is None

    clock.advance(2.0)
    tripped = changed(first, state=State.OPEN, generation=5, successes=110, failures=4, deferrals=11, rejections=9,
                      trips=3, opened_at=clock.time() - 0.5, retry_after=29.5)  # fmt: skip
    [shown] = watch.observe([row(tripped)])
    assert shown.rates is not None
    assert (shown.rates.calls, shown.rates.deferrals, shown.rates.rejections) == (6.0, 3.0, 4.0)
    assert shown.since == clock.time() - 0.5  # an open breaker's age comes from the store: exact
    [change] = watch.changes
    assert (change.label, change.source, change.target, change.reason) == (
        "partner-api", State.CLOSED, State.OPEN, "trip",
    )  # fmt: skip

    clock.advance(1.0)
    frame = watch_frame(watch.observe([row(tripped)]), watch, store="redis://h/0", interval=1.0)
    assert "closed -> open  (trip)" in frame
    assert "CALLS/S" in frame
    assert "DEFER/S" in frame
    assert "REJ/S" in frame
    line = next(text for text in frame.splitlines() if text.startswith("partner-api"))
    assert line.split()[:4] == ["partner-api", "open", "1.5", "s"]  # in its state for 1.5 s
    assert line.endswith("  -")  # open: no release

    closed = changed(tripped, state=State.CLOSED, generation=6, retry_after=0.0)
    releasing = BreakerStatus(closed, 40, 4, ReleasePace(6, 84.0, None, None))
    frame = watch_frame(watch.observe([releasing]), watch, store="redis://h/0", interval=1.0)
    line = next(text for text in frame.splitlines() if text.startswith("partner-api"))
    assert line.endswith("  40  84/s")  # parked, then the pace they are released at


def test_watch_names_resets_bursts_of_transitions_new_and_gone_breakers() -> None:
    clock = FakeClock()
    watch = Watch(clock)
    old = snap("crm", successes=50, failures=5, trips=2, generation=6)
    watch.observe([row(old)])
    clock.advance(1.0)
    reset = changed(old, successes=1, failures=0, trips=0, generation=7)
    flapped = snap("svc", state=State.OPEN, generation=3)
    [shown_reset, _] = watch.observe([row(reset), row(flapped)])
    assert shown_reset.rates is not None
    assert shown_reset.rates.calls == 1.0
    clock.advance(1.0)
    watch.observe([row(changed(flapped, generation=5, retry_after=8.0))])
    clock.advance(1.0)
    backed_off = changed(flapped, generation=7, streak=1, trips=1, open_duration=4.0)
    watch.observe([row(backed_off)])
    reasons = [(c.label, c.source, c.target, c.reason) for c in watch.changes]
    assert reasons == [
        ("crm", State.CLOSED, State.CLOSED, "reset"),
        ("svc", None, State.OPEN, "new breaker"),
        ("svc", State.OPEN, State.OPEN, "2 transitions since the last refresh"),
        ("crm", State.CLOSED, None, "left the store"),
        ("svc", State.OPEN, State.OPEN, "probe failed via half_open; open for 4.0 s"),
    ]


def test_a_breaker_deleted_and_tripped_again_within_one_refresh_is_a_change() -> None:
    # Generations restart with each incarnation: `delete` then a fresh trip before the
    # next refresh reads open, generation 1, as before. The view must not keep the old
    # trip's age (FOR) and list nothing.
    clock = FakeClock()
    watch = Watch(clock)
    first = snap("partner-api", state=State.OPEN, generation=1, trips=1, failures=1, rejections=40,
                 opened_at=clock.time() - 10.0, retry_after=20.0)  # fmt: skip
    watch.observe([row(first)])
    clock.advance(1.0)
    again = changed(first, rejections=0, opened_at=clock.time() - 0.3, retry_after=4.7)
    [shown] = watch.observe([row(again)])
    assert shown.since == clock.time() - 0.3  # opened 0.3 s ago, not 11 s ago
    [change] = watch.changes
    assert (change.label, change.source, change.target, change.reason) == (
        "partner-api", State.OPEN, State.OPEN, "recreated",
    )  # fmt: skip
    clock.advance(1.0)
    watch.observe([row(changed(again, rejections=3))])  # counting on: no change
    assert len(watch.changes) == 1


def test_run_watch_draws_each_refresh_and_survives_a_store_outage() -> None:
    clock = FakeClock()
    frames: list[str] = []
    outage = StorageError("connection refused")
    fetched: Iterator[list[BreakerStatus] | StorageError] = iter(
        [[row(snap("a"))], outage, [row(snap("a", successes=4))]]
    )

    def fetch() -> list[BreakerStatus]:
        item = next(fetched)
        if isinstance(item, StorageError):
            raise item
        return item

    def sleep(seconds: float) -> None:
        clock.advance(seconds)

    drawn = run_watch(fetch, frames.append, Watch(clock), store="redis://h/0", interval=2.0, iterations=3,
                      sleep=sleep, errors=(StorageError,))  # fmt: skip
    assert drawn == 3
    assert "store unreachable" not in frames[0]
    assert "store unreachable" in frames[1]
    assert "connection refused" in frames[1]
    assert "store unreachable" not in frames[2]
    # 4 calls in the 4 s since the last refresh that reached the store
    assert " 1.0 " in next(line for line in frames[2].splitlines() if line.startswith("a "))


def test_the_first_fetch_fails_loudly() -> None:
    def fetch() -> list[BreakerStatus]:
        raise StorageError("connection refused")

    with pytest.raises(StorageError):
        run_watch(fetch, print, Watch(FakeClock()), store="x", interval=1.0, iterations=2, sleep=lambda _: None,
                  errors=(StorageError,))  # fmt: skip


def test_fit_cuts_a_frame_to_the_terminal_without_breaking_colours() -> None:
    coloured = click.style("open", fg="red") + " " + "x" * 20
    fitted = fit("title\n" + coloured + "\nthree\nfour", 10, 3).split("\n")
    assert click.unstyle(fitted[1]) == "open xxxx>"
    assert fitted[1].endswith("\x1b[0m>")  # the colour is reset before the cut mark
    assert fitted[0] == "title"
    assert fitted[2] == "... 2 more lines: enlarge the terminal or give a PATTERN"
    assert fit("short\nframe", 80, 24) == "short\nframe"


def test_a_key_from_a_tasks_arguments_cannot_drive_the_terminal() -> None:
    """Names are checked, but a per-key breaker's key may come from a task's arguments
    (``breaker_key``): an escape sequence in it is shown as text, and an empty key as
    ``""``, in ``status`` and ``watch`` alike."""
    rows = [row(snap("crm", "t\x1b]0;owned\x07")), row(snap("crm", ""))]
    table = status_text(rows, now=0.0)
    assert "\x1b" not in table
    assert "\x07" not in table
    assert "t\\x1b]0;owned\\x07" in table
    assert '""' in table.splitlines()[2].split()
    watch = Watch(FakeClock())
    watch.observe(rows[:1])
    frame = watch_frame(watch.observe(rows), watch, store="redis://h/0", interval=1.0)
    assert "\x1b" not in frame
    assert "t\\x1b]0;owned\\x07" in frame
    assert 'crm[""]' in frame  # (the new breaker's line: its label, its key as the KEY column shows it)


def test_a_time_the_platform_cannot_show_reads_as_a_dash() -> None:
    """A policy's open period of 1e300 s made ``status --wide`` stop with OverflowError."""
    assert clock_time(1e300) == "-"
    assert clock_time(1e300, now=0.0) == "-"
    far = status_text([row(snap(state=State.OPEN, retry_after=1e300, open_until=1e300))], now=0.0, wide=True)
    assert "OPEN UNTIL (TIME)" in far


def test_wide_characters_keep_the_table_in_line() -> None:
    # A breaker named in Chinese, a key with an emoji or a combining accent: the terminal
    # gives the first two 2 columns a character, the accent none, and ``len`` counted 1
    # each: every column right of the name stood out of line.
    from celery_breaker.ops.console import text_width

    rows = [row(snap("支付网关", "🙂")), row(snap("crm", "tenant-7")), row(snap("cafe\u0301", "x")),
            row(snap("ที่ดิน", "👍🏽")), row(snap("नमस्ते", "\u1100\u1161"))]  # fmt: skip
    lines = status_text(rows, now=0.0).splitlines()[:6]
    starts = {line_start(line, "closed") for line in lines[1:]}
    assert len(starts) == 1  # STATE begins at one terminal column in every row
    assert line_start(lines[0], "STATE") == starts.pop()
    assert text_width("支付网关") == 8
    assert text_width("cafe\u0301") == 4
    assert [text_width(text) for text in ("ที่ดิน", "नमस्ते", "👍🏽", "\u1100\u1161")] == [3, 4, 2, 2]


def line_start(line: str, word: str) -> int:
    """The terminal column at which ``word`` begins in ``line``."""
    from celery_breaker.ops.console import text_width

    return text_width(line[: line.index(word)])


def test_fit_cuts_wide_characters_at_the_terminal_edge() -> None:
    from celery_breaker.ops.console import text_width

    fitted = fit("支付网关支付网关", 9, 3)
    assert text_width(fitted) <= 9
    assert fitted == "支付网关>"
