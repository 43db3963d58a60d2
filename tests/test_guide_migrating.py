"""The before/after of docs/guides/migrating-from-pybreaker.md, and the differences it states.

The pybreaker task and the celery-breaker task below are printed in the guide verbatim
(the last test checks it); the other tests prove each behavioural difference the guide
claims, against the installed pybreaker.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pybreaker
import pytest
from celery import Celery
from celery.signals import task_retry

from celery_breaker import BreakerTask, CircuitBreaker, CircuitOpenError, State
from celery_breaker.testing import fresh_store

# -- the shared scene: a payment provider ---------------------------------------------


class ProviderError(Exception):
    """The provider failed: a timeout, a 5xx."""


class InvalidCard(Exception):
    """The provider answered: it refuses this card (a business outcome, not an outage)."""


class FakeProvider:
    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    def charge(self, order_id: int) -> str:
        self.calls += 1
        if self.down:
            raise ProviderError("provider down")
        if order_id < 0:
            raise InvalidCard(f"order {order_id}: card refused")
        return f"charged {order_id}"


provider = FakeProvider()
app = Celery("shop", set_as_current=False)
app.conf.update(broker_url="memory://", breaker_storage_url="memory://migrating-guide")


# -- before: pybreaker ------------------------------------------------------------------

payments_breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60, exclude=[InvalidCard], name="payments")


@app.task(
    bind=True,
    autoretry_for=(ProviderError, pybreaker.CircuitBreakerError),
    retry_backoff=True,
    max_retries=10,
    shared=False,
)
def charge_before(self: Any, order_id: int) -> str:
    return payments_breaker.call(provider.charge, order_id)


# -- after: celery-breaker -------------------------------------------------------------

app.conf.breaker_policies = {
    "payments": {"failure_threshold": 5, "window": 60, "reset_timeout": 60, "ignore_exceptions": [InvalidCard]},
}


@app.task(
    base=BreakerTask,
    bind=True,
    breaker="payments",
    autoretry_for=(ProviderError,),
    retry_backoff=True,
    max_retries=3,
    shared=False,
)
def charge(self: Any, order_id: int) -> str:
    with self.breaker:  # only the provider call counts
        return provider.charge(order_id)


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_scene() -> Iterator[None]:
    provider.down, provider.calls = False, 0
    payments_breaker.close()
    charge.breaker.reset()
    yield
    payments_breaker.close()
    charge.breaker.reset()


# -- the trip: which exception the fifth failure raises --------------------------------


def test_pybreaker_turns_the_tripping_failure_into_circuit_breaker_error() -> None:
    provider.down = True
    for _ in range(4):
        with pytest.raises(ProviderError):
            charge_before(1)  # a direct call: the body runs, autoretry re-raises
    with pytest.raises(pybreaker.CircuitBreakerError):
        charge_before(1)  # the 5th failure: throw_new_error_on_trip=True replaces it
    with pytest.raises(pybreaker.CircuitBreakerError):
        charge_before(1)  # rejected, the provider is not called
    assert provider.calls == 5
    assert payments_breaker.current_state == pybreaker.STATE_OPEN == "open"


def test_celery_breaker_re_raises_the_tripping_failure_and_rejects_after() -> None:
    provider.down = True
    for _ in range(5):
        with pytest.raises(ProviderError):
            charge(1)  # the 5th failure trips the breaker and is still the ProviderError
    assert charge.breaker.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        charge(1)  # rejected, the provider is not called
    assert provider.calls == 5


# -- exclude vs ignore_exceptions --------------------------------------------------------


def test_pybreaker_exclude_counts_as_a_success_and_resets_the_consecutive_count() -> None:
    provider.down = True
    for _ in range(4):
        with pytest.raises(ProviderError):
            charge_before(1)
    provider.down = False
    with pytest.raises(InvalidCard):
        charge_before(-1)  # excluded: a success, the failure counter goes back to 0
    assert payments_breaker.fail_counter == 0
    provider.down = True
    for _ in range(4):
        with pytest.raises(ProviderError):
            charge_before(1)
    assert payments_breaker.current_state == "closed"  # 8 failures in a row but one


def test_celery_breaker_ignore_exceptions_is_neutral_and_successes_do_not_reset_the_window() -> None:
    provider.down = True
    for _ in range(4):
        with pytest.raises(ProviderError):
            charge(1)
    provider.down = False
    with pytest.raises(InvalidCard):
        charge(-1)  # ignored: counts for nothing
    assert charge(2) == "charged 2"  # a success does not reset the count either
    assert charge.breaker.snapshot().window_failures == 4
    provider.down = True
    with pytest.raises(ProviderError):
        charge(1)  # the 5th failure within 60 s trips it
    assert charge.breaker.state is State.OPEN


# -- the retry budget ---------------------------------------------------------------------


def test_an_open_pybreaker_spends_the_tasks_retries() -> None:
    payments_breaker.open()
    retried: list[Any] = []

    def count(sender: Any = None, **_: Any) -> None:
        if sender is charge_before or getattr(sender, "name", None) == charge_before.name:
            retried.append(sender)

    task_retry.connect(count, weak=False)
    try:
        result = charge_before.apply(args=(1,))  # eager: Celery retries at once
    finally:
        task_retry.disconnect(count)
    assert result.state == "FAILURE"
    assert isinstance(result.result, pybreaker.CircuitBreakerError)
    assert len(retried) == 10  # every retry of max_retries=10 spent on rejections
    assert provider.calls == 0


def test_an_open_celery_breaker_spends_no_retry() -> None:
    charge.breaker.force_open()
    retried: list[Any] = []

    def count(sender: Any = None, **_: Any) -> None:
        retried.append(sender)

    task_retry.connect(count, weak=False)
    try:
        result = charge.apply(args=(1,))  # eager: no broker to defer to, so it raises
    finally:
        task_retry.disconnect(count)
    assert result.state == "FAILURE"
    assert isinstance(result.result, CircuitOpenError)
    assert retried == []  # dont_autoretry_for=(CircuitOpenError,): no retry spent
    assert provider.calls == 0


# -- the lock around the call --------------------------------------------------------------


def test_pybreaker_holds_its_lock_while_the_guarded_call_runs() -> None:
    held_during_call: list[bool] = []

    def look_from_another_thread() -> str:
        def probe() -> None:
            got = payments_breaker._lock.acquire(blocking=False)
            if got:
                payments_breaker._lock.release()
            held_during_call.append(not got)

        other = threading.Thread(target=probe)
        other.start()
        other.join(10)
        return "done"

    assert payments_breaker.call(look_from_another_thread) == "done"
    assert held_during_call == [True]  # every other thread's call waits for this one


def test_celery_breaker_lets_another_thread_call_while_a_call_runs() -> None:
    breaker = CircuitBreaker("shared", storage=fresh_store())
    inner: list[str] = []

    def call_from_another_thread() -> str:
        other = threading.Thread(target=lambda: inner.append(breaker.call(lambda: "inner")))
        other.start()
        other.join(10)
        return "outer"

    assert breaker.call(call_from_another_thread) == "outer"
    assert inner == ["inner"]  # it ran to the end while the outer call was still running


# -- the guide prints this file's code -----------------------------------------------------


def test_the_guides_before_and_after_are_this_files_code() -> None:
    here = Path(__file__)
    source = here.read_text(encoding="utf-8")
    guide = (here.parents[1] / "docs" / "guides" / "migrating-from-pybreaker.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.DOTALL)
    checked = [block for block in blocks if "payments" in block]
    assert len(checked) >= 2, "the guide lost its before/after"
    strays = [block for block in checked if block not in source]
    assert not strays, f"the guide shows code tests/test_guide_migrating.py does not run: {strays}"
