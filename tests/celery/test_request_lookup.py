"""A BreakerTask reads Celery's request from its request stack directly: always the request
``task.request`` gives, in every thread, under any ident function, and from any stack."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.utils.threads import _FastLocalStack, _LocalStack

from celery_breaker import BreakerTask
from celery_breaker.integration.task_context import request_of as _request_of


@pytest.fixture
def task() -> Any:
    app = Celery("request-lookup", set_as_current=False, broker="memory://", backend="cache+memory://")
    app.conf.update(breaker_storage_url="memory://celery-tests-request-lookup")

    @app.task(base=BreakerTask, bind=True, shared=False, name="rl.job")
    def job(self: Any) -> Any:
        return self.request.id

    app.finalize()
    return app.tasks["rl.job"]


@contextlib.contextmanager
def property_unread(task: Any) -> Iterator[None]:
    """Fail if the block read the task's ``request`` property: with a request pushed,
    Celery's stack is read directly (were it not, every run would pay the property
    again, ~0.5 µs, silently)."""
    cls = type(task)
    property_ = cls.request
    asked: list[bool] = []

    class Spy:
        def __get__(self, obj: Any, owner: Any = None) -> Any:
            asked.append(True)
            return property_.__get__(obj, owner)

    cls.request = Spy()
    try:
        yield
    finally:
        cls.request = property_
    assert not asked, "the request property was read"


def read_directly(task: Any) -> Any:
    with property_unread(task):
        return _request_of(task)


def test_the_direct_read_is_in_use_on_this_celery(task: Any) -> None:
    assert type(task.request_stack) is _LocalStack
    task.push_request(id="pushed")
    try:
        assert read_directly(task) is task.request
        assert read_directly(task).id == "pushed"
    finally:
        task.pop_request()


def test_the_same_request_as_celerys_with_none_one_and_nested_pushes(task: Any) -> None:
    assert _request_of(task) is task.request  # none pushed: the task's default request
    assert _request_of(task).called_directly
    task.push_request(id="outer", called_directly=False)
    try:
        assert read_directly(task) is task.request
        assert read_directly(task).id == "outer"
        task.push_request(id="inner")
        assert read_directly(task) is task.request
        assert read_directly(task).id == "inner"
        task.pop_request()
        assert read_directly(task).id == "outer"
    finally:
        task.pop_request()
    assert _request_of(task) is task.request
    assert _request_of(task).called_directly


def test_each_thread_reads_its_own_request(task: Any) -> None:
    task.push_request(id="main")
    seen: dict[str, Any] = {}

    def other() -> None:
        seen["before"] = (_request_of(task), task.request)
        task.push_request(id="other")
        seen["pushed"] = (read_directly(task).id, task.request.id)
        task.pop_request()

    try:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert read_directly(task).id == "main"
    finally:
        task.pop_request()
    before, property_value = seen["before"]
    assert before is property_value
    assert before.id is None
    assert seen["pushed"] == ("other", "other")


def test_an_ident_function_of_its_own_is_followed(task: Any) -> None:
    # Under eventlet or gevent, Celery keys its stacks by greenlet: the direct read asks
    # the stack's own ident function, as Celery does.
    stack = task.request_stack
    previous = stack.__ident_func__
    who = ["a"]
    stack.__ident_func__ = lambda: who[0]
    try:
        task.push_request(id="in a")
        assert read_directly(task).id == "in a"
        who[0] = "b"
        assert _request_of(task) is task.request
        assert _request_of(task).id is None
        who[0] = "a"
        task.pop_request()
    finally:
        stack.__ident_func__ = previous


def test_a_stack_of_another_kind_is_read_through_the_property(task: Any) -> None:
    # USE_FAST_LOCALS=1 makes Celery's stacks _FastLocalStack: no direct read, the property.
    cls = type(task)
    original = cls.request_stack
    cls.request_stack = _FastLocalStack()
    try:
        assert _request_of(task) is task.request
        task.push_request(id="fast")
        assert _request_of(task).id == "fast"
        assert task.apply().get() is not None  # a run reads its request the same way
        task.pop_request()
    finally:
        cls.request_stack = original


def test_a_run_in_a_worker_reads_its_request_directly(task: Any) -> None:
    # As a worker's tracer runs it: the request pushed, then the task called. Its run and
    # a guarded block in its body read the request without the property.
    app = task.app

    @app.task(base=BreakerTask, bind=True, shared=False, name="rl.guarded")
    def guarded(self: Any) -> str:
        with self.breaker:
            return "done"

    run = app.tasks["rl.guarded"]
    run.push_request(id="from-a-worker", called_directly=False, args=(), kwargs={})
    try:
        with property_unread(run):
            assert run() == "done"
    finally:
        run.pop_request()
    assert run.breaker.snapshot().successes == 1
