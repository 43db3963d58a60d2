"""Remote control in an in-process worker (``celery.contrib.pytest``'s): the commands are
registered by ``install(app)`` and answered over the memory transport."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import click
import pytest
from celery.bin.control import _compile_arguments

from celery_breaker import CircuitBreaker, State
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.integration.task_options import task_breaker_config
from celery_breaker.integration.worker import unseen_breakers
from celery_breaker.labels import visible
from celery_breaker.ops.control import _reply as breaker_command
from celery_breaker.storage import resolve_store

from . import tasks

Operate = Callable[[CircuitBreaker], CircuitBreaker]


def test_the_in_process_worker_answers_inspect_breakers(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.forced_task.breaker)
    breaker.force_open()
    replies = app.control.inspect(timeout=3, limit=1)._request("breakers")
    assert len(replies) == 1, replies
    (rows,) = replies.values()
    states = {(row["name"], row["key"]): row["state"] for row in rows}
    assert states[("t-forced", None)] == "forced_open"


def test_inspect_breakers_lists_only_the_breakers_its_patterns_match(app: Any, operate: Operate) -> None:
    # Every worker listed every breaker in its reply: with 40,000 per-key breakers, 20.7 MB
    # each. ``celery inspect breakers PATTERN...`` selects them as ``breaker status`` does.
    forced = operate(tasks.forced_task.breaker)
    forced.force_open()
    operate(CircuitBreaker("other-breaker", storage=forced.store)).call(lambda: None)  # (stored: it was used)
    inspect = app.control.inspect(timeout=3, limit=1)

    def listed(*patterns: str) -> list[tuple[str, str | None]]:
        (rows,) = inspect._request("breakers", patterns=list(patterns)).values()
        return [(row["name"], row["key"]) for row in rows]

    assert listed("t-forced") == [("t-forced", None)]
    assert ("t-forced", None) in listed("t-forc*")
    assert all(name.startswith("t-forc") for name, _ in listed("t-forc*"))
    assert ("other-breaker", None) not in listed("t-forc*")
    assert listed("no-such-breaker*") == []
    # A program's own request may give one pattern as a string: it matched as its letters
    # ("t", "-", ..., "*"), and "*" listed every breaker.
    (rows,) = inspect._request("breakers", patterns="t-forc*").values()
    assert ("other-breaker", None) not in [(row["name"], row["key"]) for row in rows]
    assert ("t-forced", None) in [(row["name"], row["key"]) for row in rows]
    assert {("t-forced", None), ("other-breaker", None)} <= set(listed())  # (no pattern: every one)
    # What the `celery inspect breakers 'crm*' 'x'` client sends (it dropped the arguments).
    assert _compile_arguments("breakers", ["crm*", "x"]) == {"patterns": ["crm*", "x"]}


def test_the_in_process_worker_obeys_breaker_control_commands(app: Any, operate: Operate) -> None:
    breaker = operate(tasks.forced_task.breaker)
    for command, state in (("breaker_open", State.FORCED_OPEN), ("breaker_disable", State.DISABLED),
                           ("breaker_close", State.CLOSED), ("breaker_reset", State.CLOSED)):  # fmt: skip
        answers = app.control.broadcast(command, arguments={"name": "t-forced"}, reply=True, timeout=3, limit=1)
        assert len(answers) == 1, answers
        (answer,) = answers[0].values()
        assert "ok" in answer, answer
        assert breaker.state is state
    answers = app.control.broadcast("breaker_open", arguments={"name": "nope"}, reply=True, timeout=3, limit=1)
    (answer,) = answers[0].values()
    assert "unknown breaker 'nope'" in answer["error"]
    assert "t-forced" in answer["error"]
    assert breaker.state is State.CLOSED


def test_events_from_the_solo_pool_carry_the_workers_node_name(app: Any, celery_session_worker: Any) -> None:
    """Celery's solo pool puts the machine's host name on events sent from a task; ours
    carry the node name the worker registered with (captured at worker start)."""
    from celery_breaker.integration import events

    assert events.nodename() == celery_session_worker.hostname
    assert "@" in celery_session_worker.hostname


def test_a_control_command_that_admits_calls_to_a_failing_downstream_warns(app: Any, operate: Operate,
                                                                           caplog: Any) -> None:  # fmt: skip
    breaker = operate(tasks.forced_task.breaker)
    with contextlib.suppress(ConnectionError):
        breaker.call(_down)
    breaker.force_open()
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        answers = app.control.broadcast("breaker_close", arguments={"name": "t-forced"}, reply=True, timeout=3,
                                        limit=1)  # fmt: skip
    (answer,) = answers[0].values()
    assert answer["ok"].startswith("breaker t-forced closed: calls admitted, windows cleared; state closed. WARNING: ")
    assert "a call through t-forced failed just now, before it was forced open" in answer["ok"]
    assert breaker.state is State.CLOSED  # remote control cannot ask: it acts, and says so
    logged = [r.getMessage() for r in caplog.records if "by remote control" in r.getMessage()]
    assert logged, caplog.text
    assert "beware: a call through t-forced failed" in logged[-1]


def _down() -> None:
    raise ConnectionError("down")


def test_a_key_a_task_made_with_control_characters_is_named_as_status_shows_it(app: Any) -> None:
    own = tasks.forced_task.breaker
    key = "tenant\n7\x1b[2J"
    shown = visible(key)
    keyed = CircuitBreaker(own.name, own.policy, storage=own.store, key=key)
    try:
        answers = app.control.broadcast(
            "breaker_open", arguments={"name": own.name, "key": shown}, reply=True, timeout=3, limit=1
        )
        (answer,) = answers[0].values()
        assert answer.get("ok", "").startswith(f"breaker {own.name}[{shown}] forced open"), answer
        assert keyed.state is State.FORCED_OPEN
        assert own.state is State.CLOSED
        assert CircuitBreaker(own.name, own.policy, storage=own.store, key=shown).state is State.CLOSED  # none made
    finally:
        # Deleted, not only reset: the session's store outlives the test, and a later
        # listing of t-forced (test_inspect_breakers_lists_only_...) found these two too.
        for made in (key, shown):
            own.store.delete(own.name, made)


def test_a_breaker_the_tasks_guard_only_per_key_is_not_opened_without_a_key(app: Any, operate: Operate) -> None:
    # t-tenant's task has a breaker_key: a key-less t-tenant is a breaker no task
    # consults. Opening it replied success while every tenant's task ran on.
    policy = task_breaker_config(app.tasks[tasks.tenant_task.name]).policy
    store = resolve_store(tasks.STORE_URL)
    answers = app.control.broadcast("breaker_open", arguments={"name": "t-tenant"}, reply=True, timeout=3, limit=1)
    (answer,) = answers[0].values()
    assert answer["error"].startswith("the app's tasks guard 't-tenant' per key (breaker_key)"), answer
    assert "name one of its keys as t-tenant[KEY]" in answer["error"]
    assert answer["error"].endswith("give the key after the name: celery control breaker_open t-tenant KEY")
    assert ("t-tenant", None) not in {(s.name, s.key) for s in store.snapshots(SYSTEM_CLOCK)}  # none made
    keyed = operate(CircuitBreaker("t-tenant", policy, storage=store, key="A"))
    answers = app.control.broadcast(
        "breaker_open", arguments={"name": "t-tenant", "key": "A"}, reply=True, timeout=3, limit=1
    )
    (answer,) = answers[0].values()
    assert answer["ok"].startswith("breaker t-tenant[A] forced open"), answer
    assert keyed.state is State.FORCED_OPEN


def test_a_label_given_as_the_name_is_told_to_give_its_key_apart(app: Any, operate: Operate) -> None:
    """``t-tenant[A]``, as ``celery breaker status`` shows a per-key breaker (and as the
    error just above tells an operator to name one), was refused by ``celery control``
    with a fix that named another breaker: "write it with other characters, e.g.
    't-tenant(A)'". The fix is the key after the name."""
    policy = task_breaker_config(app.tasks[tasks.tenant_task.name]).policy
    keyed = operate(CircuitBreaker("t-tenant", policy, storage=resolve_store(tasks.STORE_URL), key="t 1"))
    says = "celery control takes the key as an argument of its own, after the name: celery control"
    # The client (`celery control breaker_close 't-tenant[t 1]'`) refuses it before sending.
    with click.Context(click.Command("control")) as context:
        context.params["command"] = "breaker_close"  # (as `celery control` has parsed it)
        with pytest.raises(click.BadParameter) as refused:
            _compile_arguments("breaker_close", ["t-tenant[t 1]"])
        with pytest.raises(click.BadParameter) as dashed:
            _compile_arguments("breaker_close", ["t-tenant[-x]"])
    assert f"{says} breaker_close t-tenant 't 1' (celery breaker takes the label as it is)" in str(refused.value)
    assert "breaker_close -- t-tenant -x" in str(dashed.value)
    # A program's broadcast is answered the same way, naming its command.
    answers = app.control.broadcast(
        "breaker_close", arguments={"name": "t-tenant[t 1]"}, reply=True, timeout=3, limit=1
    )
    (answer,) = answers[0].values()
    assert f"{says} breaker_close t-tenant 't 1'" in answer["error"], answer
    assert "other characters" not in answer["error"]
    assert keyed.state is State.CLOSED


