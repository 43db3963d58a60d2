"""broker-delay's routes back: which queue a delivery came from, and the key that reaches that queue alone."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.signals import task_received
from kombu import entity
from kombu.transport.native_delayed_delivery import calculate_routing_key

import celery_breaker.integration.worker  # noqa: F401  (connects the worker's task_received handlers)
from celery_breaker.integration.deferral.broker_delay import (
    DELAY_EXCHANGE,
    DELIVERY_EXCHANGE,
    LEGACY_DELIVERY_EXCHANGE,
    QUEUE_KEY,
    UnroutedWarning,
    _token_of,
    asked_queue,
    destination_queue,
    level_name,
    note_delivery_queue,
    queue_binding,
    queue_token,
    show_queue_delivery,
    topic_matches,
)


def Exchange(name: str, type: str) -> Any:  # (kombu's constructors, typed for this file)
    return entity.Exchange(name, type=type)  # type: ignore[no-untyped-call]


def Queue(name: str, exchange: Any = None, routing_key: str | None = None) -> Any:
    if isinstance(exchange, list):
        return entity.Queue(name, bindings=exchange)  # type: ignore[no-untyped-call]
    return entity.Queue(name, exchange, routing_key=routing_key)  # type: ignore[no-untyped-call]


def binding(exchange: Any, routing_key: str) -> Any:
    return entity.binding(exchange, routing_key=routing_key)  # type: ignore[no-untyped-call]


def app_with(*queues: Any, default: str = "celery") -> Celery:
    app = Celery("routes", set_as_current=False)
    app.conf.update(task_queues=list(queues) or None, task_default_queue=default)
    return app


def delivered(exchange: str, key: str) -> dict[str, Any]:
    return {"exchange": exchange, "routing_key": key, "priority": None, "redelivered": False}


def delayed(key: str) -> str:
    return "0." * 27 + "1." + key


@pytest.mark.parametrize(
    ("pattern", "key", "routes"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "", True),
        ("#.high", "emails.high", True),
        ("*.high", "high", False),
        ("*.*.c", "a.b.c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y.d", False),
    ],
)
def test_topic_patterns_route_as_rabbitmq_routes_them(pattern: str, key: str, routes: bool) -> None:
    assert topic_matches(pattern, key) is routes


def test_a_queue_is_bound_by_a_key_only_its_own_delayed_runs_carry() -> None:
    names = ["high", "emails.high", "a*#.b", "x" * 255]
    for name in names:
        key = delayed(queue_token(name))
        assert len(key) <= 255  # (AMQP's limit on a routing key, whatever the queue's name)
        assert [other for other in names if topic_matches(queue_binding(other), key)] == [name]
        assert _token_of(delivered(DELIVERY_EXCHANGE, key)) == queue_token(name)
    # Celery's own binding of "high" (#.high) takes none of them.
    assert not any(topic_matches("#.high", delayed(queue_token(name))) for name in names)


def test_the_default_exchange_names_the_queue_even_one_the_app_does_not_declare() -> None:
    work = Queue("work", Exchange("tasks", type="direct"), routing_key="work.rk")
    app = app_with(work, default="work")
    assert destination_queue(app, delivered("", "work")) == "work"  # Celery sends a direct queue's tasks so
    assert destination_queue(app, delivered("", "added-by-add-consumer")) == "added-by-add-consumer"
    assert destination_queue(app, delivered("tasks", "work.rk")) == "work"
    assert destination_queue(app, delivered("tasks", "other")) is None  # no queue of the app takes that key
    assert destination_queue(app, delivered("foreign", "work.rk")) is None  # an exchange the app does not know
    assert destination_queue(app, None) is None


def test_a_retry_deferred_instead_goes_to_the_queue_its_options_name() -> None:
    # self.retry(queue=...), or (exchange=..., routing_key=...) as Celery routes them: what
    # is missing comes from the default queue. Not exactly one queue: None (a countdown).
    work = Queue("work", Exchange("tasks", type="direct"), routing_key="work.rk")
    slow = Queue("slow", Exchange("tasks", type="direct"), routing_key="slow.rk")
    app = app_with(work, slow, default="work")
    assert asked_queue(app, {"queue": "slow"}) == "slow"
    assert asked_queue(app, {"queue": slow}) == "slow"  # (a kombu Queue)
    assert asked_queue(app, {"queue": "not-declared"}) == "not-declared"  # (Celery creates it)
    assert asked_queue(app, {"routing_key": "slow.rk"}) == "slow"  # through the default queue's exchange
    assert asked_queue(app, {"exchange": Exchange("tasks", type="direct"), "routing_key": "slow.rk"}) == "slow"
    assert asked_queue(app, {"exchange": "", "routing_key": "slow"}) == "slow"  # the default exchange
    assert asked_queue(app, {"exchange": "tasks"}) == "work"  # with the default queue's key
    assert asked_queue(app, {"exchange": "tasks", "routing_key": "nowhere"}) is None


def test_a_queue_with_several_bindings_is_found_by_any_of_them() -> None:
    media = Exchange("media", type="direct")
    app = app_with(
        Queue("media", [binding(media, routing_key="media.video"), binding(media, routing_key="media.image")])
    )
    assert destination_queue(app, delivered("media", "media.video")) == "media"
    assert destination_queue(app, delivered("media", "media.image")) == "media"
    assert destination_queue(app, delivered("media", "media.audio")) is None


def test_topic_and_fanout_exchanges_and_ambiguous_routes() -> None:
    events = Exchange("events", type="topic")
    broadcast = Exchange("broadcast", type="fanout")
    both = Exchange("both", type="direct")
    app = app_with(
        Queue("orders", events, routing_key="orders.#"),
        Queue("audit", broadcast),
        Queue("first", both, routing_key="same"),
        Queue("second", both, routing_key="same"),
        Queue("headers", Exchange("hdr", type="headers")),
    )
    assert destination_queue(app, delivered("events", "orders.eu.paid")) == "orders"
    assert destination_queue(app, delivered("events", "refunds.eu")) is None
    assert destination_queue(app, delivered("broadcast", "anything")) == "audit"
    assert destination_queue(app, delivered("both", "same")) is None  # two queues: which one it was is unknown
    assert destination_queue(app, delivered("hdr", "x")) is None  # a headers exchange does not route by key


def test_a_run_delayed_before_comes_back_to_its_queue() -> None:
    work = Queue("work", Exchange("tasks", type="direct"), routing_key="work.rk")
    app = app_with(work, Queue("celery"))
    assert destination_queue(app, delivered(DELIVERY_EXCHANGE, delayed(queue_token("work")))) == "work"
    # An earlier release keyed a delayed run by its queue's routing key (or name).
    assert destination_queue(app, delivered(DELIVERY_EXCHANGE, delayed("work.rk"))) == "work"
    assert destination_queue(app, delivered(DELIVERY_EXCHANGE, delayed("celery"))) == "celery"
    assert destination_queue(app, delivered(DELIVERY_EXCHANGE, delayed("unknown"))) is None
    assert _token_of(delivered(DELIVERY_EXCHANGE, delayed("work.rk"))) is None
    # An earlier release delayed runs through Celery's delivery exchange: they come back so.
    assert destination_queue(app, delivered(LEGACY_DELIVERY_EXCHANGE, delayed(queue_token("work")))) == "work"
    assert _token_of(delivered(LEGACY_DELIVERY_EXCHANGE, delayed(queue_token("work")))) == queue_token("work")
    assert _token_of(delivered("", delayed(queue_token("work")))) is None  # not through the delay: not ours


def test_the_queue_told_by_the_consumer_tag_wins_over_what_the_routes_suggest() -> None:
    class Message:
        delivery_info = {"consumer_tag": "None2", "exchange": "events", "routing_key": "user.created"}

    class Request:
        message = Message()
        delivery_info: dict[str, Any] = {"exchange": "events", "routing_key": "user.created"}

    class TaskConsumer:
        _active_tags = {"audit": "None1", "mail": "None2"}

    class Consumer:
        task_consumer = TaskConsumer()

    request = Request()
    note_delivery_queue(sender=Consumer(), request=request)
    assert request.delivery_info[QUEUE_KEY] == "mail"
    events = Exchange("events", type="topic")
    app = app_with(Queue("audit", events, routing_key="user.*"), Queue("mail", events, routing_key="user.created"))
    assert destination_queue(app, {"exchange": "events", "routing_key": "user.created"}) is None  # two queues
    assert destination_queue(app, request.delivery_info) == "mail"
    # Nothing to tell it by (another transport, a consumer without tags): nothing noted.
    bare = Request()
    bare.delivery_info = {}
    note_delivery_queue(sender=object(), request=bare)
    assert bare.delivery_info == {}


def test_a_run_back_from_broker_delay_shows_a_delivery_to_its_queue() -> None:
    # self.request.delivery_info showed the delay's exchange and key, which name no queue:
    # a task retrying itself to its routing key went to a queue no worker consumes.
    work = Queue("work", Exchange("tasks", type="direct"), routing_key="work.rk")
    consumer = SimpleNamespace(app=app_with(work, default="work"))

    def received(info: dict[str, Any]) -> dict[str, Any]:
        request = SimpleNamespace(delivery_info=dict(info))
        show_queue_delivery(sender=consumer, request=request)
        shown: dict[str, Any] = request.delivery_info
        return shown

    back = delivered(DELIVERY_EXCHANGE, delayed(queue_token("work")))
    assert received({**back, QUEUE_KEY: "mail"}) == {  # the queue the consumer tag told
        **back, QUEUE_KEY: "mail", "exchange": "", "routing_key": "mail",
    }  # fmt: skip
    assert received(back) == {**back, "exchange": "", "routing_key": "work"}  # told by its token
    # Left as they are: a token of no queue the app knows, Celery's own delayed countdown,
    # a delivery of no delay.
    unknown = delivered(DELIVERY_EXCHANGE, delayed(queue_token("gone")))
    assert received(unknown) == unknown
    celerys = delivered(LEGACY_DELIVERY_EXCHANGE, delayed("work.rk"))
    assert received(celerys) == celerys
    assert received(delivered("tasks", "work.rk")) == delivered("tasks", "work.rk")


@pytest.mark.parametrize("seconds", [1, 2, 4, 6, 12, 2**27])
def test_a_run_back_from_any_delay_shows_a_delivery_to_its_queue(seconds: int) -> None:
    # A run shows the exchange it was last dead-lettered into: the delivery exchange only
    # after an odd delay; after 2 s, the level below level 1 (celery_breaker_delayed_0),
    # after 4 s _1. Only odd delays were recognised: the even ones kept the delay's
    # exchange and key, and a task retrying itself by that key went to no worker's queue.
    work = Queue("work", Exchange("tasks", type="direct"), routing_key="work.rk")
    app = app_with(work, default="work")
    lowest = (seconds & -seconds).bit_length() - 1  # (the lowest level that held it)
    exchange = DELIVERY_EXCHANGE if lowest == 0 else level_name(lowest - 1)
    key = calculate_routing_key(seconds, queue_token("work"))
    request = SimpleNamespace(delivery_info=delivered(exchange, key))
    assert _token_of(request.delivery_info) == queue_token("work")
    assert destination_queue(app, request.delivery_info) == "work"
    show_queue_delivery(sender=SimpleNamespace(app=app), request=request)
    assert (request.delivery_info["exchange"], request.delivery_info["routing_key"]) == ("", "work")
    # (Celery's own levels, which runs an earlier release deferred come back through)
    assert _token_of(delivered(f"celery_delayed_{lowest}", key)) == queue_token("work")


@pytest.mark.parametrize(
    "exchange", ["celery_breaker_delayed_routing", "celery_breaker_delayed_unroutable", "celery_breaker_delayed_x", ""]
)
def test_no_other_exchange_reads_as_back_from_a_delay(exchange: str) -> None:
    assert _token_of(delivered(exchange, calculate_routing_key(2, queue_token("work")))) is None


def test_a_run_whose_queue_cannot_be_told_is_warned_about_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    warn = UnroutedWarning("so it goes by countdown")
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        warn({"exchange": "events", "routing_key": "a.b"})
        warn({"exchange": "events", "routing_key": "a.b"})  # (within the minute: not again)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "through exchange 'events' with routing key 'a.b' is deferred by countdown, so it goes" in lines[0]
    assert "declare the queue in task_queues" in lines[0]


def test_a_run_back_from_broker_delay_sees_no_dead_lettering_headers_of_the_delay_levels() -> None:
    # RabbitMQ writes x-death and x-first-death-* when a delay level dead-letters a run;
    # the run saw them in self.request.headers beside its caller's (seen on a real
    # RabbitMQ: a traceparent header, then x-death naming celery_breaker_delayed_0).
    ours = {
        "count": 1,
        "reason": "expired",
        "queue": "celery_breaker_delayed_0",
        "exchange": "celery_breaker_delayed_27",
    }
    theirs = {"count": 1, "reason": "rejected", "queue": "orders", "exchange": ""}
    sent = {"traceparent": "00-abc-def-01", "x-breaker-deferrals": 1}
    request = SimpleNamespace(
        request_dict={
            **sent, "x-death": [ours, theirs], "x-first-death-exchange": DELAY_EXCHANGE,
            "x-first-death-queue": "celery_breaker_delayed_0", "x-first-death-reason": "expired",
            "x-last-death-exchange": "", "x-last-death-queue": "orders", "x-last-death-reason": "rejected",
        },
        delivery_info={},
    )  # fmt: skip
    task_received.send(sender=None, request=request)
    assert request.request_dict == {
        **sent, "x-death": [theirs], "x-last-death-exchange": "", "x-last-death-queue": "orders",
        "x-last-death-reason": "rejected",
    }  # fmt: skip
    only_ours = SimpleNamespace(request_dict={**sent, "x-death": [ours]}, delivery_info={})
    task_received.send(sender=None, request=only_ours)
    assert only_ours.request_dict == sent


def test_a_deferral_back_from_celerys_native_delay_sees_no_dead_lettering_headers_of_its_levels() -> None:
    # A countdown deferral on quorum queues waits in Celery's native delay
    # (celery_delayed_0..27), which dead-letters it back: the run saw x-death and
    # x-first-death-* naming celery_delayed_0 beside its caller's headers (seen on a real
    # RabbitMQ). A task of the app's own countdown keeps them, as Celery gives them.
    celerys = {"count": 1, "reason": "expired", "queue": "celery_delayed_0", "exchange": "celery_delayed_27"}
    deaths = {
        "x-death": [celerys], "x-first-death-exchange": "celery_delayed_27", "x-first-death-queue": "celery_delayed_0",
        "x-first-death-reason": "expired",
    }  # fmt: skip
    deferred = SimpleNamespace(request_dict={"trace": "t", "x-breaker-deferrals": 2, **deaths}, delivery_info={})
    task_received.send(sender=None, request=deferred)
    assert deferred.request_dict == {"trace": "t", "x-breaker-deferrals": 2}
    own_countdown = SimpleNamespace(request_dict={"trace": "t", **deaths}, delivery_info={})
    task_received.send(sender=None, request=own_countdown)
    assert own_countdown.request_dict == {"trace": "t", **deaths}
