"""What the ``celery breaker`` CLI prints: the status table and the pieces it shares with the watch view.

Everything here is a pure function of rows and clock readings (colour is click's ANSI
styling, off unless asked for), so tests check the text without a terminal. The watch
view, which follows breakers across refreshes, is in ``celery_breaker.watch``.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from ..core import BreakerSnapshot, State
from ..labels import visible

if TYPE_CHECKING:
    from ..monitoring.status import BreakerStatus
    from ..storage import ReleasePace

__all__ = [
    "ALERT",
    "BOLD",
    "DIM",
    "STATE_STYLES",
    "Cell",
    "Column",
    "clock_time",
    "count_cell",
    "duration",
    "failure_rate_text",
    "open_until_text",
    "per_second",
    "release_text",
    "render_table",
    "state_cell",
    "status_text",
    "summary",
]

#: How each state looks in colour; the order is the summary's (the worst first).
STATE_STYLES: dict[State, dict[str, Any]] = {
    State.FORCED_OPEN: {"fg": "magenta", "bold": True},
    State.OPEN: {"fg": "red", "bold": True},
    State.HALF_OPEN: {"fg": "yellow", "bold": True},
    State.CLOSED: {"fg": "green"},
    State.DISABLED: {"fg": "blue"},
}
BOLD = {"bold": True}
DIM = {"dim": True}
ALERT = {"fg": "yellow"}

Cell = tuple[str, dict[str, Any] | None]
"""One table cell: its text and the ``click.style`` options it is shown with."""


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: its title, and whether its cells are numbers (aligned right)."""

    title: str
    numeric: bool = False


def char_width(char: str) -> int:
    """Columns a terminal gives ``char``: 2 for East Asian wide and fullwidth characters
    (CJK, most emoji), 0 for marks that sit on the character before (nonspacing and
    enclosing marks, whatever their combining class: Thai's and Devanagari's vowel signs
    have none), Hangul's medial and final jamo and emoji skin tones, else 1."""
    if (
        unicodedata.category(char) in _ON_THE_ONE_BEFORE
        or "\u1160" <= char <= "\u11ff"
        or ("\U0001f3fb" <= char <= "\U0001f3ff")
    ):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


#: General categories of marks that take no column of their own.
_ON_THE_ONE_BEFORE = ("Mn", "Me")


def text_width(text: str) -> int:
    """Columns ``text`` takes on a terminal (``char_width``): a breaker named in Chinese or
    with an emoji key pushed the rest of its row out of line with ``len``."""
    return len(text) if text.isascii() else sum(map(char_width, text))


def pad(text: str, width: int) -> str:
    """``text`` padded with spaces to ``width`` terminal columns (``ljust`` counts characters)."""
    return text + " " * (width - text_width(text))


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], *, color: bool) -> list[str]:
    """Lines of an aligned table; widths are measured on the text, in terminal columns,
    before any styling."""
    widths = [
        max([text_width(column.title), *(text_width(row[i][0]) for row in rows)]) for i, column in enumerate(columns)
    ]

    def line(cells: Sequence[Cell]) -> str:
        parts = []
        for (text, style), column, width in zip(cells, columns, widths, strict=True):
            shown = click.style(text, **style) if color and style else text
            padding = " " * (width - text_width(text))
            parts.append(padding + shown if column.numeric else shown + padding)
        return "  ".join(parts).rstrip()

    header = [(column.title, BOLD) for column in columns]
    return [line(header), *(line(row) for row in rows)]


# -- how values read --------------------------------------------------------------


