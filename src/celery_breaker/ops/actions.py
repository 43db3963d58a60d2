"""The one table of operator actions that move a breaker's state (open, close, reset,
disable), and ``DELETE``, which removes one.

The Python API (``ops.operator.operate``), the worker's remote-control commands
(``breaker_open`` ...), the ``celery breaker`` CLI and the web page are all made from
``ACTIONS``; ``DELETE`` (``ops.operator.delete``) is offered by the CLI and the web page. Light: the
``celery breaker`` entry point imports it on every ``celery`` command.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ACTIONS", "DELETE", "Action"]


@dataclass(frozen=True, slots=True)
class Action:
    """One thing an operator can do to a breaker."""

    name: str
    """As typed: ``celery breaker open``, ``celery control breaker_open``, ``operate(app, "open", ...)``."""
    target: str | None
    """The state it moves the breaker to (a ``State`` value: the table is read by every
    ``celery`` command, which should not load the breaker's core for it); ``None``: a
    reset to a fresh CLOSED breaker with zeroed counters, under the app's policy."""
    summary: str
    """One line for the CLI's help, NAME standing for the breaker."""
    done: str
    """What it did, for logs and remote-control replies."""
    after: str
    """What the breaker does from now on, for the CLI."""
    cautious: bool = False
    """It lets calls through that the breaker was holding back (or stops it tripping):
    taken while the breaker's downstream was failing, the tasks deferred behind it run
    against that downstream and spend their retries, so the CLI asks first and every
    path warns (``operator.caution``)."""


#: Every operator action, by name.
ACTIONS: dict[str, Action] = {
    action.name: action
    for action in (
        Action(
            "open", "forced_open",
            "Force NAME open: every call is rejected (tasks deferred) until an operator closes it.",
            "forced open: every call rejected until closed, reset or disabled",
            "every call is rejected (tasks are deferred) until an operator closes, resets or disables it",
        ),
        Action(
            "close", "closed",
            "Close NAME now: calls pass again (windows cleared, lifetime counters kept).",
            "closed: calls admitted, windows cleared",
            "calls pass and count towards the policy again",
            cautious=True,
        ),
        Action(
            "reset", None,
            "Reset NAME: a fresh CLOSED breaker, counters zeroed, the app's policy adopted.",
            "reset: a fresh closed breaker, counters zeroed",
            "calls pass and count towards the policy again",
            cautious=True,
        ),
        Action(
            "disable", "disabled",
            "Disable NAME: every call passes and nothing trips it until closed or reset.",
            "disabled: every call admitted and never tripped until closed or reset",
            "every call passes and nothing trips it until an operator closes or resets it",
            cautious=True,
        ),
    )
}  # fmt: skip

#: Deleting a breaker: not a move (``ops.operator.delete``). Its parked tasks must be
#: purged with it or released first; in use again, the breaker is created afresh.
DELETE = Action(
    "delete", None,
    "Delete NAME from the store: its state, counters, stored policy and history (not parked tasks).",
    "deleted",
    "it is gone from status, watch and metrics; a call through it creates it afresh, closed",
    cautious=True,
)  # fmt: skip
