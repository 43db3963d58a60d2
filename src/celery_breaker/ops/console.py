"""What the ``celery breaker`` CLI prints: the status table and the pieces it shares with the watch view.

Everything here is a pure function of rows and clock readings (colour is click's ANSI
styling, off unless asked for), so tests check the text without a terminal. The watch
view, which follows breakers across refreshes, is in ``celery_breaker.watch``.
"""

from __future__ import annotations

import shlex
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from ..core import BreakerSnapshot, State
from ..labels import visible
from ..monitoring.status import BreakerStatus, new_breaker
from ..storage import Listing

if TYPE_CHECKING:
    from ..storage import ReleasePace, UnreadableBreaker

__all__ = [
    "ALERT",
    "BOLD",
    "DIM",
    "STATE_STYLES",
    "UNREADABLE",
    "UNREADABLE_STYLE",
    "Cell",
    "Column",
    "breaker_command",
    "clock_time",
    "count_cell",
    "duration",
    "failure_rate_text",
    "listed_rows",
    "open_until_text",
    "per_second",
    "release_text",
    "render_table",
    "repair_command",
    "state_cell",
    "status_text",
    "summary",
    "unreadable_cells",
    "unreadable_row",
    "unreadable_text",
]

#: How each state looks in colour; the order is the summary's (the worst first).
STATE_STYLES: dict[State, dict[str, Any]] = {
    State.FORCED_OPEN: {"fg": "magenta", "bold": True},
    State.OPEN: {"fg": "red", "bold": True},
    State.HALF_OPEN: {"fg": "yellow", "bold": True},
    State.CLOSED: {"fg": "green"},
    State.DISABLED: {"fg": "blue"},
}
#: What the STATE column says of a breaker whose stored state a listing cannot read, and its colour.
UNREADABLE = "unreadable"
UNREADABLE_STYLE: dict[str, Any] = {"fg": "red", "bold": True, "underline": True}
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


def summary(snapshots: Sequence[BreakerSnapshot], *, color: bool, unreadable: int = 0) -> str:
    """``3 breakers: 1 unreadable, 1 open, 1 closed``, the worst states first."""
    counts = dict.fromkeys(STATE_STYLES, 0)
    for snapshot in snapshots:
        counts[snapshot.state] += 1
    total = len(snapshots) + unreadable
    noun = "breaker" if total == 1 else "breakers"
    parts = []
    if unreadable:
        parts.append(
            click.style(f"{unreadable} {UNREADABLE}", **UNREADABLE_STYLE) if color else f"{unreadable} {UNREADABLE}"
        )
    for state, count in counts.items():
        if count:
            text = f"{count} {state.value}"
            parts.append(click.style(text, **STATE_STYLES[state]) if color else text)
    return f"{total} {noun}" + (f": {', '.join(parts)}" if parts else "")


# -- unreadable breakers ------------------------------------------------------------

#: The operator's move that repairs an unreadable breaker, by the state its hash still
#: names: an operator's state is kept (mended around), anything else starts afresh.
_REPAIRS = {State.FORCED_OPEN: "open", State.DISABLED: "disable"}


def breaker_command(action: str, name: str, key: str | None) -> str:
    """``celery breaker ACTION NAME [--key KEY]`` as a shell reads it back: the name quoted
    as typed (it may hold spaces, quotes, glob characters), the key as ``status`` shows
    it; a name that starts with ``-`` after ``--``, the key given before it (else the
    command took the name for an option: "No such option '-x'")."""
    words = f"celery breaker {action}"
    keyed = "" if key is None else f" --key {shlex.quote(visible(key))}"
    if name.startswith("-"):
        return f"{words}{keyed} -- {shlex.quote(name)}"
    return f"{words} {shlex.quote(name)}{keyed}"


def repair_command(found: UnreadableBreaker) -> str:
    """The ``celery breaker`` command that repairs ``found`` now, quoted as a shell reads
    it back (a name may hold spaces, quotes, glob characters): ``open`` or ``disable`` for
    a breaker whose hash still names that operator's state (kept, the rest mended), else
    ``reset`` (a fresh closed breaker)."""
    action = _REPAIRS.get(found.stored_state, "reset") if found.stored_state is not None else "reset"
    return breaker_command(action, found.name, found.key)


