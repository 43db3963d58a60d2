"""Stores by URL scheme: each backend registers its own schemes; the process's open stores.

A backend module calls ``register_scheme`` for the schemes it serves (``memory.py``:
``memory``; ``redis/__init__.py``: every Redis and Valkey spelling) and says whether a
store it opens is shared between processes. Settings, the CLI and Flower ask this
registry, never a list of their own. An unknown scheme is a ``ConfigurationError``.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.util
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ConfigurationError, StorageError
from ..names import edit_distance
from .contract import Store
from .urls import describe_url, scrub_secrets

__all__ = [
    "check_storage_url",
    "close_stores",
    "flush_stores",
    "is_shared_url",
    "register_scheme",
    "remember",
    "resolve_store",
    "store_from_url",
]

StoreFactory = Callable[[str], Store]


@dataclass(frozen=True, slots=True)
class _Backend:
    factory: StoreFactory
    shared: bool


_BACKENDS: dict[str, _Backend] = {}
_OPEN: dict[str, Store] = {}
_OPEN_LOCK = threading.Lock()
#: Every store this process made (however): ``flush_stores`` and ``close_stores`` reach them all.
_LIVE: weakref.WeakSet[Store] = weakref.WeakSet()


def register_scheme(*schemes: str, shared: bool) -> Callable[[StoreFactory], StoreFactory]:
    """Decorator: ``factory(url)`` opens the stores of these schemes. ``shared``: their
    breakers are seen by every process that opens the same URL (so parking, operator
    commands and ``breaker_key_prefix`` apply)."""

    def register(factory: StoreFactory) -> StoreFactory:
        for scheme in schemes:
            _BACKENDS[scheme] = _Backend(factory, shared)
        return factory

    return register


def remember(store: Store) -> None:
    """Called by each store as it is made, so ``flush_stores``/``close_stores`` reach it."""
    _LIVE.add(store)


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError as exc:  # (an unclosed "[" of an IPv6 host, say)
        raise ConfigurationError(
            f"breaker_storage_url {describe_url(url)!r} is no valid URL ({scrub_secrets(str(exc), url)}); write it as "
            f"redis://[:password@]host[:port][/db], percent-encoding a password's special characters"
        ) from None


def check_storage_url(url: str) -> None:
    """Raise ConfigurationError unless ``url`` names a scheme this build can open."""
    if _scheme(url) not in _BACKENDS:
        meant = _meant(url)
        raise ConfigurationError(
            f"breaker_storage_url: unknown scheme {_scheme(url)!r} in {describe_url(url)!r}"
            + (f" (did you mean {meant}?)" if meant else "")
            + f"; this build supports: {', '.join(sorted(f + '://' for f in _BACKENDS))}"
        )


def _meant(url: str) -> str | None:
    """What a URL of no known scheme was probably meant to be: a scheme one typo away
    (``reddis://``), a scheme alone (``memory``), or a host and port with no scheme at
    all (``localhost:6379``, a Redis's), shown masked; else ``None``."""
    if not url.strip():
        return None
    if "://" not in url:
        if url.lower() in _BACKENDS:
            return f"{url.lower()}://"
        return describe_url(f"redis://{url}") if "redis" in _BACKENDS else None
    scheme = _scheme(url)
    near = sorted((edit_distance(scheme, known, 2), known) for known in _BACKENDS)
    return f"{near[0][1]}://" if near and near[0][0] <= 2 else None


def is_shared_url(url: str) -> bool:
    """Whether a store opened from ``url`` is shared between processes (a known scheme)."""
    backend = _BACKENDS.get(_scheme(url))
    return backend is not None and backend.shared


def store_from_url(url: str) -> Store:
    """The process's store for ``url``: one per URL, so equal URLs share breakers."""
    if not isinstance(url, str):
        raise ConfigurationError(f"breaker_storage_url must be a URL string, got a {type(url).__name__}")
    found = _OPEN.get(url)
    if found is not None:
        return found
    check_storage_url(url)
    factory = _BACKENDS[_scheme(url)].factory
    with _OPEN_LOCK:
        found = _OPEN.get(url)
        if found is None:
            try:
                found = _OPEN[url] = factory(url)
            except ConfigurationError as exc:
                # (the store's own message: it shows no password, RedisStore.from_url)
                raise ConfigurationError(f"breaker_storage_url {describe_url(url)!r}: {exc}") from None
        return found


def resolve_store(storage: str | Store) -> Store:
    """A store object as given, or the store for a URL."""
    if isinstance(storage, str):
        return store_from_url(storage)
    if not hasattr(storage, "cell"):
        # (its type only: a list or bytes of URLs, a dict of options, may hold a password)
        raise ConfigurationError(
            f"storage must be a store URL (a str such as 'redis://host:6379/0') or a store object, got a "
            f"{type(storage).__name__}"
        )
    return storage


def flush_stores() -> None:
    """Send every count this process keeps locally (successes, rejections, deferrals) to
    its shared stores now; a prefork child calls it before it exits. A store that cannot
    be reached keeps its counts (they are sent later, or lost with the process)."""
    for store in list(_LIVE):
        with contextlib.suppress(StorageError):
            store.flush()


def close_stores() -> None:
    """Send every count this process keeps locally, stop following transitions and close
    its connections to shared stores; a later breaker call connects again. For scripts
    done with Redis before it stops (workers need not call it)."""
    for store in list(_LIVE):
        store.close()


def _flush_at_process_exit(_: object = None) -> None:
    """Have ``flush_stores`` run when a ``multiprocessing`` child ends: one started by
    fork (or forkserver) leaves through ``os._exit``, which runs no ``atexit`` hook, only
    the finalizers of ``multiprocessing.util`` (cleared at the fork, hence registered
    again in each child)."""
    multiprocessing.util.Finalize(None, flush_stores, exitpriority=0)


atexit.register(flush_stores)
_flush_at_process_exit()
multiprocessing.util.register_after_fork(_flush_at_process_exit, _flush_at_process_exit)


def _reinit_locks_after_fork() -> None:
    # A lock another thread (the releaser, the store's agent) held at fork time would
    # stay held for ever in the child: a prefork child forked after start (autoscale,
    # max-tasks-per-child, one replacing a child killed at its limit) hung on it.
    global _OPEN_LOCK  # noqa: PLW0603 (the lock is made again in the child)
    _OPEN_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)
