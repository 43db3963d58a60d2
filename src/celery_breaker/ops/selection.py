"""Which breakers a pattern names, as ``celery breaker status`` (and ``watch``, and ``celery
inspect breakers``) select them: ``crm*`` (names), ``crm[tenant-*]`` (a name and its keys),
``crm[tenant-7]`` (one breaker, looked up alone rather than listing the store)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..labels import split_label, visible
from ..monitoring.status import BreakerStatus, collect_metrics
from ..names import kept_form, kept_key
from ..storage import Listing, UnreadableBreaker

if TYPE_CHECKING:
    from ..storage import Selected, Store

__all__ = [
    "breakers_matching",
    "breakers_selected",
    "is_glob",
    "looked_up",
    "matching",
    "selected",
    "unreached_text",
    "unreached_words",
    "unreadable_of",
]

#: What makes a pattern a glob (``fnmatch``'s marks).
_GLOB_MARKS = "*?["


def is_glob(text: str) -> bool:
    """Whether ``fnmatch`` reads ``text`` as a glob rather than as itself."""
    return any(mark in text for mark in _GLOB_MARKS)


#: A pattern split once: its name glob, its key glob (``None``: any key) and, for a key
#: that is not a glob, the key as a task typing it would have made its breaker keep it
#: (too long or not UTF-8: ``kept_form``).
_Parsed = tuple[str, str | None, str | None]


def _parsed(patterns: Sequence[str]) -> list[_Parsed]:
    return [
        (name_glob, key_glob, None if key_glob is None or is_glob(key_glob) else kept_form(key_glob))
        for name_glob, key_glob in map(split_label, patterns)
    ]


def _matches(name: str, key: str | None, pattern: _Parsed) -> bool:
    name_glob, key_glob, kept = pattern
    if not any(fnmatch.fnmatchcase(text, name_glob) for text in (name, visible(name))):
        return False
    if key_glob is None:
        return True
    # (``==``: a key holding brackets, ``crm[tenant[1]]``, which fnmatch reads as a class)
    return key is not None and (
        key == kept or any(text == key_glob or fnmatch.fnmatchcase(text, key_glob) for text in (key, visible(key)))
    )


def matching(rows: Sequence[BreakerStatus], patterns: Sequence[str]) -> list[BreakerStatus]:
    """Rows matching a glob (every row without globs): ``crm*`` matches names,
    ``crm[tenant-*]`` a name and a key (so brackets are not a character class there),
    each as it is or as ``status`` shows it (``crm[tenant\\n*]``, ``crm[C:\\\\*]``).
    A partial listing's rows stay one (``Listing.unreached``), and the unreadable
    breakers it names are picked alike (``Listing.unreadable``)."""
    listing = rows if isinstance(rows, Listing) else Listing[BreakerStatus]()
    if not patterns:
        return listing.like(rows)
    parsed = _parsed(patterns)
    picked = (row for row in rows if any(_matches(row.snapshot.name, row.snapshot.key, pattern) for pattern in parsed))
    unreadable = [found for found in listing.unreadable if any(_matches(found.name, found.key, p) for p in parsed)]
    return listing.like(picked, unreadable)


def selected(patterns: Sequence[str]) -> Selected | None:
    """``matching`` as a test of a breaker's name and key, for a store to apply before it
    reads any breaker (``Store.snapshots``'s ``where``); ``None`` for no patterns (every one)."""
    if not patterns:
        return None
    parsed = _parsed(patterns)
    return lambda name, key: any(_matches(name, key, pattern) for pattern in parsed)


def looked_up(store: Store, patterns: Sequence[str]) -> list[BreakerStatus] | None:
    """The rows of ``patterns`` when each names one breaker exactly (``crm[tenant-7]``: no
    glob, no escape) and is found, each looked up alone (``collect_metrics(only=...)``);
    else ``None``, and the caller lists the store: with 40,000 per-key breakers in Redis,
    ``status 'crm[tenant-7]'`` took 6 s listing them all."""
    wanted: list[tuple[str, str | None]] = []
    for pattern in patterns:
        name, key = split_label(pattern)
        if key is None or any(is_glob(text) or "]" in text or "\\" in text for text in (name, key)) or key == '""':
            return None
        wanted.append((name, kept_key(name, key)))  # (as its breaker keeps it: a key too long, or not UTF-8)
    if not wanted:
        return None
    rows = collect_metrics(store, only=wanted)
    found = {(row.snapshot.name, row.snapshot.key) for row in rows}
    found.update((unread.name, unread.key) for unread in unreadable_of(rows))
    return rows if found >= set(wanted) else None


def breakers_selected(store: Store, patterns: Sequence[str]) -> list[BreakerStatus]:
    """The rows of the breakers ``patterns`` match (every breaker without any), reading
    only those: looked up one by one when each pattern names one breaker exactly, else
    picked by name and key before any is read (``inspect breakers 'partner*'`` read all
    10,000 breakers of a store for its one row, past the command's 1 s timeout). Either
    way the rows are ``matching``'s already: ``selected`` is its test."""
    found = looked_up(store, patterns)
    return collect_metrics(store, where=selected(patterns)) if found is None else found


def breakers_matching(store: Store, patterns: Sequence[str]) -> tuple[list[BreakerStatus], list[BreakerStatus]]:
    """The rows of the breakers ``patterns`` match (every breaker without any: ``status``'s
    selection), and the rows they were picked from: those looked up one by one when each
    pattern names one breaker exactly, else every breaker in the store."""
    found = looked_up(store, patterns)
    everything = collect_metrics(store) if found is None else found
    return matching(everything, patterns), everything


def unreached_of(rows: Sequence[object]) -> Sequence[str]:
    """The servers a listing left out (``Listing.unreached``: a Redis Cluster's primaries
    that did not answer); none for a whole listing or a plain list."""
    return rows.unreached if isinstance(rows, Listing) else ()


def unreadable_of(rows: Sequence[object]) -> Sequence[UnreadableBreaker]:
    """The breakers a listing found unreadable (``Listing.unreadable``); none for a plain list."""
    return rows.unreadable if isinstance(rows, Listing) else ()


def unreached_text(rows: Sequence[object]) -> str | None:
    """What a listing left out (``unreached_of``), as a warning's words; ``None`` for a
    whole listing."""
    unreached = unreached_of(rows)
    return unreached_words(unreached) if unreached else None


def unreached_words(unreached: Sequence[str], *, kept: bool = False) -> str:
    """Says that the breakers stored on ``unreached`` are not shown (``kept``: they keep
    their last view), and why."""
    them = "it does" if len(unreached) == 1 else "they do"
    shown = "keep their last view" if kept else "are not shown"
    return (
        f"the breakers stored on {', '.join(unreached)} {shown}: {them} not answer (a Redis Cluster primary "
        "down; the other primaries' breakers are read)"
    )
