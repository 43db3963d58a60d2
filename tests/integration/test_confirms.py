"""Publishing with publisher confirms, a window at a time (real RabbitMQ).

``ConfirmingPublisher`` writes a window of messages, then reads RabbitMQ's confirms for
all of them; an ack or a nack may settle every message up to its number at once. Each
message must be told its own fate: a refused one taken for confirmed is a task lost, a
confirmed one taken for refused a task run twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from celery import Celery
from kombu.entity import Queue

from celery_breaker.integration.deferral.confirms import Confirm, ConfirmingPublisher, Send
from tests.rabbitmq import RabbitMQServer, taken_off


@pytest.fixture
def app(rabbitmq: RabbitMQServer) -> Celery:
    app = Celery(f"confirms-{uuid.uuid4().hex[:8]}", broker=rabbitmq.url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    return app


def _queue(app: Celery, **arguments: Any) -> Queue:
    queue = Queue(f"confirms-{uuid.uuid4().hex[:8]}", queue_arguments=arguments or None)  # type: ignore[no-untyped-call]
    with app.connection_for_write() as connection:
        queue.bind(connection.default_channel).declare()  # type: ignore[no-untyped-call]
    app.amqp.queues.select_add(queue)  # (declared as it is when a task goes there)
    return queue


def _ids(app: Celery, queue: Queue) -> list[int]:
    """The numbers (the tasks' argument) waiting in ``queue``, in order, taken off it; then it is deleted."""
    found = [message.decode()[0][0] for message in taken_off(app.conf.broker_url, queue)]
    with app.connection_for_write() as connection:
        queue.bind(connection.default_channel).delete()  # type: ignore[no-untyped-call]
    return found


def _sends(app: Celery, queue: Queue | str, numbers: Iterable[Any], **options: Any) -> list[Send]:
    """Sends of ``proj.n(number)`` to ``queue`` (by its name), with ``options``."""
    options["queue"] = queue if isinstance(queue, str) else queue.name

    def send(number: Any) -> Send:
        return lambda producer: app.send_task("proj.n", (number,), producer=producer, retry=False, **options)

    return [send(number) for number in numbers]


def test_a_batch_of_several_windows_is_confirmed_message_by_message(app: Celery) -> None:
    queue = _queue(app)
    publisher = ConfirmingPublisher(window=7)
    try:
        published = publisher.publish(app, _sends(app, queue, range(30)))
    finally:
        publisher.close_all()
    assert published.results == [Confirm.CONFIRMED] * 30
    assert published.error is None
    assert _ids(app, queue) == list(range(30))


@pytest.mark.parametrize("apps_own_confirms", [False, True])
def test_each_message_a_full_queue_refuses_is_told_refused_and_the_others_confirmed(
    app: Celery, apps_own_confirms: bool
) -> None:
    # Five fit; RabbitMQ nacks every message after them (x-overflow reject-publish), some
    # windows straddling the limit: each message must get its own answer. Also when the
    # app asks py-amqp for confirms of its own publishes (confirm_publish), which would
    # wait after each message and raise a nack: not on the publisher's connection.
    app.conf.broker_transport_options = {"confirm_publish": apps_own_confirms}
    queue = _queue(app, **{"x-max-length": 5, "x-overflow": "reject-publish"})
    publisher = ConfirmingPublisher(window=3)
    try:
        published = publisher.publish(app, _sends(app, queue, range(11)))
    finally:
        publisher.close_all()
    assert published.results == [Confirm.CONFIRMED] * 5 + [Confirm.REFUSED] * 6
    assert _ids(app, queue) == list(range(5))


@pytest.mark.parametrize("window", [1, 3])
def test_each_message_gets_its_own_confirm_when_celery_also_publishes_a_task_sent_event(
    app: Celery, window: int
) -> None:
    # With task_send_sent_event, Celery publishes a task-sent event on the same producer
    # after each task: two numbers per send. Counted one per send, a refused task was
    # forgotten as confirmed (lost), and confirmed ones waited out the timeout: countdown
    # deferrals (one message a batch) failed with "could not be deferred" after 20 s.
    app.conf.task_send_sent_event = True
    queue = _queue(app, **{"x-max-length": 5, "x-overflow": "reject-publish"})
    publisher = ConfirmingPublisher(window=window, confirm_timeout=5.0)
    try:
        published = [publisher.publish(app, [send]) for send in _sends(app, queue, range(3))]
        batch = publisher.publish(app, _sends(app, queue, range(3, 8)))
    finally:
        publisher.close_all()
    assert [one.results for one in published] == [[Confirm.CONFIRMED]] * 3
    assert [one.error for one in published] == [None] * 3
    assert batch.results == [Confirm.CONFIRMED] * 2 + [Confirm.REFUSED] * 3
    assert batch.error is None
    assert _ids(app, queue) == list(range(5))


def test_a_message_that_cannot_be_encoded_fails_alone(app: Celery) -> None:
    queue = _queue(app)
    sends = _sends(app, queue, range(4))
    sends[1] = _sends(app, queue, [object()])[0]
    publisher = ConfirmingPublisher(window=2)
    try:
        published = publisher.publish(app, sends)
    finally:
        publisher.close_all()
    assert published.results == [Confirm.CONFIRMED, Confirm.FAILED, Confirm.CONFIRMED, Confirm.CONFIRMED]
    assert "object" in repr(published.errors[1])
    assert _ids(app, queue) == [0, 2, 3]


def test_a_connection_lost_between_batches_is_replaced_and_nothing_is_lost(app: Celery) -> None:
    queue = _queue(app)
    publisher = ConfirmingPublisher(window=4)
    try:
        assert publisher.publish(app, _sends(app, queue, range(3))).results == [Confirm.CONFIRMED] * 3
        link = publisher._link
        assert link is not None
        link.connection.connection.sock.close()  # (the socket gone under the connection)
        published = publisher.publish(app, _sends(app, queue, range(3, 10)))
        assert publisher._link is not link
    finally:
        publisher.close_all()
    assert published.results == [Confirm.CONFIRMED] * 7
    assert published.error is None
    assert _ids(app, queue) == list(range(10))


def test_a_user_who_may_not_write_gets_the_refusal_as_the_error_after_one_more_try(
    rabbitmq: RabbitMQServer, app: Celery
) -> None:
    # A user who may not write to the default exchange (which a copy sent by its queue's
    # name goes through): RabbitMQ closes the channel (ACCESS_REFUSED), no message is
    # taken for confirmed, and the error says why.
    vhost, user = f"v-{uuid.uuid4().hex[:8]}", f"u-{uuid.uuid4().hex[:8]}"
    rabbitmq.rabbitmqctl("add_vhost", vhost)
    rabbitmq.rabbitmqctl("add_user", user, "secret")
    rabbitmq.rabbitmqctl("set_permissions", "-p", vhost, user, ".*", r"^(?!amq\.default$).*", ".*")
    failures: list[BaseException] = []
    try:
        refused = Celery("refused", broker=f"amqp://{user}:secret@127.0.0.1:{rabbitmq.port}/{vhost}")
        refused.conf.broker_connection_retry_on_startup = True
        publisher = ConfirmingPublisher(window=2, on_failure=failures.append)
        try:
            sends = _sends(refused, "anywhere", range(3), exchange_type="direct")
            published = publisher.publish(refused, sends)
        finally:
            publisher.close_all()
    finally:
        rabbitmq.rabbitmqctl("delete_vhost", vhost)
        rabbitmq.rabbitmqctl("delete_user", user)
    assert Confirm.CONFIRMED not in published.results
    assert published.results[0] is Confirm.UNCONFIRMED  # (written, then the channel closed: written again, once)
    assert "ACCESS_REFUSED" in repr(published.error)
    assert len(failures) == 1
    assert "ACCESS_REFUSED" in repr(failures[0])


def test_a_publisher_used_after_a_fork_opens_its_own_connection(app: Celery) -> None:
    queue = _queue(app)
    publisher = ConfirmingPublisher()
    try:
        assert publisher.publish(app, _sends(app, queue, range(1))).results == [Confirm.CONFIRMED]
        parents = publisher._link
        assert parents is not None
        publisher._pid = -1  # (as in a forked child: the connection is another process's)
        assert publisher.publish(app, _sends(app, queue, range(1, 2))).results == [Confirm.CONFIRMED]
        assert publisher._link is not parents
        parents.connection.collect()  # (left alone by the child: closed here, as its parent would)
    finally:
        publisher.close_all()
    assert _ids(app, queue) == [0, 1]
