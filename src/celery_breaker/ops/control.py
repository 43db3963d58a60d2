"""Remote control: ``celery inspect breakers``, and ``celery control breaker_open``, ``breaker_close``,
``breaker_reset`` or ``breaker_disable NAME [KEY]`` (one command per ``ACTIONS`` entry).

Importing this module registers the commands in Celery's ``Panel``, where they run in a
worker's main process: a worker imports it when it loads ``ControlStep`` (one of the
plugin's worker steps), and the ``celery breaker`` entry point imports it into every
``celery`` command, so the ``celery inspect``/``celery control`` client knows the names.

Every worker that receives a command answers for itself: with a Redis store they all
act on the same shared breaker (the operation is idempotent), with ``memory://`` each
on its own, and only under a pool that runs tasks in the main process (solo, threads,
gevent): a prefork worker's children hold breakers the main process cannot reach, so
it replies with an error saying so. Arguments are checked in the ``celery`` client before anything is sent,
so a malformed name or key is a usage error (exit 2); an unknown breaker is an
``error`` reply naming the breakers the worker knows.

Like ``cli``, it is imported by every ``celery`` command: the settings, the store and
the operator functions load inside the commands (import cost, not import cycles).
"""

from __future__ import annotations

import logging
import shlex
from typing import Any

import click
from celery import bootsteps, current_app
from celery.worker.control import Panel, control_command, inspect_command

from ..errors import BreakerKeyError, ConfigurationError, UnknownBreakerError
from ..labels import breaker_label, shown_label, split_label, visible
from ..names import check_key, check_name
from .actions import ACTIONS

__all__ = ["ControlStep", "operate"]

logger = logging.getLogger("celery_breaker")


class ControlStep(bootsteps.Step):  # type: ignore[misc]
    """The worker step whose loading registers the remote-control commands (this module's import)."""

    label = "celery-breaker remote control"


def _known_names(app: Any, store: Any) -> set[str]:
    """The breaker names known to the app or held in its store (a listing: for messages),
    those it holds but cannot read too (``Listing.unreadable``: a move repairs them)."""
    from ..clock import SYSTEM_CLOCK
    from ..integration.inventory import app_breakers
    from ..storage import Listing

    listing = store.snapshots(SYSTEM_CLOCK)
    unreadable = listing.unreadable if isinstance(listing, Listing) else ()
    return set(app_breakers(app)) | {snapshot.name for snapshot in listing} | {found.name for found in unreadable}


def _knows(app: Any, name: str) -> tuple[Any, bool]:
    """The app's store, and whether the app or that store knows breaker ``name``. A name
    the app or a key-less breaker gives is known without listing the store: a listing of
    40,000 per-key breakers took 6 s, in the worker's main process."""
    from ..clock import SYSTEM_CLOCK
    from ..integration.inventory import app_breakers
    from ..monitoring.status import app_store

    store = app_store(app)
    if name in app_breakers(app) or store.find(name, None, SYSTEM_CLOCK) is not None:
        return store, True
    return store, name in _known_names(app, store)  # (only per-key breakers of a name the app does not give)


def operate(app: Any, action: str, name: str, key: str | None = None) -> dict[str, Any]:
    """Apply ``action`` (a key of ``ACTIONS``) to breaker ``name``/``key`` in this
    process's store (``ops.operator.operate``, which the CLI uses too), send the events of
    the transitions it made, and return the breaker's snapshot as a dict, with the
    action's ``warning`` (``operator.caution``: its downstream was failing) or ``None``,
    and ``changed`` (``Move.changed``: False when it was as asked already).
    Raises ``UnknownBreakerError`` / ``BreakerKeyError`` for bad input."""
    from ..integration.events import TransitionEvents
    from .operator import operate as apply_action

    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    store, known = _knows(app, name)  # this process's store: with memory:// each worker acts on its own
    if not known:
        listing = ", ".join(sorted(_known_names(app, store))) or "none"
        raise UnknownBreakerError(f"unknown breaker {name!r}; this worker knows: {listing}")
    # A known breaker's new key (a tenant to hold open before its first call) is created;
    # a key-less one only when the app names it (not when its tasks guard it only per key).
    hint = f"give the key after the name: celery control breaker_{action} {name} KEY"
    done = apply_action(app, action, name, key, store=store, create=key is not None, create_hint=hint, as_shown=True)
    announce = TransitionEvents(app)  # (sends only where events are on)
    for transition in done.transitions:
        announce(transition)
    if not done.changed:  # (another worker the same broadcast reached made the move)
        logger.info("celery-breaker: breaker %s already %s, asked by remote control: nothing changed",
                    shown_label(done.label), done.after.state.value)  # fmt: skip
    elif done.warning is None:
        logger.warning("celery-breaker: breaker %s %s by remote control", shown_label(done.label), ACTIONS[action].done)
    else:
        logger.warning("celery-breaker: breaker %s %s by remote control; beware: %s", shown_label(done.label),
                       ACTIONS[action].done, done.warning)  # fmt: skip
    return {**done.after.as_dict(), "warning": done.warning, "changed": done.changed}


