"""Remote control: ``celery inspect breakers``, and ``celery control`` with
``breaker_open``, ``breaker_close``, ``breaker_reset`` or ``breaker_disable NAME [KEY]``.

Importing this module registers the commands in Celery's ``Panel`` (they run in a
worker's main process). ``install(app)`` imports it, so does the ``celery breaker``
entry point (imported by every ``celery`` command, so CLI-started workers and the
``celery inspect``/``celery control`` client know the names). It imports nothing heavy.

Every worker that receives a command answers for itself: with a Redis store they all
act on the same shared breaker (the operation is idempotent), with ``memory://`` each
on its own. Arguments are checked in the ``celery`` client before anything is sent,
so a malformed name or key is a usage error (exit 2); an unknown breaker is an
``error`` reply naming the breakers the worker knows.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.control import control_command, inspect_command

from .errors import ConfigurationError
from .labels import breaker_label

__all__ = ["OPERATIONS", "breaker_ref", "operate"]

logger = logging.getLogger("celery_breaker")

#: What each operator command reports it did.
OPERATIONS = {
    "open": "forced open: every call rejected until closed, reset or disabled",
    "close": "closed: calls admitted, windows cleared",
    "reset": "reset: a fresh closed breaker, counters zeroed",
    "disable": "disabled: every call admitted and never tripped until closed or reset",
}

MAX_REF_LENGTH = 200


def breaker_ref(value: str) -> str:
    """A breaker name or key as an operator typed it; raises ``ValueError`` when it
    cannot name a breaker (empty, too long, or holding control characters)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a breaker name or key must be a non-empty string, got {value!r}")
    if len(value) > MAX_REF_LENGTH:
        raise ValueError(f"a breaker name or key is at most {MAX_REF_LENGTH} characters, got {len(value)}")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(f"a breaker name or key cannot hold control characters, got {value!r}")
    return value


def _known_names(app: Any) -> tuple[Any, set[str]]:
    """The app's store, and the breaker names known to the app or held in that store."""
    from .clock import SYSTEM_CLOCK
    from .monitoring import app_store
    from .operations import app_breakers

    store = app_store(app)
    return store, set(app_breakers(app)) | {snapshot.name for snapshot in store.snapshots(SYSTEM_CLOCK)}


def operate(app: Any, operation: str, name: str, key: str | None = None) -> dict[str, Any]:
    """Apply ``operation`` (a key of ``OPERATIONS``) to breaker ``name``/``key`` in this
    process's store (``celery_breaker.operations.operate``, which the CLI uses too), send
    the events of the transitions it made, and return the breaker's snapshot as a dict.
    Raises ``UnknownBreakerError`` / ``BreakerKeyError`` for bad input."""
    from .errors import UnknownBreakerError
    from .events import TransitionEvents
    from .operations import operate as move

    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; one of {', '.join(OPERATIONS)}")
    store, known = _known_names(app)  # this process's store: with memory:// each worker acts on its own
    if name not in known:
        listing = ", ".join(sorted(known)) or "none"
        raise UnknownBreakerError(f"unknown breaker {name!r}; this worker knows: {listing}")
    # A known breaker's new key (a tenant to hold open before its first call) is created.
    done = move(app, operation, name, key, store=store, create=True)
    announce = TransitionEvents(app)  # (sends only where events are on)
    for transition in done.transitions:
        announce(transition)
    logger.warning("celery-breaker: breaker %s %s by remote control", done.label, OPERATIONS[operation])
    return done.after.as_dict()


def _reply(state: Any, operation: str, name: str | None, key: str | None) -> dict[str, Any]:
    if not name:
        return {"error": f"breaker_{operation} needs a breaker name: celery control breaker_{operation} NAME [KEY]"}
    label = breaker_label(name, key or None)  # (an empty KEY from the command line: no key)
    try:
        snapshot = operate(state.consumer.app, operation, name, key or None)
    except (LookupError, ValueError, ConfigurationError) as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a store outage, say: a reply, never a dead control thread
        logger.exception("celery-breaker: breaker_%s %s failed", operation, label)
        return {"error": f"breaker_{operation} {label}: {exc}"}
    return {"ok": f"breaker {label} {OPERATIONS[operation]}; state {snapshot['state']}"}


def _typed_ref(value: str) -> str:
    """``breaker_ref`` for the ``celery`` client: a bad value is a usage error (exit 2)."""
    import click

    try:
        return breaker_ref(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _typed_name(value: str) -> str:
    """A breaker name for the ``celery`` client: malformed, or unknown to the app the
    client loaded (``-A``) and to its store, is a usage error (exit 2) before anything is
    sent. If the client cannot read the store, the workers decide."""
    import click
    from celery import current_app

    name = _typed_ref(value)
    app = current_app._get_current_object()
    try:
        _, known = _known_names(app)
    except Exception:  # no store from here (or no settings): leave it to the workers
        return name
    if name not in known:
        listing = ", ".join(sorted(known)) or "none"
        raise click.BadParameter(f"unknown breaker {name!r}; known: {listing}")
    return name


_ARGS = [("name", _typed_name), ("key", _typed_ref)]
_SIGNATURE = "<breaker name> [key]"


@inspect_command(name="breakers", help="State of every breaker in the shared store.")  # type: ignore[untyped-decorator]
def breakers(state: Any) -> Any:
    """Every breaker this worker's store holds (a Redis store: the whole cluster's), as dicts."""
    from .monitoring import collect_metrics

    try:
        return [row.as_dict() for row in collect_metrics(state.consumer.app)]
    except Exception as exc:
        logger.exception("celery-breaker: inspect breakers failed")
        return {"error": f"inspect breakers: {exc}"}


def _register(operation: str, help_text: str) -> None:
    def command(state: Any, name: str | None = None, key: str | None = None) -> dict[str, Any]:
        return _reply(state, operation, name, key)

    command.__name__ = command.__qualname__ = f"breaker_{operation}"
    command.__doc__ = help_text
    control_command(name=f"breaker_{operation}", args=_ARGS, signature=_SIGNATURE, help=help_text)(command)


_register("open", "Force a breaker open (every call rejected).")
_register("close", "Close a breaker (calls admitted again).")
_register("reset", "Reset a breaker (closed, counters zeroed).")
_register("disable", "Disable a breaker (every call admitted).")
