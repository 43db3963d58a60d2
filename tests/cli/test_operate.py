"""``celery breaker open|close|reset|disable`` acting on the shared store, and every way to get them wrong."""

from __future__ import annotations

import json
import logging
import re
import shlex

import pytest

from celery_breaker import CircuitOpenError, ConfigurationError, State
from celery_breaker.errors import BreakerKeyError
from celery_breaker.labels import visible
from celery_breaker.names import kept_key
from celery_breaker.ops.cli import EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_USAGE
from celery_breaker.ops.control import operate as remote_operate
from celery_breaker.ops.operator import operate
from celery_breaker.storage.redis import RedisStore
from tests.servers import RedisServer, free_port

from . import cliproj
from .conftest import breaker, run, stored, trip
from .test_purge import park


def test_open_close_disable_reset_move_the_stored_breaker(store_url: str) -> None:
    partner = breaker(store_url, "partner-api")
    trip(partner)

    opened = run("open", "partner-api")
    assert opened.exit_code == 0, opened.output
    assert opened.stdout.startswith("partner-api: forced_open (was open) in redis://127.0.0.1:")
    assert stored(store_url, "partner-api").state is State.FORCED_OPEN
    with pytest.raises(CircuitOpenError):  # a worker's breaker object follows at once
        partner.call(lambda: None)

    closed = run("close", "partner-api", "--yes")  # (it failed a moment ago: test_operator_safety)
    assert closed.exit_code == 0, closed.output
    assert "partner-api: closed (was forced_open)" in closed.stdout
    assert closed.stderr.startswith("Warning: a call through partner-api failed just now")
    after_close = stored(store_url, "partner-api")
    assert (after_close.state, after_close.trips) == (State.CLOSED, 1)  # close keeps lifetime counters

    disabled = run("disable", "partner-api")
    assert disabled.exit_code == 0, disabled.output
    assert "partner-api: disabled (was closed)" in disabled.stdout
    assert stored(store_url, "partner-api").state is State.DISABLED
    trip(partner)  # a disabled breaker never trips
    assert stored(store_url, "partner-api").state is State.DISABLED

    reset = run("reset", "partner-api")
    assert reset.exit_code == 0, reset.output
    assert "partner-api: closed (was disabled)" in reset.stdout
    assert "counters zeroed" in reset.stdout
    fresh = stored(store_url, "partner-api")
    assert (fresh.state, fresh.trips, fresh.failures) == (State.CLOSED, 0, 0)


def test_an_action_that_finds_the_breaker_as_asked_changes_nothing_and_says_so(store_url: str) -> None:
    breaker(store_url, "partner-api").call(lambda: None)
    assert run("open", "partner-api").exit_code == 0
    generation = stored(store_url, "partner-api").generation
    again = run("open", "partner-api")
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("partner-api: already forced_open in redis://127.0.0.1:")
    assert ", nothing changed: every call is rejected" in again.stdout
    as_json = json.loads(run("open", "partner-api", "--json").stdout)
    assert (as_json["before"], as_json["changed"], as_json["state"]) == ("forced_open", False, "forced_open")
    assert stored(store_url, "partner-api").generation == generation  # no transition, no event
    assert run("reset", "partner-api").stdout.startswith("partner-api: closed (was forced_open)")
    fresh = run("reset", "partner-api")
    assert fresh.stdout.startswith("partner-api: already closed, counters zero in redis://127.0.0.1:"), fresh.output


def test_per_key_breakers_by_option_or_by_label(store_url: str) -> None:
    tenant = breaker(store_url, "crm", key="tenant-7", policy=cliproj.CRM_POLICY)
    tenant.call(lambda: None)
    assert run("open", "crm", "--key", "tenant-7").exit_code == 0
    assert stored(store_url, "crm", "tenant-7", cliproj.CRM_POLICY).state is State.FORCED_OPEN
    result = run("close", "crm[tenant-7]")  # the label as `status` shows it
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("crm[tenant-7]: closed (was forced_open)")
    assert stored(store_url, "crm", "tenant-7", cliproj.CRM_POLICY).state is State.CLOSED


def test_json_prints_the_resulting_snapshot(store_url: str) -> None:
    breaker(store_url, "partner-api").call(lambda: None)
    result = run("open", "partner-api", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["action"], data["before"], data["name"], data["state"]) == (
        "open",
        "closed",
        "partner-api",
        "forced_open",
    )


