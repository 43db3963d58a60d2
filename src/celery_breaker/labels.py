"""How people write a breaker: ``crm``, or ``crm[tenant-7]`` for a per-key breaker.

Logs, errors, ``status``, ``watch`` and the operator commands all show a breaker this
way, and the commands read it back (``split_label``). A label reads back as the breaker
it names, whatever its key holds (brackets included), because a name holds no bracket:
``names.check_name`` refuses one. Free of imports: ``errors`` uses it.
"""

from __future__ import annotations

__all__ = ["LABEL_MARKS", "breaker_label", "split_label", "visible"]

#: The characters that set a key apart in a label; a breaker name never holds them.
LABEL_MARKS = "[]"


def breaker_label(name: str, key: str | None) -> str:
    """``'crm'``, or ``'crm[tenant-7]'`` for the breaker ``crm`` with key ``tenant-7``."""
    return name if key is None else f"{name}[{key}]"


def split_label(label: str) -> tuple[str, str | None]:
    """The ``(name, key)`` a label names: ``'crm[tenant-7]'`` -> ``('crm', 'tenant-7')``,
    ``'crm[a[b]]'`` -> ``('crm', 'a[b]')``, ``'crm[]'`` -> ``('crm', '')``; a label without
    a key -> ``(label, None)``. The name ends at the first ``[``; the key is everything
    after it, less the closing ``]``."""
    name, bracket, rest = label.partition("[")
    if bracket and name and rest.endswith("]"):
        return name, rest[:-1]
    return label, None


def visible(text: str) -> str:
    """``text`` safe to print to a terminal or a log line: each character that is not
    printable (an escape, a newline, a bell) written as its escape (``\\x1b``), and an
    empty text as ``""``. A breaker's name is checked (``names.check_name``), but its key
    may come from a task's arguments (``breaker_key``) and hold anything."""
    if not text:
        return '""'
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
