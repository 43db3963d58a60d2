"""The Redis store's Lua scripts: read once from ``storage/lua``, one ``Script`` each per client.

A breaker script is the shared prelude ``common.lua`` (load, validate, rules, save)
followed by its operation (``acquire.lua``, ``record.lua``, ...); the parking and history
scripts stand alone. redis-py's ``Script`` runs each by EVALSHA and loads it again after
a ``SCRIPT FLUSH`` or on a new server.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from redis.commands.core import Script

__all__ = ["BREAKER_SCRIPTS", "SOURCES", "Scripts"]

#: Scripts that operate on one breaker: ``common.lua`` + the operation.
BREAKER_SCRIPTS = ("acquire", "record", "operate", "snapshot")
#: Scripts that stand alone.
STANDALONE_SCRIPTS = ("park", "release", "purge", "history")


def _read(name: str) -> str:
    return resources.files("celery_breaker.storage").joinpath("lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _sources() -> dict[str, str]:
    common = _read("common")
    found = {name: common + "\n" + _read(name) for name in BREAKER_SCRIPTS}
    found.update((name, _read(name)) for name in STANDALONE_SCRIPTS)
    return found


#: Every script's full source, by name.
SOURCES = _sources()


class Scripts:
    """Every script, registered with one client (a new client after a fork gets its own)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._scripts = {name: Script(client, source) for name, source in SOURCES.items()}

    def __call__(self, name: str, keys: list[str], args: list[Any], client: Any = None) -> Any:
        """Run script ``name`` (on ``client``, e.g. a pipeline, else this one's client)."""
        return self._scripts[name](keys, args, client=client or self.client)