def test_a_breaker_the_app_names_is_created_on_first_use_with_the_apps_policy(store_url: str) -> None:
    # Known from the app though never used yet: a task's breaker, a routed task's, a breaker_policies entry.
    for name in ("partner-api", "ledger", "billing"):
        result = run("open", name)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"{name}: forced_open (created)")
    assert run("status", "--json").stdout.count('"forced_open"') == 3
    # billing's stored policy is breaker_policies['billing'] over the default: reset_timeout 90 s.
    assert run("close", "billing").exit_code == 0
    billing = breaker(store_url, "billing")
    trip(billing)
    assert 85 < (stored(store_url, "billing").retry_after or 0) <= 90


def test_reset_adopts_the_apps_policy_and_other_moves_say_it_differs(store_url: str) -> None:
    # Created by a process with another policy (failure_threshold 9): the app says crm* trips at 3.
    odd = breaker(store_url, "crm", key="t1", policy={"failure_threshold": 9, "reset_timeout": 5.0})
    odd.call(lambda: None)
    opened = run("open", "crm", "--key", "t1")
    assert "the stored policy differs from the app's settings; `celery breaker reset crm --key t1`" in opened.stdout
    reset = run("reset", "crm[t1]")
    assert "the breaker now keeps the app's" in reset.stdout
    for _ in range(2):
        trip(odd)  # the stored policy (threshold 3) decides, not this object's
    assert stored(store_url, "crm", "t1", cliproj.CRM_POLICY).state is State.CLOSED
    trip(odd)
    assert stored(store_url, "crm", "t1", cliproj.CRM_POLICY).state is State.OPEN


@pytest.mark.parametrize(
    ("name", "key"), [("crm pay*", None), ("crm pay*", "t 1?"), ("crm's", None), ("crm\\x", "a\\b")]
)
def test_the_reset_the_note_suggests_is_a_command_the_shell_reads_back(
    store_url: str, name: str, key: str | None
) -> None:
    """A name with a space, a quote or a glob character (``crm*`` gives these a policy of
    the app's) was pasted into the suggested command as it is: the shell split it, or
    expanded it against the files there. Read back, the command resets that breaker."""
    breaker(store_url, name, key=key, policy={"failure_threshold": 9, "reset_timeout": 5.0}).call(lambda: None)
    opened = run("open", name, *(("--key", key) if key is not None else ()))
    assert opened.exit_code == 0, opened.output
    suggested = re.search(r"`(celery breaker reset .*)` adopts it", opened.stdout)
    assert suggested is not None, opened.stdout
    words = shlex.split(suggested.group(1))
    assert words == ["celery", "breaker", "reset", name, *(("--key", visible(key)) if key else ())]
    assert "the breaker now keeps the app's" in run(*words[2:]).stdout


@pytest.mark.parametrize("key", [None, "-k"])
def test_the_reset_the_note_suggests_for_a_name_starting_with_a_dash_reads_back(
    store_url: str, monkeypatch: pytest.MonkeyPatch, key: str | None
) -> None:
    """``celery breaker reset -pay`` takes ``-pay`` for an option ("No such option"): the
    note now suggests ``celery breaker reset [--key K] -- -pay``, which resets it."""
    policies = {**cliproj.app.conf.breaker_policies, "-*": cliproj.CRM_POLICY}
    monkeypatch.setitem(cliproj.app.conf, "breaker_policies", policies)
    cliproj.use_store(store_url)  # (the settings read again, with the policy of -*)
    breaker(store_url, "-pay", key=key, policy={"failure_threshold": 9, "reset_timeout": 5.0}).call(lambda: None)
    opened = run("open", *(("--key", key) if key is not None else ()), "--", "-pay")
    assert opened.exit_code == 0, opened.output
    suggested = re.search(r"`(celery breaker reset .*)` adopts it", opened.stdout)
    assert suggested is not None, opened.stdout
    words = shlex.split(suggested.group(1))
    assert words == ["celery", "breaker", "reset", *(("--key", key) if key is not None else ()), "--", "-pay"]
    reset = run("reset", "--yes", *words[3:])
    assert "the breaker now keeps the app's" in reset.stdout, reset.output


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [
        (["reset", "-pay"], "celery breaker reset -- -pay"),
        (["open", "--key", "-k", "-pay", "--json"], "celery breaker open --key -k --json -- -pay"),
        (["close", "-kt1", "-y", "-x y"], "celery breaker close -kt1 -y -- '-x y'"),
        (["delete", "--key=t1", "--pay"], "celery breaker delete --key=t1 -- --pay"),
        (["status", "crm", "-pay*"], "celery breaker status crm -- '-pay*'"),
        (["watch", "-pay"], "celery breaker watch -- -pay"),
    ],
)
def test_a_name_taken_for_an_option_says_to_put_it_after_dashes(
    store_url: str, typed: list[str], suggested: str
) -> None:
    """``celery breaker reset -pay`` said "No such option '-p'" and nothing of the way
    out: the error now gives the command with the name after ``--``, the rest as typed
    (an option's value that starts with ``-`` and options run together stay options)."""
    result = run(*typed)
    assert result.exit_code == EXIT_USAGE
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: No such option"), error
    assert error.endswith(f"put it after '--': {suggested}"), error


