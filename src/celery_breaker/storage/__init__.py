"""Stores chosen by URL scheme: each backend registers its schemes; an unknown scheme is a ConfigurationError."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .base import Cell, StorageError, Store
from .fallback import FallbackStore
from .memory import MemoryStore
from .urls import describe_url

__all__ = [
    "Cell",
    "FallbackStore",
    "MemoryStore",
    "StorageError",
    "Store",
    "check_storage_url",
    "close_stores",
    "describe_url",
    "flush_stores",
    "register_scheme",
    "resolve_store",
    "store_from_url",
    "with_fallback",
]

StoreFactory = Callable[[str], Store]

_FACTORIES: dict[str, StoreFactory] = {}
_OPEN: dict[str, Store] = {}
_OPEN_LOCK = threading.Lock()


def register_scheme(*schemes: str) -> Callable[[StoreFactory], StoreFactory]:
    """Class or function decorator: ``factory(url)`` builds the store for these schemes."""

    def register(factory: StoreFactory) -> StoreFactory:
        for scheme in schemes:
            _FACTORIES[scheme] = factory
        return factory

    return register


register_scheme("memory")(MemoryStore.from_url)


@register_scheme(
    "redis", "rediss", "redis+unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster",
    "valkey", "valkeys", "valkey+unix", "valkey+sentinel", "valkeys+sentinel", "valkey+cluster", "valkeys+cluster",
)  # fmt: skip
def _redis_store(url: str) -> Store:
    # Imported here, so memory:// never loads redis-py.
    try:
        from .redis import RedisStore
    except ModuleNotFoundError as exc:
        if exc.name != "redis":
            raise
        raise ConfigurationError(
            f"{describe_url(url)!r} needs redis-py, which is not installed: pip install 'celery-breaker[redis]'"
        ) from None

    return RedisStore.from_url(url)


def flush_stores() -> None:
    """Send every count this process keeps locally (successes, rejections, deferrals) to
    its shared stores now; a prefork child calls it before it exits."""
    redis_store = sys.modules.get(f"{__name__}.redis.store")
    if redis_store is not None:  # never imports redis-py for a memory-only process
        redis_store.flush_all()


def close_stores() -> None:
    """Send every count this process keeps locally, stop following transitions and close
    its connections to shared stores; a later breaker call connects again. For scripts
    done with Redis before it stops (workers need not call it)."""
    redis_store = sys.modules.get(f"{__name__}.redis.store")
    if redis_store is not None:
        redis_store.close_all()


def check_storage_url(url: str) -> None:
    """Raise ConfigurationError unless ``url`` names a scheme this build can open."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _FACTORIES:
        raise ConfigurationError(
            f"breaker_storage_url: unknown scheme {scheme!r} in {describe_url(url)!r}; "
            f"this build supports: {', '.join(sorted(f + '://' for f in _FACTORIES))}"
        )


def store_from_url(url: str) -> Store:
    """The process's store for ``url``: one per URL, so equal URLs share breakers."""
    if not isinstance(url, str):
        raise ConfigurationError(f"breaker_storage_url must be a URL string, got {url!r}")
    found = _OPEN.get(url)
    if found is not None:
        return found
    check_storage_url(url)
    factory = _FACTORIES[urlsplit(url).scheme.lower()]
    with _OPEN_LOCK:
        found = _OPEN.get(url)
        if found is None:
            try:
                found = _OPEN[url] = factory(url)
            except ConfigurationError as exc:
                raise ConfigurationError(f"breaker_storage_url {describe_url(url)!r}: {exc}") from None
        return found


_FALLBACKS: dict[tuple[int, str], FallbackStore] = {}


def with_fallback(store: Store, mode: str) -> Store:
    """``store`` itself when it cannot fail (in memory), else the process's
    ``FallbackStore`` for it and ``mode`` (``breaker_on_storage_error``)."""
    if isinstance(store, (MemoryStore, FallbackStore)):
        return store
    ident = (id(store), mode)
    found = _FALLBACKS.get(ident)
    if found is None or found.primary is not store:
        with _OPEN_LOCK:
            found = _FALLBACKS[ident] = FallbackStore(store, mode)
    # FallbackCell exposes the Cell attributes as properties (it forwards them).
    return cast(Store, found)


def resolve_store(storage: str | Store) -> Store:
    """A store object as given, or the store for a URL."""
    if isinstance(storage, str):
        return store_from_url(storage)
    if not hasattr(storage, "cell"):
        raise ConfigurationError(f"storage must be a store URL or a store object, got {storage!r}")
    return storage
