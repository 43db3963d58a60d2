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
from ..errors import ConfigurationError, ParkedTasksError, StorageError, UnknownBreakerError
from ..integration.deferral.selection import waiting_elsewhere
from ..integration.inventory import AppBreaker, app_inventory, policy_named
from ..integration.settings import get_settings
from ..labels import breaker_label, read_visible, shown_label, split_label, visible
from ..names import check_key, check_name, encodable, kept_key
from ..storage import Cell, Listing, Store, UnreadableBreaker, describe_url, resolve_store
from .actions import ACTIONS, DELETE, Action

#: At most this many names are listed in an error message.
MAX_LISTED = 20

_CREATE_HINT = "pass --create to act on it anyway"

__all__ = [
    "Deletion",
    "Move",
    "Purge",
    "assess",
    "caution",
    "delete",
    "operate",
    "purge",
    "shared_store",
]

#: States in which a breaker holds calls back: an operator action that admits them is cautious.
_HOLDING = (State.OPEN, State.HALF_OPEN, State.FORCED_OPEN)


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
    warning: str | None = None
    """Why the action was risky (``caution``): the breaker's downstream was failing."""

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``."""
        return self.after.label

    @property
    def changed(self) -> bool:
        """It made a transition or created the breaker. False: the breaker was as asked
        already (forced open, say, by another worker the same broadcast reached), and a
        move that changes nothing is none."""
        return bool(self.transitions) or self.before is None


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
    elsewhere: str | None = None
    """Where the app's deferred tasks wait instead, when it does not park them in the
    store (RabbitMQ's delay queues): no purge reaches them (``None``: it parks them)."""


@dataclass(frozen=True, slots=True)
class Deletion:
    """What deleting one breaker did."""

    label: str
    """``'crm'`` or ``'crm[tenant-7]'``."""
    before: BreakerSnapshot | None
    """The breaker as it was, or ``None`` when nothing but parked tasks was left of it."""
    discarded: int
    """Parked tasks purged with it (``purge=True``): they never run."""
    claimed: int
    """Tasks a releaser was publishing again: they run (and a call creates the breaker afresh)."""
    store: str
    """The store's URL, passwords masked."""
    in_app: bool
    """The app's tasks use this breaker: their next call creates it afresh (closed, the app's policy)."""
    warning: str | None = None
    existed: bool = True
    """Anything of it was there to delete (its state, or tasks parked or claimed); False for a
    breaker the app names that was never stored: nothing was deleted."""
    """Why deleting it was risky (``caution``): its downstream was failing."""


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


class _Stored:
    """Which breakers the store holds, found without reading them all: each breaker asked
    about is looked up alone (``Store.find``), and the whole store is listed only for a
    message naming what it holds. (Listing it for every action took 6 s with 40,000
    per-key breakers in Redis, twice per ``celery control`` command, in the worker's main process.)"""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._found: dict[tuple[str, str | None], BreakerSnapshot | UnreadableBreaker | None] = {}
        self._everything: set[tuple[str, str | None]] | None = None

    def __contains__(self, ident: tuple[str, str | None]) -> bool:
        """Whether the store held ``ident`` when first asked (later answers repeat it)."""
        return self.found(ident) is not None

    def found(self, ident: tuple[str, str | None]) -> BreakerSnapshot | UnreadableBreaker | None:
        """``ident`` as the store held it when first asked (``Store.find``: read, never
        written; an ``UnreadableBreaker`` when its state cannot be read)."""
        if ident not in self._found:
            self._found[ident] = self.store.find(*ident, self.clock)
        return self._found[ident]

    def everything(self) -> set[tuple[str, str | None]]:
        """Every breaker the store holds (a listing: for messages, not for every action)."""
        if self._everything is None:
            listing = self.store.snapshots(self.clock)
            unreadable = listing.unreadable if isinstance(listing, Listing) else ()  # (held: a move repairs them)
            self._everything = {(snapshot.name, snapshot.key) for snapshot in listing}
            self._everything |= {(found.name, found.key) for found in unreadable}
        return self._everything


def _listing(names: list[str]) -> str:
    shown = ", ".join(visible(name) for name in names[:MAX_LISTED])
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
    """Refuse a name that cannot name a breaker (the one rule, ``names``) before anything
    is read; ``name`` may be a label (``crm[tenant-7]``) when no ``key`` is given. A key
    waits for the store (``_target``): a task may have made any text a key."""
    if key is None:
        name, key = split_label(name) if isinstance(name, str) else (name, None)
    try:
        check_name(name, "breaker name")
    except ConfigurationError as exc:
        raise UnknownBreakerError(str(exc)) from None
    if key is not None and not isinstance(key, str):  # (a program may pass anything)
        check_key(key)  # type: ignore[unreachable]


def _target(
    app: Any,
    name: str,
    key: str | None,
    store: Store,
    clock: Clock,
    *,
    create: bool,
    hint: str,
    as_shown: bool,
    also_known: Callable[[str, str | None], bool] | None = None,
) -> tuple[str, str | None, dict[str, AppBreaker], _Stored]:
    """The breaker an operator names: ``(name, key, the app's breakers, those in the store)``.

    ``name`` may be a label (``crm[tenant-7]``) unless it is itself a known name. Known:
    in the store, named by the app (without a key, unless its tasks guard it only per
    key), or ``also_known``. An unknown one raises ``UnknownBreakerError`` ending in
    ``hint``, unless ``create``. ``name`` and
    ``key`` were checked (``_check_name``) before the store was opened. ``as_shown``: the
    key was typed as ``status`` shows it (the CLI, ``celery control``), not passed as
    the store holds it (the web page, a program).
    """
    named = app_inventory(app)
    in_store = _Stored(store, clock)

    def known(name: str, key: str | None) -> bool:
        in_app = key is None and name in named and not named[name].per_key
        return in_app or (name, key) in in_store or (also_known is not None and also_known(name, key))

    if key is None:
        label = split_label(name)
        try:
            plain = known(name, key)
        except StorageError:
            # A Redis Cluster with a primary down: ``crm[t3]`` read as a breaker of that name
            # hashes to a slot of its own, which may be the down one's, while the breaker the
            # label names lives on one that answers (`open 'crm[t3]'` failed where `open crm
            # --key t3` worked). A name that is no label has nothing else to be.
            if label[1] is None:
                raise
            plain = False
        if not plain:
            name, key = label
    if key is not None:
        # Typed, a key is read as `status` shows it (``a\\nb``: a newline; ``C:\\\\tmp``: one
        # backslash), which is how a key a task made with control characters is named
        # at all; else as it is. Typed with a control character, it is a quoting mistake
        # (`status` never shows one). A key not found must be one an operator can name:
        # it is never created otherwise.
        if as_shown and not key.isprintable():
            check_key(key)
        if not encodable(key):
            # A byte that is not UTF-8 (typed in another encoding): the breaker a task made
            # of the same key keeps it as ``kept_key`` writes it, and so does this command.
            key = kept_key(name, key)
        stored = read_visible(key) if as_shown else None
        if stored is not None and known(name, stored):
            key = stored
        elif not known(name, key):
            check_key(key)
            kept = kept_key(name, key)  # (a key too long to keep: the one its breaker keeps)
            if kept != key and (create or known(name, kept)):
                key = kept
    if not create and not known(name, key):
        everything = in_store.everything()
        if key is None and name in named and named[name].per_key:
            raise _keyless(name, everything, describe_url(store.url), hint)
        names = sorted(set(named) | {n for n, _ in everything})
        raise _unknown(name, key, names, everything, describe_url(store.url), hint)
    return name, key, named, in_store


def _keyless(name: str, in_store: set[tuple[str, str | None]], store: str, hint: str) -> UnknownBreakerError:
    # Acting on it would report success on a breaker no task consults: the tasks run on.
    keys = sorted(k for n, k in in_store if n == name and k is not None)
    where = f"its keys in {store}: {_listing(keys)}" if keys else f"{store} holds none of its keys yet"
    return UnknownBreakerError(
        f"the app's tasks guard {name!r} per key (breaker_key), so no task consults {name} without a key; "
        f"name one of its keys as {name}[KEY] (`celery breaker status --json '{name}[*]'` lists them; "
        f"{where}); {hint}"
    )


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 1:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def caution(action: str, before: BreakerSnapshot | None, policy: BreakerPolicy, now: float) -> str | None:
    """Why taking ``action`` on a breaker found as ``before`` risks its tasks, or ``None``.

    Risky: an action that admits calls (``Action.cautious``: close, reset, disable) on
    a breaker that tripped (OPEN, HALF_OPEN); on one forced open within its ``window``
    seconds (before ``now``, epoch seconds) of a failure; or on a CLOSED one whose
    window holds a failure that recent. The tasks deferred behind it then run against a
    downstream that was failing, and each failure spends one of their own retries.
    Closing or resetting a DISABLED breaker turns its protection back on: never risky.
    """
    found = _action(action)
    if found is None or not found.cautious or before is None or before.state is State.DISABLED:
        return None
    failed = before.last_failure
    recent = failed is not None and now - failed <= policy.window
    if before.state in (State.OPEN, State.HALF_OPEN):
        since = f" {_ago(now - before.opened_at)}" if before.opened_at is not None else ""
        why = f"{shown_label(before.label)} tripped{since}"
        why += f" (its last failure {_ago(now - failed)})" if failed is not None else ""
        why += ": its downstream may still be failing"
    elif before.state is State.FORCED_OPEN and recent:
        assert failed is not None
        why = f"a call through {shown_label(before.label)} failed {_ago(now - failed)}, before it was forced open"
    elif before.state is State.CLOSED and recent and before.window_failures > 0:
        assert failed is not None
        counted, calls, label = before.window_failures, before.window_calls, shown_label(before.label)
        if calls >= counted:
            why = f"{counted} of the last {calls} calls through {label} failed"
        else:  # (a rule that minds only failures counts no calls: FailuresWithin)
            why = f"{counted} calls through {label} failed in its window"
        why += f", the latest {_ago(now - failed)}"
    else:
        return None
    if found.name == "disable":
        effect = "disabling it lets every call through and nothing trips it"
    else:
        doing = {"close": "closing", "reset": "resetting", "delete": "deleting"}[found.name]
        effect = f"{doing} it lets calls through now"
        if before.state not in _HOLDING:
            effect += " and forgets the failures that would trip it"
    return f"{why}; {effect}: tasks deferred behind it run against that downstream and spend their own retries"


def _action(name: str) -> Action | None:
    return DELETE if name == DELETE.name else ACTIONS.get(name)


def _cell(
    app: Any, name: str, key: str | None, store: Store, clock: Clock, *, create: bool, hint: str, as_shown: bool
) -> tuple[Cell, bool, BreakerPolicy | None, bool]:
    """The named breaker's cell in ``store``, whether it existed, the app's policy for it
    (if the app names it), and whether the store holds it unreadable (``Store.find``: a
    cell's snapshot, which runs with a policy, would repair it, a write)."""
    name, key, named, in_store = _target(app, name, key, store, clock, create=create, hint=hint, as_shown=as_shown)
    found = named.get(name)
    wanted = found.policy if found is not None else policy_named(app, name)
    existed = (name, key) in in_store  # (asked before the cell is made: making it may store the breaker)
    unreadable = isinstance(in_store.found((name, key)), UnreadableBreaker)
    cell = store.cell(name, key, wanted or get_settings(app).policy_for(name), clock)
    return cell, existed, wanted, unreadable


def assess(
    app: Any,
    action: str,
    name: str,
    key: str | None = None,
    *,
    create: bool = False,
    store: Store | None = None,
    clock: Clock | None = None,
    create_hint: str = _CREATE_HINT,
    as_shown: bool = False,
) -> str | None:
    """``caution`` for ``action`` on breaker ``name``/``key`` as it is now, changing
    nothing: what the CLI asks about before it acts. Raises as ``operate`` (``create_hint``
    and ``as_shown`` as there)."""
    if _action(action) is None:
        raise ValueError(f"unknown action {action!r}; one of {', '.join([*ACTIONS, DELETE.name])}")
    _check_name(name, key)
    store = store if store is not None else shared_store(app)
    clock = clock or SYSTEM_CLOCK
    cell, exists, _, unreadable = _cell(app, name, key, store, clock, create=create, hint=create_hint,
                                        as_shown=as_shown)  # fmt: skip
    if not exists or unreadable:  # (nothing read to judge by; reading it with a policy would repair it)
        return None
    return caution(action, cell.snapshot(clock.monotonic()), cell.policy, clock.time())


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
    as_shown: bool = False,
) -> Move:
    """Apply ``action`` (a key of ``ACTIONS``) to breaker ``name``/``key`` in the app's store.

    ``name`` may be a label as ``status`` shows it (``crm[tenant-7]``). The breaker must
    be in the store, or (without a key) be one the app names; ``create`` acts anyway.
    ``key`` is the key as the store holds it; ``as_shown``: as ``status`` shows it,
    typed by an operator (``tenant\\n7`` names a key with a newline, when there is one).
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
    cell, exists, wanted, _ = _cell(app, name, key, store, clock, create=create, hint=create_hint, as_shown=as_shown)
    stored = cell.policy
    found_as = cell.snapshot(clock.monotonic()) if exists else None
    before = found_as.state if found_as is not None else None
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
        store=describe_url(store.url),
        transitions=transitions,
        policy_differs=differs,
        warning=caution(action, found_as, stored, clock.time()),
    )


def purge(
    app: Any,
    name: str,
    key: str | None = None,
    *,
    store: Store | None = None,
    dry_run: bool = False,
    as_shown: bool = False,
) -> Purge:
    """Discard the tasks parked behind breaker ``name``/``key``, as many as were parked
    when the call began, oldest first; tasks being published by a releaser are left.

    Like ``celery purge``, the discarded tasks never run and their results stay
    PENDING. The breaker's state is not touched. ``name`` may be a label
    (``crm[tenant-7]``); it must be a breaker the store or the app knows, or have tasks
    parked (parked tasks outlive their breaker's state). ``dry_run``: discard nothing and
    check the same (``discarded`` 0, ``parked`` what would go: what the CLI asks about). Raises
    ``UnknownBreakerError``, ``BreakerKeyError``, ``ConfigurationError`` (a memory
    store, a store without parking) or ``StorageError``. ``as_shown`` as for ``operate``.
    """
    _check_name(name, key)
    store = store if store is not None else shared_store(app)
    parking = store.parking
    label = describe_url(store.url)
    if parking is None:
        raise ConfigurationError(f"the breaker store {label} parks no tasks: there is nothing to purge")
    parked_tags = set(parking.tags())
    name, key, _, _ = _target(app, name, key, store, SYSTEM_CLOCK, create=False, hint="nothing was purged",
                              as_shown=as_shown,
                              also_known=lambda name, key: parking.tag(name, key) in parked_tags)  # fmt: skip
    tag = parking.tag(name, key)
    discarded = 0 if dry_run else parking.purge(tag)
    parked, claimed = parking.count(tag)
    return Purge(
        label=breaker_label(name, key),
        discarded=discarded,
        parked=parked,
        claimed=claimed,
        store=label,
        elsewhere=waiting_elsewhere(app),
    )


def delete(
    app: Any,
    name: str,
    key: str | None = None,
    *,
    purge: bool = False,
    dry_run: bool = False,
    store: Store | None = None,
    clock: Clock | None = None,
    as_shown: bool = False,
) -> Deletion:
    """Delete breaker ``name``/``key`` from the app's store: its state, counters, stored
    policy and metrics history. It leaves ``status``, ``watch`` and the metrics; a call
    through it (in any process) creates it afresh, CLOSED, with that caller's policy.

    A breaker that tasks are parked behind is refused with ``ParkedTasksError``, unless
    ``purge``: its parked tasks are then discarded first (as ``purge`` does: they never
    run). Tasks a releaser is already publishing run. ``name`` may be a label
    (``crm[tenant-7]``); it must be known to the store or the app, or have tasks parked.
    ``dry_run``: change nothing, and say what it would do (what the CLI asks about).
    Raises ``UnknownBreakerError``, ``BreakerKeyError``, ``ParkedTasksError``,
    ``ConfigurationError`` (a memory store) or ``StorageError``. ``as_shown`` as for ``operate``.
    """
    _check_name(name, key)
    store = store if store is not None else shared_store(app)
    clock = clock or SYSTEM_CLOCK
    parking = store.parking
    parked_tags = set(parking.tags()) if parking is not None else set()

    def has_parked(name: str, key: str | None) -> bool:
        return parking is not None and parking.tag(name, key) in parked_tags

    name, key, named, in_store = _target(app, name, key, store, clock, create=False, hint="nothing was deleted",
                                         as_shown=as_shown, also_known=has_parked)  # fmt: skip
    label = breaker_label(name, key)
    tag = parking.tag(name, key) if parking is not None else ""
    parked, _ = parking.count(tag) if parking is not None else (0, 0)
    if parked and not purge:
        tasks = "1 task is" if parked == 1 else f"{parked} tasks are"
        raise ParkedTasksError(
            f"{tasks} parked behind {shown_label(label)}: deleting it would release them at once, to run against "
            f"its downstream; "
            f"purge them with it (--purge: they never run), or close it and delete it once they have been released"
        )
    before, warning = None, None
    # (a plan reads nothing with a policy from a breaker it cannot read: that would repair
    # it, a write, before the operator has answered; the delete itself may)
    if (name, key) in in_store and not (dry_run and isinstance(in_store.found((name, key)), UnreadableBreaker)):
        found = named.get(name)
        wanted = found.policy if found is not None else policy_named(app, name) or get_settings(app).policy_for(name)
        cell = store.cell(name, key, wanted, clock)
        before = cell.snapshot(clock.monotonic())
        warning = caution(DELETE.name, before, cell.policy, clock.time())
    discarded, claimed = 0, 0
    if dry_run:
        discarded = parked
        _, claimed = parking.count(tag) if parking is not None else (0, 0)
    elif parking is not None:
        discarded = parking.purge(tag) if parked else 0
        _, claimed = parking.count(tag)
    existed = (name, key) in in_store or bool(parked or claimed)
    if not dry_run:
        existed = store.delete(name, key) or existed
        if parking is not None and tag in parked_tags:
            parking.forget(tag)  # (it stays in the index while anything is parked or claimed)
    return Deletion(
        label=label,
        before=before,
        discarded=discarded,
        claimed=claimed,
        store=describe_url(store.url),
        in_app=name in named and not (key is None and named[name].per_key),
        warning=warning,
        existed=existed,
    )
