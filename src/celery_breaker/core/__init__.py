"""The breaker itself, free of Celery and Redis: states, policies, trip rules, windows and the state machine."""

from .machine import BreakerMachine, Ticket
from .policy import CALLER_ERRORS, BreakerPolicy, Outcome, downstream_error
from .rules import TripRule, rules_for
from .snapshot import BreakerSnapshot, Probe, Transition
from .state import TRANSITIONS, State

__all__ = [
    "CALLER_ERRORS",
    "TRANSITIONS",
    "BreakerMachine",
    "BreakerPolicy",
    "BreakerSnapshot",
    "Outcome",
    "Probe",
    "State",
    "Ticket",
    "Transition",
    "TripRule",
    "downstream_error",
    "rules_for",
]
