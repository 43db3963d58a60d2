"""What each setting, task option and policy field means, beside the code (docs/configuration.md is made from it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DOC_KEY", "Doc", "doc"]

#: The dataclass field metadata key that holds a field's ``Doc``.
DOC_KEY = "doc"


@dataclass(frozen=True, slots=True, kw_only=True)
class Doc:
    """One row of the configuration reference. Markdown; links are relative to ``docs/``.

    The default itself is read from the code (``SETTINGS``, the dataclass field, the
    class attribute); ``default`` only says what it stands for when the value does not.
    """

    accepts: str
    """The type, and what validation allows."""
    meaning: str
    """What it does."""
    default: str = ""
    """What the default value stands for, e.g. ``None``: "the task's name"."""


def doc(*, accepts: str, meaning: str, default: str = "") -> Mapping[str, Doc]:
    """Field metadata carrying a ``Doc``: ``field(default=..., metadata=doc(...))``."""
    return {DOC_KEY: Doc(accepts=accepts, meaning=meaning, default=default)}
