"""``celery breaker delete``: a stray breaker leaves the store; parked tasks and a failing downstream make it wary."""

from __future__ import annotations

import gc
import json

import pytest
from celery.bin.celery import celery as celery_main
from click.testing import CliRunner, Result

from celery_breaker import CircuitBreaker, State
from celery_breaker.ops.cli import EXIT_USAGE
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis import agent as agent_module

from ..storage.conftest import following
from . import cliproj
from .conftest import APP, breaker, run, stored, trip
from .test_purge import park, parked


def answered(answer: str, *args: str) -> Result:
    return CliRunner().invoke(celery_main, ["-A", APP, "breaker", "delete", *args], input=answer)


def listed(*patterns: str) -> set[str]:
    rows = json.loads(run("status", "--json", *patterns).stdout)
    return {row["name"] + (f"[{row['key']}]" if row["key"] else "") for row in rows}


def test_a_stray_breaker_is_deleted_without_a_question_and_leaves_status(store_url: str) -> None:
    assert run("open", "partnr-api", "--create").exit_code == 0  # the typo an operator made
    breaker(store_url, "partner-api").call(lambda: None)
    assert listed() >= {"partnr-api", "partner-api"}

    done = run("delete", "partnr-api")  # (no input: a question would abort)
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith(f"partnr-api: deleted (was forced_open) from {store_url}.")
    assert done.stderr == ""
    assert "partnr-api" not in listed()
    assert "partner-api" in listed()
    again = run("delete", "partnr-api")  # gone: an unknown breaker now
    assert again.exit_code == EXIT_USAGE
    assert "no breaker named 'partnr-api'" in again.stderr


def test_a_breaker_whose_downstream_was_failing_asks_first(store_url: str) -> None:
    trip(breaker(store_url, "stray-api"))
    refused = answered("n\n", "stray-api")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("Warning: stray-api tripped just now")
    assert "deleting it lets calls through now" in refused.stderr
    assert "Delete stray-api? [y/N]" in refused.stderr
    assert stored(store_url, "stray-api").state is State.OPEN

    done = answered("y\n", "stray-api")
    assert done.exit_code == 0, done.output
    assert "stray-api: deleted (was open)" in done.stdout
    assert "stray-api" not in listed()


def test_parked_tasks_refuse_it_unless_purged_with_it(store_url: str) -> None:
    partner = breaker(store_url, "partner-api")
    partner.force_open()
    store = park(store_url, "partner-api", 3)

    refused = run("delete", "partner-api")
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "Error: 3 tasks are parked behind partner-api: deleting it would release them at once, to run against its "
        "downstream; purge them with it (--purge: they never run), or close it and delete it once they have been "
        "released"
    )
    assert parked(store, "partner-api") == (3, 0)
    assert "partner-api" in listed()

    kept = answered("n\n", "partner-api", "--purge")
    assert kept.exit_code == 1
    assert "Delete partner-api and discard the 3 task(s) parked behind it (they will never run)?" in kept.stderr
    assert parked(store, "partner-api") == (3, 0)

    done = run("delete", "partner-api", "--purge", "--yes", "--json")
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert (data["breaker"], data["deleted"], data["discarded"], data["claimed"]) == ("partner-api", True, 3, 0)
    assert data["before"]["state"] == "forced_open"
    assert data["in_app"] is True  # a task of the app uses it
    assert parked(store, "partner-api") == (0, 0)
    assert store.parking.tag("partner-api", None) not in store.parking.tags()
    assert "partner-api" not in listed()


def test_an_app_breaker_is_recreated_closed_by_its_next_call(store_url: str) -> None:
    partner = breaker(store_url, "partner-api")
    for _ in range(3):
        partner.call(lambda: None)
    done = run("delete", "partner-api")
    assert done.exit_code == 0, done.output
    assert "The app's tasks use partner-api: their next call creates partner-api afresh" in done.stdout
    # (once the worker has heard of the delete, as it does within a message's time: what
    # it counts before, under the breaker it knew, goes with that breaker)
    assert partner.store.sync()
    partner.call(lambda: None)
    fresh = stored(store_url, "partner-api")
    assert (fresh.state, fresh.successes) == (State.CLOSED, 1)


def test_one_key_of_a_per_key_breaker_by_its_label(store_url: str) -> None:
    for key in ("tenant-7", "tenant-8"):
        breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY).call(lambda: None)
    done = run("delete", "crm[tenant-7]")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("crm[tenant-7]: deleted (was closed)")
    assert "The app's tasks use crm: their next call for key 'tenant-7' creates crm[tenant-7] afresh" in done.stdout
    assert listed("crm*") == {"crm[tenant-8]"}


def test_counts_a_worker_sends_after_the_delete_do_not_bring_it_back(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker sends what it counted up to a second later, and a dropped breaker object's
    # counts later still (when it is collected): sent after the delete, they made the
    # breaker again, closed and empty, and it was back in status (a CI flake of the test
    # above, where the breaker objects were collected late).
    monkeypatch.setattr(agent_module, "FLUSH_INTERVAL", 1000.0)  # (only the flush below sends)
    worker = RedisStore.from_url(store_url)  # (a worker's: the command's process is another)
    tenants = [CircuitBreaker("crm", cliproj.CRM_POLICY, storage=worker, key=key) for key in ("tenant-7", "tenant-8")]
    following(worker)  # (its agent's first flush, as it subscribes, is done)
    for tenant in tenants:
        tenant.call(lambda: None)  # (counted in the worker, not sent)
    assert run("delete", "crm[tenant-7]").exit_code == 0
    del tenants, tenant  # (the worker drops them: their counts are the store's to send)
    gc.collect()
    worker.flush()
    assert listed("crm*") == {"crm[tenant-8]"}
    worker.close()


def test_a_breaker_with_only_parked_tasks_left_can_be_deleted_with_them(store_url: str) -> None:
    store = park(store_url, "old-task", 2)  # its state expired; its parked tasks did not
    done = run("delete", "old-task", "--purge", "--yes")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("old-task: deleted (only parked tasks were left of it)")
    assert "discarded 2 parked task(s)" in done.stdout
    assert parked(store, "old-task") == (0, 0)


def test_a_breaker_the_app_names_but_never_stored_is_not_reported_deleted(store_url: str) -> None:
    """``partner-api`` is a breaker of the app's tasks, but nothing of it is in the store:
    there is nothing to delete, and the command says so (it said "deleted")."""
    done = run("delete", "partner-api")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("partner-api: nothing to delete (the app names it, but ")
    as_json = run("delete", "partner-api", "--json")
    assert json.loads(as_json.stdout)["deleted"] is False
