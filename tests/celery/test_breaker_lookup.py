"""A task finds its breaker once and keeps it while its options and the app's registry stay as they were."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, current_app

from celery_breaker import BreakerTask, CircuitBreaker
from celery_breaker.breaker import current_run
from celery_breaker.integration import registry, task_options
from celery_breaker.integration import task as task_module
from celery_breaker.integration.task_options import forget_task_breaker_config, task_breaker_config
from celery_breaker.testing import FakeClock, use_clock


def throwaway_app(name: str) -> Any:
    app = Celery(name, set_as_current=False, broker="memory://", backend="cache+memory://")
    app.conf.update(breaker_storage_url=f"memory://celery-tests-{name}")
    return app


def test_a_task_keeps_its_breaker_until_the_registry_makes_another() -> None:
    app = throwaway_app("lookup-registry")
    seen: list[CircuitBreaker] = []

    @app.task(base=BreakerTask, bind=True, shared=False, name="lr.job")
    def job(self: Any) -> None:
        run = current_run()  # (the breaker the run was admitted on; self.breaker is the run's own copy)
        assert run is not None
        seen.append(run.breaker)

    app.finalize()
    task = app.tasks["lr.job"]
    task.apply().get()
    task.apply().get()
    assert seen[0] is seen[1]
    clock = FakeClock()
    use_clock(app, clock)  # the registry lets its breakers go: the next run meets a new one
    task.apply().get()
    assert seen[2] is not seen[1]
    assert seen[2]._clock is clock


def test_a_task_whose_options_changed_meets_a_breaker_with_the_new_policy() -> None:
    app = throwaway_app("lookup-options")
    thresholds: list[int | None] = []

    @app.task(base=BreakerTask, bind=True, shared=False, name="lo.job", breaker_policy={"failure_threshold": 3})
    def job(self: Any) -> None:
        thresholds.append(self.breaker.policy.failure_threshold)

    app.finalize()
    task = app.tasks["lo.job"]
    task.apply().get()
    task.apply().get()  # (the first run made the breaker: from the second on, it is kept)
    type(task).breaker_policy = {"failure_threshold": 7}
    forget_task_breaker_config(type(task))
    task.apply().get()
    assert thresholds == [3, 3, 7]


def test_a_task_given_a_key_after_its_first_runs_meets_the_keyed_breaker() -> None:
    app = throwaway_app("lookup-key")
    keys: list[str | None] = []

    @app.task(base=BreakerTask, bind=True, shared=False, name="lk.job")
    def job(self: Any, account: str) -> None:
        keys.append(self.breaker.key)

    app.finalize()
    task = app.tasks["lk.job"]
    task.apply(("a",)).get()
    task.apply(("a",)).get()
    type(task).breaker_key = staticmethod(lambda args, kwargs: args[0])
    task.apply(("b",)).get()
    assert keys == [None, None, "b"]


def test_a_kept_breaker_is_not_asked_for_again(monkeypatch: pytest.MonkeyPatch) -> None:
    app = throwaway_app("lookup-kept")
    asked: list[object] = []
    ask = registry.registry_for

    def counting(app: Any) -> Any:
        asked.append(app)
        return ask(app)

    monkeypatch.setattr(task_module, "registry_for", counting)

    @app.task(base=BreakerTask, shared=False, name="lkept.job")
    def job() -> None:
        return None

    app.finalize()
    task = app.tasks["lkept.job"]
    for _ in range(5):
        task.apply().get()
    assert len(asked) == 2  # the first run made the breaker, the second kept it
    forget_task_breaker_config(type(task))  # any task's options forgotten: asked again
    task.apply().get()
    task.apply().get()
    assert len(asked) == 3


def test_tasks_sharing_a_breaker_each_run_with_their_own_health_check() -> None:
    # A worker refuses this app (check_app: one breaker, two checks); eager runs and
    # direct calls check nothing, and the cached lookup must still not run a task with
    # the other task's check.
    app = throwaway_app("lookup-probes")
    probes: list[tuple[str, object, object]] = []

    def check_a() -> bool:
        return True

    def check_b() -> bool:
        return True

    @app.task(base=BreakerTask, bind=True, shared=False, name="lp.a", breaker="shared", breaker_probe=check_a)
    def a(self: Any) -> None:
        probes.append(("a", self.breaker.probe, task_breaker_config(self).probe))

    @app.task(base=BreakerTask, bind=True, shared=False, name="lp.b", breaker="shared", breaker_probe=check_b)
    def b(self: Any) -> None:
        probes.append(("b", self.breaker.probe, task_breaker_config(self).probe))

    app.finalize()
    for name in ("lp.a", "lp.b", "lp.a", "lp.b"):
        app.tasks[name].apply().get()
    assert [name for name, _, _ in probes] == ["a", "b", "a", "b"]
    for name, used, own in probes:
        assert used is own, name  # each run's breaker carries the running task's check
    assert probes[0][1] is not probes[1][1]


def test_a_task_on_the_current_app_meets_the_breaker_of_the_app_current_now() -> None:
    seen: list[CircuitBreaker] = []

    class Job(BreakerTask):
        name = "lookup-current.job"

        def run(self) -> None:
            run = current_run()  # (the breaker the run was admitted on; self.breaker is the run's own copy)
            assert run is not None
            seen.append(run.breaker)

    before = current_app._get_current_object()
    try:
        job = Job()
        first = Celery("lookup-current-1", broker="memory://", backend="cache+memory://")  # current
        first.conf.breaker_storage_url = "memory://lookup-current-1"
        assert job.app.main == "lookup-current-1"  # bound to the current_app proxy
        job()
        job()
        second = Celery("lookup-current-2", broker="memory://", backend="cache+memory://")
        second.conf.breaker_storage_url = "memory://lookup-current-2"
        clock = FakeClock()
        use_clock(second, clock)
        job()
        assert seen[-1].store.url == "memory://lookup-current-2"
        assert seen[-1]._clock is clock
        assert seen[-1] is job.breaker
    finally:
        before.set_current()


def test_a_run_while_options_are_being_forgotten_keeps_nothing_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    # A run on another thread between forget_task_breaker_config's two steps (dropping the
    # cached options, counting the change) must not keep the old options for good.
    app = throwaway_app("lookup-race")
    thresholds: list[int | None] = []

    @app.task(base=BreakerTask, bind=True, shared=False, name="lrace.job", breaker_policy={"failure_threshold": 3})
    def job(self: Any) -> None:
        thresholds.append(self.breaker.policy.failure_threshold)

    app.finalize()
    task = app.tasks["lrace.job"]
    task.apply().get()
    task.apply().get()
    type(task).breaker_policy = {"failure_threshold": 7}

    def run_meanwhile(owner: object, attribute: str) -> None:
        task.apply().get()  # (forced into the gap: a thread switch could land here)
        delattr(owner, attribute)

    monkeypatch.setattr(task_options, "delattr", run_meanwhile, raising=False)
    forget_task_breaker_config(type(task))
    monkeypatch.undo()
    task.apply().get()
    task.apply().get()
    assert thresholds == [3, 3, 3, 7, 7]