def _unseen(state: Any, what: str) -> str | None:
    """Why this worker's main process cannot see its tasks' breakers (``unseen_breakers``), or None."""
    from ..integration.worker import unseen_breakers

    worker = getattr(state.consumer, "controller", None)
    return None if worker is None else unseen_breakers(worker, what)


def _reply(state: Any, action: str, name: Any, key: Any) -> dict[str, Any]:
    if name is None or name == "":
        return {"error": f"breaker_{action} needs a breaker name: celery control breaker_{action} NAME [KEY]"}
    # The `celery` client checked both; a program's broadcast (app.control.broadcast) did not.
    try:
        check_name(name, f"breaker_{action}: the breaker name")
    except ConfigurationError as exc:
        return {"error": _as_label(name, f"breaker_{action}") or str(exc)}
    if key is not None and not isinstance(key, str):
        return {"error": f"breaker_{action}: the key of breaker {name!r} must be text (or null for no key), "
                         f"got {type(key).__name__} {key!r:.100}"}  # fmt: skip
    unseen = _unseen(state, f"breaker_{action}")
    if unseen is not None:  # a success here would change a breaker no task uses
        return {"error": unseen}
    label = breaker_label(name, key or None)  # (an empty KEY from the command line: no key)
    if not label.isprintable():  # (typed: shown text is printable; anything else is escaped)
        label = visible(label)
    try:
        snapshot = operate(state.consumer.app, action, name, key or None)
    except (LookupError, ValueError, ConfigurationError) as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a store outage, say: a reply, never a dead control thread
        logger.exception("celery-breaker: breaker_%s %s failed", action, label)
        from ..storage.masking import MaskedText  # (here: every celery command imports this module)

        return {"error": f"breaker_{action} {label}: {MaskedText(exc)}"}
    label = shown_label(breaker_label(snapshot["name"], snapshot["key"]))  # (the breaker it named, as status shows it)
    text = f"breaker {label} {ACTIONS[action].done}; state {snapshot['state']}"
    if not snapshot["changed"]:
        text = f"breaker {label} already {snapshot['state']}: nothing changed"
    if snapshot["warning"] is not None:  # (`celery control` prints only the "ok" text)
        text += f". WARNING: {snapshot['warning']}"
    return {"ok": text}


def _as_label(value: Any, command: str = "breaker_open") -> str | None:
    """The fix for a name that is a label (``crm[tenant-7]``, as ``celery breaker status``
    shows a per-key breaker): the key goes apart, after the name. ``None`` for any other
    malformed name (``check_name``'s own message says what is wrong with it)."""
    if not isinstance(value, str):
        return None
    name, key = split_label(value)
    if key is None:
        return None
    try:
        check_name(name)
    except ConfigurationError:
        return None
    dashes = "-- " if key.startswith("-") else ""  # (else Celery's own option parser reads it)
    return (
        f"breaker name {value!r} is a per-key breaker's label (NAME[KEY]); celery control takes the key as an "
        f"argument of its own, after the name: celery control {command} {dashes}{shlex.quote(name)} "
        f"{shlex.quote(key) if key else '<KEY>'} (celery breaker takes the label as it is)"
    )


