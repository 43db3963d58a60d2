"""The guard layer's breaker: ``CircuitBreaker`` and the run admissions a task takes, one concern a module.

* ``circuit_breaker``: the class, its constructor, ``call``, ``acall``, the decorators and
  the run admissions (``begin_run``, ``enter_run``), built from:
* ``steps``: its fields and the steps every way of guarding takes (admit, acquire,
  finish, announce), and transition logging;
* ``blocks``: ``with`` and ``async with``;
* ``checks``: the health check run in place of a call that wins a probe slot, and
  ``check_health``; ``check_limits``: how long a check may run;
* ``operating``: state, snapshot, listeners and an operator's moves;
* ``runs``: ``RunAdmission``, the ticket a run holds, and ``current_run``;
* ``run_breaker``: a run's own breaker object (``self.breaker`` in a task body).
"""

from __future__ import annotations

from . import run_breaker  # noqa: F401  (registers each run's own breaker: see runs.make_own_breakers_with)
from .check_limits import CHECK_LEASE_MARGIN as CHECK_LEASE_MARGIN
from .check_limits import check_fits as check_fits
from .check_limits import check_time as check_time
from .checks import bound_checks_in_runs as bound_checks_in_runs
from .checks import lease_runs_by as lease_runs_by
from .circuit_breaker import CircuitBreaker
from .runs import RUN, ExceptionTranslator, RunAdmission, current_run
from .steps import TransitionListener

__all__ = ["CircuitBreaker", "ExceptionTranslator", "RunAdmission", "TransitionListener", "current_run"]

_RUN = RUN  # (the context variable making a run current: tests set it by hand)
