"""What the Redis scripts are told and what they answer: the policy text, script replies, snapshots."""

from __future__ import annotations

from typing import Any

from ...core import BreakerPolicy, BreakerSnapshot, State

__all__ = ["decode_snapshot", "opt_float", "policy_from_text", "policy_text"]

# -- the policy as the scripts read it ------------------------------------------

_POLICY_FIELDS = (
    "failure_threshold", "window", "failure_rate_threshold", "minimum_calls", "count_window",
    "slow_call_duration", "slow_call_rate_threshold", "reset_timeout", "half_open_max_calls",
    "success_threshold", "half_open_max_wait",
)  # fmt: skip
#: Added by version 2 of the text, after the two resolved fields of version 1.
_BACKOFF_FIELDS = ("backoff_multiplier", "max_reset_timeout", "reset_jitter")
_INT_FIELDS = frozenset(
    ("failure_threshold", "minimum_calls", "count_window", "half_open_max_calls", "success_threshold")
)
#: What a version-1 text (a release without backoff) means for the new fields.
_V1_BACKOFF = {"backoff_multiplier": 1.0, "max_reset_timeout": None, "reset_jitter": 0.0}


def policy_text(policy: BreakerPolicy) -> str:
    """The policy's numeric fields as one ARGV, also its fingerprint: equal text, equal rules.

    Classification (``record_exceptions``, ``ignore_exceptions``) stays with the caller:
    it runs in the worker and cannot be stored. Version 2: version 1's fourteen fields,
    then the backoff fields and ``longest_open`` (``parse_policy`` in common.lua reads both).
    """
    values = [getattr(policy, name) for name in _POLICY_FIELDS] + [policy.calls_to_judge, policy.probes_to_close]
    values += [getattr(policy, name) for name in _BACKOFF_FIELDS] + [policy.longest_open]
    return "2;" + ";".join("" if value is None else repr(value) for value in values)


def policy_from_text(text: str, base: BreakerPolicy) -> BreakerPolicy:
    """The policy a stored text describes (``base`` gives what the text cannot hold:
    classification); raises ValueError or ConfigurationError when it is unreadable."""
    items = text.split(";")
    fields = items[1 : 1 + len(_POLICY_FIELDS)]
    changes: dict[str, Any] = {
        name: None if value == "" else int(value) if name in _INT_FIELDS else float(value)
        for name, value in zip(_POLICY_FIELDS, fields, strict=True)
    }
    if items[0] == "1":
        changes.update(_V1_BACKOFF)  # as the scripts read it: no backoff, no jitter
    else:
        extra = items[3 + len(_POLICY_FIELDS) : 3 + len(_POLICY_FIELDS) + len(_BACKOFF_FIELDS)]
        changes.update(
            (name, None if value == "" else float(value)) for name, value in zip(_BACKOFF_FIELDS, extra, strict=True)
        )
    return base.replace(**changes)


def opt_float(value: Any) -> float | None:
    """A script's optional number: ``''`` (or nothing) is ``None``."""
    return None if value in (b"", "", None) else float(value)


def decode_snapshot(reply: list[Any], offset: float) -> BreakerSnapshot:
    """A snapshot script's reply as a ``BreakerSnapshot`` (script times + ``offset`` = epoch)."""

    def wall(value: Any) -> float | None:
        seconds = opt_float(value)
        return None if seconds is None else seconds + offset

    key_arg = reply[31].decode()
    return BreakerSnapshot(
        name=reply[30].decode(),
        key=None if key_arg == "-" else key_arg[1:],
        state=State(reply[0].decode()),
        generation=int(reply[1]),
        successes=int(reply[16]),
        failures=int(reply[17]),
        rejections=int(reply[18]),
        deferrals=int(reply[19]),
        trips=int(reply[20]),
        last_failure=wall(reply[21]),
        last_success=wall(reply[22]),
        opened_at=wall(reply[23]),
        open_until=wall(reply[24]),
        retry_after=opt_float(reply[25]),
        window_calls=int(reply[26]),
        window_failures=int(reply[27]),
        window_slow_calls=int(reply[28]),
        probes_in_flight=int(reply[29]),
        streak=int(reply[32]),
        open_duration=opt_float(reply[33]),
    )