def test_a_memory_store_is_refused_only_where_a_prefork_pool_runs_the_tasks(app: Any) -> None:
    # This session's worker is solo on memory://: its commands act where its tasks run
    # (the tests above). Under prefork the children hold the breakers, each its own.
    from celery.concurrency import prefork, solo, thread

    for pool, refused in ((prefork.TaskPool, True), (solo.TaskPool, False), (thread.TaskPool, False)):
        worker = SimpleNamespace(app=app, pool_cls=pool)
        assert (unseen_breakers(worker, "breaker_open") is not None) is refused, pool
    prefork_worker = SimpleNamespace(app=app, pool_cls=prefork.TaskPool)
    state = SimpleNamespace(consumer=SimpleNamespace(app=app, controller=prefork_worker))
    reply = breaker_command(state, "open", "t-forced", None)
    assert reply["error"].startswith("breaker_storage_url is 'memory://celery-tests': a memory store holds only")
    assert tasks.forced_task.breaker.state is State.CLOSED  # nothing was changed


def test_inspect_conf_report_and_the_settings_repr_mask_the_store_password(app: Any) -> None:
    """Celery masks the settings it knows hold secrets (``...PASS...``, its broker and backend
    URLs) in ``celery inspect conf`` and ``celery report``, and showed ``breaker_storage_url``
    (and so its password) whole; so did ``repr`` of the validated settings."""
    from celery import Celery

    from celery_breaker.integration.settings import build_settings

    url = "redis://:s3cret-pw@127.0.0.1:6379/5"
    original = app.conf.breaker_storage_url
    app.conf.breaker_storage_url = url  # (the worker read its settings at start: it keeps its own store)
    try:
        replies = app.control.inspect(timeout=3, limit=1).conf(with_defaults=False)
        report = app.bugreport()
    finally:
        app.conf.breaker_storage_url = original
    assert len(replies) == 1, replies
    (conf,) = replies.values()
    assert conf["breaker_storage_url"] == "redis://:***@127.0.0.1:6379/5"
    assert "breaker_storage_url: 'redis://:***@127.0.0.1:6379/5'" in report
    assert "s3cret-pw" not in report
    django = Celery("django-style", set_as_current=False)
    django.config_from_object({"CELERY_BREAKER_STORAGE_URL": url}, namespace="CELERY")
    assert "s3cret-pw" not in django.conf.humanize()
    shown = repr(build_settings(django.conf))
    assert "storage_url='redis://:***@127.0.0.1:6379/5'" in shown
    assert "s3cret-pw" not in shown