def _typed_key(value: str) -> str:
    """A breaker key for the ``celery`` client: one that cannot name a breaker is a usage error (exit 2)."""
    try:
        check_key(value)
    except BreakerKeyError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _typed_name(value: str) -> str:
    """A breaker name for the ``celery`` client: malformed, or unknown to the app the
    client loaded (``-A``) and to its store, is a usage error (exit 2) before anything is
    sent. If the client cannot read the store, the workers decide."""
    try:
        name = check_name(value, "breaker name")
    except ConfigurationError as exc:
        context = click.get_current_context(silent=True)  # (`celery control COMMAND ...`: its COMMAND)
        command = str(context.params.get("command") or "breaker_open") if context is not None else "breaker_open"
        raise click.BadParameter(_as_label(value, command) or str(exc)) from None
    app = current_app._get_current_object()
    try:
        store, known = _knows(app, name)
        listing = "" if known else ", ".join(sorted(_known_names(app, store))) or "none"
    except Exception:  # no store from here (or no settings): leave it to the workers
        return name
    if not known:
        raise click.BadParameter(f"unknown breaker {name!r}; known: {listing}")
    return name


_ARGS = [("name", _typed_name), ("key", _typed_key)]
_SIGNATURE = "<breaker name> [key]"


@inspect_command(  # type: ignore[untyped-decorator]
    name="breakers",
    variadic="patterns",
    signature="[PATTERN]...",
    help="State of the breakers in the shared store: every one, or those a pattern matches (crm*, crm[tenant-7]).",
)
def breakers(state: Any, patterns: list[str] | str | None = None, **_: Any) -> Any:
    """The breakers this worker's store holds (a Redis store: the whole cluster's), as
    dicts: every one, or those ``patterns`` match, as ``celery breaker status`` selects
    them (a pattern that names one breaker exactly is looked up alone: with 40,000
    per-key breakers, every worker's reply listed them all, 20.7 MB). A Redis Cluster
    with a primary down is listed in part, and says so: ``{"breakers": [...],
    "unreached": [servers], "warning": ...}`` (a reader of the list alone took the
    part for the whole)."""
    from ..monitoring.status import store_of
    from .console import listed_rows
    from .selection import breakers_selected, unreached_of, unreached_text

    unseen = _unseen(state, "inspect breakers")
    if unseen is not None:  # (the main process's breakers: none a task uses)
        return {"error": unseen}
    try:
        if isinstance(patterns, str):  # (a program's broadcast, patterns="crm*": one pattern, not its letters)
            patterns = [patterns]
        wanted = [str(pattern) for pattern in patterns or ()]
        rows = breakers_selected(store_of(state.consumer.app), wanted)
        listed = listed_rows(rows)  # (as status --json: an unreadable breaker, a row of its own)
        warning = unreached_text(rows)
        if warning is None:
            return listed
        return {"breakers": listed, "unreached": list(unreached_of(rows)), "warning": warning}
    except Exception as exc:
        logger.exception("celery-breaker: inspect breakers failed")
        from ..storage.masking import MaskedText  # (here: every celery command imports this module)

        return {"error": f"inspect breakers: {MaskedText(exc)}"}


def _register(action: str, help_text: str) -> None:
    def command(state: Any, name: str | None = None, key: str | None = None) -> dict[str, Any]:
        return _reply(state, action, name, key)

    command.__name__ = command.__qualname__ = f"breaker_{action}"
    command.__doc__ = help_text
    control_command(name=f"breaker_{action}", args=_ARGS, signature=_SIGNATURE, help=help_text)(command)


for _action in ACTIONS.values():
    _register(_action.name, _action.summary.replace("NAME", "a breaker"))


def _follow_event_switches() -> None:
    """Have ``celery control enable_events``/``disable_events`` switch breaker events too.

    Flower sends ``enable_events`` every few seconds to a worker started without ``-E``:
    Celery then sends task events, and breaker events, which follow the worker's task
    events when ``breaker_send_events`` is unset, must follow as well (``events.switched``)."""
    for name, on in (("enable_events", True), ("disable_events", False)):
        handler = Panel.data.get(name)
        if handler is None or getattr(handler, "_celery_breaker_follows", False):
            continue

        def switch(state: Any, *args: Any, _handler: Any = handler, _on: bool = on, **kwargs: Any) -> Any:
            reply = _handler(state, *args, **kwargs)
            if isinstance(reply, dict) and "ok" in reply:  # (not "event dispatcher unavailable")
                from ..integration import events

                events.switched(_on)
            return reply

        switch.__name__ = switch.__qualname__ = name
        switch.__doc__ = handler.__doc__
        switch._celery_breaker_follows = True  # type: ignore[attr-defined]
        Panel.data[name] = switch


_follow_event_switches()
