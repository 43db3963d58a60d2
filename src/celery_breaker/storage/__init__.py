"""Where breakers live: the store contract, the scheme registry and the stores every build has.

``contract`` says what a store and a cell must do; ``registry`` opens stores by URL
scheme (each backend registers its own); ``memory`` is the one-process default,
``fallback`` what a shared store's breakers do while it is down, and ``redis`` the shared
store (importing it registers its schemes; redis-py loads only when a store is opened).
Internal: the public names are ``celery_breaker``'s own.
"""

from . import redis as _redis  # noqa: F401  (registers the Redis schemes)
from .contract import (
    NO_MOVES,
    Cell,
    EvictionCheck,
    History,
    Listing,
    Moves,
    Parking,
    ReleasePace,
    Selected,
    Store,
    UnreadableBreaker,
)
from .fallback import FallbackStore, forced_why, with_fallback
from .memory import MemoryStore
from .registry import (
    check_storage_url,
    close_stores,
    flush_stores,
    is_shared_url,
    register_scheme,
    resolve_store,
    store_from_url,
)
from .urls import describe_url

__all__ = [
    "NO_MOVES",
    "Cell",
    "EvictionCheck",
    "FallbackStore",
    "History",
    "Listing",
    "MemoryStore",
    "Moves",
    "Parking",
    "ReleasePace",
    "Selected",
    "Store",
    "UnreadableBreaker",
    "check_storage_url",
    "close_stores",
    "describe_url",
    "flush_stores",
    "forced_why",
    "is_shared_url",
    "register_scheme",
    "resolve_store",
    "store_from_url",
    "with_fallback",
]
