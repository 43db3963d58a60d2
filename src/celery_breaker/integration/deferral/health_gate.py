"""Whether a breaker with a health check lets its parked tasks go: it runs the check when due, and sends no probes.

A breaker without a health check is probed by real tasks: the releaser publishes
``half_open_max_calls`` parked tasks when it may half-open (``release.lua``). One with a
health check must not be: nobody else calls it while every task is parked, so the
releaser runs the check itself when the breaker's open time is up (waiting a moment only,
for all the checks of a pass together: a slow check goes on without it, so it holds up no
other breaker), and releases no task
as a probe: it lets ``release.lua`` run only while the breaker admits calls or an operator
holds it open, or while it stays open for longer than ``MARGIN`` (then that script
releases nothing but the entries past their deadline, which go whatever the breaker says).
"""

from __future__ import annotations

import time
from typing import Any

from ...core import BreakerPolicy, State
from ...errors import ConfigurationError
from ...health import HealthCheck
from ...labels import split_label
from ..probes import breaker_with_probe, resolve_probe
from ..settings import get_settings
from ..task import BreakerTask
from ..task_options import task_breaker_config

__all__ = ["CHECK_WAIT", "MARGIN", "HealthGate"]

#: Seconds of open time left below which a breaker with a health check releases nothing at
#: all: the script decides on Redis's clock, which may run a little ahead of this view, and
#: hands out the probes once it sees the open time up.
MARGIN = 1.0
#: Seconds the releaser waits for health checks in one pass over the breakers, all checks
#: together: a check still running then goes on without it
#: (``CircuitBreaker.check_health(wait=...)``), and the releaser goes on to the other
#: breakers. It waited for each check to end: one that hung held up every other breaker's
#: tasks for its whole timeout; then for each check up to this long: 100 per-key breakers
#: whose checks hung made one pass last 25 s.
CHECK_WAIT = 0.25
#: What ``release.lua`` releases no probe for: calls pass, or an operator holds it open.
_NO_PROBES = (State.CLOSED, State.DISABLED, State.FORCED_OPEN)


class HealthGate:
    """For the releaser: which parked breakers have a health check, and whether each may release."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._checks: dict[str, tuple[BreakerPolicy, HealthCheck] | None] | None = None
        #: Seconds this pass may still wait for checks (``begin_pass``): once spent, a due
        #: check is started and left going at once, its verdict recorded when it comes.
        self._spare = CHECK_WAIT

    def begin_pass(self) -> None:
        """A new pass over the breakers: its checks may be waited for ``CHECK_WAIT`` seconds in all."""
        self._spare = CHECK_WAIT

    def holds(self, label: str) -> bool:
        """True when breaker ``label`` (``crm`` or ``crm[tenant-7]``) has a health check
        and releasing now could publish a parked task as its probe (it is half-open, or
        its open time is nearly up): nothing of it is released this tick. When its open
        time is up, the check runs here (``CircuitBreaker.check_health``), so the breaker
        can close on checks alone."""
        name, key = split_label(label)
        found = self._check_of(name)
        if found is None:
            return False
        policy, probe = found
        breaker = breaker_with_probe(self.app, name, key, policy, probe)
        started = time.monotonic()
        try:
            health = breaker.check_health(wait=self._spare)
        finally:
            self._spare = max(0.0, self._spare - (time.monotonic() - started))
        if health.state in _NO_PROBES:
            return False
        return not (health.state is State.OPEN and health.open_for is not None and health.open_for > MARGIN)

    def _check_of(self, name: str) -> tuple[BreakerPolicy, HealthCheck] | None:
        checks = self._checks
        if checks is None:
            checks = self._checks = self._task_checks()
        if name not in checks:
            checks[name] = self._setting_check(name)
        return checks[name]

    def _task_checks(self) -> dict[str, tuple[BreakerPolicy, HealthCheck] | None]:
        """The breakers of the app's tasks, with their policy and health check (or None)."""
        found: dict[str, tuple[BreakerPolicy, HealthCheck] | None] = {}
        for task in list(self.app.tasks.values()):
            if not isinstance(task, BreakerTask) or not task.is_guarded():
                continue
            try:
                config = task_breaker_config(task)
            except ConfigurationError:
                continue  # (the worker refused to start on it; nothing of it is parked here)
            if found.get(config.name) is None:
                found[config.name] = None if config.probe is None else (config.policy, config.probe)
        return found

    def _setting_check(self, name: str) -> tuple[BreakerPolicy, HealthCheck] | None:
        """A breaker no task of this app names: ``breaker_probes`` alone decides."""
        settings = get_settings(self.app)
        entry = settings.probe_for(name)
        if entry is None:
            return None
        pattern, probe = entry
        check = resolve_probe(self.app, probe, where=f"breaker_probes[{pattern!r}]", timeout=settings.probe_timeout)
        return settings.policy_for(name), check
