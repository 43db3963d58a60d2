"""Operating an app's breakers in its shared store: ``operate`` (an ``ACTIONS`` entry) and ``purge``.

Free of click and of remote control: the Python API (``celery_breaker.ops.operate``), the
worker's remote-control commands and the ``celery breaker`` CLI all act through these.
Every function that reads the store raises ``StorageError`` when it cannot be reached.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..core import BreakerPolicy, BreakerSnapshot, State, Transition
from ..errors import ConfigurationError, UnknownBreakerError
from ..integration.inventory import app_breakers, policy_named
from ..integration.settings import get_settings
from ..labels import breaker_label, split_label
from ..names import check_key, check_name
from ..storage import Store, describe_url, resolve_store
from .actions import ACTIONS

#: At most this many names are listed in an error message.
MAX_LISTED = 20

_CREATE_HINT = "pass --create to act on it anyway"

__all__ = [
    "Move",
    "Purge",
    "operate",
    "purge",
    "shared_store",
]


@dataclass(frozen=True, slots=True)
class Move:
    """What one operator action did to one breaker."""

    action: str
    before: State | None
    """The state before, or ``None`` when the breaker did not exist and was created."""
    after: BreakerSnapshot
    store: str
    """The store's URL, passwords masked."""
    transitions: tuple[Transition, ...]
    """The transitions the action made (what listeners and events would announce)."""
    policy_differs: bool
    """The stored policy differed from the app's (a reset has now adopted the app's)."""

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``."""
        return self.after.label


@dataclass(frozen=True, slots=True)
class Purge:
    """What one purge discarded from one breaker's parked tasks."""

    label: str
    """``'crm'`` or ``'crm[tenant-7]'``."""
    discarded: int
    """Parked tasks discarded: they will never run, and their results stay PENDING."""
    parked: int
    """Tasks still parked: those parked while the purge ran."""
    claimed: int
    """Tasks a releaser had claimed and was publishing again: they run."""
    store: str
    """The store's URL, passwords masked."""


def shared_store(app: Any) -> Store:
    """The app's breaker store, refusing a ``memory://`` one: it holds only the breakers
    of the process that uses it, so another process can neither see nor change them."""
    url = get_settings(app).storage_url
    store = resolve_store(url)
    if not store.shared:
        raise ConfigurationError(
            f"breaker_storage_url is {describe_url(url)!r}: a memory store holds only the breakers of the "
            "process that uses it, so this command cannot see or change the workers' breakers; set "
            "breaker_storage_url to a redis:// URL (a Redis broker's server is the default) to share them"
        )
    return store


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    hidden = len(names) - MAX_LISTED
    return shown + (f" and {hidden} more" if hidden > 0 else "")


def _unknown(
    name: str, key: str | None, names: list[str], in_store: set[tuple[str, str | None]], store: str, hint: str
) -> UnknownBreakerError:
    if key is not None and name in names:
        keys = sorted(k for n, k in in_store if n == name and k is not None)
        text = f"breaker {name!r} has no key {key!r} in {store}"
        text += f"; its keys there: {_listing(keys)}" if keys else "; it has no per-key breakers there"
    else:
        text = f"no breaker named {name!r} in {store} or among the app's tasks"
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            text += f" (did you mean {close[0]!r}?)"
        text += f"; known breakers: {_listing(names)}" if names else "; the app and the store know no breakers"
    return UnknownBreakerError(f"{text}; {hint}")


def _check_name(name: str, key: str | None) -> None:
    """Refuse a name or key that cannot name a breaker (the one rule, ``names``) before
    anything is read; ``name`` may be a label (``crm[tenant-7]``) when no ``key`` is given."""
    if key is None:
        name, key = split_label(name) if isinstance(name, str) else (name, None)
    try:
        check_name(name, "breaker name")
    except ConfigurationError as exc:
        raise UnknownBreakerError(str(exc)) from None
    check_key(key)