def test_an_option_of_another_command_gets_no_name_hint(store_url: str) -> None:
    """``status --key K`` is an option given to the wrong command, not a name."""
    result = run("status", "--key", "t1")
    assert result.exit_code == EXIT_USAGE
    assert "No such option" in result.stderr
    assert "breaker's name" not in result.stderr


def test_a_name_taken_for_an_option_goes_among_those_after_the_dashes(store_url: str) -> None:
    """With ``--`` typed already, the word goes after it, before the names there; click's
    own suggestion of the option it may have meant stays."""
    result = run("status", "--jsn", "--", "-pay")
    assert result.exit_code == EXIT_USAGE
    error = result.stderr.strip().splitlines()[-1]
    assert "Did you mean '--json'?" in error, error
    assert error.endswith("put it after '--': celery breaker status -- --jsn -pay"), error


def test_an_unknown_name_lists_the_known_ones_and_changes_nothing(store_url: str) -> None:
    breaker(store_url, "stored-only").call(lambda: None)
    result = run("open", "partnr-api")
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    error = result.stderr.strip()
    assert error.startswith(
        f"Error: no breaker named 'partnr-api' in {store_url} "
        "or among the app's tasks (did you mean 'partner-api'?); known breakers: "
    ), error
    assert error.endswith("; pass --create to act on it anyway")
    known = error.split("known breakers: ", 1)[1].split("; pass --create", 1)[0].split(", ")
    assert known == sorted(known)
    # (Breakers of other test modules' tasks may be listed too: @shared_task reaches every app.)
    assert {"billing", "crm", "ledger", "partner-api", "stored-only"} <= set(known)
    assert "\n" not in error
    assert "partnr-api" not in run("status").stdout  # nothing was created

    created = run("open", "partnr-api", "--create")
    assert created.exit_code == 0
    assert stored(store_url, "partnr-api").state is State.FORCED_OPEN


def test_an_unknown_key_of_a_known_breaker_lists_its_keys(store_url: str) -> None:
    breaker(store_url, "crm", key="tenant-7", policy=cliproj.CRM_POLICY).call(lambda: None)
    result = run("disable", "crm", "--key", "tenant-8")
    assert result.exit_code == EXIT_USAGE
    assert "breaker 'crm' has no key 'tenant-8'" in result.stderr
    assert "its keys there: tenant-7" in result.stderr
    assert run("disable", "crm", "--key", "tenant-8", "--create").exit_code == 0
    assert stored(store_url, "crm", "tenant-8", cliproj.CRM_POLICY).state is State.DISABLED


