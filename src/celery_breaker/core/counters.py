"""Lock-free counters: ``itertools.count`` advanced with ``next()`` (one atomic C call) and read without consuming."""

from __future__ import annotations

import itertools

__all__ = ["tally"]


def tally(counter: itertools.count[int]) -> int:
    """How many times ``next`` was called on ``counter`` (read without consuming it)."""
    return int(repr(counter)[6:-1])  # repr is "count(N)"
