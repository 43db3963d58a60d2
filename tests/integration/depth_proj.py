"""The app ``test_delay_depth`` (and the web page's tests) count RabbitMQ's delay queues with: one task
under ``partner-api``. Each test points it at a vhost and a store of its own (``use``), and defers runs
of its task into that vhost's delay queues as a worker does (``defer``)."""

from __future__ import annotations

import time
import types
from typing import Any

from celery import Celery
from kombu.connection import Connection

from celery_breaker import BreakerTask
from celery_breaker.integration.deferral.broker_delay import UNROUTABLE, BrokerDelay
from celery_breaker.integration.deferral.plan import DeferralPlan
from celery_breaker.integration.settings import reload_settings

POLICY = {"failure_threshold": 1, "reset_timeout": 30.0}

app = Celery("depth_proj", broker="memory://", set_as_current=False)
app.conf.update(breaker_default_policy=POLICY)


@app.task(base=BreakerTask, breaker="partner-api", name="depth.call_partner")
def call_partner(n: int) -> int:
    """Guarded by ``partner-api``."""
    return n


def use(broker_url: str, store_url: str, *, connect_timeout: float = 4.0, park: bool | str = "auto") -> None:
    """Point the app at ``broker_url`` (``broker_connection_timeout``: ``connect_timeout``,
    Celery's default unless given) and the store ``store_url``, parking as ``park`` says
    (``breaker_park``); its settings are read again."""
    app.conf.update(
        broker_url=broker_url, broker_connection_timeout=connect_timeout, breaker_storage_url=store_url,
        breaker_park=park,
    )  # fmt: skip
    reload_settings(app)


def deferral(n: int, delay: int, **fields: Any) -> types.SimpleNamespace:
    """What a worker hands the deferral strategies for run ``n`` of ``call_partner`` (pushed as its
    request), deferred by ``delay`` seconds: the fields broker-delay reads, and ``fields``."""
    plan = DeferralPlan(delay=float(delay), count=1, since=time.time())
    return types.SimpleNamespace(task=call_partner, args=(n,), kwargs={}, headers={}, plan=plan, options={}, **fields)


def pushed(n: int) -> None:
    """Run ``n``'s request on ``call_partner``, as the worker running it has it (pop it after)."""
    call_partner.push_request(
        id=f"run-{n}", args=(n,), kwargs={}, delivery_info={"exchange": "", "routing_key": "celery"}
    )


def defer(delays: tuple[int, ...]) -> None:
    """Defer one run of ``call_partner`` per delay by broker-delay, wherever the app points
    (the topology declared, the publish confirmed): far longer than a test lasts, so they
    wait in the delay queues while it reads them."""
    strategy = BrokerDelay()
    for n, delay in enumerate(delays):
        pushed(n)
        try:
            assert strategy.deliver(deferral(n, delay)) == delay  # type: ignore[arg-type]
        finally:
            call_partner.pop_request()


def strand(url: str, count: int) -> None:
    """``count`` messages in ``UNROUTABLE``, as runs whose queue was gone when they came due (confirmed)."""
    with Connection(url, transport_options={"confirm_publish": True}) as connection:  # type: ignore[no-untyped-call]
        producer = connection.Producer()
        for n in range(count):
            producer.publish({"n": n}, exchange=UNROUTABLE, routing_key="")