def test_a_breaker_the_tasks_guard_only_per_key_is_not_acted_on_without_a_key(store_url: str) -> None:
    # crm's task has a breaker_key: a key-less crm is a breaker no task consults, so
    # opening it would report success while every tenant's task runs on.
    breaker(store_url, "crm", key="tenant-7", policy=cliproj.CRM_POLICY).call(lambda: None)
    for action in ("open", "close", "delete"):
        refused = run(action, "crm", *(["--yes"] if action != "open" else []))
        assert refused.exit_code == EXIT_USAGE, refused.output
        assert refused.stdout == ""
        error = refused.stderr.strip()
        assert error.startswith("Error: the app's tasks guard 'crm' per key (breaker_key), so no task consults crm "
                                "without a key; name one of its keys as crm[KEY] "
                                "(`celery breaker status --json 'crm[*]'` lists them; its keys in "), error  # fmt: skip
        assert ": tenant-7)" in error
    assert [(r["name"], r["key"]) for r in json.loads(run("status", "--json", "crm*").stdout)] == [("crm", "tenant-7")]
    assert "pass --create to act on it anyway" in run("open", "crm").stderr
    created = run("open", "crm", "--create")  # asked for: made
    assert created.exit_code == 0, created.output
    assert stored(store_url, "crm", None, cliproj.CRM_POLICY).state is State.FORCED_OPEN
    assert stored(store_url, "crm", "tenant-7", cliproj.CRM_POLICY).state is State.CLOSED
    # Once in the store (made by --create, or by a run whose key function answered None),
    # the key-less crm is a breaker like any other.
    assert run("close", "crm").exit_code == 0


@pytest.mark.parametrize(
    ("key", "says"),
    [("", "is empty"), (" tenant-7", "whitespace"), ("tenant\n7", "control character"), ("a\x00b", "control")],
)
def test_a_malformed_key_is_refused(store_url: str, key: str, says: str) -> None:
    breaker(store_url, "crm", key="tenant-7", policy=cliproj.CRM_POLICY).call(lambda: None)
    for args in (["open", "crm", "--key", key], ["open", "--create", f"crm[{key}]"]):
        result = run(*args)
        assert result.exit_code == EXIT_USAGE, result.output
        assert result.stderr.startswith("Error: breaker key ")
        assert says in result.stderr
        assert "Traceback" not in result.output
    assert run("status", "--json").stdout.count('"name"') == 1  # nothing created


def test_a_name_that_is_not_utf8_is_refused_as_bad_input(store_url: str) -> None:
    """A byte that is not UTF-8 in an argument reaches Python as a lone surrogate. The name
    passed the checks, and the store could not write it: `open --create` ended in
    "unexpected UnicodeEncodeError" (exit 1), and a CircuitBreaker of that name in one."""
    breaker(store_url, "partner-api").call(lambda: None)
    for args in (["open", "--create", "partner\udcff"], ["open", "\udcff"], ["delete", "\udcff"],
                 ["purge", "-f", "\udcff"], ["status", "--json"]):  # fmt: skip
        result = run(*args)
        if args[0] == "status":
            assert [row["name"] for row in json.loads(result.stdout)] == ["partner-api"]  # nothing created
            continue
        assert result.exit_code == EXIT_USAGE, result.output
        assert result.stderr.startswith("Error: breaker name ")
        assert "not UTF-8" in result.stderr
        assert "unexpected" not in result.stderr
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        breaker(store_url, "partner\udcff")


def test_a_memory_store_or_an_unreachable_one_is_refused() -> None:
    cliproj.use_store("memory://")
    result = run("close", "partner-api")
    assert result.exit_code == EXIT_CONFIG
    assert "cannot see or change the workers' breakers" in result.stderr

    port = free_port()
    cliproj.use_store(f"redis://user:s3cret@127.0.0.1:{port}/2")
    try:
        for action in ("open", "close", "reset", "disable"):
            result = run(action, "partner-api")
            assert result.exit_code == EXIT_UNAVAILABLE, result.output
            assert result.stderr.startswith(
                f"Error: cannot reach the breaker store redis://user:***@127.0.0.1:{port}/2"
            )
            assert "s3cret" not in result.output
            assert "Traceback" not in result.output
    finally:
        cliproj.use_store("memory://")


def test_a_store_that_wants_a_password_is_named_with_the_fix() -> None:
    # A store URL without the password Redis asks for gave Redis's own words ("HELLO must
    # be called with the client already authenticated"), naming no fix.
    with RedisServer(password="s3cret-pw") as server:
        server.start()
        try:
            for url in (f"redis://127.0.0.1:{server.port}/2", f"redis://:wrong-pw@127.0.0.1:{server.port}/2"):
                cliproj.use_store(url)
                result = run("status")
                assert result.exit_code == EXIT_UNAVAILABLE, result.output
                assert "Redis wants a password, or another one: give it in the store URL" in result.stderr, url
                assert "wrong-pw" not in result.output
                assert "s3cret-pw" not in result.output
        finally:
            cliproj.use_store("memory://")


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("status", "open", "close", "reset", "disable", "watch"):
        assert f"  {command} " in result.stdout