def _target(
    app: Any,
    name: str,
    key: str | None,
    store: Store,
    clock: Clock,
    *,
    create: bool,
    hint: str,
    also_known: Callable[[str, str | None], bool] | None = None,
) -> tuple[str, str | None, dict[str, BreakerPolicy], set[tuple[str, str | None]]]:
    """The breaker an operator names: ``(name, key, the app's breakers, those in the store)``.

    ``name`` may be a label (``crm[tenant-7]``) unless it is itself a known name. Known:
    in the store, named by the app (without a key), or ``also_known``. An unknown one
    raises ``UnknownBreakerError`` ending in ``hint``, unless ``create``. ``name`` and
    ``key`` were checked (``_check_name``) before the store was opened.
    """
    named = app_breakers(app)
    in_store = {(snapshot.name, snapshot.key) for snapshot in store.snapshots(clock)}

    def known(name: str, key: str | None) -> bool:
        in_app = key is None and name in named
        return in_app or (name, key) in in_store or (also_known is not None and also_known(name, key))

    if key is None and not known(name, key):
        name, key = split_label(name)
        check_key(key)
    if not create and not known(name, key):
        names = sorted(set(named) | {n for n, _ in in_store})
        raise _unknown(name, key, names, in_store, describe_url(store.url), hint)
    return name, key, named, in_store


def operate(
    app: Any,
    action: str,
    name: str,
    key: str | None = None,
    *,
    create: bool = False,
    store: Store | None = None,
    clock: Clock | None = None,
    create_hint: str = _CREATE_HINT,
) -> Move:
    """Apply ``action`` (a key of ``ACTIONS``) to breaker ``name``/``key`` in the app's store.

    ``name`` may be a label as ``status`` shows it (``crm[tenant-7]``). The breaker must
    be in the store, or (without a key) be one the app names; ``create`` acts anyway.
    A breaker the app names gets the app's policy when created or reset; any other keeps
    the policy stored with it. Raises ``UnknownBreakerError``, ``BreakerKeyError``,
    ``ConfigurationError`` (a memory store, bad settings) or ``StorageError``.
    """
    found = ACTIONS.get(action)
    if found is None:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    _check_name(name, key)
    store = store if store is not None else shared_store(app)
    clock = clock or SYSTEM_CLOCK
    name, key, named, in_store = _target(app, name, key, store, clock, create=create, hint=create_hint)
    label = describe_url(store.url)
    exists = (name, key) in in_store

    wanted = named.get(name) or policy_named(app, name)
    cell = store.cell(name, key, wanted or get_settings(app).policy_for(name), clock)
    before = cell.state if exists else None
    stored = cell.policy
    differs = wanted is not None and stored != wanted
    if found.target is None:
        transitions = cell.reset(wanted or stored, clock.monotonic())
    else:
        transitions = cell.force(State(found.target), wanted or stored, clock.monotonic())
    # (reported to the caller, which announces them as it sees fit)
    return Move(
        action=action,
        before=before,
        after=cell.snapshot(clock.monotonic()),
        store=label,
        transitions=transitions,
        policy_differs=differs,
    )


def purge(app: Any, name: str, key: str | None = None, *, store: Store | None = None) -> Purge:
    """Discard the tasks parked behind breaker ``name``/``key``, as many as were parked
    when the call began, oldest first; tasks being published by a releaser are left.

    Like ``celery purge``, the discarded tasks never run and their results stay
    PENDING. The breaker's state is not touched. ``name`` may be a label
    (``crm[tenant-7]``); it must be a breaker the store or the app knows, or have tasks
    parked (parked tasks outlive their breaker's state). Raises
    ``UnknownBreakerError``, ``BreakerKeyError``, ``ConfigurationError`` (a memory
    store, a store without parking) or ``StorageError``.
    """
    _check_name(name, key)
    store = store if store is not None else shared_store(app)
    parking = store.parking
    label = describe_url(store.url)
    if parking is None:
        raise ConfigurationError(f"the breaker store {label} parks no tasks: there is nothing to purge")
    parked_tags = set(parking.tags())
    name, key, _, _ = _target(app, name, key, store, SYSTEM_CLOCK, create=False, hint="nothing was purged",
                              also_known=lambda name, key: parking.tag(name, key) in parked_tags)  # fmt: skip
    tag = parking.tag(name, key)
    discarded = parking.purge(tag)
    parked, claimed = parking.count(tag)
    return Purge(
        label=breaker_label(name, key),
        discarded=discarded,
        parked=parked,
        claimed=claimed,
        store=label,
    )
