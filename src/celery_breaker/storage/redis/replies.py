"""What the Redis scripts are told and what they answer: the policy text, script replies, snapshots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...core import BreakerPolicy, BreakerSnapshot, State, rules_for
from .damage import finite

__all__ = [
    "Absent",
    "Metrics",
    "Moved",
    "Reply",
    "decode_absent",
    "decode_reply",
    "decode_snapshot",
    "opt_float",
    "policy_from_text",
    "policy_text",
]

# -- the policy as the scripts read it ------------------------------------------

#: The version of the keyed (JSON) policy text ``policy_text`` writes.
POLICY_VERSION = 3
#: Fields the text cannot hold: classification runs in the worker.
_CLASSIFICATION = frozenset(("record_exceptions", "ignore_exceptions"))

# Versions 1 and 2 (earlier releases) were positional: 'v;' then these fields in order.
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
    """The policy as one ARGV, also its fingerprint: equal text, equal rules (the scripts
    compare texts), so it is deterministic: sorted keys, no spaces.

    Version 3, a JSON object: ``rules``, each rule's ``kind`` and ``parameters``
    (``core/rules.py``) as ``common.lua``'s ``RULES`` reads them; the parameters of the
    open and half-open periods by name, resolved; and ``fields``, every numeric
    ``BreakerPolicy`` field that is set, by name (for ``policy_from_text``: a field left out
    is ``None``). Classification
    (``record_exceptions``, ``ignore_exceptions``) stays with the caller: it runs in the
    worker and cannot be stored.
    """
    described: dict[str, Any] = {
        "v": POLICY_VERSION,
        "rules": [{"kind": rule.kind, **rule.parameters} for rule in rules_for(policy)],
        "reset_timeout": policy.reset_timeout,
        "backoff_multiplier": policy.backoff_multiplier,
        "longest_open": policy.longest_open,
        "reset_jitter": policy.reset_jitter,
        "half_open_max_calls": policy.half_open_max_calls,
        "probes_to_close": policy.probes_to_close,
        "half_open_max_wait": policy.half_open_max_wait,
        "fields": {
            name: value for name, value in policy.as_dict().items() if name not in _CLASSIFICATION and value is not None
        },
    }
    if policy.slow_call_duration is not None:
        described["slow_call_duration"] = policy.slow_call_duration
    return json.dumps(described, sort_keys=True, separators=(",", ":"), allow_nan=False)


def policy_from_text(text: str, base: BreakerPolicy) -> BreakerPolicy:
    """The policy a stored text describes (``base`` gives what the text cannot hold:
    classification); raises ValueError (ConfigurationError is one) when it is unreadable.

    Reads version 3 (keyed) and the positional versions 1 and 2 of earlier releases."""
    if text.startswith("{"):
        described = json.loads(text)
        if not isinstance(described, dict) or described.get("v") != POLICY_VERSION:
            raise ValueError(f"not a version {POLICY_VERSION} policy text")
        fields = described.get("fields")
        if not isinstance(fields, dict):
            raise ValueError("policy text without fields")
        numeric = [name for name in base.as_dict() if name not in _CLASSIFICATION]
        return base.replace(**{name: fields.get(name) for name in numeric})
    items = text.split(";")
    if items[0] not in ("1", "2"):
        raise ValueError(f"unknown policy text version {items[0]!r}")
    fields_v1 = items[1 : 1 + len(_POLICY_FIELDS)]
    changes: dict[str, Any] = {
        name: None if value == "" else int(value) if name in _INT_FIELDS else float(value)
        for name, value in zip(_POLICY_FIELDS, fields_v1, strict=True)
    }
    if items[0] == "1":
        changes.update(_V1_BACKOFF)  # as the scripts read it: no backoff, no jitter
    else:
        extra = items[3 + len(_POLICY_FIELDS) : 3 + len(_POLICY_FIELDS) + len(_BACKOFF_FIELDS)]
        changes.update(
            (name, None if value == "" else float(value)) for name, value in zip(_BACKOFF_FIELDS, extra, strict=True)
        )
    return base.replace(**changes)


# -- what the scripts answer -------------------------------------------------------
#
# Every breaker script answers flat key/value pairs (as HGETALL does), built by reply()
# in common.lua; the names below are the keys. A listing's snapshot of a breaker that
# expired meanwhile answers {'absent', 1} alone.


def opt_float(value: Any) -> float | None:
    """A script's optional number: ``''`` (or nothing) is ``None``; anything but a finite
    number raises ``ValueError``."""
    return None if value in (b"", "", None) else finite(float(value))


def _whole(value: Any) -> int:
    """A script's count or generation: a whole number >= 0 (a Redis integer: a window's
    count sums up to 20 stored counts, each at most ``MAX_WHOLE``), else ``ValueError``."""
    number = int(value)
    if number < 0:
        raise ValueError(f"not a count: {value!r}")
    return number


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Moved:
    """The transition a script made (keys ``from``, ``to``, ``why``, ``mgen``, ``mko``, ``mcalls``, ``mtr``)."""

    source: State
    target: State
    reason: str
    generation: int
    failures: int
    """Failures the policy's shown rule held when it happened."""
    calls: int
    trips: int


@dataclass(frozen=True, slots=True)
class Metrics:
    """What a snapshot script adds to its reply; times on the script's clock."""

    successes: int  # ok
    failures: int  # ko
    rejections: int  # rj
    deferrals: int  # df
    trips: int  # tr
    last_failure: float | None  # lf
    last_success: float | None  # ls
    opened_at: float | None  # oa
    open_until: float | None  # ou
    retry_after: float | None  # ra
    window_calls: int  # wcalls
    window_failures: int  # wko
    window_slow_calls: int  # wslow
    probes_in_flight: int  # live
    name: str  # nm
    key_arg: str  # ky: '-' for no key, '+' .. key
    streak: int  # stk
    open_duration: float | None  # od


