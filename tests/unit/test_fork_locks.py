"""Locks a prefork child inherits: made again, never held by a thread it does not have.

A prefork pool forks children after the worker started (autoscale, max-tasks-per-child,
a child replacing one killed at its time limit) while the releaser and the store's agent
run in the parent. A lock one of them held at that moment stayed held in the child for
good, and the child hung on its first task that took it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery

from celery_breaker import health
from celery_breaker.integration import registry, settings
from celery_breaker.integration.deferral import selection
from celery_breaker.storage import registry as stores

# (Forking while another thread holds a lock is the point here: Python 3.12+ warns of it.)
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


@contextmanager
def held_elsewhere(lock: Any) -> Iterator[None]:
    """``lock`` held by another thread (as the releaser would hold it) until the block ends."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            done.wait(10)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(5)
    try:
        yield
    finally:
        done.set()
        thread.join(5)


def _free_in_a_child(lock_now: Callable[[], Any]) -> bool:
    """Whether a forked child can take the lock ``lock_now()`` gives there at once."""
    pid = os.fork()
    if pid == 0:  # the child: answer by its exit code, and leave at once
        os._exit(0 if lock_now().acquire(timeout=2) else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    "lock_now",
    [
        lambda: registry._LOCK,
        lambda: settings._LOCK,
        lambda: selection._LOCK,
        lambda: stores._OPEN_LOCK,
        lambda: health._HUNG_LOCK,
        lambda: health._PENDING_LOCK,
    ],
    ids=["registries", "settings", "strategies", "stores", "hung-checks", "pending-checks"],
)
def test_a_module_lock_held_by_another_thread_at_fork_is_free_in_the_child(lock_now: Callable[[], Any]) -> None:
    with held_elsewhere(lock_now()):
        assert _free_in_a_child(lock_now)


def test_a_registry_lock_held_by_another_thread_at_fork_is_free_in_the_child() -> None:
    found = registry.registry_for(Celery("fork-locks", set_as_current=False))
    with held_elsewhere(found._lock):
        assert _free_in_a_child(lambda: found._lock)


def test_the_parents_pending_checks_are_not_the_childs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settled by the child (abandon_pending_checks at its shutdown), they would free probe
    # slots the parent's checks still hold.
    monkeypatch.setattr(health, "_PENDING", {object()})
    pid = os.fork()
    if pid == 0:
        os._exit(0 if not health._PENDING else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
