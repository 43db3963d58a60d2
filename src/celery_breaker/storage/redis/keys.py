"""The key scheme: how a key prefix, a breaker's name and its key become Redis keys, and back.

Each of the three is quoted with ``urllib.parse.quote(text, safe='')``: every character
but ASCII letters, digits and ``_.-~`` becomes ``%XX`` (UTF-8 bytes), ``:`` and ``%``
included. So a quoted part never holds ``:``, ``{`` or ``}``, and a breaker's hash tag
``{prefix:name}`` or ``{prefix:name:key}`` names exactly one (prefix, name, key): no two
prefixes, names or keys share a key, and a breaker without a key (``{p:n}``) differs from
one whose key is ``""`` (``{p:n:}``). A prefix of letters, digits and ``_.-~`` only is
written as it is. ``checks.lua`` (``breaker_of``) reads tags the same way.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

__all__ = ["breaker_of", "breaker_tag", "glob_escape", "quote_part"]


def quote_part(text: str) -> str:
    """A prefix, name or key as it stands in a Redis key or channel. Text holding a lone
    surrogate (a byte that is not UTF-8, typed by an operator) is quoted as its bytes
    (``surrogatepass``): no breaker is stored under it (a breaker keeps such a key as
    ``names.kept_key`` writes it), so it is found nowhere, where it raised
    ``UnicodeEncodeError``."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def breaker_tag(quoted_prefix: str, name: str, key: str | None) -> str:
    """The hash tag every key of breaker ``name``/``key`` starts with: ``{prefix:name[:key]}``."""
    tag = f"{quoted_prefix}:{quote_part(name)}"
    if key is not None:
        tag += f":{quote_part(key)}"
    return "{" + tag + "}"


def breaker_of(tag: str, quoted_prefix: str) -> tuple[str, str | None] | None:
    """The ``(name, key)`` whose hash tag ``tag`` is under ``quoted_prefix``; ``None`` when
    ``tag`` is no tag ``breaker_tag`` writes (another prefix's, or not quoted as ours)."""
    start = "{" + quoted_prefix + ":"
    if not (tag.startswith(start) and tag.endswith("}")):
        return None
    name, sep, key = tag[len(start) : -1].partition(":")
    found = (unquote(name), unquote(key) if sep else None)
    return found if breaker_tag(quoted_prefix, *found) == tag else None


def glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
