"""Tasks for the in-process worker: one task and one breaker per scenario, so tests never share state.

Loaded by the session worker through the ``celery_includes`` fixture. ``@shared_task``
binds each task to every app that is finalized, so throwaway apps in the settings tests
get them too: their options must be valid against the default settings as well.
"""

from __future__ import annotations

import email.message
import enum
import threading
import urllib.error
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from celery import Task, shared_task

from celery_breaker import BreakerTask, CircuitBreaker, CircuitOpenError, RetryAfter
from celery_breaker.integration.deferral.plan import DEFERRALS_HEADER

#: The breaker store of the session app (process-global, so the test sees the worker's state).
STORE_URL = "memory://celery-tests"

#: Downstreams a test switches down (True) and back up; read by the task bodies.
DOWN: dict[str, bool] = {}
#: How many times each downstream was called.
CALLS: dict[str, int] = {}
_LOCK = threading.Lock()


def call_downstream(name: str) -> str:
    """The flaky dependency: counts the call, then fails while ``DOWN[name]`` is set."""
    with _LOCK:
        CALLS[name] = CALLS.get(name, 0) + 1
    if DOWN.get(name, False):
        raise ConnectionError(f"downstream {name} is down")
    return f"{name} ok"


def report(task: Any, value: Any = None) -> dict[str, Any]:
    """What a run saw: its id, its retry count and the deferral header."""
    request = task.request
    headers = request.headers or {}
    return {
        "id": request.id,
        "retries": request.retries,
        "deferrals": headers.get(DEFERRALS_HEADER),
        "value": value,
    }


# -- deferral ------------------------------------------------------------------


@shared_task(base=BreakerTask, bind=True, breaker="t-forced")
def forced_task(self: Any, x: int) -> dict[str, Any]:
    return report(self, x * 2)


@shared_task(base=BreakerTask, bind=True, breaker="t-max-retries-0", max_retries=0)
def no_retries_task(self: Any) -> dict[str, Any]:
    return report(self)


@shared_task(base=BreakerTask, bind=True, breaker="t-autoretry", autoretry_for=(Exception,), max_retries=0)
def autoretry_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-autoretry")
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-autoretry-nested", autoretry_for=(Exception,), max_retries=0)
def autoretry_nested_task(self: Any) -> dict[str, Any]:
    """Admitted by its own (closed) breaker; a nested breaker rejects inside the body."""
    with self.breaker, CircuitBreaker("t-autoretry-nested-dep", storage=STORE_URL):
        value = call_downstream("t-autoretry-nested")
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-autoretry-trip", autoretry_for=(Exception,), max_retries=0)
def autoretry_trip_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-autoretry-trip")
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-own-retry", max_retries=5)
def own_retry_task(self: Any) -> dict[str, Any]:
    """The user's own ``raise self.retry(exc=exc)`` around a guarded call."""
    try:
        with CircuitBreaker("t-own-retry-dep", storage=STORE_URL):
            value = call_downstream("t-own-retry")
    except CircuitOpenError as exc:
        raise self.retry(exc=exc, countdown=0.1) from exc
    return report(self, value)


def _retry_inside_block(task: Any, name: str, max_retries: int) -> dict[str, Any]:
    """The user's own ``raise self.retry(exc=exc)`` inside the guarded block: the failure it
    retries on is recorded only when the ``Retry`` leaves the block."""
    with task.breaker:
        try:
            value = call_downstream(name)
        except ConnectionError as exc:
            raise task.retry(exc=exc, countdown=0.1, max_retries=max_retries) from exc
    return report(task, value)


#: What a ``self.retry(...)`` asks its next run to be sent with, besides its countdown.
RETRY_ASKS: dict[str, Any] = {"priority": 7, "time_limit": 40, "soft_time_limit": 30, "headers": {"trace": "retry"}}


def sent_with(task: Any, value: Any) -> dict[str, Any]:
    """``report``, and what the run was sent with: its priority, time limits and a header."""
    request = task.request
    return {
        **report(task, value),
        "priority": (request.delivery_info or {}).get("priority"),
        "timelimit": list(request.timelimit or (None, None)),
        "trace": (request.headers or {}).get("trace"),
    }


