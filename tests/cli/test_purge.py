"""``celery breaker purge``: discarding the tasks parked behind a breaker, and only those."""

from __future__ import annotations

import json

from celery.bin.celery import celery as celery_main
from click.testing import CliRunner, Result

from celery_breaker.ops.cli import EXIT_USAGE
from celery_breaker.storage.redis import RedisStore

from . import cliproj
from .conftest import APP, breaker, run


def park(url: str, name: str, count: int, key: str | None = None) -> RedisStore:
    store = RedisStore.from_url(url)
    for i in range(count):
        store.parking.park(name, key, f"task-{i}:1", 100.0 + i, f"payload {i}", None)
    return store


def parked(store: RedisStore, name: str, key: str | None = None) -> tuple[int, int]:
    return store.parking.count(store.parking.tag(name, key))


def answered(answer: str, *args: str) -> Result:
    return CliRunner().invoke(celery_main, ["-A", APP, "breaker", "purge", *args], input=answer)


def test_purge_discards_every_parked_task_and_leaves_the_breaker_alone(store_url: str) -> None:
    partner = breaker(store_url, "partner-api")
    partner.force_open()
    store = park(store_url, "partner-api", 5)

    result = run("purge", "partner-api", "--force")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("partner-api: discarded 5 parked tasks in redis://127.0.0.1:")
    assert parked(store, "partner-api") == (0, 0)
    tag = store.parking.tag("partner-api", None)
    assert not store.client().exists(tag + ":q", tag + ":m", tag + ":d")  # no payload left behind
    assert partner.snapshot().state.value == "forced_open"  # the state is not touched


def test_purge_asks_first_and_a_no_discards_nothing(store_url: str) -> None:
    store = park(store_url, "partner-api", 3)
    refused = answered("n\n", "partner-api")
    assert refused.exit_code == 1
    assert "Discard the 3 tasks parked behind partner-api? They will never run." in refused.output
    assert parked(store, "partner-api") == (3, 0)

    agreed = answered("y\n", "partner-api")
    assert agreed.exit_code == 0, agreed.output
    assert "partner-api: discarded 3 parked tasks" in agreed.output
    assert parked(store, "partner-api") == (0, 0)


def test_purge_json_asks_on_stderr_so_stdout_stays_json(store_url: str) -> None:
    store = park(store_url, "partner-api", 3)
    agreed = answered("y\n", "partner-api", "--json")
    assert agreed.exit_code == 0, agreed.output
    assert "Discard the 3 tasks parked behind partner-api?" in agreed.stderr
    assert json.loads(agreed.stdout)["discarded"] == 3
    assert parked(store, "partner-api") == (0, 0)


def test_tasks_being_published_are_left_to_run(store_url: str) -> None:
    store = park(store_url, "partner-api", 3)
    tag = store.parking.tag("partner-api", None)
    releaser = RedisStore.from_url(store_url + "&time=client").parking  # times of the test's choosing
    claimed = [entry for now in (1000.0, 1001.0) for entry, _ in
               releaser.release(tag, most=1, pace=1.0, ramp=0.0, lease=30.0, now=now)]  # fmt: skip
    assert claimed == ["task-0:1"]  # no breaker state: released at the pace, 1 a second

    result = run("purge", "partner-api", "--force", "--json")
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert (reply["breaker"], reply["discarded"], reply["parked"], reply["claimed"]) == ("partner-api", 2, 0, 1)
    assert store.client().hexists(tag + ":m", "task-0:1")  # its payload stays until it is published


def test_per_key_and_orphaned_backlogs_can_be_purged(store_url: str) -> None:
    store = park(store_url, "crm", 2, key="tenant-7")
    result = run("purge", "crm[tenant-7]", "--force")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("crm[tenant-7]: discarded 2 parked tasks")
    # Parked tasks outlive their breaker's state: a name known only to the parking is accepted.
    park(store_url, "retired-partner", 1)
    orphan = run("purge", "retired-partner", "--key", "", "--force")
    assert orphan.exit_code == EXIT_USAGE  # an empty key is refused before anything is read
    orphan = run("purge", "retired-partner", "--force")
    assert orphan.exit_code == 0, orphan.output
    assert parked(store, "retired-partner") == (0, 0)


def test_an_unknown_breaker_is_refused_and_nothing_is_discarded(store_url: str) -> None:
    store = park(store_url, "partner-api", 2)
    result = run("purge", "partner-apj", "--force")
    assert result.exit_code == EXIT_USAGE
    assert "no breaker named 'partner-apj'" in result.output
    assert "did you mean 'partner-api'?" in result.output
    assert "nothing was purged" in result.output
    assert parked(store, "partner-api") == (2, 0)
    # Without --force: refused before the question (a "yes" would have been for nothing).
    asked = answered("y\n", "partner-apj")
    assert asked.exit_code == EXIT_USAGE
    assert "Discard" not in asked.output
    assert "no breaker named 'partner-apj'" in asked.output


def test_purge_in_an_app_deferring_into_rabbitmq_says_those_tasks_are_out_of_its_reach(store_url: str) -> None:
    # On RabbitMQ (breaker_park "auto") deferred tasks wait in its delay queues: purge
    # printed "discarded 0 parked tasks", exited 0, and all 50 ran once the breaker closed;
    # status showed PARKED 0 while they waited.
    cliproj.app.conf.update(broker_url="amqp://guest:guest@127.0.0.1:1//")  # (never connected to)
    cliproj.use_store(store_url)
    try:
        breaker(store_url, "partner-api").force_open()
        result = run("purge", "partner-api", "--force")
        assert result.exit_code == 1
        assert result.stdout.startswith("partner-api: discarded 0 parked tasks in redis://")
        assert "this app's deferred tasks wait in RabbitMQ's delay queues (celery_breaker_delayed_*)" in result.stderr
        as_json = run("purge", "partner-api", "--force", "--json")
        elsewhere = json.loads(as_json.stdout)["waiting_elsewhere"]
        assert elsewhere == "in RabbitMQ's delay queues (celery_breaker_delayed_*)"
        status = run("status")
        assert status.exit_code == 0, status.output
        assert "PARKED counts tasks parked in the store; this app's deferred tasks wait in RabbitMQ's" in status.stdout
    finally:
        cliproj.app.conf.update(broker_url="memory://")
        cliproj.use_store(store_url)
    cliproj.app.conf.update(broker_url="redis://127.0.0.1:1/0")  # (parks in the store: never connected to)
    cliproj.use_store(store_url)
    try:
        assert "Warning" not in run("purge", "partner-api", "--force").stderr
        assert "PARKED counts" not in run("status").stdout
    finally:
        cliproj.app.conf.update(broker_url="memory://")
        cliproj.use_store(store_url)
