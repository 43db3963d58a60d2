"""A BreakerTask's options: resolved against the app's settings, validated once, cached on its class."""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..breaker import check_fits
from ..core import BreakerPolicy
from ..errors import ConfigurationError
from ..health import HealthCheck, check_timeout
from ..names import check_name
from ..storage.urls import scrub_each, urls_in
from . import values
from .probes import resolve_probe
from .setting_docs import TASK_OPTION_DOCS
from .settings import OPTIONS_FORGOTTEN, BreakerSettings, get_settings

__all__ = [
    "OPTIONS_FORGOTTEN",
    "TaskBreakerConfig",
    "forget_task_breaker_config",
    "secrets_masked",
    "task_breaker_config",
]

_CONFIG = "_celery_breaker_config"  # the class attribute caching the resolved options


@dataclass(frozen=True, slots=True)
class TaskBreakerConfig:
    """A task's breaker options, resolved against the app's settings and validated."""

    name: str
    policy: BreakerPolicy
    max_deferrals: int | None
    max_defer_age: float | None
    defer_spread: float | None
    counts_runs: bool
    """``breaker_scope="run"``: a run that made no guarded call records its own outcome."""
    probe: HealthCheck | None = None
    """The breaker's health check (``breaker_probe``, else ``breaker_probes``), if any."""
    settings: BreakerSettings | None = field(default=None, compare=False, repr=False)
    """The app's settings these options were resolved against: once the settings are read
    again (``reload_settings``, a worker's start), the options are resolved again."""


def _scope(where: str, value: Any) -> str:
    if value not in ("run", "calls"):
        raise ConfigurationError(f"{where} must be 'run' or 'calls', got {value!r}")
    return str(value)


def task_breaker_config(task: Any) -> TaskBreakerConfig:
    """The resolved breaker options of a ``BreakerTask`` (or its class): validated once, cached on its class."""
    # task.__class__, not type(task): @shared_task hands out a Proxy that forwards it.
    cls: Any = task if isinstance(task, type) else task.__class__
    found: TaskBreakerConfig | None = cls.__dict__.get(_CONFIG)
    settings = get_settings(cls.app)
    if found is not None and found.settings is settings:
        return found
    with secrets_masked(cls):
        return _resolve(cls, task, settings)


@contextlib.contextmanager
def secrets_masked(cls: Any) -> Iterator[None]:
    """Refusals of ``cls``'s options with the password of every URL an option holds
    masked: a store URL given to the wrong option (``breaker_policy="redis://:pw@..."``)
    is quoted by its refusal, which a worker logs at CRITICAL."""
    try:
        yield
    except ConfigurationError as error:
        urls = [url for attr in _OPTIONS for url in urls_in(inspect.getattr_static(cls, attr, None))]
        text = scrub_each(str(error), urls)
        if text == str(error):
            raise
        problems = tuple(scrub_each(problem, urls) for problem in error.problems)
        raise ConfigurationError(text, problems=problems) from None  # (its cause quotes the value too)


#: Every attribute a task option is kept in (``breaker``'s value, before the class is
#: prepared, and ``breaker_name``, after).
_OPTIONS = (*TASK_OPTION_DOCS, "breaker", "breaker_name")