def test_the_caution_check_of_an_unknown_breaker_gives_the_callers_hint(store_url: str) -> None:
    """The web page asks ``assess`` before a close: its refusal of a breaker that left the
    store must say what helps on a page, not the CLI's ``--create``."""
    from celery_breaker.errors import UnknownBreakerError
    from celery_breaker.ops.operator import assess

    with pytest.raises(UnknownBreakerError, match=r"; reload the page$"):
        assess(cliproj.app, "close", "partnr-api", create_hint="reload the page")


@pytest.mark.parametrize("key", ["line\nbreak", "t\x1b]0;owned\x07", "C:\\tmp\n", "\u200bzero-width"])
def test_a_key_a_task_made_with_control_characters_is_named_as_status_shows_it(store_url: str, key: str) -> None:
    # breaker_key takes any text: such a breaker could be watched, never operated.
    breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY).call(lambda: None)
    shown = visible(key)
    status = run("status")
    assert shown in status.stdout
    assert key not in status.stdout

    opened = run("open", "crm", "--key", shown)
    assert opened.exit_code == 0, opened.output
    assert opened.stdout.startswith(f"crm[{shown}]: forced_open (was closed)")
    assert key not in opened.output  # (reported as shown, never raw to the terminal)
    assert stored(store_url, "crm", key, cliproj.CRM_POLICY).state is State.FORCED_OPEN

    closed = run("close", f"crm[{shown}]")  # the label as `status` shows it
    assert closed.exit_code == 0, closed.output
    assert stored(store_url, "crm", key, cliproj.CRM_POLICY).state is State.CLOSED
    assert run("status", "--json").stdout.count('"name"') == 1  # nothing else was created


def test_two_keys_that_differ_by_a_backslash_are_told_apart(store_url: str) -> None:
    newline, backslash_n = "a\nb", "a\\nb"
    for key in (newline, backslash_n):
        breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY).call(lambda: None)
    assert (visible(newline), visible(backslash_n)) == ("a\\nb", "a\\\\nb")
    assert run("open", "crm", "--key", visible(newline)).exit_code == 0
    assert stored(store_url, "crm", newline, cliproj.CRM_POLICY).state is State.FORCED_OPEN
    assert stored(store_url, "crm", backslash_n, cliproj.CRM_POLICY).state is State.CLOSED
    assert run("disable", "crm", "--key", visible(backslash_n)).exit_code == 0
    assert stored(store_url, "crm", backslash_n, cliproj.CRM_POLICY).state is State.DISABLED
    assert stored(store_url, "crm", newline, cliproj.CRM_POLICY).state is State.FORCED_OPEN


def test_a_shown_key_that_is_not_stored_is_not_created_with_control_characters(store_url: str) -> None:
    breaker(store_url, "crm", key="tenant-7", policy=cliproj.CRM_POLICY).call(lambda: None)
    result = run("open", "crm", "--key", "ten\nant", "--create")
    assert result.exit_code == EXIT_USAGE
    assert "control character" in result.stderr
    assert "named as `status` shows it: ten\\nant" in result.stderr
    created = run("open", "crm", "--key", "a\\nb", "--create")  # nothing shown so: taken as typed
    assert created.exit_code == 0, created.output
    assert stored(store_url, "crm", "a\\nb", cliproj.CRM_POLICY).state is State.FORCED_OPEN


def test_a_program_or_the_web_page_passing_a_stored_key_acts_on_that_key(store_url: str) -> None:
    # Only a key typed by an operator is read as `status` shows it: the web page and a
    # program pass the key as the store holds it, which a backslash-n key must not
    # turn into its newline twin.
    newline, backslash_n = "a\nb", "a\\nb"
    for key in (newline, backslash_n):
        breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY).call(lambda: None)
    move = operate(cliproj.app, "open", "crm", backslash_n, store=RedisStore.from_url(store_url))
    assert move.after.key == backslash_n
    assert stored(store_url, "crm", backslash_n, cliproj.CRM_POLICY).state is State.FORCED_OPEN
    assert stored(store_url, "crm", newline, cliproj.CRM_POLICY).state is State.CLOSED


