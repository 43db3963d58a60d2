"""Click parameter types the ``celery breaker`` commands share (imported by the entry point: click only)."""

from __future__ import annotations

import math
from typing import Any

import click

__all__ = ["REFRESH_INTERVAL"]


class _Seconds(click.FloatRange):
    """Seconds in a finite range.

    click.FloatRange alone lets ``nan`` through (it compares false with any bound): a
    watch that never waits, reading the store in a busy loop; and ``inf`` passes a range
    without a maximum, then overflows the wait.
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        wanted = f"{value!r} is not a number of seconds from {self.min:g} to {self.max:g}"
        try:
            float(value)
        except (TypeError, ValueError):  # (click's own words: "'5s' is not a valid float range")
            self.fail(wanted, param, ctx)
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(wanted, param, ctx)
        return seconds


#: The ``--interval`` of ``watch`` and ``web``: an hour at most (no view waits longer usefully).
REFRESH_INTERVAL = _Seconds(min=0.1, max=3600.0)
