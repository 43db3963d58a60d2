"""The ``celery breaker watch`` view: breakers followed across refreshes, with rates per
second, time in state and the recent changes.

Like ``celery_breaker.console``, everything but ``run_watch`` is a pure function of rows
and clock readings, so tests check the frames without a terminal.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from ..clock import Clock
from ..core import TRANSITIONS, BreakerSnapshot, State
from ..labels import shown_label, visible
from ..storage import Listing, UnreadableBreaker
from ..storage.masking import MaskedText
from .console import (
    ALERT,
    DIM,
    STATE_STYLES,
    Cell,
    Column,
    char_width,
    clock_time,
    count_cell,
    duration,
    failure_rate_text,
    open_until_text,
    pad,
    release_text,
    render_table,
    state_cell,
    summary,
    text_width,
    unreadable_cells,
    unreadable_text,
)
from .selection import unreached_words

if TYPE_CHECKING:
    from ..monitoring.status import BreakerStatus

#: A reading of the store is followed by a pause at least this many times as long as it
#: took, so a view left open reads at most a fifth of the time: reading 40,000 per-key
#: breakers takes ~6 s of which ~4 s is Redis running scripts, and back to back
#: ``watch`` took half of the Redis server's time.
PAUSE_PER_READ = 4.0

__all__ = ["PAUSE_PER_READ", "Change", "Rates", "Watch", "WatchRow", "fit", "run_watch", "watch_frame"]

#: Transitions the watch view keeps listing.
HISTORY = 10


@dataclass(frozen=True, slots=True)
class Rates:
    """Per second since the previous refresh."""

    calls: float
    deferrals: float
    rejections: float


@dataclass(frozen=True, slots=True)
class Change:
    """A state change the watch saw between two refreshes."""

    at: float
    """Epoch seconds of the refresh that saw it."""
    label: str
    source: State | None
    """``None``: the breaker appeared."""
    target: State | None
    """``None``: the breaker left the store (expired or deleted)."""
    reason: str


@dataclass(frozen=True, slots=True)
class WatchRow:
    """One breaker in one refresh: its status, rates and how long it has been in its state."""

    status: BreakerStatus
    rates: Rates | None
    """``None`` on the first refresh that shows the breaker."""
    since: float | None
    """Epoch seconds its state began; ``None``: before the watch started."""


@dataclass(frozen=True, slots=True)
class _Seen:
    snapshot: BreakerSnapshot
    at: float
    since: float | None
    status: BreakerStatus


def _per_second(now: int, before: int, elapsed: float) -> float:
    # A counter that went down was reset: everything it holds now came since.
    return (now - before if now >= before else now) / elapsed


def _reason(old: BreakerSnapshot, new: BreakerSnapshot) -> str:
    moves = new.generation - old.generation
    if new.state is State.CLOSED and (
        new.trips < old.trips or new.successes + new.failures < old.successes + old.failures
    ):
        return "reset"
    if moves < 1:
        return "recreated"  # expired and made again: its generation started over
    if moves == 1:
        reason = TRANSITIONS.get((old.state, new.state), "moved")
    elif old.state is State.OPEN and new.state is State.OPEN and new.streak > old.streak:
        # OPEN -> HALF_OPEN -> OPEN, perhaps more than once: the streak counts failed probes.
        failed = new.streak - old.streak
        reason = "probe failed" + (f" {failed} times" if failed > 1 else "") + " via half_open"
    else:
        reason = f"{moves} transitions since the last refresh"
    if new.state is State.OPEN and new.open_duration:
        reason += f"; open for {duration(new.open_duration)}"
    return reason


def _remade(old: BreakerSnapshot, new: BreakerSnapshot) -> bool:
    """Whether the breaker was made afresh (deleted, or expired, and used again) at the
    generation it had: generations restart with each incarnation, so ``delete`` and a trip
    within one refresh leave ``open``, generation 1, as before. Its opening time or a
    lifetime counter that went down tells it apart."""
    return (
        new.opened_at != old.opened_at
        or new.trips < old.trips
        or new.successes + new.failures < old.successes + old.failures
        or new.deferrals < old.deferrals
        or new.rejections < old.rejections
    )


#: States whose beginning the store records (``opened_at``): their time in state is exact.
_OPENED = (State.OPEN, State.FORCED_OPEN)


class Watch:
    """Follows a store's breakers across refreshes: rates, time in state, recent changes.

    A change is seen as a new generation (every transition increments it), so several
    transitions between two refreshes show as one change that says how many there were.
    """

    def __init__(self, clock: Clock, *, history: int = HISTORY) -> None:
        self.clock = clock
        self.started = clock.time()
        self.changes: deque[Change] = deque(maxlen=history)
        self._seen: dict[tuple[str, str | None], _Seen] = {}
        self._refreshes = 0
        self.unreached: tuple[str, ...] = ()
        """The servers the last refresh could not read (``Listing.unreached``): the
        breakers stored there that are missing from it keep their last view, and have
        not left the store."""
        self.unreadable: tuple[UnreadableBreaker, ...] = ()
        """The breakers the last refresh found but could not read (``Listing.unreadable``):
        shown as such, and not said to have left the store."""

    def observe(self, rows: Sequence[BreakerStatus]) -> list[WatchRow]:
        """Take one refresh's rows; return them with rates and state ages."""
        mono, wall = self.clock.monotonic(), self.clock.time()
        first = self._refreshes == 0
        self._refreshes += 1
        seen_now: dict[tuple[str, str | None], _Seen] = {}
        out = []
        was_unreadable = {(found.name, found.key) for found in self.unreadable}  # (at the last refresh)
        for row in rows:
            new = row.snapshot
            ident = (new.name, new.key)
            seen = self._seen.get(ident)
            since: float | None
            rates = None
            if seen is None:
                since = new.opened_at if new.state in _OPENED else (None if first else wall)
                if not first:
                    # (one the last refresh found unreadable was there all along: a call repaired it)
                    reason = "readable again (repaired)" if ident in was_unreadable else "new breaker"
                    self.changes.append(Change(wall, new.label, None, new.state, reason))
            else:
                old = seen.snapshot
                elapsed = mono - seen.at
                if elapsed > 0:
                    rates = Rates(
                        calls=_per_second(new.successes + new.failures, old.successes + old.failures, elapsed),
                        deferrals=_per_second(new.deferrals, old.deferrals, elapsed),
                        rejections=_per_second(new.rejections, old.rejections, elapsed),
                    )
                since = seen.since
                if new.generation != old.generation or new.state is not old.state or _remade(old, new):
                    self.changes.append(Change(wall, new.label, old.state, new.state, _reason(old, new)))
                    since = new.opened_at if new.state in _OPENED and new.opened_at else wall
            seen_now[ident] = _Seen(new, mono, since, row)
            out.append(WatchRow(row, rates, since))
        # A Redis Cluster with a primary down lists the others' breakers: one missing may be
        # stored there, and keeps its last view (no rates) rather than leave the store.
        self.unreached = rows.unreached if isinstance(rows, Listing) else ()
        stranded = rows.stranded if isinstance(rows, Listing) else None
        self.unreadable = rows.unreadable if isinstance(rows, Listing) else ()
        unreadable = {(found.name, found.key): found for found in self.unreadable}
        kept = False
        for ident, gone in self._seen.items():
            if ident in seen_now:
                continue
            if ident in unreadable:  # (still there, left as it is: its line says what is wrong)
                self.changes.append(Change(wall, gone.snapshot.label, gone.snapshot.state, None, "unreadable"))
            elif self.unreached and (stranded is None or stranded(*ident)):
                seen_now[ident] = gone
                out.append(WatchRow(gone.status, None, gone.since))
                kept = True
            else:
                self.changes.append(Change(wall, gone.snapshot.label, gone.snapshot.state, None, "left the store"))
        if kept:
            out.sort(key=lambda row: (row.status.snapshot.name, row.status.snapshot.key or ""))
        self._seen = seen_now
        return out


