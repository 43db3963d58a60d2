"""How people write a breaker: ``crm``, or ``crm[tenant-7]`` for a per-key breaker.

Logs, errors, ``status``, ``watch`` and the operator commands all show a breaker this
way, and the commands read it back (``split_label``). Free of imports: ``errors`` uses it.
"""

from __future__ import annotations

__all__ = ["breaker_label", "split_label"]


def breaker_label(name: str, key: str | None) -> str:
    """``'crm'``, or ``'crm[tenant-7]'`` for the breaker ``crm`` with key ``tenant-7``."""
    return name if key is None else f"{name}[{key}]"


def split_label(label: str) -> tuple[str, str | None]:
    """``'crm[tenant-7]'`` (a label as ``status`` shows it) -> ``('crm', 'tenant-7')``;
    anything else -> ``(label, None)``."""
    if label.endswith("]") and "[" in label:
        name, _, key = label[:-1].partition("[")
        if name:
            return name, key
    return label, None
