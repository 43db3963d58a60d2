"""Health-check probes from settings and task options: a dotted path, a task name or a callable, made a ``HealthCheck``.

A string names a task of the app when one has that name; otherwise it is imported as
``package.module:function`` (or ``package.module.function``), which may find a task too
(one named otherwise than its path), or a ``HealthCheck`` (kept as it is, with its own
timeout); a task object may be given too. A task's body is
called in the process that checks (``task.run()``), without its breaker, its retries or
a result backend: a health check that had to travel through the broker and back could
wait behind the very backlog it is meant to release, and a worker blocking on another
task's result is what Celery forbids inside tasks (docs/decisions.md, decision 44).
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

from celery import Task

from ..breaker import CircuitBreaker
from ..core import BreakerPolicy
from ..core.dotted import find_by_path, split_path
from ..errors import ConfigurationError
from ..health import HealthCheck, ProbeFunction, shown_probe
from ..storage.masking import MaskedText
from ..storage.urls import scrub_secrets
from .registry import registry_for

__all__ = ["breaker_with_probe", "resolve_probe"]

ProbeSpec = str | ProbeFunction | HealthCheck


def resolve_probe(app: Any, probe: ProbeSpec, *, where: str, timeout: float) -> HealthCheck:
    """``probe`` (from ``where``: a setting or a task option) as a ``HealthCheck`` that
    waits at most ``timeout`` seconds, or a ``ConfigurationError`` naming ``where``, the
    value and the fix."""
    given = _as_check(where, probe, timeout)
    if given is not None:
        return given
    if callable(probe) and not isinstance(probe, str):
        return _check(where, probe, timeout)
    if not isinstance(probe, str) or not probe or probe.strip() != probe:
        raise ConfigurationError(
            f"{where} must be a callable, a dotted path 'package.module:function' or a task name, "
            f"got {shown_probe(probe)}"
        )
    task = app.tasks.get(probe)
    if task is not None:
        return _check(where, task.run, timeout, f"task {probe}")
    if "://" in probe:
        # (a URL to fetch, as some health checkers take: shown masked, with what to write)
        raise ConfigurationError(
            f"{where}={shown_probe(probe)} is a URL, not a health check; write a function that calls it "
            "(raising, or returning False, when the downstream is unhealthy) and name it "
            "'package.module:function', or give the function itself"
        )
    found = _import(app, probe, where)
    given = _as_check(where, found, timeout)
    if given is not None:
        return given
    if not callable(found):
        raise ConfigurationError(f"{where}={shown_probe(probe)} is {shown_probe(found)}, not a callable; {_IMPORT_FIX}")
    return _check(where, found, timeout, probe)


def _as_check(where: str, probe: object, timeout: float) -> HealthCheck | None:
    """``probe``, given or named by its dotted path, when it is a ``HealthCheck`` (kept as
    it is, with its own timeout) or a task (its body); ``None`` for anything else.

    A check kept in a module, named by its path (all a setting read from a file or the
    environment can say), was refused as no callable, and the worker did not start. A
    task (or the proxy ``@app.task`` returns: evaluated here) is its body, never the task
    itself, whose call would go through its breaker (the one it checks, when it is guarded
    by it: the check held its half-open slot, the task was rejected, and it never closed)."""
    if isinstance(probe, HealthCheck):
        return probe
    if isinstance(probe, Task):
        return _check(where, probe.run, timeout, f"task {probe.name}")
    return None


def _check(where: str, fn: ProbeFunction, timeout: float, name: str = "") -> HealthCheck:
    """``HealthCheck(fn, timeout, name)``; its refusal (a function no check can call)
    names ``where`` too: alone, it named neither the setting nor the task it came from."""
    try:
        return HealthCheck(fn, timeout, name)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


#: What a probe that names neither a task nor something importable should be.
_IMPORT_FIX = "write 'package.module:function', or the name of a task of this app"


def _import(app: Any, path: str, where: str) -> object:
    """What ``path`` (``package.module:function`` or ``package.module.function``) names,
    whatever it is (``resolve_probe`` tells); a ``ConfigurationError`` when it names nothing."""
    shown = shown_probe(path)  # (never a password it may hold)
    module_name, attr = split_path(path)
    if not module_name or not attr:
        problem = f"{where}={shown} names no task of this app and is no dotted path{_meant(app, path)}"
        raise ConfigurationError(f"{problem}; {_IMPORT_FIX}")
    try:
        found = find_by_path(path)
    except (ImportError, AttributeError) as exc:
        problem = f"{where}={shown} names no task of this app and cannot be imported ({scrub_secrets(str(exc), path)})"
        raise ConfigurationError(f"{problem}{_meant(app, path)}; {_IMPORT_FIX}") from None
    except Exception as exc:  # (the module itself fails as it is imported: a SyntaxError, its own code)
        # (its own code may connect somewhere as it is imported: its error may quote a URL)
        problem = f"{where}={shown}: importing {module_name!r} failed ({type(exc).__name__}: {MaskedText(exc)})"
        raise ConfigurationError(f"{problem}; fix that module, or name another check") from exc
    return found


def _meant(app: Any, path: str) -> str:
    """A did-you-mean for ``path``, which names nothing: the callable of its module (when
    that imports) whose name is closest to its attribute, else the app's task whose name
    is closest to it; empty when nothing is close. (A task name or a function one typo off
    was refused with nothing to say which was meant.)"""
    module_name, attr = split_path(path)
    module = sys.modules.get(module_name) if module_name else None
    if module is not None and "." not in attr:
        names = [name for name, value in vars(module).items() if callable(value) and not name.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=1)
        if close:
            return f" (did you mean '{module_name}:{close[0]}'?)"
    tasks = [name for name in app.tasks if not name.startswith("celery.")]
    close = difflib.get_close_matches(path, tasks, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def breaker_with_probe(
    app: Any, name: str, key: str | None, policy: BreakerPolicy, probe: HealthCheck | None
) -> CircuitBreaker:
    """The app's breaker ``name``/``key`` (``registry_for(app).get``) with ``probe`` as its health check."""
    breaker = registry_for(app).get(name, key, policy)
    if breaker.probe != probe:
        breaker.probe = probe
    return breaker
