"""Stores chosen by URL scheme: each backend registers its schemes; an unknown scheme is a ConfigurationError."""

from __future__ import annotations

import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .base import Cell, StorageError, Store
from .memory import MemoryStore

__all__ = ["Cell", "MemoryStore", "StorageError", "Store", "register_scheme", "resolve_store", "store_from_url"]

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


def store_from_url(url: str) -> Store:
    """The process's store for ``url``: one per URL, so equal URLs share breakers."""
    if not isinstance(url, str):
        raise ConfigurationError(f"breaker_storage_url must be a URL string, got {url!r}")
    found = _OPEN.get(url)
    if found is not None:
        return found
    scheme = urlsplit(url).scheme.lower()
    factory = _FACTORIES.get(scheme)
    if factory is None:
        raise ConfigurationError(
            f"breaker_storage_url: unknown scheme {scheme!r} in {url!r}; "
            f"this build supports: {', '.join(sorted(f + '://' for f in _FACTORIES))}"
        )
    with _OPEN_LOCK:
        found = _OPEN.get(url)
        if found is None:
            found = _OPEN[url] = factory(url)
        return found


def resolve_store(storage: str | Store) -> Store:
    """A store object as given, or the store for a URL."""
    if isinstance(storage, str):
        return store_from_url(storage)
    if not hasattr(storage, "cell"):
        raise ConfigurationError(f"storage must be a store URL or a store object, got {storage!r}")
    return storage
