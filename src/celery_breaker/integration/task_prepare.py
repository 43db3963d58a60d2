"""A task class's breaker options in working form: the ``self.breaker`` accessor; option names checked."""

from __future__ import annotations

import inspect
import logging
import types
import weakref
from typing import TYPE_CHECKING, overload

from celery import Task

from ..breaker import current_run
from ..errors import ConfigurationError
from ..health import HealthCheck, checking_now
from ..names import check_name, edit_distance
from .probes import breaker_with_probe
from .setting_docs import TASK_OPTION_DOCS
from .task_options import forget_task_breaker_config, secrets_masked, task_breaker_config

if TYPE_CHECKING:
    from ..breaker import CircuitBreaker
    from .task import BreakerTask

__all__ = ["BreakerAttribute", "prepare"]

logger = logging.getLogger("celery_breaker")


class BreakerAttribute:
    """``task.breaker``: the running call's breaker inside a task body (its first guarded
    call uses the run's admission); in a body run as the health check of its own breaker
    (a task named as the probe), the breaker it checks, with its key; else the task's
    key-less breaker. The ``breaker=`` task option names it (``task.breaker_name``)."""

    # (typed, so a task body's ``self.breaker.call(fn, ...)`` is checked as any breaker's)
    @overload
    def __get__(self, task: None, owner: type | None = None) -> BreakerAttribute: ...
    @overload
    def __get__(self, task: BreakerTask, owner: type | None = None) -> CircuitBreaker: ...

    def __get__(self, task: BreakerTask | None, owner: type | None = None) -> BreakerAttribute | CircuitBreaker:
        if task is None:
            return self
        run = current_run()  # (``task_context.running``, unfolded: read on every ``self.breaker``)
        if run is not None and run.owner is task:
            return run.own_breaker()
        config = task_breaker_config(task)
        key = None
        checked = checking_now()
        if checked is not None and not checked.run.over and checked.name == config.name:
            # A per-key breaker's check: its guarded call passes on the check's slot
            # (``CircuitBreaker``, decision 44). The key-less breaker, which no task used,
            # took the checks' outcomes: the tenants' failures tripped it, and it then
            # failed every tenant's check until it closed.
            key = checked.key
        return breaker_with_probe(task.app, config.name, key, config.policy, config.probe)


def prepare(cls: type[BreakerTask], base: type[BreakerTask]) -> None:
    """Turn decorator options into their working form (idempotent).

    ``@app.task(base=BreakerTask, breaker="crm")`` makes ``breaker`` a class attribute
    string, which would hide the ``self.breaker`` accessor: move it to ``breaker_name``.
    Functions given as ``breaker_key``/``breaker_fallback``/``breaker_probe`` would become methods of the
    task class: keep them plain. ``base``: ``BreakerTask``, whose own names (and Celery's)
    are known options; it calls this, and is handed in (this module is below it).
    """
    with secrets_masked(cls):  # (a URL given to the wrong option is quoted masked)
        _check_option_names(cls, base)
        raw = inspect.getattr_static(cls, "breaker")
        if not isinstance(raw, BreakerAttribute):
            if raw is not None:
                check_name(raw, f"task {cls.name or cls.__qualname__!r}: the breaker option")
            cls.breaker_name = raw
            cls.breaker = BreakerAttribute()
        for option in ("breaker_key", "breaker_fallback", "breaker_probe"):
            owner = next((klass for klass in cls.__mro__ if option in vars(klass)), None)
            value = inspect.getattr_static(cls, option)
            if isinstance(value, types.FunctionType) and owner is not None and vars(owner).get("_decorated"):
                # Given to @app.task(...): a plain function, not a method of the task.
                setattr(owner, option, staticmethod(value))
            elif (
                value is not None
                and not (option == "breaker_probe" and value is False)
                and not isinstance(value, (str, staticmethod, classmethod))
                and not callable(value)
                and not (option == "breaker_probe" and isinstance(value, HealthCheck))
            ):
                accepted = (
                    "a callable, a HealthCheck, a dotted path, a task name, or False (no health check)"
                    if option == "breaker_probe"
                    else "a callable or a method name"
                )
                raise ConfigurationError(
                    f"task {cls.name or cls.__qualname__!r}: {option} must be {accepted}, got {value!r}"
                )

    forget_task_breaker_config(cls)  # options changed: resolve them again


