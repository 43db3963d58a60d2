"""BreakerTask options through the worker: eager mode, fallbacks, per-key breakers, self.breaker, breaker_routes."""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from celery.result import EagerResult

from celery_breaker import BreakerTask, CircuitBreaker, CircuitOpenError, ConfigurationError, State
from celery_breaker.integration.inventory import check_app
from celery_breaker.integration.registry import registry_for
from celery_breaker.integration.task_options import task_breaker_config
from celery_breaker.storage import resolve_store
from celery_breaker.testing import FakeClock

from . import tasks
from .support import DEFERRED, TIMEOUT, deferral_text, wait_for
from .test_settings import throwaway_app

Operate = Callable[[CircuitBreaker], CircuitBreaker]


def get(result: Any) -> Any:
    return result.get(timeout=TIMEOUT, interval=0.02)


def wait_until_probe_admissible(breaker: CircuitBreaker) -> None:
    """Poll for the end of the open period (the breaker then half-opens on its next call)."""
    wait_for(lambda: breaker.snapshot().retry_after == 0.0, f"breaker {breaker.label!r} to admit a probe")


def trip(breaker: CircuitBreaker) -> None:
    """Record one failure from the test thread (failure_threshold 1): the breaker opens."""
    with pytest.raises(ConnectionError), breaker:
        raise ConnectionError("tripped by the test")
    assert breaker.state is State.OPEN


# -- 5. eager mode raises instead of deferring ---------------------------------


def test_eager_apply_with_an_open_breaker_fails_with_circuit_open_error(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.eager_task.breaker)
    breaker.force_open()

    result = tasks.eager_task.apply(args=(1,))
    assert isinstance(result, EagerResult)
    assert result.state == "FAILURE"
    error = result.result
    assert isinstance(error, CircuitOpenError)
    assert error.name == "t-eager"
    assert error.state is State.FORCED_OPEN
    assert error.retry_after is None
    assert str(error) == "breaker 't-eager' forced_open"
    snapshot = breaker.snapshot()
    assert snapshot.deferrals == 0  # nothing was requeued (and no eager retry recursion)
    assert snapshot.rejections == 1

    with pytest.raises(CircuitOpenError, match="breaker 't-eager' forced_open"):
        tasks.eager_task(2)  # called as a plain function
    assert breaker.snapshot().deferrals == 0

    breaker.close()
    assert tasks.eager_task.apply(args=(3,)).result["value"] == 3
    assert tasks.eager_task(4)["value"] == 4


# -- 8. breaker_fallback -------------------------------------------------------


def test_fallback_callable_returns_its_value_instead_of_deferring(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.fallback_callable_task.breaker)
    breaker.force_open()

    value = get(tasks.fallback_callable_task.delay("ACME", currency="USD"))
    assert value == {"fallback": "callable", "symbol": "ACME", "currency": "USD"}
    assert breaker.snapshot().deferrals == 0

    breaker.close()
    assert get(tasks.fallback_callable_task.delay("ACME")) == {"fallback": None, "symbol": "ACME"}


def test_fallback_method_name_returns_its_value_instead_of_deferring(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.fallback_method_task.breaker)
    breaker.force_open()

    value = get(tasks.fallback_method_task.delay("ACME"))
    assert value == {"fallback": "method", "symbol": "ACME", "task": tasks.fallback_method_task.name}
    assert breaker.snapshot().deferrals == 0

    breaker.close()
    assert get(tasks.fallback_method_task.delay("ACME")) == {"fallback": None, "symbol": "ACME"}


# -- 9. per-key breakers ---------------------------------------------------------


def test_per_key_breaker_defers_one_tenant_while_another_runs(app: Any, operate: Operate) -> None:
    policy = task_breaker_config(app.tasks[tasks.tenant_task.name]).policy
    registry = registry_for(app)
    tenant_a = operate(registry.get("t-tenant", "A", policy))
    tenant_b = operate(registry.get("t-tenant", "B", policy))
    tenant_a.force_open()

    result_a = tasks.tenant_task.apply_async(kwargs={"tenant": "A"})
    result_b = tasks.tenant_task.apply_async(kwargs={"tenant": "B"})

    value_b = get(result_b)
    assert value_b["breaker"] == "t-tenant"
    assert value_b["key"] == "B"  # self.breaker is this tenant's breaker
    assert value_b["deferrals"] is None
    # Tenant A is forced open, so it is still deferred while B has run.
    wait_for(lambda: result_a.state == "RETRY", "tenant A's task to be deferred")
    match = DEFERRED.fullmatch(deferral_text(result_a))
    assert match is not None
    assert match["label"] == "t-tenant[A]"
    assert not result_a.ready()
    assert tenant_b.snapshot().deferrals == 0
    assert tenant_b.snapshot().successes == 1

    tenant_a.close()
    value_a = get(result_a)
    assert value_a["key"] == "A"
    assert value_a["deferrals"] == tenant_a.snapshot().deferrals >= 1
    keyless = tasks.tenant_task.breaker
    try:
        assert keyless.snapshot().deferrals == 0  # the key-less breaker is untouched
    finally:
        # (Made by that read, in the session's store: a later test's breaker_open t-tenant
        # found it and opened it, where no task's breaker should be made.)
        keyless.store.delete("t-tenant", None)


