"""The Redis store's Lua scripts: read once from ``storage/lua``, one ``Script`` each per client.

Every script starts with ``checks.lua`` (the bounds every value read from Redis is held
to). A breaker script goes on with the shared prelude ``common.lua`` (load, validate,
rules, save) and its operation (``acquire.lua``, ``record.lua``, ...); a parking script
with ``parked.lua`` (its keys, their types repaired) and its own (``release.lua`` after
``pacing.lua``, the adaptive release's law); ``pace.lua`` reads the pace as ``release.lua``
does, after ``pace_prelude.lua`` (its keys and clock) and ``pacing.lua``; ``history.lua``,
``forget.lua``, ``lookout.lua`` and ``retype.lua`` follow ``checks.lua`` alone. redis-py's ``Script`` runs
each by EVALSHA and loads it again after a ``SCRIPT FLUSH`` or on a new server; on a
Cluster a script the node lacks is sent with EVAL, to that node alone (``Scripts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError

__all__ = ["BREAKER_SCRIPTS", "PARKING_SCRIPTS", "SOURCES", "Scripts"]

#: Scripts that operate on one breaker: ``common.lua`` + the operation.
BREAKER_SCRIPTS = ("acquire", "record", "operate", "snapshot")
#: Scripts that operate on one breaker's parked entries: ``parked.lua`` + the script.
PARKING_SCRIPTS = ("park", "release", "done", "purge", "tidy")
#: Scripts that stand alone (after ``checks.lua``).
STANDALONE_SCRIPTS = ("forget", "history", "lookout", "retype")


def _read(name: str) -> str:
    return resources.files("celery_breaker.storage").joinpath("lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _sources() -> dict[str, str]:
    checks, common, parked = _read("checks"), _read("common"), _read("parked")
    found = {name: "\n".join((checks, common, _read(name))) for name in BREAKER_SCRIPTS}
    found.update((name, "\n".join((checks, parked, _read(name)))) for name in PARKING_SCRIPTS)
    pacing = _read("pacing")
    found["release"] = "\n".join((checks, parked, pacing, _read("release")))  # the adaptive law first
    found["pace"] = "\n".join((checks, _read("pace_prelude"), pacing, _read("pace")))  # (read_pace, as release reads)
    found.update((name, "\n".join((checks, _read(name)))) for name in STANDALONE_SCRIPTS)
    return found


#: Every script's full source, by name.
SOURCES = _sources()


class Scripts:
    """Every script, registered with one client (a new client after a fork gets its own)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._scripts = {name: Script(client, source) for name, source in SOURCES.items()}

    def __call__(self, name: str, keys: Sequence[str | bytes], args: Sequence[Any], client: Any = None) -> Any:
        """Run script ``name`` (on ``client``, e.g. a pipeline, else this one's client).

        On a Cluster, a node that lacks the script (restarted, failed over, SCRIPT FLUSH)
        is sent it with EVAL, routed by the keys like the EVALSHA: redis-py's ``Script``
        loads it with SCRIPT LOAD, which a Cluster client sends to every primary, so one
        primary down failed the calls of breakers on the others (they fell back, and a
        tripped breaker's calls passed in other processes)."""
        script = self._scripts[name]
        target = client or self.client
        if isinstance(target, RedisCluster) and not isinstance(target, ClusterPipeline):
            try:
                return target.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return target.eval(SOURCES[name], len(keys), *keys, *args)
        return script(keys, args, client=target)
