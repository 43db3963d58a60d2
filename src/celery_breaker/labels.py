"""How people write a breaker: ``crm``, or ``crm[tenant-7]`` for a per-key breaker.

Logs, errors, ``status``, ``watch`` and the operator commands all show a breaker this
way, and the commands read it back (``split_label``). A label reads back as the breaker
it names, whatever its key holds (brackets included), because a name holds no bracket:
``names.check_name`` refuses one. Free of imports: ``errors`` uses it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

__all__ = [
    "LABEL_MARKS", "PrintableLog", "breaker_label", "read_visible", "shown_callable", "split_label", "visible"
]  # fmt: skip

#: The characters that set a key apart in a label; a breaker name never holds them.
LABEL_MARKS = "[]"


def breaker_label(name: str, key: str | None) -> str:
    """``'crm'``, or ``'crm[tenant-7]'`` for the breaker ``crm`` with key ``tenant-7``."""
    return name if key is None else f"{name}[{key}]"


def shown_label(label: str) -> str:
    """``label`` (``breaker_label``'s) as ``status`` shows its name and key: each part as
    ``visible`` shows it, so ``crm[""]`` (the empty key), ``crm[\\x20a]``, ``we\\\\ird``."""
    name, key = split_label(label)
    return breaker_label(visible(name), None if key is None else visible(key))


def split_label(label: str) -> tuple[str, str | None]:
    """The ``(name, key)`` a label names: ``'crm[tenant-7]'`` -> ``('crm', 'tenant-7')``,
    ``'crm[a[b]]'`` -> ``('crm', 'a[b]')``, ``'crm[]'`` -> ``('crm', '')``; a label without
    a key -> ``(label, None)``. The name ends at the first ``[``; the key is everything
    after it, less the closing ``]``."""
    name, bracket, rest = label.partition("[")
    if bracket and name and rest.endswith("]"):
        return name, rest[:-1]
    return label, None


#: Characters Python calls printable that show nothing: Unicode's default ignorable code
#: points (variation selectors, the combining grapheme joiner, Hangul fillers, tags; the
#: rest of them are format characters, which Python already calls unprintable) and the
#: blank braille pattern. ``tenant-7`` and ``tenant-7`` + U+FE0F read the same on the
#: page, in ``status`` and in a metric's label: ``visible`` writes each as its escape.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


def _plain(text: str) -> bool:
    """Whether every character of ``text`` shows as itself: printable, and not invisible."""
    return text.isprintable() and _INVISIBLE.search(text) is None


def visible(text: str) -> str:
    """``text`` safe to print to a terminal or a log line: each character that is not
    printable (an escape, a newline, a bell), or prints as nothing (``_INVISIBLE``: a
    variation selector), written as its escape (``\\x1b``, ``\\ufe0f``), and an empty
    text as ``""``. A breaker's name is checked (``names.check_name``), but its key
    may come from a task's arguments (``breaker_key``) and hold anything. So that no two
    texts look alike and ``read_visible`` reads any of them back (what an operator copies
    from ``status`` names the key it shows), a backslash is doubled (``a\\nb`` is a
    newline, ``a\\\\nb`` a backslash), a space that starts or ends the text is written
    ``\\x20``, and a text of two quotes ``\\x22\\x22``."""
    if not text:
        return '""'
    if _plain(text) and "\\" not in text and text[0] != " " and text[-1] != " " and text != '""':
        return text
    if text == '""':
        return "\\x22\\x22"
    last = len(text) - 1
    return "".join(_shown(char, at in (0, last)) for at, char in enumerate(text))


def _shown(char: str, at_an_end: bool) -> str:
    if char == "\\":
        return "\\\\"
    if not char.isprintable():
        return repr(char)[1:-1]
    if _INVISIBLE.match(char) is not None:  # (``repr`` shows it as it is: printable)
        code = ord(char)
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return "\\x20" if at_an_end and char == " " else char


def read_visible(shown: str) -> str | None:
    """The text ``visible`` shows as ``shown`` (``'a\\\\nb'`` -> ``'a\\nb'``, ``'""'`` ->
    ``''``), when that is not ``shown`` itself; else ``None``."""
    if shown == '""':
        return ""
    if "\\" not in shown or not _plain(shown) or _SHOWN.fullmatch(shown) is None:
        return None
    text = _ESCAPE.sub(_unescape, shown)
    return text if visible(text) == shown else None


#: The escapes ``visible`` writes: a doubled backslash, and ``repr``'s of a character.
_ESCAPE = re.compile(r"\\(\\|[nrt]|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")
_SHOWN = re.compile(r"(?:[^\\]|" + _ESCAPE.pattern + ")*", re.DOTALL)
_NAMED = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def _unescape(escape: re.Match[str]) -> str:
    code = escape.group(1)
    return _NAMED.get(code) or chr(int(code[1:], 16))


class PrintableLog(logging.Filter):
    """On the ``celery_breaker`` logger (the package installs it): each text argument of
    a record that is not printable (or holds a character that prints as nothing) is
    written as ``visible`` shows it. A key from a
    task's arguments reaches many log lines (a transition, a parked task) as such an
    argument; with a newline or an escape sequence in it, a line could forge the next one
    or drive the terminal that tails the log. The message itself is ours and keeps its
    line breaks (the worker's block of configuration problems); so do exceptions, whose
    texts quote keys with ``repr``. Structured fields (``extra``) keep the key as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(type(arg) is str and not _plain(arg) for arg in args):
            record.args = tuple(visible(arg) if type(arg) is str and not _plain(arg) else arg for arg in args)
        return True


def shown_callable(fn: Callable[..., object]) -> str:
    """What a user's callable (a check, a transition listener, an exception predicate) is
    called in logs: its function's qualified name, never its ``repr``. A ``partial``'s
    repr shows its arguments, and a callable object's its fields (a URL with a password,
    a webhook's token): logged with every failed check, they leaked."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    owner: object = fn
    if not isinstance(name, str):  # a callable object: named by its class
        owner = type(fn)
        name = type(fn).__qualname__
    module = getattr(owner, "__module__", None)
    return f"{module}:{name}" if isinstance(module, str) and module else name