def _any_key_store() -> Any:
    # (not the task's ``.breaker``: read outside a run, it makes the key-less breaker)
    return resolve_store(tasks.STORE_URL)


def _any_key_breakers() -> dict[str | None, Any]:
    return {row.key: row for row in _any_key_store().snapshots(FakeClock()) if row.name == "t-any-key"}


def test_a_whole_number_key_is_the_breaker_of_its_digits_and_a_uuid_of_its_text(app: Any) -> None:
    # (they were str()-ed: an IntEnum's text is 'Tier.GOLD' on Python 3.10, '7' on 3.11)
    try:
        keys = {kind: get(tasks.any_key_task.delay(kind=kind)) for kind in ("int", "str", "int-enum", "uuid")}
        assert keys == {"int": "7", "str": "7", "int-enum": "7", "uuid": "00000000-0000-0000-0000-000000000007"}
        breakers = _any_key_breakers()
        assert set(breakers) == {"7", "00000000-0000-0000-0000-000000000007"}  # 7, "7" and GOLD: one breaker
        assert breakers["7"].successes == 3
    finally:
        for key in ("7", "00000000-0000-0000-0000-000000000007"):
            _any_key_store().delete("t-any-key", key)


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("none", "returned None for this run's arguments, which names no breaker"),
        ("object", "returned a value of type object, which is no key"),  # (its repr: a new breaker a run)
        ("tuple", "returned a value of type tuple, which is no key"),
        ("float", "returned a value of type float, which is no key"),
        ("bool", "returned a value of type bool, which is no key"),
    ],
)
def test_a_key_that_is_no_key_fails_that_run_unrun_naming_the_task_and_the_fix(
    app: Any, kind: str, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None was the key-less breaker (which the operator's commands say no task of a
    # keyed breaker consults), anything else str()-ed: an object's repr made a breaker a run.
    runs: list[str] = []
    monkeypatch.setattr(tasks, "ANY_KEY_RUNS", runs)
    result = tasks.any_key_task.delay(kind=kind)
    with pytest.raises(ConfigurationError) as info:
        get(result)
    assert str(info.value).startswith(f"task 'tests.celery.tasks.any_key_task': breaker_key {said}; return the key")
    assert result.state == "FAILURE"
    assert runs == []  # the body never ran
    assert _any_key_breakers() == {}  # and no breaker was made for it
    try:
        assert get(tasks.any_key_task.delay(kind="str")) == "7"  # the next run, with a key, runs
        assert runs == ["str"]
    finally:
        _any_key_store().delete("t-any-key", "7")


# -- 10. self.breaker inside the body ------------------------------------------


def test_self_breaker_in_the_body_is_this_calls_breaker_and_records_once(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.guard_once_task.breaker)  # failure_threshold 5: stays closed
    before = breaker.snapshot()

    seen = get(tasks.guard_once_task.delay(False))
    assert seen == {"is_breaker": True, "name": "t-guard-once", "key": None, "state": "closed"}
    after_success = breaker.snapshot()
    assert after_success.successes == before.successes + 1
    assert after_success.failures == before.failures

    with pytest.raises(ConnectionError, match="t-guard-once is down"):
        get(tasks.guard_once_task.delay(True))
    after_failure = breaker.snapshot()
    assert after_failure.failures == after_success.failures + 1
    assert after_failure.successes == after_success.successes
    assert after_failure.state is State.CLOSED


def test_guarded_block_in_half_open_uses_the_tasks_probe_slot(app: Any, operate: Operate) -> None:
    # half_open_max_calls 2, success_threshold 2 (task option breaker_policy).
    breaker = operate(tasks.probe_task.breaker)
    assert breaker.policy.half_open_max_calls == 2
    trip(breaker)
    wait_until_probe_admissible(breaker)
    successes = breaker.snapshot().successes

    inside = get(tasks.probe_task.delay())
    assert inside == {"state": "half_open", "probes_in_flight": 1}  # one slot, not two
    after = breaker.snapshot()
    assert after.successes == successes + 1  # recorded once
    assert after.state is State.HALF_OPEN  # one success of the two needed
    assert after.probes_in_flight == 0

    assert get(tasks.probe_task.delay()) == {"state": "half_open", "probes_in_flight": 1}
    assert breaker.snapshot().state is State.CLOSED
    assert breaker.snapshot().successes == successes + 2


def test_failure_after_a_successful_guarded_block_is_not_deferred(
    app: Any, operate: Operate, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaker = operate(tasks.fails_after_block_task.breaker)  # half_open_max_calls 2, success_threshold 2
    monkeypatch.setitem(tasks.CALLS, "t-fails-after-block", 0)
    trip(breaker)
    wait_until_probe_admissible(breaker)

    result = tasks.fails_after_block_task.delay()
    with pytest.raises(RuntimeError, match="bug in the task's own code"):
        get(result)
    # The RuntimeError is the task's own bug, after its guarded call succeeded: it must fail
    # the task at once, without a deferral that calls the (successful) downstream a second time.
    assert breaker.snapshot().deferrals == 0
    assert tasks.CALLS["t-fails-after-block"] == 1


# -- 12. breaker_routes: a plain task under a breaker by settings alone ---------


def test_breaker_routes_put_a_plain_task_under_a_breaker(app: Any, operate: Operate) -> None:
    task = app.tasks["tests.celery.tasks.routed_plain_task"]
    assert isinstance(task, BreakerTask)  # made one at worker start, by breaker_routes
    assert task_breaker_config(task).name == "t-routed"
    breaker = operate(task.breaker)
    assert breaker.name == "t-routed"
    breaker.force_open()

    result = tasks.routed_plain_task.delay(1)
    wait_for(lambda: result.state == "RETRY", "the routed task to be deferred")
    match = DEFERRED.fullmatch(deferral_text(result))
    assert match is not None
    assert match["label"] == "t-routed"
    assert match["state"] == "forced_open"

    breaker.close()
    value = get(result)
    assert value["value"] == 2
    assert value["retries"] == 0
    assert value["deferrals"] == breaker.snapshot().deferrals >= 1


def test_a_fallback_whose_own_breaker_is_open_defers_the_task(app: Any, operate: Operate) -> None:
    """The primary is down and the fallback's secondary provider too: the fallback's
    CircuitOpenError defers the task (as if it had no fallback) rather than failing it."""
    primary = operate(tasks.fallback_secondary_task.breaker)
    secondary = operate(CircuitBreaker("t-fallback-secondary", storage=tasks.STORE_URL))
    primary.force_open()
    secondary.force_open()
    result = tasks.fallback_secondary_task.delay("ACME")
    wait_for(lambda: primary.snapshot().deferrals >= 1 or result.state == "FAILURE", "the task deferred")
    assert result.state != "FAILURE", result.info
    primary.close()
    assert get(result) == {"fallback": None, "symbol": "ACME"}


def test_a_rejection_that_fails_a_task_keeps_its_text_in_the_result_backend(app: Any, operate: Operate) -> None:
    """A result backend rebuilds an exception from its args (JSON): a rejection made on
    the hot path (no args, its text formatted when read) came back as "breaker '' open"."""
    breaker = operate(CircuitBreaker("t-plain-guarded", storage=tasks.STORE_URL))
    breaker.force_open()
    result = tasks.plain_guarded_task.delay()
    with pytest.raises(CircuitOpenError) as info:
        result.get(timeout=TIMEOUT)
    assert str(info.value) == "breaker 't-plain-guarded' forced_open"


def _quote_fallback_none() -> str:
    return "cached"


def _key_of_one(tenant: str) -> str:
    return tenant


def _any_fallback(*args: Any, **kwargs: Any) -> str:
    return "cached"


def _symbol_fallback(symbol: str, currency: str = "EUR") -> str:
    return symbol


def _named_fallback(**kwargs: Any) -> str:
    return str(kwargs)


def _plainly_wrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"breaker_key": _key_of_one}, "breaker_key cannot be called (args, kwargs)"),
        ({"breaker_fallback": _quote_fallback_none}, "breaker_fallback cannot be called with the task's arguments"),
        ({"breaker_key": "key_of_one"}, "breaker_key cannot be called (args, kwargs)"),
        ({"breaker_fallback": "fallback_of_none"}, "breaker_fallback cannot be called with the task's arguments"),
        ({"breaker_fallback": _any_fallback, "breaker_key": lambda args, kwargs: args[0]}, None),
        ({"breaker_fallback": _symbol_fallback, "breaker_key": "key_of_two"}, None),
        ({"breaker_fallback": "fallback_of_symbol"}, None),
        ({"breaker_fallback": _named_fallback}, None),  # (the task's arguments may come by name)
        ({"breaker_key": "key_wrapped"}, None),  # a method under a decorator without functools.wraps
        ({"breaker_fallback": "fallback_wrapped"}, None),
        ({"breaker_key": "key_partial"}, None),  # a functools.partialmethod
    ],
)
def test_a_key_or_fallback_that_cannot_take_its_call_stops_the_worker_at_start(
    options: dict[str, Any], problem: str | None
) -> None:
    # The worker started; the key then failed every run with a bare TypeError naming no
    # option, and the fallback failed every task at the first outage instead of answering.
    app = throwaway_app("call-shapes")

    class QuoteTask(BreakerTask):
        def key_of_one(self, tenant: str) -> str:
            return tenant

        def key_of_two(self, args: Any, kwargs: Any) -> str:
            return str(args[0])

        def fallback_of_none(self) -> str:
            return "cached"

        def fallback_of_symbol(self, symbol: str) -> str:
            return symbol

        @_plainly_wrapped
        def key_wrapped(self, args: Any, kwargs: Any) -> str:
            return str(args[0])

        @_plainly_wrapped
        def fallback_wrapped(self, symbol: str) -> str:
            return symbol

        def _key_with(self, prefix: str, args: Any, kwargs: Any) -> str:
            return prefix + str(args[0])

        key_partial = functools.partialmethod(_key_with, "k-")

    @app.task(base=QuoteTask, bind=True, breaker="quotes-shape", shared=False, name="shape.quote", **options)
    def quote(self: Any, symbol: str) -> str:
        """A task of one argument."""
        return "live"

    if problem is None:
        check_app(app)
        return
    with pytest.raises(ConfigurationError, match=re.escape(f"task 'shape.quote': {problem}")):
        check_app(app)