@dataclass(frozen=True, slots=True)
class Reply:
    """One breaker script's reply: the local view every reply carries, and what the
    script adds (a transition, a snapshot's metrics)."""

    state: State  # st
    generation: int  # gen
    remaining: float | None  # left: seconds until open_until
    now: float  # now: the script's clock
    verdict: str  # verdict: 'ok', record's 'refused', or acquire's 'admit', 'probe', 'reject'
    value: str  # value: the probe's lease, or a rejection's retry_after
    warnings: str  # warn: what was reset as unreadable ('' when nothing)
    policy: str  # pol: the stored policy text when it is not the caller's, else ''
    incarnation: str  # inc
    moved: Moved | None
    metrics: Metrics | None


@dataclass(frozen=True, slots=True)
class Absent:
    """A listing's answer for a breaker it does not show as read (``absent``): one that
    expired since the scan saw it, one it cannot read (``unreadable``: what is wrong, and
    ``stored``, the state its hash names if it names one; the listing wrote nothing), or
    keys that belong to no breaker of this store (``foreign``: why). ``warnings``: what a
    reset found, as ``Reply``'s (a listing resets nothing since decision 107)."""

    warnings: str
    foreign: str
    unreadable: str = ""
    stored: str = ""


def decode_absent(raw: list[Any]) -> Absent | None:
    """A listing's ``Absent`` answer, or None for any other reply."""
    fields = dict(zip(raw[::2], raw[1::2], strict=True))
    if b"absent" not in fields:
        return None
    return Absent(
        warnings=_text(fields.get(b"warn", b"")), foreign=_text(fields.get(b"foreign", b"")),
        unreadable=_text(fields.get(b"unreadable", b"")), stored=_text(fields.get(b"st", b"")),
    )  # fmt: skip


def decode_reply(raw: list[Any]) -> Reply | None:
    """A breaker script's reply as a ``Reply``, or None for a breaker that is absent (a
    listing's snapshot of one that expired since it was listed). Raises ``LookupError``,
    ``ValueError`` or ``TypeError`` on anything else."""
    fields = dict(zip(raw[::2], raw[1::2], strict=True))
    if b"absent" in fields:
        return None
    moved = None
    if fields.get(b"from"):
        moved = Moved(
            source=State(_text(fields[b"from"])),
            target=State(_text(fields[b"to"])),
            reason=_text(fields[b"why"]),
            generation=_whole(fields[b"mgen"]),
            failures=_whole(fields[b"mko"]),
            calls=_whole(fields[b"mcalls"]),
            trips=_whole(fields[b"mtr"]),
        )
    metrics = None
    if b"ok" in fields:
        metrics = Metrics(
            successes=_whole(fields[b"ok"]),
            failures=_whole(fields[b"ko"]),
            rejections=_whole(fields[b"rj"]),
            deferrals=_whole(fields[b"df"]),
            trips=_whole(fields[b"tr"]),
            last_failure=opt_float(fields[b"lf"]),
            last_success=opt_float(fields[b"ls"]),
            opened_at=opt_float(fields[b"oa"]),
            open_until=opt_float(fields[b"ou"]),
            retry_after=opt_float(fields[b"ra"]),
            window_calls=_whole(fields[b"wcalls"]),
            window_failures=_whole(fields[b"wko"]),
            window_slow_calls=_whole(fields[b"wslow"]),
            probes_in_flight=_whole(fields[b"live"]),
            name=_text(fields[b"nm"]),
            key_arg=_text(fields[b"ky"]),
            streak=_whole(fields[b"stk"]),
            open_duration=opt_float(fields[b"od"]),
        )
    return Reply(
        state=State(_text(fields[b"st"])),
        generation=_whole(fields[b"gen"]),
        remaining=opt_float(fields[b"left"]),
        now=finite(float(fields[b"now"])),
        verdict=_text(fields[b"verdict"]),
        value=_text(fields[b"value"]),
        warnings=_text(fields[b"warn"]),
        policy=_text(fields[b"pol"]),
        incarnation=_text(fields[b"inc"]),
        moved=moved,
        metrics=metrics,
    )


def decode_snapshot(reply: Reply, offset: float) -> BreakerSnapshot:
    """A snapshot script's reply as a ``BreakerSnapshot`` (script times + ``offset`` = epoch)."""
    metrics = reply.metrics
    if metrics is None:
        raise ValueError("not a snapshot script's reply")

    def wall(seconds: float | None) -> float | None:
        return None if seconds is None else seconds + offset

    key_arg = metrics.key_arg
    return BreakerSnapshot(
        name=metrics.name,
        key=None if key_arg == "-" else key_arg[1:],
        state=reply.state,
        generation=reply.generation,
        successes=metrics.successes,
        failures=metrics.failures,
        rejections=metrics.rejections,
        deferrals=metrics.deferrals,
        trips=metrics.trips,
        last_failure=wall(metrics.last_failure),
        last_success=wall(metrics.last_success),
        opened_at=wall(metrics.opened_at),
        open_until=wall(metrics.open_until),
        retry_after=metrics.retry_after,
        window_calls=metrics.window_calls,
        window_failures=metrics.window_failures,
        window_slow_calls=metrics.window_slow_calls,
        probes_in_flight=metrics.probes_in_flight,
        streak=metrics.streak,
        open_duration=metrics.open_duration,
    )