#: The task options (``breaker_name`` is where ``breaker``'s value is kept: known, never
#: suggested).
_OPTION_NAMES = frozenset(TASK_OPTION_DOCS)
#: Options whose value may name a method of the task.
_METHOD_OPTIONS = ("breaker_key", "breaker_fallback", "breaker_probe")
#: The names Celery's ``Task`` defines (read from the class dicts: ``hasattr(Task, "app")``
#: would bind Celery's own ``Task`` class to the current app, and no task made after
#: that would be annotated).
_CELERY_NAMES = frozenset(name for klass in Task.__mro__ for name in vars(klass))
#: A name this many edits or fewer from an option (and not one) is taken for a typo of it.
_TYPO_EDITS = 2
#: By task class: the options without their prefix already warned of (``_check_option_names``).
_WARNED_UNPREFIXED: weakref.WeakKeyDictionary[type, set[str]] = weakref.WeakKeyDictionary()


def _check_option_names(cls: type[BreakerTask], base: type[BreakerTask]) -> None:
    """Refuse an option misspelt in ``@app.task(...)``, ``task_annotations`` or the class
    (``breaker_polcy``, ``breakr``): it would be ignored silently, where a misspelt
    setting stops the worker. A typo is a name at most ``_TYPO_EDITS`` edits from an
    option; an option given to the decorator without its ``breaker_`` prefix (``probe=``)
    is warned of (an app may have such an attribute of its own). Given to the decorator
    (its class says ``_decorated``; annotations land there too), any name but Celery's
    own task attributes counts; on a class of the
    user's, only a ``breaker_*`` name that holds no method: a helper of its own
    (``breaker_probe_url``) is further from every option, and a method an option names
    (``breaker_key = "breaker_tenant"``) is left alone. The classes from ``base`` on are
    not looked at."""
    named = {value for option in _METHOD_OPTIONS if isinstance(value := getattr(cls, option, None), str)}
    for klass in cls.__mro__:
        if klass is base:
            break  # (its own names, and Celery's, are known)
        decorated = bool(vars(klass).get("_decorated"))
        for attr, value in vars(klass).items():
            if attr.startswith("_") or attr in _OPTION_NAMES or attr == "breaker_name" or attr in named:
                continue
            if decorated:
                if attr in _CELERY_NAMES:
                    continue  # (Celery's own option: acks_late, name, run...)
            elif not attr.startswith("breaker_") or callable(value) or isinstance(value, (classmethod, property)):
                continue
            if decorated and f"breaker_{attr}" in _OPTION_NAMES:
                # An option without its prefix (``probe=`` for ``breaker_probe=``: the breaker
                # had no health check, and its real tasks went as probes). A word an app may
                # use for an attribute of its own, so said, not refused.
                warned = _WARNED_UNPREFIXED.setdefault(cls, set())
                if attr not in warned:  # (once: the check runs at each binding of the class)
                    warned.add(attr)
                    logger.warning(
                        "task %r: %r is no celery-breaker task option and changes nothing here; did you mean "
                        "breaker_%s?", getattr(cls, "name", None) or cls.__qualname__, attr, attr,
                    )  # fmt: skip
                continue
            distance, near = min((edit_distance(attr, option, _TYPO_EDITS), option) for option in _OPTION_NAMES)
            if distance <= _TYPO_EDITS:
                task = getattr(cls, "name", None) or cls.__qualname__
                raise ConfigurationError(
                    f"task {task!r}: {attr!r} is no celery-breaker task option; did you mean {near}? "
                    f"The options are {', '.join(sorted(TASK_OPTION_DOCS))}"
                )