def _in_state(row: WatchRow, now: float, started: float) -> str:
    if row.since is None:  # in this state since before the watch started: at least that long
        watched = now - started
        return f">= {duration(watched)}" if watched >= 0.05 else "-"
    return duration(now - row.since)


def _rate_cell(value: float | None, *, alert: bool = True) -> Cell:
    """A rate; deferrals and rejections stand out while they happen (calls are normal)."""
    if value is None:
        return "-", DIM
    return f"{value:.1f}", ALERT if alert and value > 0 else None


def _change_line(change: Change, *, width: int, color: bool) -> str:
    def state(value: State | None, absent: str) -> str:
        if value is None:
            return absent
        return click.style(value.value, **STATE_STYLES[value]) if color else value.value

    moved = f"{state(change.source, '(new)')} -> {state(change.target, '(gone)')}"
    return f"  {clock_time(change.at)}  {pad(shown_label(change.label), width)}  {moved}  ({change.reason})"


def watch_frame(
    rows: Sequence[WatchRow],
    watch: Watch,
    *,
    store: str,
    interval: float,
    color: bool = False,
    error: str | None = None,
    note: str | None = None,
) -> str:
    """One screen of ``watch``: a title, the summary, the table, ``note`` under it (the
    line ``status`` prints there: deferred tasks PARKED cannot show), recent changes."""
    now = watch.clock.time()
    title = f"celery breaker watch  {store}  {clock_time(now)}  every {interval:g} s  (Ctrl-C to quit)"
    lines = [click.style(title, bold=True) if color else title]
    if error is not None:
        warning = f"store unreachable at {clock_time(now)}: {MaskedText(error)}; showing the last view, retrying"
        lines.append(click.style(warning, fg="red", bold=True) if color else warning)
    elif watch.unreached:
        warning = f"part of the store unreachable at {clock_time(now)}: {unreached_words(watch.unreached, kept=True)}"
        lines.append(click.style(warning, fg="red", bold=True) if color else warning)
    unreadable = watch.unreadable
    lines += [summary([row.status.snapshot for row in rows], color=color, unreadable=len(unreadable)), ""]
    keyed = any(row.status.snapshot.key is not None for row in rows) or any(f.key is not None for f in unreadable)
    columns = [Column("NAME"), *([Column("KEY")] if keyed else []), Column("STATE"), Column("FOR", True),
               Column("FAIL%", True), Column("CALLS", True), Column("OPEN UNTIL"), Column("TRIPS", True),
               Column("CALLS/S", True), Column("DEFER/S", True), Column("REJ/S", True),
               Column("DEFERRED", True), Column("PARKED", True), Column("RELEASE")]  # fmt: skip
    table = [((found.name, found.key or ""), unreadable_cells(found, columns, keyed=keyed)) for found in unreadable]
    for row in rows:
        snapshot, rates = row.status.snapshot, row.rates
        cells: list[Cell] = [(visible(snapshot.name), None)]
        if keyed:
            cells.append((visible(snapshot.key) if snapshot.key is not None else "-", None))
        parked = row.status.parked
        cells += [
            state_cell(snapshot.state),
            (_in_state(row, now, watch.started), None),
            (failure_rate_text(snapshot), None),
            count_cell(snapshot.window_calls),
            (open_until_text(snapshot), None),
            count_cell(snapshot.trips),
            _rate_cell(rates.calls if rates else None, alert=False),
            _rate_cell(rates.deferrals if rates else None),
            _rate_cell(rates.rejections if rates else None),
            count_cell(snapshot.deferrals),
            (str(parked), ALERT if parked else None),
            (release_text(row.status.release), None if row.status.release is not None else DIM),
        ]
        table.append(((snapshot.name, snapshot.key or ""), cells))
    if unreadable:  # (in among the rows, which come sorted)
        table.sort(key=lambda item: item[0])
    shown_rows = [cells for _, cells in table]
    lines += render_table(columns, shown_rows, color=color) if shown_rows else ["(no breakers yet)"]
    lines += [f"Unreadable: {unreadable_text(found)}" for found in unreadable]
    if note is not None:
        lines.append(note)
    lines.append("")
    heading = "Recent changes (newest last)" if watch.changes else f"No changes since {clock_time(watch.started)}"
    lines.append(click.style(heading, bold=True) if color else heading)
    width = max((text_width(shown_label(change.label)) for change in watch.changes), default=0)
    lines += [_change_line(change, width=width, color=color) for change in watch.changes]
    return "\n".join(lines)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def fit(frame: str, columns: int, lines: int) -> str:
    """``frame`` cut to a terminal of ``columns`` x ``lines``, so redrawing in place never
    scrolls: long lines are cut (escape sequences kept, colour reset), extra lines dropped
    with a note saying how many."""
    out = [_cut(line, columns) for line in frame.split("\n")]
    if len(out) > lines:
        hidden = len(out) - (lines - 1)
        out = [*out[: lines - 1], f"... {hidden} more lines: enlarge the terminal or give a PATTERN"]
    return "\n".join(out)