def unreadable_text(found: UnreadableBreaker) -> str:
    """One line naming an unreadable breaker, what is wrong and the fix: ``crm[t7]:
    unreadable state in the store (unreadable gen='nan' in {breaker:crm:t7}:s); left as
    it is: the next call through it resets it, or now: celery breaker reset crm --key t7``."""
    held = found.stored_state
    kept = f"; its hash still names {held.value}, which the repair keeps" if held in _REPAIRS else ""
    then = "mends it" if held in _REPAIRS else "resets it"
    waiting = found.parked + found.claimed
    parked = f"; {waiting} task{'' if waiting == 1 else 's'} parked behind it" if waiting else ""
    return (
        f"{visible(found.label)}: unreadable state in the store ({visible(found.problem)}{kept}){parked}; left as it "
        f"is: the next call through it {then}, or now: {repair_command(found)}"
    )


def unreadable_row(found: UnreadableBreaker) -> dict[str, Any]:
    """An unreadable breaker as a ``status --json`` row: every other row's keys
    (``BreakerStatus.as_dict``'s), none of them read (``None``), the state ``unreadable``
    and ``unreadable``: what is wrong (``problem``), the state its hash still names
    (``stored_state``, or ``None``) and the command that repairs it now (``repair``)."""
    row: dict[str, Any] = dict.fromkeys(BreakerStatus(new_breaker(found.name, found.key)).as_dict())
    row.update(
        name=found.name, key=found.key, state=UNREADABLE, parked=found.parked, claimed=found.claimed,
        unreadable={
            "problem": found.problem,
            "stored_state": None if found.stored_state is None else found.stored_state.value,
            "repair": repair_command(found),
        },
    )  # fmt: skip
    return row


def listed_rows(rows: Sequence[BreakerStatus]) -> list[dict[str, Any]]:
    """A listing as ``status --json`` and ``inspect breakers`` give it: one JSON-ready row a
    breaker, by name and key, each with ``unreadable`` (``None`` for one read whole), an
    unreadable breaker a row of its own (``unreadable_row``)."""
    listed = [{**row.as_dict(), "unreadable": None} for row in rows]
    listed += [unreadable_row(found) for found in (rows.unreadable if isinstance(rows, Listing) else ())]
    listed.sort(key=lambda row: (row["name"], row["key"] or ""))
    return listed


def unreadable_cells(found: UnreadableBreaker, columns: Sequence[Column], *, keyed: bool) -> list[Cell]:
    """A table row of ``columns`` for an unreadable breaker: its name (and key, when
    ``keyed``), ``unreadable``, its parked and claimed tasks (its parking is read apart),
    and ``?`` for the rest (nothing of its state could be read as a whole)."""
    cells: list[Cell] = [(visible(found.name), None)]
    if keyed:
        cells.append((visible(found.key) if found.key is not None else "-", None))
    cells.append((UNREADABLE, UNREADABLE_STYLE))
    read: dict[str, Cell] = {"PARKED": (str(found.parked), ALERT if found.parked else None),
                             "CLAIMED": count_cell(found.claimed)}  # fmt: skip
    return cells + [read.get(column.title, ("?", None)) for column in columns[len(cells) :]]


# -- status -----------------------------------------------------------------------


def status_text(
    rows: Sequence[BreakerStatus],
    *,
    now: float,
    wide: bool = False,
    color: bool = False,
    unreadable: Sequence[UnreadableBreaker] = (),
) -> str:
    """The ``status`` table and its summary line (``now``: epoch seconds, for ``--wide``'s
    times); ``unreadable``: breakers the listing could not read, each a row in order and a
    line under the summary saying what is wrong and the fix."""
    keyed = any(row.snapshot.key is not None for row in rows) or any(found.key is not None for found in unreadable)
    columns = [Column("NAME"), *([Column("KEY")] if keyed else []), Column("STATE"), Column("FAIL%", True),
               Column("CALLS", True), Column("FAILS", True), Column("OPEN UNTIL")]  # fmt: skip
    if wide:
        columns.append(Column("OPEN UNTIL (TIME)"))
    columns += [Column("TRIPS", True), Column("DEFERRED", True), Column("PARKED", True)]
    if wide:
        columns += [Column("REJECTED", True), Column("CLAIMED", True), Column("STREAK", True), Column("GEN", True)]
    columns.append(Column("RELEASE"))  # (last: its text has spaces)
    table = [((found.name, found.key or ""), unreadable_cells(found, columns, keyed=keyed)) for found in unreadable]
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
        table.append(((snapshot.name, snapshot.key or ""), cells))
    if unreadable:  # (in among the rows, which come sorted)
        table.sort(key=lambda item: item[0])
    lines = render_table(columns, [cells for _, cells in table], color=color)
    told = [f"Unreadable: {unreadable_text(found)}" for found in unreadable]
    return "\n".join(
        [*lines, "", summary([row.snapshot for row in rows], color=color, unreadable=len(unreadable)), *told]
    )