def test_warnings_refusals_and_patterns_show_such_a_key_escaped(store_url: str) -> None:
    key = "t\x1b[2J\n7"
    shown = visible(key)
    tripped = breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY)
    trip(tripped)  # a failure just now: closing it warns
    closed = run("close", "crm", "--key", shown, "--yes")
    assert closed.exit_code == 0, closed.output
    assert closed.stderr.startswith(f"Warning: 1 calls through crm[{shown}] failed")
    park(store_url, "crm", 2, key=key)
    refused = run("delete", "crm", "--key", shown, "--yes")
    assert refused.exit_code == 1, refused.output  # (refused for what it would do, not for bad input)
    assert f"2 tasks are parked behind crm[{shown}]:" in refused.stderr
    for output in (closed.output, refused.output):
        assert "\n7" not in output
        assert "\x1b" not in output
    for pattern in (f"crm[{shown}]", "crm[t\\x1b*]"):  # a pattern matches a key as shown too
        assert shown in run("status", pattern).stdout, pattern
    breaker(store_url, "crm", key="C:\\tmp", policy=cliproj.CRM_POLICY).call(lambda: None)
    assert "C:\\\\tmp" in run("status", "crm[C:\\\\tmp]").stdout  # as shown
    assert "C:\\\\tmp" in run("status", "crm[C:\\tmp]").stdout  # as stored


@pytest.mark.parametrize("key", ["", " x", "x "])
def test_the_empty_key_and_keys_with_spaces_at_their_ends_are_named_as_shown(store_url: str, key: str) -> None:
    breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY).call(lambda: None)
    shown = visible(key)
    assert shown in {'""', "\\x20x", "x\\x20"}
    assert f"crm[{shown}]" in run("status", "--wide").stdout or shown in run("status").stdout
    for typed in (["open", "crm", "--key", shown], ["close", f"crm[{shown}]"]):
        result = run(*typed)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"crm[{shown}]: ")  # (the result names it as status does: not crm[])
    assert stored(store_url, "crm", key, cliproj.CRM_POLICY).state is State.CLOSED
    assert run("status", "--json").stdout.count('"name"') == 1  # nothing else was created


def test_a_program_acts_on_a_stored_key_however_it_looks(store_url: str) -> None:
    # The web page and the Python API pass a key as stored: empty, with spaces at its
    # ends or a newline, it is acted on (only a key the store lacks must be nameable).
    store = RedisStore.from_url(store_url)
    for key in ("", " x", "tenant\n"):
        breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY).call(lambda: None)
        move = operate(cliproj.app, "open", "crm", key, store=store)
        assert move.after.key == key
        assert stored(store_url, "crm", key, cliproj.CRM_POLICY).state is State.FORCED_OPEN
    with pytest.raises(BreakerKeyError, match="starts or ends with whitespace"):
        operate(cliproj.app, "open", "crm", " y", store=store, create=True)


def test_a_key_typed_with_a_control_character_is_refused_even_when_stored(store_url: str) -> None:
    breaker(store_url, "crm", key="a\nb", policy=cliproj.CRM_POLICY).call(lambda: None)
    result = run("open", "crm", "--key", "a\nb")  # (a quoting mistake: status shows a\nb)
    assert result.exit_code == EXIT_USAGE
    assert "control character" in result.stderr
    assert "named as `status` shows it: a\\nb" in result.stderr
    assert stored(store_url, "crm", "a\nb", cliproj.CRM_POLICY).state is State.CLOSED


def test_the_question_and_a_pattern_name_the_key_as_typed(store_url: str) -> None:
    key = "tenant\n7"
    trip(breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY))
    asked = run("close", "crm", "--key", visible(key))  # (no answer: it aborts)
    assert "Warning: 1 calls through crm[tenant\\n7] failed" in asked.stderr
    assert "Close crm[tenant\\n7] anyway?" in asked.stderr  # what the warning showed, not its twin
    breaker(store_url, "crm", key="tenant[1]", policy=cliproj.CRM_POLICY).call(lambda: None)
    assert "tenant[1]" in run("status", "crm[tenant[1]]").stdout  # (brackets in a key: no class)


