"""Which breakers an app has: those its tasks use (``BreakerTask`` and ``breaker_routes``) and those its settings name.

One walk over the app's tasks serves both the worker's start-up check (``check_app``:
strict, every bad option and policy conflict is collected, and they stop the worker
together) and the operators
(``app_breakers``: lenient, a task whose options are invalid is skipped, so the other
breakers can still be operated).

Tasks sharing a breaker must agree on its policy and on its health check: the registry
holds one breaker object per name, and a check given by only some of its tasks would let
the others reach the downstream as real probes while it half-opens.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from celery.app.annotations import resolve_all

from ..core import BreakerPolicy
from ..health import HealthCheck
from ..names import edit_distance
from .probes import resolve_probe
from .problems import Problems
from .setting_docs import TASK_OPTION_DOCS
from .settings import BreakerSettings, entry_matches, get_settings
from .task import BreakerTask
from .task_options import task_breaker_config

__all__ = ["AppBreaker", "app_breakers", "app_inventory", "check_app", "near_misses", "policy_named"]


@dataclass(frozen=True, slots=True)
class AppBreaker:
    """One breaker the app names, and the policy it gives it."""

    name: str
    policy: BreakerPolicy
    tasks: tuple[str, ...]
    """The ``BreakerTask``s guarded by it (routed plain tasks count once routes are applied)."""
    per_key: bool = False
    """Its tasks guard it per key (``breaker_key``), and no task or route without one: a
    breaker of this name without a key is one no task consults (but for a run whose key
    function answers ``None``)."""


def _walk(app: Any, *, strict: bool) -> dict[str, AppBreaker]:
    settings = get_settings(app)
    found: dict[str, AppBreaker] = {}
    # The health check the first task of each breaker gives it (a strict walk compares them).
    checks: dict[str, HealthCheck | None] = {}
    problems = Problems("tasks")
    keyed: set[str] = set()  # the breakers a task guards per key (breaker_key)
    keyless: set[str] = set()  # and those a task or a route guards without one

    def add(name: str, policy: BreakerPolicy, task: str | None, probe: HealthCheck | None = None) -> None:
        seen = found.get(name)
        if seen is None:
            found[name] = AppBreaker(name, policy, (task,) if task else ())
            if task:
                checks[name] = probe
            return
        if strict and task and seen.tasks and seen.policy != policy:
            problems.add(
                f"tasks {seen.tasks[0]!r} and {task!r} share breaker {name!r} but give it different "
                f"policies; set the policy once in breaker_policies[{name!r}] instead of per task"
            )
        if strict and task and seen.tasks and checks[name] != probe:
            problems.add(
                f"tasks {seen.tasks[0]!r} and {task!r} share breaker {name!r} but give it different health "
                f"checks ({_shown(checks[name])} and {_shown(probe)}): a task without the check would reach "
                f"the downstream as a real probe; set it once in breaker_probes[{name!r}] (and "
                f"breaker_probe_timeout once; None: no health check) instead of breaker_probe per task"
            )
        if task:
            found[name] = AppBreaker(name, seen.policy, (*seen.tasks, task))
            checks.setdefault(name, probe)

    for task_name, task in sorted(app.tasks.items()):
        if isinstance(task, BreakerTask):
            if not task.is_guarded():
                continue
            if strict:
                bypass = _call_bypassing_the_breaker(type(task))
                if bypass is not None:
                    problems.add(
                        f"task {task_name!r}: {bypass.__module__}.{bypass.__qualname__}.__call__ does not call "
                        f"super().__call__(*args, **kwargs), so BreakerTask.__call__ never runs and no breaker "
                        f"guards the task; call it there (it runs the task's body under the breaker)"
                    )
            if strict and _takes_self_unbound(type(task)):
                problems.add(
                    f"task {task_name!r}: its function's first argument is self, but the task is not bound, so "
                    f"Celery passes the task's first argument as self (and self.breaker is no breaker); add "
                    f"bind=True to its @app.task(...)"
                )
            # A task whose options are invalid: noted (the worker refuses to start on it),
            # or skipped for operators, who must still act on the other breakers.
            config = problems.check(partial(task_breaker_config, task), None)
            if config is not None:
                add(config.name, config.policy, task_name, config.probe)
                (keyless if task.breaker_key is None else keyed).add(config.name)
        elif not task_name.startswith("celery."):
            routed = settings.route_for(task_name)
            if routed is not None:  # a plain task the worker will route (True: its own name)
                add(routed or task_name, settings.policy_for(routed or task_name), None)
                keyless.add(routed or task_name)
            elif strict:
                unguarded = _options_of_a_plain_task(app, task)
                if unguarded:
                    given = ", ".join(f"{option}={getattr(task, option)!r:.60}" for option in unguarded)
                    base = _own_base(app, task)
                    fix = (
                        "give it base=BreakerTask (or name it in breaker_routes)"
                        if base is None
                        else f"its base {base} is not a BreakerTask: give it a base that is both, "
                        f"class {base.removesuffix('Task')}BreakerTask({base}, BreakerTask), as "
                        f"base={base.removesuffix('Task')}BreakerTask (or name it in breaker_routes, which "
                        f"puts BreakerTask after {base})"
                    )
                    problems.add(
                        f"task {task_name!r} is given {given} but is a plain task, not a BreakerTask, so no "
                        f"breaker guards it; {fix}"
                    )
    for pattern, _ in settings.policies:
        if not _is_glob(pattern):
            add(pattern, settings.policy_for(pattern), None)
    if strict:
        # Every health check is resolved, not only those of the tasks' breakers: the
        # releaser runs the one of any breaker with tasks parked (one no task of this app
        # names: an earlier deploy's, another app's on the store), and one that named
        # nothing held that breaker's backlog parked, a WARNING at every tick.
        for pattern, probe in settings.probes:
            if probe is not None:
                where = f"breaker_probes[{pattern!r}]"
                problems.check(partial(resolve_probe, app, probe, where=where, timeout=settings.probe_timeout), None)
        problems.raise_any()
    for name in keyed - keyless:
        found[name] = replace(found[name], per_key=True)
    return found


def _call_bypassing_the_breaker(cls: type) -> type | None:
    """The class whose ``__call__`` runs instead of ``BreakerTask.__call__`` without ever
    reaching it (a task base written as ``return self.run(*args, **kwargs)``, or calling
    ``Task.__call__`` by name), or ``None``. ``breaker_routes`` and ``task_cls`` put
    ``BreakerTask`` after the app's own task class, so such a ``__call__`` there left
    every routed task unguarded. A ``__call__`` that calls ``super()`` (with or without
    arguments), or wraps another (``task_annotations``' ``"@__call__"``), is taken to
    reach it."""
    for klass in cls.__mro__:
        if klass is BreakerTask:
            return None
        method = vars(klass).get("__call__")
        if method is None or hasattr(method, "__wrapped__"):
            continue
        code = getattr(method, "__code__", None)
        if code is None or "__class__" in code.co_freevars or "super" in code.co_names:
            continue
        return klass
    return None


def _options_of_a_plain_task(app: Any, task: Any) -> list[str]:
    """The breaker options given to ``@app.task(...)`` (or ``@shared_task``) of a plain
    task, which no breaker reads: ``base=BreakerTask`` forgotten. Options set by
    ``task_annotations`` are left out (an annotation for ``"*"`` reaches plain tasks too),
    as is a class of the user's own (its ``breaker`` may be anything of its own)."""
    own = vars(type(task))
    if not own.get("_decorated"):
        return []
    annotated = {key for found in resolve_all(app.annotations, task) for key in found}
    return sorted(
        option for option in TASK_OPTION_DOCS if own.get(option) is not None and option not in annotated
    )  # (None is every option's default: it asks for nothing)


def _own_base(app: Any, task: Any) -> str | None:
    """The name of the class a plain task was given as ``base=`` (``None`` without one):
    "give it base=BreakerTask" would drop it, with what it does for the task."""
    base = type(task).__bases__[0]
    return None if base is app.Task else str(base.__name__)


def _takes_self_unbound(cls: type) -> bool:
    """Whether a task made by ``@app.task(...)`` without ``bind=True`` has a function whose
    first argument, with no default, is named ``self``: Celery passes it the task's first
    argument (``run`` is then a static method), so every call failed with a ``TypeError``
    naming an argument, not the ``bind=True`` that was forgotten."""
    own = vars(cls)
    run = own.get("run")
    if not own.get("_decorated") or not isinstance(run, staticmethod):
        return False
    try:
        first = next(iter(inspect.signature(run.__func__).parameters.values()), None)
    except (TypeError, ValueError):  # (a callable without a signature: nothing to say)
        return False
    return (
        first is not None
        and first.name == "self"
        and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
        and first.default is first.empty
    )


def _shown(probe: HealthCheck | None) -> str:
    """A health check as a refusal names it: ``'none'``, or its name and timeout."""
    return "none" if probe is None else f"{probe.name} within {probe.timeout:g} s"


def check_app(app: Any) -> dict[str, list[str]]:
    """Resolve every BreakerTask's options; raise ConfigurationError on any bad one, or
    when tasks sharing a breaker disagree on its policy or its health check (one giving
    none counts). Returns breaker -> task names."""
    return {name: list(found.tasks) for name, found in _walk(app, strict=True).items() if found.tasks}


def near_misses(app: Any, breakers: Mapping[str, Sequence[str]]) -> list[str]:
    """What to warn of in ``breaker_policies`` and ``breaker_probes``: an exact name that
    no task's breaker has but that is one typo from one's (``breakers``: ``check_app``'s;
    ``"partnr"`` for ``"partner"``: one edit, two for names longer than 8 characters),
    while that breaker gets no such entry otherwise (none of its own, no glob, no task
    option). It silently went without it (a health check meant to spare a payment API:
    its real tasks were its probes). Names that differ only in digits (``tenant-1``,
    ``tenant-2``) are siblings, not typos. Not an error: a breaker used outside tasks
    (``CircuitBreaker("partnr")``) may have the name. And in ``breaker_routes``: an exact
    task name that names no task of this app but is one typo from one no route matches
    (``send_reciept``), which runs unguarded (another app's task may have the name)."""
    settings = get_settings(app)
    named = set(breakers)  # (and the breakers of plain tasks breaker_routes guards)
    for task_name in list(app.tasks):
        routed = settings.route_for(task_name)
        if routed is not None:
            named.add(routed or task_name)
    found: list[str] = []
    for setting, entries, option, missing in (
        ("breaker_policies", settings.policies, "breaker_policy", "that policy"),
        ("breaker_probes", settings.probes, "breaker_probe", "that health check (its tasks are its probes)"),
    ):
        patterns = [pattern for pattern, _ in entries]
        for pattern, value in entries:
            if pattern in named or _is_glob(pattern):
                continue
            if value is None:  # (breaker_probes: an exemption, missed where a glob still gives a check)
                exemption = _missed_exemption(app, breakers, pattern, settings)
                if exemption is not None:
                    found.append(exemption)
                continue
            uncovered = [name for name in breakers if not _covered(app, breakers[name], name, patterns, option)]
            name = _one_typo_from(pattern, uncovered)
            if name is not None:
                found.append(
                    f"{setting}[{pattern!r}] names no breaker of this app's tasks; did you mean {name!r} (the "
                    f"breaker of task {breakers[name][0]!r})? As it is, breaker {name!r} goes without {missing}. "
                    f"Ignore this if {pattern!r} is a breaker used outside tasks"
                )
    # breaker_routes: an exact task name that names no task of this app, one typo from a
    # task that no route matches: that task runs without the breaker meant for it.
    unrouted = [name for name in app.tasks if not name.startswith("celery.") and settings.route_for(name) is None]
    for pattern, _ in settings.routes:
        if pattern in app.tasks or _is_glob(pattern):
            continue
        name = _one_typo_from(pattern, unrouted)
        if name is not None:
            found.append(
                f"breaker_routes[{pattern!r}] names no task of this app; did you mean {name!r}? As it is, no "
                f"route puts task {name!r} under a breaker. Ignore this if {pattern!r} is another app's task"
            )
    return found


def _missed_exemption(
    app: Any, breakers: Mapping[str, Sequence[str]], pattern: str, settings: BreakerSettings
) -> str | None:
    """The warning for ``breaker_probes[pattern] = None`` (no health check) that names no
    breaker of the app's tasks, one typo from a breaker a glob of the setting gives a check
    (its tasks giving none of their own): the exemption meant for it missed, silently."""
    checked = {
        name: entry[0]
        for name in breakers
        if (entry := settings.probe_for(name)) is not None
        and not any(getattr(app.tasks.get(task), "breaker_probe", None) is not None for task in breakers[name])
    }
    name = _one_typo_from(pattern, list(checked))
    if name is None:
        return None
    return (
        f"breaker_probes[{pattern!r}] is None (no health check) but names no breaker of this app's tasks; did you "
        f"mean {name!r} (the breaker of task {breakers[name][0]!r})? As it is, breaker {name!r} gets the health "
        f"check of breaker_probes[{checked[name]!r}]. Ignore this if {pattern!r} is a breaker used outside tasks"
    )


#: Digits, which set sibling breakers apart (``tenant-1``, ``tenant-2``): no typo.
_DIGITS = re.compile(r"\d")


def _one_typo_from(pattern: str, names: Sequence[str]) -> str | None:
    """The name of ``names`` nearest ``pattern`` within a typo of it (one edit, two for a
    pattern longer than 8 characters), not a sibling that differs in digits only; ``None``
    when there is none."""
    most = 1 if len(pattern) <= 8 else 2
    near = [
        (distance, name)
        for name in names
        if (distance := edit_distance(pattern, name, most)) <= most
        and _DIGITS.sub("", pattern) != _DIGITS.sub("", name)
    ]
    return min(near)[1] if near else None


def _covered(app: Any, tasks: Sequence[str], name: str, patterns: Sequence[str], option: str) -> bool:
    """Whether breaker ``name`` gets an entry of the setting (``patterns``: its own, or a
    glob's) or its tasks give the ``option`` themselves."""
    if any(entry_matches(pattern, name) for pattern in patterns):
        return True
    return any(getattr(app.tasks.get(task), option, None) is not None for task in tasks)


def _is_glob(pattern: str) -> bool:
    return any(mark in pattern for mark in "*?[")


def app_inventory(app: Any) -> dict[str, AppBreaker]:
    """Every breaker the app names, as ``AppBreaker``: its tasks' breakers (``BreakerTask``
    and ``breaker_routes``) and the exact names in ``breaker_policies``. A task whose
    options are invalid is skipped."""
    return _walk(app, strict=False)


def app_breakers(app: Any) -> dict[str, BreakerPolicy]:
    """Every breaker the app names (``app_inventory``), with the policy it gives it."""
    return {name: found.policy for name, found in app_inventory(app).items()}


def policy_named(app: Any, name: str) -> BreakerPolicy | None:
    """The policy the app gives breaker ``name``, or ``None`` when no task or setting mentions it."""
    found = app_breakers(app).get(name)
    if found is not None:
        return found
    settings = get_settings(app)
    if any(entry_matches(pattern, name) for pattern, _ in settings.policies):
        return settings.policy_for(name)
    return None
