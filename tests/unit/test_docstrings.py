"""Every public name carries a docstring: the module, each name in its ``__all__``, and the
public methods and properties of each public class.

A method implementing a documented protocol member (``Cell``, ``Store``, ``Parking``,
``History``, ``Clock``, ``RateWindow``, ``TripRule``, ``DeferralStrategy``) or
overriding a documented base method inherits that documentation, as ``help()`` shows it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import GenericAlias, ModuleType
from typing import Any

import celery_breaker
from celery_breaker.clock import Clock
from celery_breaker.core.rules import TripRule
from celery_breaker.core.windows import RateWindow
from celery_breaker.integration.deferral.strategy import DeferralStrategy
from celery_breaker.storage.contract import Cell, History, Parking, Store

PROTOCOLS = (Cell, Store, Parking, History, Clock, RateWindow, TripRule, DeferralStrategy)


def modules() -> list[ModuleType]:
    names = [info.name for info in pkgutil.walk_packages(celery_breaker.__path__, "celery_breaker.")]
    return [celery_breaker, *map(importlib.import_module, names)]


def declared_elsewhere(cls: type, attr: str) -> bool:
    for owner in (*PROTOCOLS, *cls.__mro__[1:]):
        if attr in getattr(owner, "__annotations__", {}):
            return True  # a protocol's data member, documented where it is declared
        inherited = getattr(owner, attr, None)
        if inherited is not None and inspect.getdoc(inherited) and owner is not object:
            return True
    return False


def undocumented_members(cls: type) -> list[str]:
    missing = []
    for attr, value in vars(cls).items():
        if attr.startswith("_"):
            continue
        function: Any = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        if not inspect.isfunction(function) or function.__doc__ or declared_elsewhere(cls, attr):
            continue
        missing.append(f"{cls.__module__}.{cls.__qualname__}.{attr}")
    return missing


def test_every_module_has_a_docstring_and_an_all() -> None:
    assert [module.__name__ for module in modules() if not module.__doc__] == []
    assert [module.__name__ for module in modules() if not hasattr(module, "__all__")] == []


def test_every_public_name_and_its_public_members_have_docstrings() -> None:
    missing: set[str] = set()
    for module in modules():
        for name in module.__all__:
            value = getattr(module, name)
            # (a type alias such as ``Callable[..., X]`` is a class to 3.10's ``isclass``)
            if inspect.isclass(value) and not isinstance(value, GenericAlias):
                if "__doc__" not in vars(value) or not value.__doc__:
                    missing.add(f"{value.__module__}.{value.__qualname__}")
                missing.update(undocumented_members(value))
            elif inspect.isfunction(value) and not value.__doc__:
                missing.add(f"{value.__module__}.{value.__qualname__}")
    assert sorted(missing) == []


def test_the_check_sees_a_missing_docstring() -> None:
    class Documented:
        """Has a docstring; its method does not."""

        def act(self) -> None:
            pass

    assert undocumented_members(Documented) == [f"{__name__}.{Documented.__qualname__}.act"]
