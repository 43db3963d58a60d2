"""A releaser leaves parked what its app does not accept (real Redis, in-memory brokers).

Two apps share one store and key prefix: one parks a pickle task, the other accepts only
JSON. The second's releaser must not drop the first's task: it stays parked (its claim's
lease puts it back) until a releaser that accepts pickle publishes it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_breaker.integration.deferral import parking as parking_module
from celery_breaker.integration.deferral import release
from celery_breaker.integration.deferral.parking import NeedsCode, NotAcceptedHere, decode_message, encode_message
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.storage.redis import RedisStore

from .conftest import unique_prefix


def release_until(releaser: Releaser, done: Callable[[], bool]) -> None:
    """Run ``releaser``'s passes, 50 ms apart, until ``done()`` (10 s at most)."""
    deadline = time.monotonic() + 10
    while not done() and time.monotonic() < deadline:
        releaser.release_once()
        time.sleep(0.05)


def app_accepting(name: str, *content: str) -> Celery:
    app = Celery(name, set_as_current=False, broker="memory://")
    app.conf.update(accept_content=list(content), task_default_queue=f"{name}-queue")
    return app


def test_a_task_this_app_does_not_accept_is_left_parked_for_one_that_does(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(release, "LEASE", 0.5)  # (seconds a claim holds an entry: shortened)
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    parking = store.parking
    body: dict[str, Any] = {
        "task": "a.charge",
        "args": [1],
        "kwargs": {},
        "options": {},
        "subtask_type": None,
        "immutable": False,
    }
    parking.park("svc", None, "t-1:1", 1.0, encode_message(body, "pickle"), None)
    tag = parking.tag("svc", None)

    json_only = Releaser(app_accepting("json-only", "json"), parking, rate=1000.0, ramp=0.0)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        release_until(json_only, lambda: "left t-1:1" in caplog.text)
        for _ in range(20):  # (claimed again as each lease runs out)
            json_only.release_once()
            time.sleep(0.05)
    assert json_only.released == 0
    assert sum(parking.count(tag)) == 1  # (parked or claimed: not dropped)
    assert "left t-1:1 of svc parked" in caplog.text
    assert "application/x-python-serialize" in caplog.text
    assert "dropped" not in caplog.text
    assert caplog.text.count("left t-1:1") == 1  # (once a minute, not at every claim)

    with_pickle = Releaser(app_accepting("with-pickle", "json", "pickle"), parking, rate=1000.0, ramp=0.0)
    release_until(with_pickle, lambda: with_pickle.released > 0)
    assert with_pickle.released == 1
    assert parking.count(tag) == (0, 0)


def test_an_unreadable_message_is_told_apart_from_one_not_accepted() -> None:
    pickled = encode_message({"task": "a.charge"}, "pickle")
    with pytest.raises(NotAcceptedHere, match="application/x-python-serialize"):
        decode_message(pickled, {"application/json"})
    with pytest.raises(ValueError, match="unreadable parked message") as caught:
        decode_message('{"v": 1, "ct": "application/json", "ce": "utf-8", "b64": false, "body": "{"}', None)
    assert not isinstance(caught.value, NotAcceptedHere)
    # A body that is no signature is named by its type: a log line never quotes arguments.
    stored = encode_message({"args": ["card 4111 1111 1111 1111"]}, "json")
    with pytest.raises(ValueError, match="unreadable parked message: a dict, not a task's signature") as caught:
        decode_message(stored, None)
    assert "4111" not in str(caught.value)


def test_one_breaker_failing_in_any_way_stops_no_other_release(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a storage error: whatever one breaker's release raises (here its health
    gate), the releaser reports it and releases the other breakers' tasks."""
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    parking = store.parking
    app = app_accepting("isolated", "json")
    for name in ("a", "b", "c"):
        body = dict(app.signature(f"{name}.job", args=(1,)))
        parking.park(name, None, f"{name}-1:1", 1.0, encode_message(body, "json"), None)
    releaser = Releaser(app, parking, rate=1000.0, ramp=0.0)
    holds = releaser.health_gate.holds

    def broken_for_a(label: str) -> bool:
        if label == "a":
            raise RuntimeError("a probe setting this worker cannot resolve")
        return holds(label)

    monkeypatch.setattr(releaser.health_gate, "holds", broken_for_a)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        release_until(releaser, lambda: releaser.released >= 2)
    assert releaser.released == 2
    assert parking.count(parking.tag("a", None)) == (1, 0)
    assert "cannot release the tasks parked behind a" in caplog.text


LARGE = {"items": [{"sku": f"SKU-{i}", "qty": i % 5, "name": f"Widget {i}", "price": 9.99} for i in range(100)]}


@pytest.mark.parametrize("serializer", ["json", "pickle", "msgpack", "yaml"])
def test_a_large_message_is_parked_compressed_and_read_back_whole(serializer: str) -> None:
    if serializer in ("msgpack", "yaml"):
        pytest.importorskip(serializer)
    body: dict[str, Any] = {
        "task": "a.sync",
        "args": [LARGE],
        "kwargs": {},
        "options": {},
        "subtask_type": None,
        "immutable": False,
    }
    small = {**body, "args": [1]}
    accept = {"application/json", "application/x-python-serialize", "application/x-msgpack", "application/x-yaml"}
    stored = encode_message(body, serializer)
    assert json.loads(stored)["z"] == "zlib"
    assert len(stored) < len(json.dumps(LARGE)) / 3  # (a 7.4 KB argument: ~0.9 KB parked)
    assert decode_message(stored, accept) == body
    assert "z" not in json.loads(encode_message(small, serializer))  # (too small to pay)
    assert decode_message(encode_message(small, serializer), accept) == small


def test_a_damaged_compressed_message_is_unreadable_not_a_worker_out_of_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = json.loads(encode_message({"task": "a.sync", "args": [LARGE]}, "json"))
    monkeypatch.setattr(parking_module, "LARGEST_BODY", 1024)  # (it inflates to ~7 KB)
    with pytest.raises(ValueError, match="larger than 1024 bytes"):
        decode_message(json.dumps(stored), None)
    monkeypatch.undo()
    for damaged, why in (
        ({**stored, "body": stored["body"][:-40]}, "truncated"),
        ({**stored, "body": "not base64!"}, "unreadable parked message"),
        ({**stored, "z": "lz4"}, "unknown compression 'lz4'"),
    ):
        with pytest.raises(ValueError, match=why) as caught:
            decode_message(json.dumps(damaged), None)
        assert not isinstance(caught.value, NotAcceptedHere)


def test_a_message_of_a_newer_format_is_left_parked_for_a_newer_worker(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A format change in a later release must not make this release's releasers drop what
    # the newer workers park during a rolling upgrade: an unreadable entry is dropped.
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    parking = store.parking
    newer = json.dumps({"v": 3, "codec": "zstd", "body": "KLUv/QBYAQ=="})
    parking.park("svc", None, "t-1:1", 1.0, newer, None)
    releaser = Releaser(app_accepting("older", "json"), parking, rate=1000.0, ramp=0.0)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        release_until(releaser, lambda: "left t-1:1" in caplog.text)
    assert "left t-1:1 of svc parked: parked message in format 3" in caplog.text
    assert "Upgrade this worker" in caplog.text
    assert "dropped" not in caplog.text
    assert sum(parking.count(parking.tag("svc", None))) == 1
    store.close()


def test_a_compressed_message_is_released_as_it_was_sent(redis_url: str) -> None:
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    app = app_accepting("compressed", "json")
    body = dict(app.signature("a.sync", args=(LARGE,), kwargs={"n": 7}))
    payload = encode_message(body, "json")
    assert json.loads(payload)["z"] == "zlib"
    store.parking.park("svc", None, "t-1:1", 1.0, payload, None)
    releaser = Releaser(app, store.parking, rate=1000.0, ramp=0.0)
    release_until(releaser, lambda: releaser.released > 0)
    assert releaser.released == 1
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(app.conf.task_default_queue)
        message = queue.get(timeout=5)
        args, kwargs, _ = message.decode()
        queue.close()
    assert message.headers["task"] == "a.sync"
    assert (args, kwargs) == ([LARGE], {"n": 7})
    store.close()


@pytest.mark.parametrize(
    "damage",
    [{"args": 5}, {"kwargs": [1, 2]}, {"options": "x"}, {"options": {"queue": {"x": 1}}}],
    ids=["args-no-list", "kwargs-no-mapping", "options-no-mapping", "queue-no-name"],
)
def test_an_entry_celery_can_never_publish_is_dropped_once_with_an_error(
    redis_url: str, caplog: pytest.LogCaptureFixture, damage: dict[str, Any]
) -> None:
    # Another writer parked a task whose arguments or options Celery refuses (TypeError at
    # publish). It stayed claimed, was claimed again after every lease (30 s) for ever with
    # a WARNING each time, and its breaker's parked count never went to 0. The tasks beside
    # it are released as usual.
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    parking = store.parking
    body: dict[str, Any] = {"task": "a.charge", "args": [1], "kwargs": {}, "options": {}, "subtask_type": None,
                            "immutable": False}  # fmt: skip
    parking.park("svc", None, "t-bad:1", 1.0, encode_message({**body, **damage}, "json"), None)
    parking.park("svc", None, "t-good:1", 2.0, encode_message(body, "json"), None)
    tag = parking.tag("svc", None)
    releaser = Releaser(app_accepting("poisoned", "json"), parking, rate=1000.0, ramp=0.0)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        release_until(releaser, lambda: parking.count(tag) == (0, 0))
    assert parking.count(tag) == (0, 0)
    assert releaser.released == 2  # (both left the parking: one published, one dropped)
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith("celery-breaker releaser: dropped parked entry t-bad:1 of svc: it can never be published")
    assert "TypeError" in error
    store.close()


def test_a_task_whose_arguments_need_code_this_worker_lacks_is_left_parked(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rolling deploy: a newer worker parked a pickle task whose argument is an object of
    # a module this older worker does not have. Its releaser dropped the entry as
    # unreadable ("No module named ..."): the task was lost, where the newer workers
    # would have released it.
    monkeypatch.setattr(release, "LEASE", 0.5)
    billing = types.ModuleType("billing_v2_money")

    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

    Money.__module__ = billing.__name__
    Money.__qualname__ = "Money"
    billing.Money = Money  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, billing.__name__, billing)
    store = RedisStore.from_url(f"{redis_url}?key_prefix={unique_prefix()}")
    parking = store.parking
    app = app_accepting("rolling", "json", "pickle")
    payload = encode_message(dict(app.signature("a.charge", args=(Money(1250),))), "pickle")
    parking.park("svc", None, "t-1:1", 1.0, payload, None)
    tag = parking.tag("svc", None)

    del sys.modules[billing.__name__]  # (this worker has no such module)
    with pytest.raises(NeedsCode, match="No module named 'billing_v2_money'"):
        decode_message(payload, {"application/x-python-serialize"})
    older = Releaser(app, parking, rate=1000.0, ramp=0.0)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        release_until(older, lambda: "left t-1:1" in caplog.text)
    assert older.released == 0
    assert sum(parking.count(tag)) == 1  # (parked or claimed: not dropped)
    assert "needs code this worker cannot import" in caplog.text
    assert "deploy it to every worker" in caplog.text
    assert "dropped" not in caplog.text

    sys.modules[billing.__name__] = billing  # (a worker that has it)
    newer = Releaser(app, parking, rate=1000.0, ramp=0.0)
    release_until(newer, lambda: newer.released > 0)
    assert newer.released == 1
    assert parking.count(tag) == (0, 0)
