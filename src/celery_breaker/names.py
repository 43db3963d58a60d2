"""Breaker names and keys: the one rule for what may name a breaker.

A breaker is a name (``crm``) and, for a per-key breaker, a key (``tenant-7``); people
write it as a label (``celery_breaker.labels``). Tasks, settings, the Python API, remote
control and the ``celery breaker`` CLI all check names with ``check_name`` and operators'
keys with ``check_key``, so a name one of them accepts is accepted by all.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
import uuid
from typing import overload

from .errors import BreakerKeyError, ConfigurationError
from .labels import LABEL_MARKS, visible

__all__ = [
    "MAX_KEY_LENGTH", "MAX_NAME_LENGTH", "check_key", "check_name", "edit_distance", "encodable", "kept_form",
    "kept_key", "key_text",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")

#: The longest breaker name, in characters.
MAX_NAME_LENGTH = 200
#: The longest key a breaker keeps, in characters (``kept_key``).
MAX_KEY_LENGTH = 200
#: Hex digits of the digest that stands for the rest of a key too long to keep.
_DIGEST_LENGTH = 16
_WARNED: set[str] = set()

#: Unicode categories no name or key may hold: control and format characters, line and
#: paragraph separators (they would break log lines, tables and the CLI's arguments).
_UNPRINTABLE = frozenset(("Cc", "Cf", "Zl", "Zp"))


def _unprintable(text: str) -> str | None:
    return next((char for char in text if unicodedata.category(char) in _UNPRINTABLE), None)


def check_name(name: object, where: str = "breaker name") -> str:
    """Return ``name`` if it can name a breaker, else raise ``ConfigurationError`` naming
    ``where`` (the setting, option or argument it came from), the value and the rule.

    A name is a non-empty string of at most ``MAX_NAME_LENGTH`` printable characters
    (text: no lone surrogate, which no store can write), without leading or trailing
    whitespace, and without ``[`` or ``]``: they set a key
    apart in a label (``crm[tenant-7]``), which must read back as the breaker it names.
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{where} must be a non-empty string, got {name!r}")
    if name != name.strip():
        raise ConfigurationError(f"{where} {name!r} starts or ends with whitespace; write {name.strip()!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigurationError(f"{where} is at most {MAX_NAME_LENGTH} characters, got {len(name)}: {name[:40]!r}...")
    bad = _unprintable(name)
    if bad is not None:
        raise ConfigurationError(f"{where} {name!r} holds the control character {bad!r}; names are printable text")
    surrogate = next((char for char in name if unicodedata.category(char) == "Cs"), None)
    if surrogate is not None:
        # (a byte that is not UTF-8, decoded with surrogateescape: a command-line argument
        # in another encoding, say; no store could write it, nor a log line or a label show it)
        raise ConfigurationError(
            f"{where} {name!r} holds {surrogate!r}: a byte that is not UTF-8 (a lone surrogate), which no store "
            "can keep; write the name in UTF-8"
        )
    mark = next((char for char in name if char in LABEL_MARKS), None)
    if mark is not None:
        raise ConfigurationError(
            f"{where} {name!r} holds {mark!r}: brackets set a per-key breaker's key apart (crm[tenant-7]), so a "
            f"name cannot hold them; write it with other characters, e.g. {name.replace('[', '(').replace(']', ')')!r}"
        )
    return name


def check_key(key: str | None) -> None:
    """Raise ``BreakerKeyError`` unless ``key`` (``None``: no key) is a key an operator
    can name: a non-empty string of printable characters without surrounding whitespace.
    (A task's ``breaker_key`` may make any text a key: operators name such a key as
    ``status`` shows it, ``labels.visible``.)"""
    if key is None:
        return
    if not isinstance(key, str):
        raise BreakerKeyError(f"breaker key {key!r:.100} is no text ({type(key).__name__}); a key is a str")
    if not key:
        raise BreakerKeyError(f"breaker key {key!r} is empty; a breaker without a key takes no key at all")
    if key != key.strip():
        raise BreakerKeyError(f"breaker key {key!r} starts or ends with whitespace; quote only the key itself")
    bad = _unprintable(key)
    if bad is not None:
        raise BreakerKeyError(
            f"breaker key {key!r} holds the control character {bad!r}; keys are printable text (a stored key "
            f"that holds one is named as `status` shows it: {visible(key)})"
        )


def key_text(key: object, where: str) -> str:
    """The key a task's ``breaker_key`` returned (``where`` names the task and the option),
    as text: a ``str`` as it is (a subclass, a ``StrEnum``, as its text), a whole number
    (an ``int``, an ``IntEnum``) in decimal digits, so ``7`` and ``"7"`` are one breaker,
    and a ``uuid.UUID`` in its canonical form. These read the same on every run, process
    and Python version. Anything else raises ``ConfigurationError``: ``None`` (a missing
    argument, most often), and an object whose text is not the same for the same key
    (a default ``repr`` holds its memory address: a new breaker every run, never freed),
    or reads alike for different keys; a ``bool`` (a test where a key was meant), a
    ``float``, ``bytes``, a tuple."""
    if isinstance(key, str):
        return str.__str__(key)
    if isinstance(key, int) and not isinstance(key, bool):
        try:
            return int.__repr__(key)
        except ValueError:  # (more digits than Python writes: sys.get_int_max_str_digits())
            raise ConfigurationError(
                f"{where} returned a whole number of more digits than Python writes as text "
                "(sys.get_int_max_str_digits()); return a shorter key (a str, a whole number or a UUID)"
            ) from None
    if isinstance(key, uuid.UUID):
        return str(key)
    fix = (
        "return the key as a str, a whole number or a UUID; str() anything else yourself where its text is the "
        "same for the same key on every run and process"
    )
    if key is None:
        raise ConfigurationError(
            f"{where} returned None for this run's arguments, which names no breaker; {fix} (for runs without a "
            "key, raise, or return a fixed key such as 'none' for one breaker among them)"
        )
    raise ConfigurationError(f"{where} returned a value of type {type(key).__qualname__}, which is no key; {fix}")


@overload
def kept_key(name: str, key: str) -> str: ...
@overload
def kept_key(name: str, key: None) -> None: ...
@overload
def kept_key(name: str, key: str | None) -> str | None: ...
def kept_key(name: str, key: str | None) -> str | None:
    """``key`` as breaker ``name`` keeps it. A task's ``breaker_key`` may make any text a
    key. A key longer than ``MAX_KEY_LENGTH`` would flood every table, log line and
    metric that names it, and no command line could name it back. A key holding a lone
    surrogate (bytes decoded with ``surrogateescape``) cannot be written to Redis at all.
    Either is kept as its first characters (a surrogate written as its escape, ``\\udce9``),
    ``~`` and a digest of the whole key, so distinct keys stay distinct breakers on every
    store; a WARNING says so, once per breaker name and process."""
    if key is None:
        return None
    kept = kept_form(key)
    if kept is key:
        return key
    if name not in _WARNED:
        _WARNED.add(name)
        logger.warning(
            "breaker %s: a key of %d characters%s is kept as %s (its first characters and a digest of the "
            "whole); keys of at most %d characters of text are kept as they are (check the task's breaker_key)",
            name, len(key), "" if encodable(key) else " that is not text (a lone surrogate)",
            visible(kept), MAX_KEY_LENGTH,
        )  # fmt: skip
    return kept


@overload
def kept_form(key: str) -> str: ...
@overload
def kept_form(key: None) -> None: ...
def kept_form(key: str | None) -> str | None:
    """``kept_key`` without its WARNING: the form a key is kept in (``key`` itself, the
    same object, when it is kept as it is)."""
    if key is None or (len(key) <= MAX_KEY_LENGTH and (key.isascii() or encodable(key))):
        return key
    whole = key.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(whole).hexdigest()[:_DIGEST_LENGTH]
    shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{shown[: MAX_KEY_LENGTH - _DIGEST_LENGTH - 1]}~{digest}"


def encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def edit_distance(a: str, b: str, most: int) -> int:
    """The edit distance of ``a`` and ``b`` (insertions, deletions, substitutions, and a
    swap of two neighbours counting one), or ``most + 1`` for any distance above ``most``
    (what a typo check needs: it stops early on lengths that differ by more)."""
    if abs(len(a) - len(b)) > most:
        return most + 1
    before: list[int] = []
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row = row, [i]
        for j, y in enumerate(b, 1):
            cost = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (x != y))
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                cost = min(cost, before[j - 2] + 1)
            row.append(cost)
        before = previous
    return min(row[-1], most + 1)