def _resolve(cls: Any, task: Any, settings: BreakerSettings) -> TaskBreakerConfig:
    # A task class without a name of its own, registered with app.register_task: Celery
    # names the instance (after its module and class), not the class.
    task_name = cls.name or (None if task is cls else getattr(task, "name", None))
    where = f"task {task_name!r}"
    given = cls.breaker_name or _routed_name(cls, task_name, settings)
    try:
        name = check_name(given or task_name, f"{where}: breaker name")
    except ConfigurationError as exc:
        if given:
            raise
        # (no breaker was named: the task's own name stands for it, which the user never wrote
        # as a breaker name; renaming the task is no fix they need)
        if task_name and settings.route_for(task_name) == "":  # (a route of True: "the task's own name")
            fix = "breaker_routes gives it True (the task's own name): map it to a breaker name there instead"
        else:
            fix = "the task names no breaker, so its breaker is named after the task: give it breaker='...'"
        raise ConfigurationError(f"{exc}; {fix}") from None
    base_policy = settings.policy_for(name)
    policy = BreakerPolicy.coerce(cls.breaker_policy, base=base_policy, source=f"{where}: breaker_policy")

    def option(attr: str, setting_value: Any, check: Callable[[str, Any], Any]) -> Any:
        value = getattr(cls, attr)
        if value is None:
            return setting_value
        return check(f"{where}: {attr}", value)

    for attr in ("breaker_key", "breaker_fallback"):
        value = getattr(cls, attr)
        if isinstance(value, str) and not callable(getattr(cls, value, None)):
            raise ConfigurationError(
                f"{where}: {attr}={value!r} names no method of the task; "
                f"define {value}() on the task class or give a callable"
            )
    _check_call_shapes(cls, task, where)
    config = TaskBreakerConfig(
        name=name,
        policy=policy,
        max_deferrals=option("breaker_max_deferrals", settings.max_deferrals, values.whole),
        max_defer_age=option("breaker_max_defer_age", settings.max_defer_age, values.seconds),
        defer_spread=option("breaker_defer_spread", settings.defer_spread, values.seconds_or_zero),
        counts_runs=option("breaker_scope", "run", _scope) == "run",
        probe=_probe(cls, task, where, name, settings),
        settings=settings,
    )
    check_fits(config.policy, config.probe, where)
    setattr(cls, _CONFIG, config)
    return config


#: A value standing for each argument a call shape passes.
_ARGUMENT = object()


def _check_call_shapes(cls: Any, task: Any, where: str) -> None:
    """Refuse a ``breaker_key`` that cannot be called as ``key(args, kwargs)``, and a
    ``breaker_fallback`` that cannot take the arguments the task's body requires (given
    by position or by name, as a caller may send them): either failed only at its first
    call, the key on every run with a bare ``TypeError``, the fallback at the first
    outage, which failed every task it should have answered. A callable whose signature
    cannot be read, or read for sure (a method taken from the class by another kind of
    descriptor), is left to its call: a refusal stops the worker."""
    body = _signature_of(cls, task, "run")
    fallback_shapes: list[tuple[list[object], dict[str, object]]] = []
    if body is not None:
        by_position: tuple[list[object], dict[str, object]] = ([], {})
        by_name: tuple[list[object], dict[str, object]] = ([], {})
        for parameter in body.parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                continue
            if parameter.kind is parameter.POSITIONAL_ONLY:
                by_position[0].append(_ARGUMENT)
                by_name[0].append(_ARGUMENT)
            elif parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
                by_position[0].append(_ARGUMENT)
                by_name[1][parameter.name] = _ARGUMENT
            elif parameter.kind is parameter.KEYWORD_ONLY:
                by_position[1][parameter.name] = _ARGUMENT
                by_name[1][parameter.name] = _ARGUMENT
        fallback_shapes = [by_position, by_name]
    checks: dict[str, tuple[list[tuple[list[object], dict[str, object]]], str]] = {
        "breaker_key": ([([_ARGUMENT, _ARGUMENT], {})], "write it as key(args, kwargs), returning the key"),
        "breaker_fallback": (
            fallback_shapes,
            "give it the task's own parameters (def fallback(*args, **kwargs) takes any)",
        ),
    }
    for attr, (shapes, fix) in checks.items():
        found = _signature_of(cls, task, attr) if getattr(cls, attr) is not None else None
        if found is None or not shapes:
            continue
        problems: list[str] = []
        for positional, named in shapes:
            try:
                found.bind(*positional, **named)
            except TypeError as exc:
                problems.append(str(exc))
            else:
                break
        else:
            needed = "(args, kwargs)" if attr == "breaker_key" else "with the task's arguments"
            raise ConfigurationError(f"{where}: {attr} cannot be called {needed} ({problems[0]}); {fix}")


