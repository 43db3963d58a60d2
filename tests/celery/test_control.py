"""Remote control in an in-process worker (``celery.contrib.pytest``'s): the commands are
registered by ``install(app)`` and answered over the memory transport."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from celery_breaker import CircuitBreaker, State
from celery_breaker.labels import visible

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


def test_a_key_a_task_made_with_control_characters_is_named_as_status_shows_it(app: Any, operate: Operate) -> None:
    own = tasks.forced_task.breaker
    key = "tenant\n7\x1b[2J"
    keyed = operate(CircuitBreaker(own.name, own.policy, storage=own.store, key=key))
    shown = visible(key)
    answers = app.control.broadcast(
        "breaker_open", arguments={"name": own.name, "key": shown}, reply=True, timeout=3, limit=1
    )
    (answer,) = answers[0].values()
    assert answer.get("ok", "").startswith(f"breaker {own.name}[{shown}] forced open"), answer
    assert keyed.state is State.FORCED_OPEN
    assert own.state is State.CLOSED
    assert CircuitBreaker(own.name, own.policy, storage=own.store, key=shown).state is State.CLOSED  # none made
