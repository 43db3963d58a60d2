"""Deferral arithmetic: the ``x-breaker-*`` headers, a request's limits, the next delay (no Celery calls)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery.utils.time import maybe_iso8601, maybe_make_aware

from ...core import State
from ...core.chance import CHANCE
from ..values import positive_finite

__all__ = [
    "DEFERRALS_HEADER",
    "HEADERS",
    "PARKED_HEADER",
    "SINCE_HEADER",
    "WORKER_SOFT_TIME_LIMIT_ATTR",
    "WORKER_TIME_LIMIT_ATTR",
    "DeferralHeaders",
    "DeferralPlan",
    "hard_time_limit",
    "park_deadline",
    "plan_deferral",
    "read_headers",
    "run_soft_time_limit",
    "run_time_limit",
    "seconds_until",
]

logger = logging.getLogger("celery_breaker")

#: How many times this task was deferred (an unprefixed name could overwrite Celery's own).
DEFERRALS_HEADER = "x-breaker-deferrals"
#: Epoch seconds of the task's first deferral, for ``breaker_max_defer_age``.
SINCE_HEADER = "x-breaker-deferred-since"
#: Set on a parked task's message: released, it is paced (a 429 it meets slows the release;
#: BreakerTask._run_guarded). A deferral by any other way drops it.
PARKED_HEADER = "x-breaker-parked"
HEADERS = (DEFERRALS_HEADER, SINCE_HEADER, PARKED_HEADER)

#: How long after its ``expires`` a deferred task arrives, so the worker revokes it as expired.
EXPIRY_OVERSHOOT = 1.0
#: The shortest deferral: never requeue in a busy loop.
MINIMUM_DELAY = 0.5
#: How long before its ``expires`` a deferred task that can still run is due at the latest.
EXPIRY_MARGIN = 1.0
#: The most deferrals a header may count: more is no real count (at least half a second
#: each, a million is six days of nothing but deferrals).
MOST_DEFERRALS = 1_000_000
#: ``x-breaker-deferred-since`` earlier than this (2000-01-01) is no real time.
EARLIEST_SINCE = 946_684_800.0
#: How far ahead of this worker's clock another host's may be.
CLOCK_SKEW = 300.0


@dataclass(frozen=True, slots=True)
class DeferralHeaders:
    """What the headers of a message say about its past deferrals."""

    count: int
    since: float | None
    problems: tuple[str, ...] = ()
    """Human-readable complaints about malformed values (they were ignored)."""


@dataclass(frozen=True, slots=True)
class DeferralPlan:
    """The next deferral: publish again after ``delay`` seconds, or give up (``give_up`` set)."""

    delay: float
    count: int
    since: float
    expires_first: bool = False
    """The task expires before the breaker can admit it: it arrives just after
    ``expires`` so the worker revokes it as expired, as Celery does."""
    give_up: str | None = None


#: The fix a malformed deferral header's WARNING names: it came from a sender, not from us.
_NOT_YOURS = "celery-breaker sets it; do not send it"


def read_headers(headers: Mapping[str, Any] | None, *, now: float) -> DeferralHeaders:
    """Parse the deferral headers leniently: a malformed value is reported, not fatal."""
    if not headers:
        return DeferralHeaders(0, None)
    problems = []
    count = 0
    raw_count = headers.get(DEFERRALS_HEADER)
    if raw_count is not None:
        try:
            if isinstance(raw_count, bool) or (isinstance(raw_count, float) and not raw_count.is_integer()):
                raise ValueError
            count = int(raw_count)
            if not 0 <= count <= MOST_DEFERRALS:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            problems.append(
                f"header {DEFERRALS_HEADER}={_shown(raw_count)} is not a whole number from 0 to {MOST_DEFERRALS}; "
                f"counting from 0 ({_NOT_YOURS})"
            )
            count = 0
    since: float | None = None
    raw_since = headers.get(SINCE_HEADER)
    if raw_since is not None:
        try:
            if isinstance(raw_since, bool):
                raise ValueError
            since = float(raw_since)
            # Epoch seconds of a past deferral: after 2000, and not ahead of this worker's
            # clock by more than another host's clock could be.
            if not (math.isfinite(since) and EARLIEST_SINCE <= since <= now + CLOCK_SKEW):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            problems.append(
                f"header {SINCE_HEADER}={_shown(raw_since)} is not the epoch seconds of a past deferral; "
                f"measuring the deferral age from now ({_NOT_YOURS})"
            )
            since = None
    return DeferralHeaders(count, since, tuple(problems))


def plan_deferral(
    *,
    label: str,
    state: str = "open",
    retry_after: float,
    spread: float,
    past: DeferralHeaders,
    now: float,
    max_deferrals: int | None,
    max_defer_age: float | None,
    expires_in: float | None,
    cap: float | None,
    uniform: Callable[[float, float], float] = CHANCE.uniform,
) -> DeferralPlan:
    """Plan the next deferral of a task whose breaker said ``retry_after``.

    The delay is the time until the breaker can next admit a probe plus a random
    share of ``spread`` (so a backlog does not return all at once), no longer than
    ``cap`` (the broker's redelivery window), and never past ``expires``.
    """
    since = past.since if past.since is not None else now
    age = now - since
    if max_deferrals is not None and past.count >= max_deferrals:
        return DeferralPlan(
            0.0, past.count, since,
            give_up=f"breaker {label!r} still {state} after {past.count} deferral(s) over {age:.0f} s; "
            f"giving up (breaker_max_deferrals={max_deferrals})",
        )  # fmt: skip
    if max_defer_age is not None and age >= max_defer_age:
        return DeferralPlan(
            0.0, past.count, since,
            give_up=f"breaker {label!r} still {state} after {past.count} deferral(s) over {age:.0f} s; "
            f"giving up (breaker_max_defer_age={max_defer_age:g} s)",
        )  # fmt: skip
    earliest = max(retry_after, MINIMUM_DELAY)  # when the breaker may admit it
    operators_open = state == State.FORCED_OPEN.value
    if operators_open and expires_in is not None and MINIMUM_DELAY <= expires_in - EXPIRY_MARGIN < earliest:
        # An operator's open ends when an operator closes it: its retry_after (the policy's
        # reset_timeout) is no promise. So a task that may still run looks again just before
        # its expiry (parked, it is released at its close or at its expiry), rather than
        # coming back after it, revoked though the breaker closed in time.
        earliest = expires_in - EXPIRY_MARGIN
    if expires_in is not None and earliest >= expires_in:
        # It cannot run before it expires: let it arrive just after, to be revoked.
        delay = max(expires_in, 0.0) + EXPIRY_OVERSHOOT
        if cap is not None:
            delay = min(delay, cap)
        return DeferralPlan(delay, past.count + 1, since, expires_first=True)
    delay = max(max(retry_after, 0.0) + (uniform(0.0, spread) if spread > 0 else 0.0), MINIMUM_DELAY)
    if expires_in is not None:
        # The spread must not push it past its expiry: arrive a little before it.
        delay = min(delay, max(earliest, expires_in - EXPIRY_MARGIN))
    if max_defer_age is not None:
        # Back when its budget by age runs out, at the latest: run then, or fail then, not
        # a whole delay later.
        delay = min(delay, max_defer_age - age)
    if cap is not None:
        delay = min(delay, cap)
    return DeferralPlan(max(delay, MINIMUM_DELAY), past.count + 1, since)


def seconds_until(expires: Any, now: float) -> float | None:
    """Seconds from ``now`` to a request's ``expires`` (ISO 8601 text or a datetime);
    ``None`` when it has none, or has one that cannot be read (logged, then ignored)."""
    if not expires:
        return None
    try:
        when = maybe_make_aware(maybe_iso8601(expires))
        return float(when.timestamp() - now)
    except (TypeError, ValueError, AttributeError, OverflowError):
        logger.warning("celery_breaker: ignoring unreadable expires=%r", expires)
        return None


def hard_time_limit(request: Any) -> float | None:
    """A request's hard time limit in seconds (``None`` when it has none)."""
    return _request_time_limit(request, 0)


def _request_time_limit(request: Any, which: int) -> float | None:
    """A request's hard (0) or soft (1) time limit in seconds (``None`` when it has none)."""
    limits: Any = getattr(request, "timelimit", None) or (None, None)
    try:
        found = float(limits[which]) if limits[which] else None
    except (TypeError, ValueError, IndexError, KeyError, OverflowError):  # (a header no Celery wrote)
        return None
    return found if found is not None and found > 0 and math.isfinite(found) else None


#: Where the worker notes its own hard time limit on the app (``BreakerStep``):
#: ``--time-limit`` lives on the worker, not in ``app.conf``.
WORKER_TIME_LIMIT_ATTR = "_celery_breaker_worker_time_limit"
#: ... and its own soft time limit (``--soft-time-limit``).
WORKER_SOFT_TIME_LIMIT_ATTR = "_celery_breaker_worker_soft_time_limit"


def run_time_limit(task: Any, request: Any) -> float | None:
    """The hard time limit of ``task``'s run (seconds; ``None``: none): the message's, else
    the task's (``@app.task(time_limit=...)``), else the worker's ``--time-limit``, else
    ``task_time_limit``. The worker applies them in that order; only the message's
    reaches ``request``."""
    return _run_limit(task, request, 0)


def run_soft_time_limit(task: Any, request: Any) -> float | None:
    """The soft time limit of ``task``'s run (seconds; ``None``: none), found in the order
    ``run_time_limit`` finds the hard one: the message's, the task's, the worker's
    ``--soft-time-limit``, ``task_soft_time_limit``."""
    return _run_limit(task, request, 1)


#: Where each limit is found after the message's, hard (0) and soft (1): the task's option,
#: the worker's (noted on the app), the setting.
_LIMIT_SOURCES = (
    ("time_limit", WORKER_TIME_LIMIT_ATTR, "task_time_limit"),
    ("soft_time_limit", WORKER_SOFT_TIME_LIMIT_ATTR, "task_soft_time_limit"),
)


def _run_limit(task: Any, request: Any, which: int) -> float | None:
    limit = _request_time_limit(request, which)
    if limit is None:
        option, on_worker, setting = _LIMIT_SOURCES[which]
        app = task.app
        for value in (getattr(task, option, None), getattr(app, on_worker, None), app.conf.get(setting)):
            limit = positive_finite(value)
            if limit is not None:
                break
    return limit


def park_deadline(expires_in: float | None, since: float, max_defer_age: float | None, now: float) -> float | None:
    """When a parked task must be released whatever its breaker says (epoch seconds):
    just after its ``expires`` (so the worker revokes it), or when its deferral budget
    by age runs out (so it fails with a clear CircuitOpenError)."""
    found = []
    if expires_in is not None:
        found.append(now + expires_in + EXPIRY_OVERSHOOT)
    if max_defer_age is not None:
        found.append(since + max_defer_age)
    return min(found) if found else None


def _shown(value: Any) -> str:
    """A header's value as a warning shows it: at most 60 characters of its repr."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