def _signature_of(cls: Any, task: Any, attr: str) -> inspect.Signature | None:
    """The signature ``attr`` (a callable, or the name of a method of the task) is called
    with: read from the task itself, where a method is bound (``self`` given); from its
    class, only for a plain function (``self`` its first parameter) or a static one.
    ``None`` where it cannot be read for sure."""
    value = getattr(cls, attr)
    name = value if isinstance(value, str) else attr
    if not isinstance(task, type):
        found = getattr(task, name, None)
    else:
        raw = inspect.getattr_static(cls, name, None)
        if isinstance(raw, staticmethod):
            found = raw.__func__
        elif isinstance(raw, types.FunctionType):
            found = functools.partial(raw, _ARGUMENT)  # (``self``)
        else:
            return None
    if not callable(found):
        return None
    try:
        return inspect.signature(found)
    except (TypeError, ValueError):
        return None


def _routed_name(cls: Any, task_name: str | None, settings: BreakerSettings) -> str | None:
    """The breaker ``breaker_routes`` gives a task made from the app's own task class (a
    plain ``@app.task``) that is a ``BreakerTask`` only because
    ``task_cls="celery_breaker:BreakerTask"`` made that class one, and that names no
    breaker itself; ``None`` for any other task (``base=BreakerTask``, a class of the
    user's: their breaker is the one they name, else their own name)."""
    if not settings.routes or not task_name or task_name.startswith(("celery.", "celery_breaker.")):
        return None
    if not issubclass(cls, cls.app.Task):
        return None
    return settings.route_for(task_name) or None  # ("": True, the task's own name)


def _probe(cls: Any, task: Any, where: str, name: str, settings: BreakerSettings) -> HealthCheck | None:
    """The task's health check: its ``breaker_probe`` option, else the ``breaker_probes``
    entry of its breaker; resolved (imported, or found among the app's tasks) now."""
    timeout = settings.probe_timeout
    if cls.breaker_probe_timeout is not None:
        option = f"{where}: breaker_probe_timeout"
        timeout = check_timeout(option, values.duration(option, cls.breaker_probe_timeout))
    probe = cls.breaker_probe
    if probe is False:  # (no health check for this task's breaker, whatever breaker_probes says)
        return None
    if probe is not None:
        if task is not cls and isinstance(inspect.getattr_static(cls, "breaker_probe"), types.FunctionType):
            # A method of the task class (a function given to @app.task is made static):
            # called with self, as breaker_key's and breaker_fallback's are. Taken from
            # the class, it failed every check (no self given), and the breaker never closed.
            probe = _TaskMethod(probe, task)
        return resolve_probe(cls.app, probe, where=f"{where}: breaker_probe", timeout=timeout)
    entry = settings.probe_for(name)
    if entry is None:
        return None
    pattern, probe = entry
    return resolve_probe(cls.app, probe, where=f"breaker_probes[{pattern!r}]", timeout=timeout)


class _TaskMethod:
    """A ``breaker_probe`` method of a task class, called with the task as ``self``, and
    named as the method. Equal to another of the same function: tasks sharing a breaker
    through a base class that defines the method give it the same check (one of them is
    ``self`` for it), not checks the worker would refuse as different."""

    def __init__(self, function: Callable[..., object], task: Any) -> None:
        functools.update_wrapper(self, function)
        self.function = self.__func__ = function  # (``__func__``: what a check is, ``health._callees``)
        self.task = task
        # What is left to give once ``self`` is: nothing, or the breaker's key (``HealthCheck``).
        with contextlib.suppress(TypeError, ValueError):
            signature = inspect.signature(function)
            self.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])

    def __call__(self, *key: object, **by_name: object) -> object:
        # (the key by position, or as ``key=`` to a method whose ``key`` is optional)
        return self.function(self.task, *key, **by_name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TaskMethod) and other.function is self.function

    def __hash__(self) -> int:
        return hash(self.function)


def forget_task_breaker_config(cls: type) -> None:
    """Drop the options cached on ``cls`` (its options changed: resolve them again)."""
    if _CONFIG in cls.__dict__:
        delattr(cls, _CONFIG)
    # (after: a run between the two that kept a breaker with the old options must
    # hold a count that is already stale)
    OPTIONS_FORGOTTEN[0] += 1
