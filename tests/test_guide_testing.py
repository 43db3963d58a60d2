"""The examples of docs/guides/testing.md, run as they are printed there.

Each test below is a snippet of the guide (the guide says the suite runs them). Keep the
two in step: a change here that the guide does not show is a guide that lies.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from celery import Celery

from celery_breaker import BreakerTask, CircuitBreaker, CircuitOpenError, State
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock, fresh_store, use_clock

# -- 1. a breaker in your own code: FakeClock and fresh_store ------------------------


class ApiDown(ConnectionError):
    pass


def fetch_rates(breaker: CircuitBreaker, down: bool) -> str:
    """The code under test: one call to a downstream, guarded by ``breaker``."""

    def call_api() -> str:
        if down:
            raise ApiDown("rates API down")
        return "rates"

    return breaker.call(call_api)


def test_the_breaker_opens_after_two_failures_and_probes_after_30_s() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "rates-api",
        {"failure_threshold": 2, "reset_timeout": 30, "half_open_max_calls": 1},
        storage=fresh_store(),  # private: no other test sees this breaker
        clock=clock,  # time moves only when the test says so
    )
    for _ in range(2):
        with pytest.raises(ApiDown):
            fetch_rates(breaker, down=True)
    assert breaker.state is State.OPEN

    with pytest.raises(CircuitOpenError) as rejected:
        fetch_rates(breaker, down=False)  # rejected: the API is not even called
    assert rejected.value.retry_after == 30

    clock.advance(29.9)
    with pytest.raises(CircuitOpenError):
        fetch_rates(breaker, down=False)

    clock.advance(0.1)
    assert breaker.state is State.OPEN  # the next call half-opens it, not the clock
    assert fetch_rates(breaker, down=False) == "rates"  # the probe
    assert breaker.snapshot().state is State.CLOSED  # one probe, one success: closed


# -- 2. a task in eager mode: apply() raises, use_clock() moves its breakers ---------


def make_app() -> Celery:
    app = Celery("guide-eager", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        # Every test its own store: breakers share nothing across tests.
        breaker_storage_url=f"memory://{uuid.uuid4().hex}",
        breaker_default_policy={"failure_threshold": 2, "reset_timeout": 30, "half_open_max_calls": 1},
    )
    return app


PROVIDER_DOWN = {"value": False}


def build_charge(app: Celery) -> Any:
    # shared=False: this throwaway app's task is not added to every other app.
    @app.task(base=BreakerTask, bind=True, breaker="payments", shared=False)
    def charge(self: Any, order_id: int) -> str:
        with self.breaker:  # guard only the provider call
            if PROVIDER_DOWN["value"]:
                raise ConnectionError("provider down")
            return f"charged {order_id}"

    return charge


def test_an_open_breaker_makes_apply_raise_circuit_open_error() -> None:
    app = make_app()
    charge = build_charge(app)
    charge.breaker.force_open()

    result = charge.apply(args=(7,))
    assert result.state == "FAILURE"
    assert isinstance(result.result, CircuitOpenError)
    with pytest.raises(CircuitOpenError, match="breaker 'payments' forced_open"):
        result.get()
    with pytest.raises(CircuitOpenError):
        charge(7)  # a direct call too

    charge.breaker.close()
    assert charge.apply(args=(7,)).get() == "charged 7"


def test_failures_trip_the_tasks_breaker_and_the_fake_clock_reopens_it() -> None:
    app = make_app()
    charge = build_charge(app)
    clock = FakeClock()
    use_clock(app, clock)  # before the first call: every task breaker reads this clock

    PROVIDER_DOWN["value"] = True
    try:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                charge.apply(args=(1,)).get()  # eager: a failing run keeps its own error
        assert charge.breaker.state is State.OPEN
        with pytest.raises(CircuitOpenError):
            charge.apply(args=(1,)).get()
    finally:
        PROVIDER_DOWN["value"] = False

    clock.advance(30)
    assert charge.apply(args=(1,)).get() == "charged 1"  # the probe
    assert charge.breaker.snapshot().state is State.CLOSED


# -- 3. a real deferral: an in-process worker (celery.contrib.pytest) ---------------


@pytest.fixture
def celery_config() -> Mapping[str, Any]:
    return {
        "broker_url": "memory://",
        "result_backend": "cache+memory://",
        "broker_transport_options": {"polling_interval": 0.02},  # the default 1 s slows deferrals
        "task_default_queue": "guide-testing",  # no other in-process worker takes these tasks
        "breaker_storage_url": "memory://guide-worker",  # the worker thread shares this process's store
        "breaker_default_policy": {"failure_threshold": 1, "reset_timeout": 0.5},
        "breaker_defer_spread": 0.1,
    }


@pytest.fixture
def celery_worker_parameters() -> Mapping[str, Any]:
    return {"perform_ping_check": False}


@pytest.fixture
def guide_tasks(celery_app: Celery) -> Iterator[Any]:
    """Register the task on the test app before ``celery_worker`` starts the worker."""

    @celery_app.task(base=BreakerTask, bind=True, breaker="guide-crm", shared=False)
    def sync_contact(self: Any, contact_id: int) -> dict[str, Any]:
        return {"id": self.request.id, "retries": self.request.retries, "contact": contact_id}

    yield sync_contact
    sync_contact.breaker.reset()  # never leave a forced-open breaker behind


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until ``condition()`` holds; the deadline only bounds a broken test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_open_breaker_defers_the_task_and_it_runs_once_closed(guide_tasks: Any, celery_worker: Any) -> None:
    sync_contact = guide_tasks
    sync_contact.breaker.force_open()

    result = sync_contact.delay(42)
    wait_for(lambda: result.state == "RETRY")  # deferred, not failed
    assert isinstance(result.info, CircuitOpenError)
    assert "breaker 'guide-crm' forced_open, deferred" in str(result.info)

    sync_contact.breaker.close()
    value = result.get(timeout=10)
    assert value == {"id": result.id, "retries": 0, "contact": 42}  # same id, no retry spent
    assert sync_contact.breaker.snapshot().deferrals >= 1


# -- 4. against a real Redis: ?time=client and store.sync() --------------------------


def test_a_trip_in_one_process_is_seen_by_another(redis_url: str) -> None:
    url = f"{redis_url}/0?time=client&key_prefix=test-{uuid.uuid4().hex}"
    clock = FakeClock()
    policy = {"failure_threshold": 1, "reset_timeout": 30}
    here = CircuitBreaker("rates-api", policy, storage=RedisStore.from_url(url), clock=clock)
    there = CircuitBreaker("rates-api", policy, storage=RedisStore.from_url(url), clock=clock)  # another "process"
    assert there.call(lambda: "warm") == "warm"  # its view of the breaker now exists

    with pytest.raises(ApiDown):
        fetch_rates(here, down=True)  # trips the shared breaker
    there.store.sync()  # returns once "there" has heard every transition published so far
    with pytest.raises(CircuitOpenError):
        fetch_rates(there, down=False)

    clock.advance(30)  # the Lua scripts read this clock, not Redis TIME
    assert fetch_rates(there, down=False) == "rates"


# -- the module's own bookkeeping --------------------------------------------------


@pytest.fixture(autouse=True)
def _provider_up() -> Iterator[None]:
    PROVIDER_DOWN["value"] = False
    yield
    PROVIDER_DOWN["value"] = False


def test_every_python_block_of_the_guide_is_in_this_file() -> None:
    """Guard: the guide prints only code this file runs (each block verbatim), and shows every test."""
    import re
    from pathlib import Path

    here = Path(__file__)
    source = here.read_text(encoding="utf-8")
    guide = (here.parents[1] / "docs" / "guides" / "testing.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.DOTALL)
    assert len(blocks) >= 5
    strays = [block for block in blocks if block not in source]
    assert not strays, f"docs/guides/testing.md shows code that tests/test_guide_testing.py does not run: {strays}"
    names: Sequence[str] = [
        "test_the_breaker_opens_after_two_failures_and_probes_after_30_s",
        "test_an_open_breaker_makes_apply_raise_circuit_open_error",
        "test_failures_trip_the_tasks_breaker_and_the_fake_clock_reopens_it",
        "test_an_open_breaker_defers_the_task_and_it_runs_once_closed",
        "test_a_trip_in_one_process_is_seen_by_another",
    ]
    missing = [name for name in names if not any(f"def {name}(" in block for block in blocks)]
    assert not missing, f"docs/guides/testing.md lost these examples: {missing}"
