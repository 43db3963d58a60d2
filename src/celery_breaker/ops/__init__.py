"""Operating breakers: the Python API for operators, remote control, and the ``celery breaker`` CLI.

``operate(app, "open", "crm")``, ``purge(app, "crm")`` and ``delete(app, "crm")`` act on an app's breakers in its
shared store (``operator``; ``actions`` is the one table of actions); ``control`` registers the
``celery inspect``/``celery control`` commands; ``cli`` is the ``celery breaker`` command,
drawn by ``console`` and ``watch``, with the option types it shares with ``web`` in
``options``. The names below load on first use: every ``celery`` command imports ``cli``,
through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .actions import ACTIONS, DELETE, Action
    from .operator import Deletion, Move, Purge, delete, operate, purge, shared_store

__all__ = ["ACTIONS", "DELETE", "Action", "Deletion", "Move", "Purge", "delete", "operate", "purge", "shared_store"]


if not TYPE_CHECKING:  # (a module __getattr__ a type checker sees makes any name pass, as Any)

    def __getattr__(name: str) -> Any:
        if name not in __all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        home = ".actions" if name in ("ACTIONS", "DELETE", "Action") else ".operator"
        value = getattr(importlib.import_module(home, __name__), name)
        globals()[name] = value
        return value
