"""Configuration problems collected in one pass and raised together: one start of a worker shows them all."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..errors import ConfigurationError

__all__ = ["Problems"]

T = TypeVar("T")


class Problems:
    """Collects ``ConfigurationError`` messages instead of stopping at the first.

    ``check(parse, fallback)`` runs ``parse``: its value, or ``fallback`` once its problem
    is noted, so the next checks still run. ``raise_any()`` raises one ``ConfigurationError``
    listing every problem (one alone is raised as it was written)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.found: list[str] = []

    def add(self, text: str) -> None:
        """Note one problem (once)."""
        if text not in self.found:
            self.found.append(text)

    def check(self, parse: Callable[[], T], fallback: T) -> T:
        """``parse()``, or ``fallback`` once the problems it raised are noted."""
        try:
            return parse()
        except ConfigurationError as exc:
            for text in exc.problems:
                self.add(text)
            return fallback

    def raise_any(self) -> None:
        """Raise one ``ConfigurationError`` for every problem noted (none: nothing)."""
        if not self.found:
            return
        if len(self.found) == 1:
            raise ConfigurationError(self.found[0])
        lines = "\n".join(f"  - {text}" for text in self.found)
        raise ConfigurationError(
            f"{len(self.found)} problems in celery-breaker's {self.what}:\n{lines}", problems=tuple(self.found)
        )
