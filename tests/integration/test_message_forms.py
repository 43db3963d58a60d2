"""Every form a task message takes comes back the same task through a deferral, on real brokers and workers.

Each form (a serializer, a compression, custom headers, time limits, ``shadow``,
callbacks, binary, non-ASCII and large arguments...) is sent once with the breaker
closed, and once while it is held open: the run after the deferral must see what the
undeferred run saw (its arguments, headers and options), run once, and spend no retry.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from kombu.connection import Connection

from celery_breaker import CircuitBreaker
from celery_breaker.storage import close_stores
from tests.integration.backlog_proj import (
    BREAKER,
    MIRROR_TASK,
    PLAIN_SLOW_TASK,
    UTF16_SERIALIZER,
    deferral_counts_key,
    executions_key,
    mirrored_key,
)
from tests.integration.deployments import Deployment, deploy
from tests.integration.workers import wait_for
from tests.rabbitmq import RabbitMQServer
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

POLICY = {"failure_threshold": 1, "reset_timeout": 1.0}


@pytest.fixture(autouse=True)
def _let_go() -> Iterator[None]:
    yield
    close_stores()


#: Fields of a run's request that differ between two sends of one form by nature.
OWN = ("id", "correlation_id", "deferrals", "retries")


def forms(cell: Deployment) -> dict[str, dict[str, Any]]:
    """Each form: the ``send_task`` options it is sent with (its first argument names it)."""
    note: dict[str, Any] = {
        "task": "backlog.note",
        "args": ["linked", "x"],
        "kwargs": {},
        "options": {},
        "subtask_type": None,
    }
    return {
        "json-everything": {
            "args": ("Grüße, 東京 ✓", "x" * 100_000),
            "kwargs": {"amount": 12.5, "nested": {"a": [1, 2, {"b": None}]}},
            "headers": {"tenant": {"id": 7, "tags": ["a", "é"]}, "trace": "ü-1"},
            "shadow": "payments.charge[visible]",
            "time_limit": 40,
            "soft_time_limit": 30,
            "priority": 3,
            "compression": "gzip",
            "link": note,
            "link_error": note,
            "expires": datetime.now(timezone.utc) + timedelta(seconds=300),
        },
        "expires-in-seconds": {"args": (1,), "expires": 300.0, "compression": "zlib"},
        "pickle-bytes-bzip2": {
            "args": (b"\x00\xff\xfe binary", {1: "int key"}, (1, 2)),
            "serializer": "pickle",
            "compression": "bzip2",
        },
        "msgpack-bytes-lzma": {"args": (b"\x00\xff binary", "ü"), "serializer": "msgpack", "compression": "lzma"},
        "ignore-result-reply-to": {"args": (2,), "ignore_result": True, "reply_to": "my-reply-queue"},
        "utf16-serializer": {"args": ("Grüße ✓", "y" * 2_000), "serializer": UTF16_SERIALIZER},
        "stamped": {"args": (6,), "stamped_headers": ["tenant_stamp"], "tenant_stamp": "acme"},
        "eta": {"args": (3,), "eta": datetime.now(timezone.utc) + timedelta(seconds=0.5)},
        "hostile-headers": {
            "args": (4,),
            "headers": {
                "x-breaker-deferrals": "many",
                "x-breaker-deferred-since": "yesterday",
                "x-breaker-parked": ["?"],
            },
        },
    }


def _send_minimal(cell: Deployment) -> str:
    """Publish the fewest headers a worker takes, as a producer in another language might
    (no ``timelimit``, ``root_id``, ``origin``... and none of celery-breaker's); its id."""
    task_id = str(uuid.uuid4())
    with Connection(cell.broker_url) as connection:  # type: ignore[no-untyped-call]
        connection.Producer().publish(
            [[cell.ns, "minimal", 7], {}, {}], routing_key=cell.queue, exchange="", serializer="json",
            headers={"lang": "py", "task": MIRROR_TASK, "id": task_id},
        )  # fmt: skip
    return task_id


def _seen(client: redis.Redis, ns: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for raw in client.lrange(mirrored_key(ns), 0, -1):
        seen = json.loads(raw)
        form = seen["args"].split("'")[1]
        found.setdefault(form, []).append(seen)
    return found


@pytest.mark.parametrize(
    ("broker", "mode"),
    [("redis", "park"), ("redis", "countdown"), ("rabbitmq-classic", "park"), ("rabbitmq-classic", "countdown"),
     ("rabbitmq-classic", "store"), ("rabbitmq-quorum", "park"), ("rabbitmq-quorum", "countdown")],
)  # fmt: skip
def test_every_form_of_message_comes_back_the_same_task_after_a_deferral(
    broker: str, mode: str, rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    cell = deploy(broker, "redis", mode, rabbitmq=rabbitmq, redis_server=redis_server, policy=POLICY,
                  breaker_defer_spread=0, accept_content=["json", "pickle", "msgpack", UTF16_SERIALIZER])  # fmt: skip
    cell.env["C_FORCE_ROOT"] = "1"  # (tests run as root here; Celery refuses pickle to root workers)
    client = redis.Redis.from_url(cell.counter_url, decode_responses=True)
    publisher = cell.publisher()
    old_protocol = cell.publisher(task_protocol=1)  # (a producer of Celery 3's message format)
    sent = forms(cell)
    breaker = CircuitBreaker(BREAKER, POLICY, storage=cell.store_url)
    try:
        with cell.worker(concurrency=1) as started:
            closed = [publisher.send_task(MIRROR_TASK, args=(cell.ns, name, *o.get("args", ())),
                                          **{k: v for k, v in o.items() if k != "args"}).id
                      for name, o in sent.items()]  # fmt: skip
            closed.append(_send_minimal(cell))
            closed.append(old_protocol.send_task(MIRROR_TASK, args=(cell.ns, "protocol-1", 5), time_limit=40).id)
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(closed), 30, "the undeferred runs")
            breaker.force_open()
            deferred = [publisher.send_task(MIRROR_TASK, args=(cell.ns, name, *o.get("args", ())),
                                            **{k: v for k, v in o.items() if k != "args"}).id
                        for name, o in sent.items()]  # fmt: skip
            deferred.append(_send_minimal(cell))
            deferred.append(old_protocol.send_task(MIRROR_TASK, args=(cell.ns, "protocol-1", 5), time_limit=40).id)
            wait_for(lambda: client.hlen(deferral_counts_key(cell.ns)) >= len(deferred), 30, "every task deferred")
            breaker.close()
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(closed) + len(deferred), 30,
                     "the deferred runs")  # fmt: skip
            log = started.log()
    finally:
        with contextlib.suppress(Exception):
            breaker.close()
        publisher.close()
        old_protocol.close()
    assert client.hgetall(executions_key(cell.ns)) == dict.fromkeys(closed + deferred, "1"), log
    differences = {}
    for name, runs in _seen(client, cell.ns).items():
        assert len(runs) == 2, (name, runs)
        first, second = runs
        assert second["deferrals"] is not None, name
        assert second["retries"] == 0, name
        if isinstance(sent.get(name, {}).get("expires"), float):  # (seconds from each send: two times)
            del first["expires"]
        if name == "minimal":  # (what Celery fills in for any message it sends: no limits, its own reply_to)
            assert (first["timelimit"], second["timelimit"], first["reply_to"]) == ("None", "[None, None]", None)
            del first["timelimit"], first["reply_to"]
        if first["content_type"] is None:  # (task protocol 1: its copy goes in protocol 2, in the task's serializer)
            del first["content_type"]
        differ = {k: (first[k], second[k]) for k in first if k not in OWN and first[k] != second[k]}
        if differ:
            differences[name] = differ
    assert not differences
    assert "acme" in _seen(client, cell.ns)["stamped"][1]["stamps"]  # (a stamp revoke_by_stamped_headers finds)
    assert set(_seen(client, cell.ns)) == {*sent, "protocol-1", "minimal"}


def test_a_held_countdown_handed_back_from_a_busy_pool_keeps_its_compression(
    rabbitmq: RabbitMQServer, redis_server: RedisServer
) -> None:
    """A countdown deferral that comes due while every pool process is busy is handed back
    to its queue (``handover.py``). kombu gives the held body decompressed, and the copy
    went out without its compression: a task sent compressed waited in RabbitMQ as large
    as it was uncompressed, and every later deferral of it too (its request named no
    compression any more)."""
    cell = deploy("rabbitmq-classic", "redis", "countdown", rabbitmq=rabbitmq, redis_server=redis_server,
                  policy=POLICY, breaker_defer_spread=0)  # fmt: skip
    client = redis.Redis.from_url(cell.counter_url)
    publisher = cell.publisher()
    breaker = CircuitBreaker(BREAKER, POLICY, storage=cell.store_url)
    breaker.force_open()
    try:
        with cell.worker(concurrency=1) as started:
            ids = [publisher.send_task(MIRROR_TASK, args=(cell.ns, "bzip2", "x" * 10_000), compression="bzip2").id
                   for _ in range(2)]  # fmt: skip
            wait_for(lambda: client.hlen(deferral_counts_key(cell.ns)) >= len(ids), 30, "every task deferred")
            publisher.send_task(PLAIN_SLOW_TASK, args=(cell.ns, 3.0))  # (the one process, taken while they come due)
            breaker.close()
            wait_for(lambda: client.hlen(executions_key(cell.ns)) >= len(ids), 30, "the tasks after the close")
            log = started.log()
    finally:
        with contextlib.suppress(Exception):
            breaker.close()
        publisher.close()
    assert "handed back to queue" in log
    runs = [json.loads(raw) for raw in client.lrange(mirrored_key(cell.ns), 0, -1)]
    assert [(run["compression"], run["args"]) for run in runs] == [
        ("application/x-bz2", repr(("bzip2", "x" * 10_000)))
    ] * len(ids)
