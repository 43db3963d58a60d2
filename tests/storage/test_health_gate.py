"""The releaser and health checks (real Redis): a parked breaker with a probe closes on checks alone.

With every task parked nobody calls the breaker, so the worker's releaser runs the
health check when the open time is up, and publishes no parked task as a probe: the
parked tasks go only once the checks have closed the breaker.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
from celery import Celery

from celery_breaker import CircuitBreaker, State
from celery_breaker.core import Transition
from celery_breaker.core.pacing import PacingLaw
from celery_breaker.integration.deferral.health_gate import CHECK_WAIT
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.integration.registry import registry_for
from celery_breaker.storage import resolve_store

from ..celery.support import wait_for
from .conftest import unique_prefix

POLICY = {"failure_threshold": 1, "reset_timeout": 0.2, "half_open_max_calls": 1, "success_threshold": 1}
#: The downstream's health, read by ``check`` (a dotted path in ``breaker_probes``).
HEALTH = {"up": False, "checks": 0}
_APPS = itertools.count()


def check() -> None:
    HEALTH["checks"] += 1
    if not HEALTH["up"]:
        raise ConnectionError("health endpoint down")


@pytest.fixture
def app(redis_url: str) -> Any:
    name = f"gate-{next(_APPS)}"
    app = Celery(name, set_as_current=False, broker="memory://")
    app.conf.update(
        task_default_queue=f"{name}-queue",
        breaker_storage_url=f"{redis_url}?key_prefix={unique_prefix()}",
        breaker_default_policy=POLICY,
        breaker_probes={"svc": "tests.storage.test_health_gate:check"},
    )

    @app.task(name="gate.job", shared=False)
    def job(n: int) -> int:
        return n

    HEALTH.update(up=False, checks=0)
    return app


def park(app: Any, breaker: CircuitBreaker, count: int) -> None:
    parking = breaker.store.parking
    assert parking is not None
    for n in range(count):
        payload = encode_message(dict(app.signature("gate.job", args=(n,))), "json")
        parking.park(breaker.name, None, f"{breaker.name}-{n}:1", float(n), payload, None)


def parked(breaker: CircuitBreaker) -> int:
    parking = breaker.store.parking
    assert parking is not None
    return parking.count(parking.tag(breaker.name, None))[0]


def test_a_parked_breaker_with_a_probe_closes_on_checks_alone(app: Any) -> None:
    url = app.conf.breaker_storage_url
    breaker = CircuitBreaker("svc", POLICY, storage=url)
    seen: list[Transition] = []
    registry_for(app).add_listener(seen.append)
    with pytest.raises(ConnectionError):
        breaker.call(check)  # the trip: one real failure
    assert breaker.state is State.OPEN
    park(app, breaker, 5)
    HEALTH["checks"] = 0
    parking = resolve_store(url).parking
    assert parking is not None
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)

    # While the downstream is down, the releaser's checks fail and reopen the breaker;
    # not one parked task is published (without a probe, one would go as each probe).
    wait_for(lambda: releaser.release_once() == 0 and HEALTH["checks"] >= 3, "three failing health checks")
    assert releaser.released == 0
    assert parked(breaker) == 5
    reasons = [t.reason for t in seen]
    assert "health check failed" in reasons
    assert State.CLOSED not in [t.target for t in seen]

    HEALTH["up"] = True
    wait_for(lambda: (releaser.release_once(), releaser.released)[1] == 5, "the parked tasks to be released")
    assert parked(breaker) == 0
    assert breaker.snapshot().state is State.CLOSED
    assert [t.reason for t in seen if t.target is State.CLOSED] == ["health check succeeded"]


def test_a_worker_held_back_by_its_own_backlog_still_runs_health_checks(app: Any) -> None:
    # A releaser whose worker's pool takes nothing more (WorkerBacklog.room 0) publishes
    # nothing, but still runs a parked breaker's health check: a check adds nothing to the
    # broker, and without it the breaker stayed open while every worker was busy.
    url = app.conf.breaker_storage_url
    breaker = CircuitBreaker("svc", POLICY, storage=url)
    with pytest.raises(ConnectionError):
        breaker.call(check)
    park(app, breaker, 3)
    HEALTH.update(up=True, checks=0)
    parking = resolve_store(url).parking
    assert parking is not None
    room: list[int | None] = [0]
    releaser = Releaser(app, parking, rate=None, ramp=0.0, law=PacingLaw(start=1000.0), backlog=lambda: room[0])
    wait_for(lambda: (releaser.release_once(), breaker.snapshot().state)[1] is State.CLOSED, "the check to close it")
    assert HEALTH["checks"] >= 1
    for _ in range(5):
        releaser.release_once()
    assert releaser.released == 0  # (held: nothing published)
    assert parked(breaker) == 3
    room[0] = None
    wait_for(lambda: (releaser.release_once(), releaser.released)[1] == 3, "the parked tasks to be released")


def test_a_parked_breaker_without_a_probe_still_sends_real_probes(app: Any) -> None:
    app.conf.breaker_probes = {}
    url = app.conf.breaker_storage_url
    breaker = CircuitBreaker("svc", POLICY, storage=url)
    with pytest.raises(ConnectionError):
        breaker.call(check)
    park(app, breaker, 3)
    parking = resolve_store(url).parking
    assert parking is not None
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
    wait_for(lambda: releaser.release_once() > 0, "the probe to be released")
    assert releaser.released == 1  # half_open_max_calls real tasks go as the probes
    assert HEALTH["checks"] == 1  # only the trip called it


def test_entries_past_their_deadline_still_go_while_the_breaker_stays_open(app: Any) -> None:
    policy = {**POLICY, "reset_timeout": 30}
    app.conf.breaker_default_policy = policy
    url = app.conf.breaker_storage_url
    breaker = CircuitBreaker("svc", policy, storage=url)
    with pytest.raises(ConnectionError):
        breaker.call(check)
    parking = resolve_store(url).parking
    assert parking is not None
    expired = encode_message(dict(app.signature("gate.job", args=(-1,))), "json")
    parking.park("svc", None, "expired:1", -1.0, expired, time.time() - 1)
    park(app, breaker, 2)
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
    assert releaser.release_once() == 1  # the expired entry, so Celery can revoke it
    assert parked(breaker) == 2
    assert HEALTH["checks"] == 1  # the trip's: the breaker is not due for a check


#: Set when ``hanging_check`` may answer, healthy.
ANSWER = threading.Event()


def hanging_check() -> None:
    HEALTH["checks"] += 1
    ANSWER.wait(30)


def tripped_with_a_hanging_check(app: Any, parked: int) -> CircuitBreaker:
    """Breaker ``svc``, whose health check hangs until ``ANSWER`` is set, tripped with
    ``parked`` tasks parked."""
    app.conf.breaker_probes = {"svc": "tests.storage.test_health_gate:hanging_check"}
    app.conf.breaker_probe_timeout = 30
    ANSWER.clear()
    breaker = CircuitBreaker("svc", POLICY, storage=app.conf.breaker_storage_url)
    with pytest.raises(ConnectionError):
        breaker.call(check)  # the trip
    park(app, breaker, parked)
    return breaker


def test_a_check_that_hangs_holds_up_no_other_breakers_tasks(app: Any) -> None:
    # The releaser waited for each breaker's check to end before it looked at the next
    # breaker: one hanging check held every other breaker's parked tasks for its timeout.
    breaker = tripped_with_a_hanging_check(app, 2)
    other = CircuitBreaker("other", POLICY, storage=app.conf.breaker_storage_url)
    parking = other.store.parking
    assert parking is not None
    for n in range(3):
        payload = encode_message(dict(app.signature("gate.job", args=(n,))), "json")
        parking.park("other", None, f"other-{n}:1", float(n), payload, None)
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
    time.sleep(POLICY["reset_timeout"])  # (svc's open time runs out: its check is due)
    HEALTH["checks"] = 0
    try:
        wait_for(lambda: (releaser.release_once(), releaser.released)[1] == 3, "other's tasks to be released")
        assert HEALTH["checks"] == 1  # they went while svc's check hangs, and no other check began
        snap = breaker.snapshot()
        assert (snap.state, snap.probes_in_flight) == (State.HALF_OPEN, 1)  # the check goes on in its slot
        assert parked(breaker) == 2
    finally:
        ANSWER.set()
    wait_for(lambda: breaker.snapshot().state is State.CLOSED, "the check's verdict to close svc")
    wait_for(lambda: (releaser.release_once(), releaser.released)[1] == 5, "svc's tasks to be released")


def test_one_pass_waits_for_all_its_hanging_checks_together_not_for_each(app: Any, monkeypatch: Any) -> None:
    # The releaser waited CHECK_WAIT for each due check: 100 per-key breakers whose checks
    # hung made one pass over the breakers last 25 s, and held every other breaker's
    # tasks that long.
    app.conf.breaker_probes = {"svc-*": "tests.storage.test_health_gate:hanging_check"}
    app.conf.breaker_probe_timeout = 30
    ANSWER.clear()
    breakers = [CircuitBreaker(f"svc-{n}", POLICY, storage=app.conf.breaker_storage_url) for n in range(6)]
    for breaker in breakers:
        with pytest.raises(ConnectionError):
            breaker.call(check)  # the trip
        park(app, breaker, 1)
    waits: list[float | None] = []
    check_health = CircuitBreaker.check_health

    def recorded(self: CircuitBreaker, *, wait: float | None = None) -> Any:
        waits.append(wait)
        return check_health(self, wait=wait)

    monkeypatch.setattr(CircuitBreaker, "check_health", recorded)
    parking = breakers[0].store.parking
    assert parking is not None
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
    time.sleep(POLICY["reset_timeout"])  # (their open time runs out: every check is due)
    HEALTH["checks"] = 0
    try:
        assert releaser.release_once() == 0
        assert HEALTH["checks"] == 6  # every check began in the one pass...
        assert waits == [CHECK_WAIT] + [0.0] * 5  # ...the first waited for, the others left going at once
        assert all(b.snapshot().probes_in_flight == 1 for b in breakers)  # each in its slot
        releaser.release_once()  # the next pass starts no other check: every slot is taken
        assert HEALTH["checks"] == 6
    finally:
        ANSWER.set()
    wait_for(lambda: all(b.snapshot().state is State.CLOSED for b in breakers), "the checks' verdicts")
    wait_for(lambda: (releaser.release_once(), releaser.released)[1] == 6, "every breaker's task to be released")


def test_a_releaser_that_stops_frees_the_slot_of_a_check_it_left_going(app: Any) -> None:
    breaker = tripped_with_a_hanging_check(app, 1)
    parking = breaker.store.parking
    assert parking is not None
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
    releaser.tick = 0.05
    try:
        before = set(threading.enumerate())
        releaser.start()
        wait_for(
            lambda: any(thread.name.endswith(" verdict") for thread in set(threading.enumerate()) - before),
            "the releaser to leave its check going",
        )
        assert breaker.snapshot().probes_in_flight == 1
        releaser.stop()
        assert not releaser.is_alive()
        snap = breaker.snapshot()
        assert (snap.state, snap.probes_in_flight) == (State.HALF_OPEN, 0)  # freed: the next worker checks at once
    finally:
        ANSWER.set()


@pytest.mark.parametrize("mode", ["local", "deny"])
def test_a_checks_own_guarded_call_on_its_breaker_passes_on_redis(app: Any, mode: str) -> None:
    # (the memory store's case: tests/unit/test_health_checks.py) A client library's breaker
    # of the same name, in the check: rejected by the slot the check held, it never closed.
    # Its own breaker_on_storage_error ("deny") wraps the same store in another object: it
    # was rejected still.
    url = app.conf.breaker_storage_url
    client = CircuitBreaker("svc", POLICY, storage=url, on_storage_error=mode)
    breaker = CircuitBreaker("svc", POLICY, storage=url, probe=lambda: client.call(check))
    with pytest.raises(ConnectionError):
        breaker.call(check)  # the trip
    HEALTH["up"] = True
    wait_for(lambda: breaker.check_health().state is State.CLOSED, "the check to close the breaker")
    snap = breaker.snapshot()
    assert snap.trips == 1  # closed by the first check its open time allowed
    assert HEALTH["checks"] == 2  # the trip's call, then the check's call through the library's breaker


#: The tenants whose downstream is down, for ``tenant_check``.
TENANTS_DOWN: set[str] = set()


def tenant_check(key: str | None) -> None:
    """A per-key breaker's check: each tenant's own health endpoint."""
    HEALTH["checks"] += 1
    if key in TENANTS_DOWN:
        raise ConnectionError(f"{key} down")


def test_per_key_breakers_with_a_check_that_takes_the_key_close_each_on_its_own(app: Any) -> None:
    # One check for every key of a name could not tell the tenants apart: the check of a
    # tenant still down passed whenever the shared endpoint answered, its breaker closed,
    # and its parked tasks met the downstream (an acceptance test: 248 real calls to down
    # tenants after their trip, 98 retries spent, a task failed).
    app.conf.breaker_probes = {"svc": "tests.storage.test_health_gate:tenant_check"}
    url = app.conf.breaker_storage_url
    TENANTS_DOWN.clear()
    TENANTS_DOWN.add("tenant-1")
    breakers = {key: CircuitBreaker("svc", POLICY, storage=url, key=key) for key in ("tenant-1", "tenant-2")}
    parking = breakers["tenant-1"].store.parking
    assert parking is not None
    for key, breaker in breakers.items():
        with pytest.raises(ConnectionError):
            breaker.call(check)  # the trip
        for n in range(2):
            payload = encode_message(dict(app.signature("gate.job", args=(n,))), "json")
            parking.park("svc", key, f"{key}-{n}:1", float(n), payload, None)
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
    wait_for(lambda: (releaser.release_once(), releaser.released)[1] == 2, "tenant-2's tasks to be released")
    assert breakers["tenant-2"].snapshot().state is State.CLOSED
    assert breakers["tenant-1"].snapshot().state is not State.CLOSED
    assert parking.count(parking.tag("svc", "tenant-1"))[0] == 2  # still down: nothing of it went
    TENANTS_DOWN.clear()
    wait_for(lambda: (releaser.release_once(), releaser.released)[1] == 4, "tenant-1's tasks, once it answers")
