"""How fast one releaser publishes parked tasks: Redis, and RabbitMQ with confirms by windows or one by one.

Run ``python bench/release_publish.py`` (about 40 s; ``--tasks N``, ``--repeats R``).
Real parts: a ``redis-server`` (the store, and one broker) and a ``rabbitmq-server``
(the other broker), each on free loopback ports in a temp dir, started and stopped
here (``tests/servers.py``, ``tests/rabbitmq.py``). No worker consumes: this is the
releaser's own publishing, the ceiling of any release pace, not a drain time.

Each run parks N tasks behind one closed breaker and calls ``Releaser.release_once``
(the fixed pace set far above what it can publish, so the pace never holds it back)
until all N are published, and reports tasks per second. On RabbitMQ the releaser
publishes with publisher confirms (``integration/deferral/confirms.py``): the default
writes a window of 64 messages, then reads their confirms; ``window 1`` is what
py-amqp's own ``confirm_publish`` did (a round trip per message), the releaser's way
before. Medians of ``--repeats`` runs, on a shared machine: read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery
from kombu.entity import Queue
from tests.rabbitmq import RabbitMQServer
from tests.servers import RedisServer

from celery_breaker.integration.deferral.confirms import ConfirmingPublisher
from celery_breaker.integration.deferral.parking import encode_message
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.storage import close_stores
from celery_breaker.storage.redis import RedisStore


def one_run(broker: str, store_url: str, tasks: int, window: int | None) -> float:
    """Tasks published per second by one releaser, N parked tasks, until all are out."""
    ns = uuid.uuid4().hex[:8]
    queue = Queue(f"release-{ns}")  # type: ignore[no-untyped-call]
    app = Celery(f"release-{ns}", broker=broker, set_as_current=False)
    app.conf.update(task_queues=[queue], task_default_queue=queue.name, broker_connection_retry_on_startup=True)
    store = RedisStore.from_url(f"{store_url}?key_prefix={ns}")
    parking = store.parking
    assert parking is not None
    for n in range(tasks):
        task_id = str(uuid.uuid4())
        body = dict(app.signature("bench.charge", args=(n,), task_id=task_id, queue=queue.name))
        parking.park("partner", None, f"{task_id}:0:1", float(n), encode_message(body, "json"), None)
    releaser = Releaser(app, parking, rate=1e6, ramp=0.0)
    if window is not None and releaser._publisher is not None:
        releaser._publisher = ConfirmingPublisher(window=window)
    try:
        start = time.perf_counter()
        while releaser.released < tasks:
            if time.perf_counter() - start > 300:
                raise RuntimeError(f"only {releaser.released} of {tasks} published in 300 s")
            releaser.release_once()
        elapsed = time.perf_counter() - start
    finally:
        if releaser._publisher is not None:
            releaser._publisher.close_all()
        close_stores()
    with app.connection_for_write() as connection:
        queue.bind(connection.default_channel).delete()  # type: ignore[no-untyped-call]
    return tasks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks parked, then published, per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (the median is reported)")
    args = parser.parse_args()
    redis_server = RedisServer().start()
    rabbitmq = RabbitMQServer().start()
    try:
        cases = [
            ("Redis broker (no confirms)", f"{redis_server.url}/0", None),
            ("RabbitMQ, confirms a window of 64 at a time", rabbitmq.url, None),
            ("RabbitMQ, confirms one at a time (before)", rabbitmq.url, 1),
        ]
        rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(args.repeats):  # (round-robin: noise lands on every case alike)
            for name, broker, window in cases:
                rates[name].append(one_run(broker, f"{redis_server.url}/1", args.tasks, window))
        print(f"{args.tasks} parked tasks published by one releaser, median of {args.repeats} runs:")
        base = statistics.median(rates[cases[-1][0]])
        for name, _, _ in cases:
            median = statistics.median(rates[name])
            spread = f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}"
            print(f"  {name:<46} {median:>7,.0f} tasks/s  ({spread})  x{median / base:.2f} of one at a time")
    finally:
        rabbitmq.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