def duration(seconds: float) -> str:
    """``4.2 s``, ``12m05s``, ``3h07m``, ``2d04h``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def clock_time(epoch: float, now: float | None = None) -> str:
    """``14:03:05`` (local time), with the date when it is not today's; ``-`` for a time
    the platform cannot show (a policy's open period of 1e300 s, say)."""
    try:
        moment = time.localtime(epoch)
    except (OverflowError, ValueError, OSError):
        return "-"
    if now is not None and time.localtime(now)[:3] != moment[:3]:
        return time.strftime("%Y-%m-%d %H:%M:%S", moment)
    return time.strftime("%H:%M:%S", moment)


def open_until_text(snapshot: BreakerSnapshot) -> str:
    """When an open breaker may let a probe through, relative to the snapshot."""
    state = snapshot.state
    if state is State.FORCED_OPEN:
        return "until closed"
    if state is State.OPEN:
        wait = snapshot.retry_after
        return "probe due" if not wait else f"in {duration(wait)}"
    if state is State.HALF_OPEN:
        return "probing"
    return "-"


def failure_rate_text(snapshot: BreakerSnapshot) -> str:
    """``25%``, or ``-`` while the window has too few calls to judge."""
    rate = snapshot.failure_rate
    return "-" if rate is None else f"{rate:.0%}"


def per_second(rate: float) -> str:
    """``4.5/s``, ``146/s``: a rate to the precision a person reads it."""
    return f"{rate:.1f}/s" if round(rate, 1) < 10 else f"{rate:.0f}/s"


def release_text(release: ReleasePace | None) -> str:
    """The adaptive release's pace: ``40/s``; ``held 1.2 s, then 28/s`` while it waits out a
    refusal's Retry-After (nothing goes meanwhile); ``(limit 40/s)`` after it once the
    downstream refused a rate; ``(8% usually bad)`` once the pace learnt that share of
    failed or slow calls as the downstream's usual (none shown for 0); ``-`` for none."""
    if release is None:
        return "-"
    text = per_second(release.rate)
    if release.held_for is not None:
        text = f"held {duration(release.held_for)}, then {text}"
    notes = []
    if release.limit is not None:
        notes.append(f"limit {per_second(release.limit)}")
    usual = release.usual_bad_share
    if usual is not None and usual > 0:
        notes.append(f"{usual:.0%} usually bad" if usual >= 0.01 else "<1% usually bad")
    return f"{text} ({'; '.join(notes)})" if notes else text


def state_cell(state: State) -> Cell:
    """A state as a table cell, in its colour."""
    return state.value, STATE_STYLES[state]


def count_cell(value: int) -> Cell:
    """A count as an unstyled table cell."""
    return str(value), None


def summary(snapshots: Sequence[BreakerSnapshot], *, color: bool) -> str:
    """``3 breakers: 1 open, 2 closed``, the worst states first."""
    counts = dict.fromkeys(STATE_STYLES, 0)
    for snapshot in snapshots:
        counts[snapshot.state] += 1
    noun = "breaker" if len(snapshots) == 1 else "breakers"
    parts = []
    for state, count in counts.items():
        if count:
            text = f"{count} {state.value}"
            parts.append(click.style(text, **STATE_STYLES[state]) if color else text)
    return f"{len(snapshots)} {noun}" + (f": {', '.join(parts)}" if parts else "")


# -- status -----------------------------------------------------------------------


def status_text(rows: Sequence[BreakerStatus], *, now: float, wide: bool = False, color: bool = False) -> str:
    """The ``status`` table and its summary line (``now``: epoch seconds, for ``--wide``'s times)."""
    keyed = any(row.snapshot.key is not None for row in rows)
    columns = [Column("NAME"), *([Column("KEY")] if keyed else []), Column("STATE"), Column("FAIL%", True),
               Column("CALLS", True), Column("FAILS", True), Column("OPEN UNTIL")]  # fmt: skip
    if wide:
        columns.append(Column("OPEN UNTIL (TIME)"))
    columns += [Column("TRIPS", True), Column("DEFERRED", True), Column("PARKED", True)]
    if wide:
        columns += [Column("REJECTED", True), Column("CLAIMED", True), Column("STREAK", True), Column("GEN", True)]
    columns.append(Column("RELEASE"))  # (last: its text has spaces)
    table: list[list[Cell]] = []
    for row in rows:
        snapshot = row.snapshot
        cells: list[Cell] = [(visible(snapshot.name), None)]
        if keyed:
            cells.append((visible(snapshot.key) if snapshot.key is not None else "-", None))
        cells += [
            state_cell(snapshot.state),
            (failure_rate_text(snapshot), None),
            count_cell(snapshot.window_calls),
            count_cell(snapshot.window_failures),
            (open_until_text(snapshot), None),
        ]
        if wide:
            until = snapshot.open_until if snapshot.state is State.OPEN else None
            cells.append((clock_time(until, now) if until is not None else "-", None))
        cells += [
            count_cell(snapshot.trips),
            count_cell(snapshot.deferrals),
            (str(row.parked), ALERT if row.parked else None),
        ]
        if wide:
            cells += [count_cell(snapshot.rejections), count_cell(row.claimed), count_cell(snapshot.streak),
                      count_cell(snapshot.generation)]  # fmt: skip
        cells.append((release_text(row.release), None))
        table.append(cells)
    lines = render_table(columns, table, color=color)
    return "\n".join([*lines, "", summary([row.snapshot for row in rows], color=color)])