def test_a_broadcast_whose_arguments_no_client_checked_gets_an_error_naming_them(
    app: Any, operate: Operate, caplog: Any
) -> None:
    """`celery control` checks the name and key before sending; a program's own broadcast
    (``app.control.broadcast``) does not. A name that was no text got an
    ``AttributeError("'int' object has no attribute 'isprintable'")`` reply and a traceback
    in the worker's log; a key that was no text read as "empty", and a falsy one (``0``)
    acted on the key-less breaker."""
    breaker = operate(tasks.forced_task.breaker)

    def answer(arguments: dict[str, Any]) -> dict[str, Any]:
        answers = app.control.broadcast("breaker_open", arguments=arguments, reply=True, timeout=3, limit=1)
        assert len(answers) == 1, answers
        (found,) = answers[0].values()
        return cast("dict[str, Any]", found)

    with caplog.at_level(logging.ERROR):
        for arguments, says in (
            ({"name": 123}, "breaker_open: the breaker name must be a non-empty string, got 123"),
            ({"name": ["t-forced"]}, "breaker_open: the breaker name must be a non-empty string, got ['t-forced']"),
            ({"name": "x" * 300}, "breaker_open: the breaker name is at most 200 characters, got 300"),
            ({"name": "t-forced", "key": 0}, "key of breaker 't-forced' must be text (or null for no key), got int 0"),
            ({"name": "t-forced", "key": {"a": 1}}, "must be text (or null for no key), got dict {'a': 1}"),
        ):  # fmt: skip
            assert says in answer(arguments).get("error", ""), (arguments, answer(arguments))
    assert breaker.state is State.CLOSED  # (key 0 opened the key-less breaker)
    assert "pidbox command error" not in caplog.text
