"""The breaker itself, free of Celery and Redis: states, policies, windows and the state machine."""

from .machine import BreakerMachine, Ticket
from .policy import BreakerPolicy, Outcome
from .snapshot import BreakerSnapshot, Probe, Transition
from .state import TRANSITIONS, State

__all__ = [
    "TRANSITIONS",
    "BreakerMachine",
    "BreakerPolicy",
    "BreakerSnapshot",
    "Outcome",
    "Probe",
    "State",
    "Ticket",
    "Transition",
]