def _cut(line: str, columns: int) -> str:
    if text_width(_ANSI.sub("", line)) <= columns:
        return line
    kept, visible, at = [], 0, 0
    while at < len(line):
        escape = _ANSI.match(line, at)
        if escape:
            kept.append(escape.group())
            at = escape.end()
            continue
        width = char_width(line[at])
        if visible + width > columns - 1:
            break
        kept.append(line[at])
        visible += width
        at += 1
    return "".join(kept) + ("\x1b[0m" if "\x1b[" in line else "") + ">"


def run_watch(
    fetch: Callable[[], Sequence[BreakerStatus]],
    draw: Callable[[str], None],
    watch: Watch,
    *,
    store: str,
    interval: float,
    iterations: int | None,
    sleep: Callable[[float], None],
    errors: tuple[type[Exception], ...],
    color: bool = False,
    note: Callable[[], str | None] | None = None,
) -> int:
    """Fetch, observe and draw every ``interval`` seconds, ``iterations`` times (``None``:
    until interrupted); return the number of frames drawn. A fetch that took ``t``
    seconds is followed by at least ``PAUSE_PER_READ * t`` (the title says the pace).
    ``note()``, read for each frame, is drawn under the table (``watch_frame``).

    The first fetch's errors propagate; a later one that raises one of ``errors`` keeps
    the last view on screen with a warning and tries again at the next refresh.
    """
    clock = watch.clock
    started = clock.monotonic()
    rows = watch.observe(fetch())
    took = clock.monotonic() - started
    error: str | None = None
    drawn = 0
    deadline = started
    while True:
        paced = PAUSE_PER_READ * took
        every = interval if paced <= interval else float(round(paced))  # (the title's figure)
        below = note() if note is not None else None
        draw(watch_frame(rows, watch, store=store, interval=every, color=color, error=error, note=below))
        drawn += 1
        if iterations is not None and drawn >= iterations:
            return drawn
        # Refresh on a fixed beat; a slow fetch delays the next frame, never the one after;
        # a fetch that takes long is followed by a pause long enough (PAUSE_PER_READ).
        deadline = max(deadline + interval, clock.monotonic(), started + took + PAUSE_PER_READ * took)
        sleep(max(0.0, deadline - clock.monotonic()))
        started = clock.monotonic()
        try:
            fetched = fetch()
        except errors as exc:
            error = str(exc)
            continue
        finally:
            took = clock.monotonic() - started
        error = None
        rows = watch.observe(fetched)
