"""``celery breaker close|reset|disable`` on a breaker whose downstream was failing: it warns and asks first."""

from __future__ import annotations

import json

from celery.bin.celery import celery as celery_main
from click.testing import CliRunner, Result

from celery_breaker import State

from .conftest import APP, breaker, run, stored, trip
from .test_purge import park, parked


def answered(answer: str, *args: str) -> Result:
    return CliRunner().invoke(celery_main, ["-A", APP, "breaker", *args], input=answer)


def test_closing_a_tripped_breaker_asks_first_and_no_changes_nothing(store_url: str) -> None:
    trip(breaker(store_url, "partner-api"))
    for action in ("close", "reset", "disable"):
        refused = answered("n\n", action, "partner-api")
        assert refused.exit_code == 1, refused.output
        assert refused.stdout == ""
        assert refused.stderr.startswith("Warning: partner-api tripped just now (its last failure just now):")
        assert "tasks deferred behind it run against that downstream and spend their own retries." in refused.stderr
        assert f"{action.capitalize()} partner-api anyway? [y/N]" in refused.stderr
        assert stored(store_url, "partner-api").state is State.OPEN


def test_a_yes_at_the_prompt_acts_and_warns_once(store_url: str) -> None:
    trip(breaker(store_url, "partner-api"))
    done = answered("y\n", "close", "partner-api")
    assert done.exit_code == 0, done.output
    assert done.stderr.count("Warning:") == 1
    assert done.stdout.startswith("partner-api: closed (was open)")
    assert stored(store_url, "partner-api").state is State.CLOSED


def test_yes_skips_the_question_but_not_the_warning(store_url: str) -> None:
    trip(breaker(store_url, "partner-api"))
    done = run("reset", "partner-api", "--yes", "--json")
    assert done.exit_code == 0, done.output
    assert done.stderr.startswith("Warning: partner-api tripped")
    assert "anyway?" not in done.stderr
    data = json.loads(done.stdout)
    assert data["state"] == "closed"
    assert data["warning"].startswith("partner-api tripped")


def test_a_healthy_breaker_is_closed_without_a_question(store_url: str) -> None:
    breaker(store_url, "partner-api").call(lambda: None)
    done = run("disable", "partner-api")  # (no input: a question would abort)
    assert done.exit_code == 0, done.output
    assert done.stderr == ""
    assert stored(store_url, "partner-api").state is State.DISABLED
    closed = run("close", "partner-api", "--json")  # turning protection back on never asks
    assert closed.exit_code == 0, closed.output
    assert json.loads(closed.stdout)["warning"] is None


def test_opening_never_asks(store_url: str) -> None:
    trip(breaker(store_url, "partner-api"))
    done = run("open", "partner-api")
    assert done.exit_code == 0, done.output
    assert done.stderr == ""
    assert "--yes" not in run("open", "--help").stdout
    assert "--yes" in run("close", "--help").stdout


def test_a_question_with_no_one_to_answer_it_names_the_option_that_skips_it(store_url: str) -> None:
    # A script or CI job (stdin not a terminal, at its end): click said only "Aborted!",
    # and the operator had to guess --yes (--force for purge).
    trip(breaker(store_url, "partner-api"))
    refused = answered("", "close", "partner-api")
    assert refused.exit_code == 1, refused.output
    assert refused.stderr.splitlines()[-1] == (
        "Error: no answer to 'Close partner-api anyway?': stdin is not a terminal; pass --yes to go on without asking"
    )
    assert "Aborted" not in refused.stderr
    assert stored(store_url, "partner-api").state is State.OPEN
    deleted = answered("", "delete", "partner-api")
    assert deleted.exit_code == 1, deleted.output
    assert deleted.stderr.endswith("pass --yes to go on without asking\n")
    assert stored(store_url, "partner-api").state is State.OPEN

    store = park(store_url, "partner-api", 2)
    purged = answered("", "purge", "partner-api")
    assert purged.exit_code == 1, purged.output
    assert purged.stderr.endswith("pass --force to go on without asking\n")
    assert parked(store, "partner-api") == (2, 0)
    assert answered("n\n", "purge", "partner-api").stderr.endswith("Aborted!\n")  # (a "no" is a no, as before)