@shared_task(base=BreakerTask, bind=True, breaker="t-retry-asks", max_retries=5)
def retry_asks_task(self: Any) -> dict[str, Any]:
    """A ``self.retry(...)`` with options inside the guarded block (held back until it leaves it)."""
    with self.breaker:
        try:
            value = call_downstream("t-retry-asks")
        except ConnectionError as exc:
            raise self.retry(exc=exc, countdown=0.1, **RETRY_ASKS) from exc
    return sent_with(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-retry-asks-nested", max_retries=5)
def retry_asks_nested_task(self: Any) -> dict[str, Any]:
    """A ``self.retry(...)`` with options for a nested breaker's rejection."""
    try:
        with CircuitBreaker("t-retry-asks-nested-dep", storage=STORE_URL):
            value = call_downstream("t-retry-asks-nested")
    except CircuitOpenError as exc:
        raise self.retry(exc=exc, countdown=0.1, **RETRY_ASKS) from exc
    return sent_with(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-retry-inside")
def retry_inside_block_task(self: Any, max_retries: int = 5) -> dict[str, Any]:
    return _retry_inside_block(self, "t-retry-inside", max_retries)


@shared_task(base=BreakerTask, bind=True, breaker="t-retry-inside-closed")  # failure_threshold 5
def retry_inside_closed_block_task(self: Any, max_retries: int = 5) -> dict[str, Any]:
    return _retry_inside_block(self, "t-retry-inside-closed", max_retries)


@shared_task(base=BreakerTask, bind=True, breaker="t-bare-retry-inside", max_retries=5)
def bare_retry_inside_block_task(self: Any) -> dict[str, Any]:
    """A bare ``raise self.retry(countdown=...)`` (no ``exc``) inside the guarded block."""
    with self.breaker:
        try:
            value = call_downstream("t-bare-retry-inside")
        except ConnectionError:
            raise self.retry(countdown=0.1) from None
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-bare-retry-after", max_retries=5)
def bare_retry_after_block_task(self: Any) -> dict[str, Any]:
    """A bare ``self.retry()`` after the guarded block failed (and tripped the breaker)."""
    try:
        with self.breaker:
            value = call_downstream("t-bare-retry-after")
    except ConnectionError:
        raise self.retry(countdown=0.1) from None
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-bare-retry-direct", max_retries=5)
def bare_retry_poll_task(self: Any) -> None:
    """Polls: asks for a bare retry in its normal flow (no exception of its own)."""
    raise self.retry(countdown=5)


@shared_task(base=BreakerTask, bind=True, breaker="t-bare-retry-eager", max_retries=3)  # failure_threshold 3
def bare_retry_whole_run_task(self: Any) -> None:
    """The whole run guarded (no block): a bare retry in the body's except clause."""
    try:
        call_downstream("t-bare-retry-eager")
    except ConnectionError:
        raise self.retry(countdown=0) from None


#: What the batch tasks below have done, per breaker: the items, in the order processed.
PROCESSED: dict[str, list[str]] = {}


def _process_the_rest(task: Any, name: str, items: list[str], guarded: bool) -> dict[str, Any]:
    """Processes ``items`` one by one; when the downstream fails, asks Celery to retry
    with the items left (``self.retry(args=...)``), so none is processed twice."""
    for i, item in enumerate(items):
        try:
            if guarded:
                with task.breaker:
                    call_downstream(name)
            else:
                call_downstream(name)
        except ConnectionError as exc:
            raise task.retry(args=(items[i:],), exc=exc, countdown=0.1) from exc
        PROCESSED.setdefault(name, []).append(item)
    return report(task, list(items))


@shared_task(base=BreakerTask, bind=True, breaker="t-retry-rest", max_retries=5)
def retry_the_rest_task(self: Any, items: list[str]) -> dict[str, Any]:
    """The whole run guarded: its ``self.retry(args=...)`` trips the breaker."""
    return _process_the_rest(self, "t-retry-rest", items, guarded=False)


@shared_task(base=BreakerTask, bind=True, breaker="t-retry-rest-block", max_retries=5)
def retry_the_rest_inside_block_task(self: Any, items: list[str]) -> dict[str, Any]:
    """A guarded block: its ``self.retry(args=...)`` is held back until the block records it."""
    return _process_the_rest(self, "t-retry-rest-block", items, guarded=True)


@shared_task(base=BreakerTask, bind=True, breaker="t-reprs")
def hidden_arguments_task(self: Any, card: str, token: str = "") -> dict[str, Any]:
    """Reports how its arguments are shown (``argsrepr``, ``kwargsrepr``: events, logs, Flower)."""
    request = self.request
    return {**report(self), "argsrepr": request.argsrepr, "kwargsrepr": request.kwargsrepr}


@shared_task(base=BreakerTask, bind=True, breaker="t-as-sent")
def as_sent_task(self: Any) -> dict[str, Any]:
    """Reports what its message said besides its arguments: its compression and its lineage."""
    request = self.request
    return {
        **report(self), "compression": getattr(request, "compression", None), "parent_id": request.parent_id,
        "root_id": request.root_id,
    }  # fmt: skip


class JitterRetry(Task):  # type: ignore[misc]
    """A retry of its own: the MRO's next ``retry`` after ``BreakerTask``'s."""

    retried_through: ClassVar[list[str]] = []

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        JitterRetry.retried_through.append(self.request.id)
        return super().retry(*args, **kwargs)


class AuditedTask(BreakerTask, JitterRetry):
    """``BreakerTask`` first in the MRO, a class with its own ``retry`` after it."""


@shared_task(base=AuditedTask, bind=True, breaker="t-retry-inside-closed")  # failure_threshold 5
def retry_through_the_mro_task(self: Any) -> dict[str, Any]:
    return _retry_inside_block(self, "t-retry-inside-closed", 5)


class RetryingFallbackTask(BreakerTask):
    def no_cached_quote(self, symbol: str) -> dict[str, Any]:
        """A fallback that asks for a Celery retry (nothing cached to answer with)."""
        if DOWN.get("t-fallback-retry-cache", True):
            raise self.retry(exc=LookupError(f"no cached quote for {symbol}"), countdown=0.1)
        return {"fallback": "cached", "retries": self.request.retries}


@shared_task(
    base=RetryingFallbackTask, bind=True, breaker="t-fallback-retry", breaker_fallback="no_cached_quote", max_retries=5
)
def fallback_retry_task(self: Any, symbol: str) -> dict[str, Any]:
    with CircuitBreaker("t-fallback-retry-dep", storage=STORE_URL):  # the partner API's own breaker
        value = call_downstream("t-fallback-retry")
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-trip")
def trip_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-trip")
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-threaded")
def threaded_calls_task(self: Any) -> dict[str, Any]:
    """The downstream called from a thread the body starts, through the run's breaker
    read in the body (docs/concepts.md): the call is the run's, as in the body."""
    breaker = self.breaker
    with ThreadPoolExecutor(1) as pool:
        value = pool.submit(breaker.call, call_downstream, "t-threaded").result()
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-nested")
def nested_inner_task(self: Any) -> str:
    with self.breaker:
        return call_downstream("t-nested")


@shared_task(base=BreakerTask, bind=True, breaker="t-nested")
def nested_outer_task(self: Any) -> dict[str, Any]:
    """Calls a task of the same breaker directly: the inner run takes the outer's ticket."""
    return report(self, nested_inner_task())


#: Runs of ``self_nesting_task``: (depth, the run's request args) as each began.
SELF_NESTED: list[tuple[int, Any]] = []


def _before_nested_call(task: Any, depth: int) -> None:
    """Note the run, make a guarded call, and force the breaker open once (``DOWN``)."""
    SELF_NESTED.append((depth, list(task.request.args or ())))
    with task.breaker:
        pass
    if depth and DOWN.get("t-self-nested"):
        DOWN["t-self-nested"] = False
        task.breaker.force_open()


@shared_task(base=BreakerTask, bind=True, breaker="t-self-nested")
def self_nesting_task(self: Any, depth: int) -> dict[str, Any]:
    """Calls its own task directly (``self(depth - 1)``) on the worker's request, after a
    guarded call of its own (so the nested run asks the breaker, not the run's ticket);
    the breaker is forced open between the two, once, by the test's ``DOWN`` flag."""
    _before_nested_call(self, depth)
    inner = self(depth - 1)["value"] if depth else "leaf"
    return report(self, f"depth {depth} ({inner})")


@shared_task(base=BreakerTask, bind=True, breaker="t-self-nested")
def mutual_x_task(self: Any, depth: int) -> dict[str, Any]:
    """As ``self_nesting_task``, but calls itself through ``mutual_y_task`` (x -> y -> x)."""
    _before_nested_call(self, depth)
    inner = mutual_y_task(depth - 1)["value"] if depth else "leaf"
    return report(self, f"depth {depth} ({inner})")


@shared_task(base=BreakerTask, bind=True, breaker="t-mutual-y")
def mutual_y_task(self: Any, depth: int) -> dict[str, Any]:
    """Calls ``mutual_x_task`` directly."""
    return report(self, f"y {mutual_x_task(depth)['value']}")


@shared_task(base=BreakerTask, bind=True, breaker="t-retry-after")  # failure_threshold 5 in breaker_policies
def retry_after_task(self: Any) -> dict[str, Any]:
    """The downstream answers "come back in 2 s" once (a 429 would), then works."""
    with _LOCK:
        CALLS["t-retry-after"] = CALLS.get("t-retry-after", 0) + 1
        first = CALLS["t-retry-after"] == 1
    if first:
        raise RetryAfter(2.0, "partner rate limit")
    return report(self, "t-retry-after ok")


def _refuse_once(name: str) -> None:
    """The downstream answers 429 (urllib's HTTPError, ``Retry-After: 0.5``) on its first call."""
    with _LOCK:
        CALLS[name] = CALLS.get(name, 0) + 1
        first = CALLS[name] == 1
    if first:
        headers = email.message.Message()
        headers["Retry-After"] = "0.5"
        raise urllib.error.HTTPError("http://partner.test/", 429, "Too Many Requests", headers, None)


@shared_task(base=BreakerTask, bind=True, breaker="t-refused")  # failure_threshold 5 in breaker_policies
def refused_task(self: Any) -> dict[str, Any]:
    """Refused (429) on its first call, then works."""
    _refuse_once("t-refused")
    return report(self, "t-refused ok")


@shared_task(
    base=BreakerTask, bind=True, breaker="t-refused-autoretry", autoretry_for=(Exception,), max_retries=0
)  # failure_threshold 5 in breaker_policies
def refused_autoretry_task(self: Any) -> dict[str, Any]:
    """The same, under autoretry_for: the refusal must not spend the (zero) retries."""
    with self.breaker:
        _refuse_once("t-refused-autoretry")
    return report(self, "t-refused-autoretry ok")


@shared_task(base=BreakerTask, bind=True, breaker="t-stays-closed")  # failure_threshold 2 in breaker_policies
def stays_closed_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        value = call_downstream("t-stays-closed")
    return report(self, value)


@shared_task(base=BreakerTask, bind=True, breaker="t-eager")
def eager_task(self: Any, x: int) -> dict[str, Any]:
    return report(self, x)


@shared_task(base=BreakerTask, bind=True, breaker="t-max-deferrals", breaker_max_deferrals=2)
def max_deferrals_task(self: Any) -> dict[str, Any]:
    return report(self)


@shared_task(base=BreakerTask, bind=True, breaker="t-max-defer-age", breaker_max_defer_age=1.0)
def max_defer_age_task(self: Any) -> dict[str, Any]:
    return report(self)


@shared_task(base=BreakerTask, bind=True, breaker="t-expires")  # reset_timeout 60 in breaker_policies
def expiring_task(self: Any) -> dict[str, Any]:
    return report(self)


@shared_task(base=BreakerTask, bind=True, breaker="t-headers")
def header_task(self: Any) -> dict[str, Any]:
    return report(self, (self.request.headers or {}).get("x-breaker-deferred-since"))


# -- fallbacks, keys, self.breaker ---------------------------------------------


def cached_quote(symbol: str, *, currency: str = "EUR") -> dict[str, Any]:
    """A fallback: called with the task's arguments instead of deferring it."""
    return {"fallback": "callable", "symbol": symbol, "currency": currency}


@shared_task(base=BreakerTask, bind=True, breaker="t-fallback-callable", breaker_fallback=cached_quote)
def fallback_callable_task(self: Any, symbol: str, *, currency: str = "EUR") -> dict[str, Any]:
    return {"fallback": None, "symbol": symbol}


class QuoteTask(BreakerTask):
    """A BreakerTask base class whose method serves as the fallback."""

    def stale_quote(self, symbol: str) -> dict[str, Any]:
        return {"fallback": "method", "symbol": symbol, "task": self.name}


@shared_task(base=QuoteTask, bind=True, breaker="t-fallback-method", breaker_fallback="stale_quote")
def fallback_method_task(self: Any, symbol: str) -> dict[str, Any]:
    return {"fallback": None, "symbol": symbol}


@shared_task(base=BreakerTask, bind=True, breaker="t-tenant", breaker_key=lambda args, kwargs: kwargs["tenant"])
def tenant_task(self: Any, *, tenant: str) -> dict[str, Any]:
    breaker = self.breaker
    return {**report(self, tenant), "breaker": breaker.name, "key": breaker.key}


class Tier(enum.IntEnum):
    GOLD = 7


#: What ``any_key_task``'s ``breaker_key`` returns for each ``kind`` (made anew each run,
#: as a key function's value is).
KEYS_OF_KIND: dict[str, Callable[[], Any]] = {
    "int": lambda: 7,
    "str": lambda: "7",
    "int-enum": lambda: Tier.GOLD,
    "uuid": lambda: uuid.UUID(int=7),
    "none": lambda: None,
    "object": object,
    "tuple": lambda: ("tenant", 7),
    "float": lambda: 7.0,
    "bool": lambda: True,
}
ANY_KEY_RUNS: list[str] = []


@shared_task(
    base=BreakerTask, bind=True, breaker="t-any-key", breaker_key=lambda args, kwargs: KEYS_OF_KIND[kwargs["kind"]]()
)
def any_key_task(self: Any, *, kind: str) -> Any:
    ANY_KEY_RUNS.append(kind)
    return self.breaker.key


@shared_task(base=BreakerTask, bind=True, breaker="t-guard-once")  # failure_threshold 5 in breaker_policies
def guard_once_task(self: Any, fail: bool) -> dict[str, Any]:
    breaker = self.breaker
    seen = {
        "is_breaker": isinstance(breaker, CircuitBreaker),
        "name": breaker.name,
        "key": breaker.key,
        "state": breaker.state.value,
    }
    with self.breaker:
        if fail:
            raise ConnectionError("t-guard-once is down")
    return seen


@shared_task(
    base=BreakerTask,
    bind=True,
    breaker="t-probe",
    breaker_policy={"half_open_max_calls": 2, "success_threshold": 2},
)
def probe_task(self: Any) -> dict[str, Any]:
    with self.breaker:
        inside = self.breaker.snapshot()
    return {"state": inside.state.value, "probes_in_flight": inside.probes_in_flight}


@shared_task(
    base=BreakerTask,
    bind=True,
    breaker="t-fails-after-block",
    breaker_policy={"half_open_max_calls": 2, "success_threshold": 2},
)
def fails_after_block_task(self: Any) -> None:
    """The downstream call succeeds; the task's own code fails afterwards."""
    with self.breaker:
        call_downstream("t-fails-after-block")
    raise RuntimeError("bug in the task's own code, after the downstream call succeeded")


@shared_task(base=BreakerTask, bind=True, breaker="t-unpublishable")
def unpublishable_task(self: Any) -> dict[str, Any]:
    return report(self)


@shared_task(base=BreakerTask, bind=True, breaker="t-unpublishable-late", acks_late=True)
def unpublishable_late_task(self: Any) -> dict[str, Any]:
    return report(self)


# -- breaker_routes: plain tasks, no BreakerTask base --------------------------


@shared_task(bind=True)  # put under breaker "t-routed" by breaker_routes alone
def routed_plain_task(self: Any, x: int) -> dict[str, Any]:
    return report(self, x + 1)


#: Runs of ``retried_after_an_outage_task`` that should end in a Celery retry (a reason of its own).
RETRY_ONCE: set[str] = set()


@shared_task(base=BreakerTask, bind=True, breaker="t-retry-budget", breaker_max_deferrals=1, max_retries=1)
def retried_after_an_outage_task(self: Any) -> dict[str, Any]:
    """Deferred in one outage, then retried by Celery for a reason of its own."""
    with _LOCK:
        CALLS["t-retry-budget"] = CALLS.get("t-retry-budget", 0) + 1
    if self.request.id in RETRY_ONCE:
        RETRY_ONCE.discard(self.request.id)
        raise self.retry(exc=ValueError("a reason of its own"), countdown=0.5)
    return report(self)


def secondary_quote(symbol: str) -> dict[str, Any]:
    """A fallback that calls a secondary provider, behind a breaker of its own."""
    with CircuitBreaker("t-fallback-secondary", storage=STORE_URL):
        return {"fallback": "secondary", "symbol": symbol}


@shared_task(base=BreakerTask, bind=True, breaker="t-fallback-primary", breaker_fallback=secondary_quote)
def fallback_secondary_task(self: Any, symbol: str) -> dict[str, Any]:
    return {"fallback": None, "symbol": symbol}


@shared_task(bind=True)
def plain_guarded_task(self: Any) -> str:
    """A plain Celery task (no BreakerTask) guarding its call: a rejection fails it."""
    with CircuitBreaker("t-plain-guarded", storage=STORE_URL):
        return "ok"