_STORE_URL = "redis://:s3cret-pw@cache.internal:6379/0"


_URL_OPTIONS = [
    "breaker",
    "breaker_policy",
    "breaker_max_deferrals",
    "breaker_max_defer_age",
    "breaker_defer_spread",
    "breaker_scope",
    "breaker_probe",
    "breaker_probe_timeout",
    "breaker_key",
    "breaker_fallback",
]


@pytest.mark.parametrize(
    ("option", "shape"),
    # (a breaker name is the user's to choose, URL-like or not: ``breaker`` only nested)
    [(option, shape) for option in _URL_OPTIONS for shape in ("itself", "in a dict", "in a list")][1:],
)
def test_a_store_url_given_to_a_task_option_is_refused_with_its_password_masked(option: str, shape: str) -> None:
    # (a URL put in the wrong option: its refusal, which a worker logs at CRITICAL on
    # start, quoted the value, password and all, as the settings' did before e919c8d)
    value: Any = {"itself": _STORE_URL, "in a dict": {"window": _STORE_URL}, "in a list": [_STORE_URL]}[shape]
    app = throwaway_app(f"url-option-{option}")

    def declare_and_start() -> None:  # (refused when the task is made, or at the worker's start)
        @app.task(base=BreakerTask, shared=False, name="url.option", **{option: value})
        def job() -> None:
            return None

        app.finalize()
        check_app(app)

    with pytest.raises(ConfigurationError) as info:
        declare_and_start()
    refusal = info.value
    assert option in str(refusal)
    for text in (str(refusal), *refusal.problems):
        assert "s3cret-pw" not in text
        assert ":***@cache.internal:6379/0" in text
    logged = "".join(traceback.format_exception(refusal))  # (as a worker logs it: causes and contexts too)
    assert "s3cret-pw" not in logged


@pytest.mark.parametrize(
    ("routes", "options", "fix"),
    [
        ({}, {"base": BreakerTask}, "the task names no breaker, so its breaker is named after the task: give it "),
        ({"shapes.*": True}, {}, "breaker_routes gives it True (the task's own name): map it to a breaker name "),
    ],
)
def test_a_task_name_no_breaker_can_take_is_refused_with_the_option_that_names_one(
    routes: dict[str, Any], options: dict[str, Any], fix: str
) -> None:
    # A task that names no breaker lends it its own name. A name a breaker cannot take
    # (a bracket, here) was refused with check_name's fix alone, "write it with other
    # characters", about a breaker name the user never wrote.
    app = throwaway_app("bracket-names", breaker_routes=routes, breaker_storage_url="memory://")

    def process() -> None:
        """A task whose name holds a bracket."""

    app.task(name="shapes.process[v2]", shared=False, **options)(process)
    with pytest.raises(ConfigurationError) as refused:
        check_app(app)
    text = str(refused.value)
    assert "task 'shapes.process[v2]': breaker name 'shapes.process[v2]' holds '['" in text
    assert fix in text