def test_a_key_too_long_to_keep_is_operated_as_its_breaker_keeps_it(store_url: str) -> None:
    # A breaker keeps a key over MAX_KEY_LENGTH as its start and a digest (kept_key): an
    # operator's `open --create` with the task's real key made a breaker under the raw key,
    # which no task ever meets, and `open` without it found nothing.
    key = "tenant-" + "x" * 230
    created = run("open", "crm", "--key", key, "--create")
    assert created.exit_code == 0, created.output
    task_side = breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY)
    assert task_side.key == kept_key("crm", key)
    assert stored(store_url, "crm", task_side.key, cliproj.CRM_POLICY).state is State.FORCED_OPEN
    closed = run("close", "crm", "--key", key)  # (the real key, as the task has it)
    assert closed.exit_code == 0, closed.output
    assert stored(store_url, "crm", task_side.key, cliproj.CRM_POLICY).state is State.CLOSED
    assert run("status", "--json").stdout.count('"name"') == 1  # (nothing under the raw key)


def test_a_key_that_is_not_utf8_is_operated_as_its_breaker_keeps_it(store_url: str) -> None:
    # A byte that is not UTF-8 in --key reaches Python as a lone surrogate, which a breaker
    # keeps as kept_key writes it. Every command ended in "unexpected UnicodeEncodeError"
    # (exit 1), and `reset --create` left a breaker the store's agent could not flush.
    key = "tenant-\udcff"
    task_side = breaker(store_url, "crm", key=key, policy=cliproj.CRM_POLICY)
    task_side.call(lambda: None)
    assert task_side.key == kept_key("crm", key) != key
    opened = run("open", "crm", "--key", key)
    assert opened.exit_code == 0, opened.output
    assert stored(store_url, "crm", task_side.key, cliproj.CRM_POLICY).state is State.FORCED_OPEN
    shown = run("status", "--json", f"crm[{key}]")
    assert shown.exit_code == 0, shown.output
    assert [(row["key"], row["state"]) for row in json.loads(shown.stdout)] == [(task_side.key, "forced_open")]
    for args in (["close", "crm", "--key", key, "--yes"], ["purge", "-f", "crm", "--key", key],
                 ["delete", "crm", "--key", key, "--yes"]):  # fmt: skip
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert "unexpected" not in result.output
    assert run("status", "--json").stdout.count('"name"') == 0  # deleted; nothing under the raw key
    assert run("open", "crm", "--key", "other-\udcff").exit_code == EXIT_USAGE  # not there: unknown, no crash
    assert run("open", "crm", "--key", "other-\udcff", "--create").exit_code == 0
    assert [row["key"] for row in json.loads(run("status", "--json").stdout)] == [kept_key("crm", "other-\udcff")]


def test_a_long_key_pattern_is_no_key_to_keep(store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # A pattern's key was passed through kept_key like a key: a WARNING said a "key of 301
    # characters" was kept as a digest, of a glob nobody's breaker has.
    breaker(store_url, "crm", key="tenant-7", policy=cliproj.CRM_POLICY).call(lambda: None)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        result = run("status", "--json", f"crm[{'x' * 300}*]")
    assert result.exit_code == 0, result.output
    assert "is kept as" not in caplog.text + result.output


def test_acting_on_one_breaker_reads_that_breaker_alone(store_url: str, listings: list[RedisStore]) -> None:
    # Each action listed every breaker in the store to find the one it named: with 40,000
    # per-key breakers in Redis, `open crm[tenant-7]` took 6 s, `close` 9 s, and a
    # `celery control breaker_open` kept the worker's main process busy for 20 s (no reply in time).
    for tenant in ("tenant-1", "tenant-2"):
        breaker(store_url, "crm", key=tenant, policy=cliproj.CRM_POLICY).call(lambda: None)
    for args in (("open", "crm[tenant-1]"), ("close", "crm[tenant-1]", "--yes"), ("reset", "partner-api"),
                 ("delete", "crm[tenant-2]", "--yes"), ("open", "crm", "--key", "tenant-3", "--create")):  # fmt: skip
        result = run(*args)
        assert result.exit_code == 0, result.output
    assert remote_operate(cliproj.app, "disable", "crm", "tenant-1")["state"] == "disabled"
    assert listings == []
    assert stored(store_url, "crm", "tenant-1", cliproj.CRM_POLICY).state is State.DISABLED
    assert stored(store_url, "crm", "tenant-3", cliproj.CRM_POLICY).state is State.FORCED_OPEN

    unknown = run("close", "crm[tenant-9]")  # (the message names the keys the store holds: a listing)
    assert unknown.exit_code == EXIT_USAGE
    assert "its keys there: tenant-1, " in unknown.stderr
    assert listings
