"""Per-app registry of CircuitBreaker objects, bounded however many per-key breakers appear."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from ..breaker import CircuitBreaker, TransitionListener
from ..clock import SYSTEM_CLOCK, Clock
from ..core import BreakerPolicy
from .settings import get_settings

__all__ = ["BreakerRegistry", "registry_for"]

#: Breaker objects kept per app; beyond this the oldest half is dropped. Dropping one
#: loses nothing: its state lives in the store, and the next call builds it again.
MAX_CACHED_BREAKERS = 10_000

_ATTRIBUTE = "_celery_breaker_registry"
_LOCK = threading.Lock()
#: Every registry of this process (its lock is made again in a forked child).
_REGISTRIES: weakref.WeakSet[BreakerRegistry] = weakref.WeakSet()


class BreakerRegistry:
    """The CircuitBreaker for each (name, key) an app's tasks use."""

    def __init__(self, app: Any, *, clock: Clock | None = None) -> None:
        self.app = app
        self.clock = clock or SYSTEM_CLOCK
        self._breakers: dict[tuple[str, str | None], CircuitBreaker] = {}
        self._listeners: list[TransitionListener] = []
        self._lock = threading.Lock()
        _REGISTRIES.add(self)
        self.version = 0
        """Moves on whenever the registry makes a breaker or lets one go: a breaker it gave
        out is still its breaker for that (name, key) while the version is unchanged."""

    def get(self, name: str, key: str | None, policy: BreakerPolicy) -> CircuitBreaker:
        """The breaker for ``(name, key)``, cached; a changed ``policy`` makes a new one that keeps the listeners."""
        found = self._breakers.get((name, key))
        if found is not None:
            if found.policy is policy:
                return found
            if found.policy == policy:  # settings were re-read: same rules, new object
                found.policy = policy
                return found
        settings = get_settings(self.app)
        breaker = CircuitBreaker(
            name, policy, storage=settings.storage_url, clock=self.clock, key=key,
            on_storage_error=settings.on_storage_error,
        )  # fmt: skip
        for listener in (*self._listeners, *(found.listeners if found is not None else ())):
            if listener not in breaker.listeners:
                breaker.add_listener(listener)
        with self._lock:
            if len(self._breakers) >= MAX_CACHED_BREAKERS:
                for ident in list(self._breakers)[: MAX_CACHED_BREAKERS // 2]:
                    del self._breakers[ident]
            self._breakers[(name, key)] = breaker
            self.version += 1
        return breaker

    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener(transition)`` for every breaker of this app, per-key ones included."""
        with self._lock:
            self._listeners.append(listener)
            for breaker in self._breakers.values():
                breaker.add_listener(listener)

    def use_clock(self, clock: Clock) -> None:
        """Build every breaker from now on with ``clock`` (for tests)."""
        with self._lock:
            self.clock = clock
            self._breakers.clear()
            self.version += 1


def registry_for(app: Any) -> BreakerRegistry:
    """The app's registry, created on first use."""
    found: BreakerRegistry | None = getattr(app, _ATTRIBUTE, None)
    if found is None:
        with _LOCK:
            found = getattr(app, _ATTRIBUTE, None)
            if found is None:
                found = BreakerRegistry(app)
                setattr(app, _ATTRIBUTE, found)
    return found


def _reinit_locks_after_fork() -> None:
    # A lock another thread (the releaser, the store's agent) held at fork time would
    # stay held for ever in the child: a prefork child forked after start (autoscale,
    # max-tasks-per-child, one replacing a child killed at its limit) hung on it.
    global _LOCK  # noqa: PLW0603 (the lock is made again in the child)
    _LOCK = threading.Lock()
    for registry in list(_REGISTRIES):
        registry._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)
