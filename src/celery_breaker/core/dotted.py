"""Objects named by a path, as settings name them: ``package.module:attr`` or ``package.module.attr``."""

from __future__ import annotations

import importlib

__all__ = ["find_by_path", "split_path"]


def split_path(path: str) -> tuple[str, str]:
    """``path``'s module and attribute: ``package.module:attr`` splits at the colon (the
    attribute may be dotted, ``module:Class.attr``), ``package.module.attr`` at the last
    dot. Either is empty when ``path`` names none (``":attr"``, ``"module:"``, ``"name"``)."""
    module_name, colon, attr = path.partition(":")
    if not colon:
        module_name, _, attr = path.rpartition(".")
    return module_name, attr


def find_by_path(path: str) -> object:
    """The object ``path`` names (``split_path``): its module imported, then each part of
    its attribute looked up. Raises ``ImportError`` or ``AttributeError`` when nothing has
    that name (``ImportError`` when it names no module or no attribute), and
    whatever the module raises as it is imported (a ``SyntaxError``, its own code): every
    setting that names an object by its path reads it here, so the two forms are
    accepted alike wherever one is."""
    module_name, attr = split_path(path)
    if not module_name or not attr:
        raise ImportError(f"{path!r} names no module and attribute: write 'package.module:attr'")
    found: object = importlib.import_module(module_name)
    for part in attr.split("."):
        found = getattr(found, part)
    return found
