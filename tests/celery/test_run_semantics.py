"""What a task run records, and how options given as methods behave (eager runs on throwaway apps)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TimeLimitExceeded

from celery_breaker import BreakerTask, CircuitBreaker, ConfigurationError, State
from celery_breaker.breaker import current_run
from celery_breaker.core import Outcome
from celery_breaker.integration import task as task_module
from celery_breaker.integration import task_limits
from celery_breaker.integration.inventory import check_app
from celery_breaker.testing import FakeClock, fresh_store, use_clock


class RateLimited(Exception):
    """The downstream asked us to slow down: not a sign that it is down."""


def throwaway_app(name: str, **settings: Any) -> Any:
    app = Celery(name, set_as_current=False, broker="memory://", backend="cache+memory://")
    app.conf.update(breaker_storage_url=f"memory://celery-tests-{name}", **settings)
    return app


def test_a_retry_inside_a_guarded_block_counts_as_its_cause_not_as_a_failure() -> None:
    app = throwaway_app(
        "retry-in-block",
        breaker_default_policy={"failure_threshold": 1, "ignore_exceptions": [RateLimited]},
    )

    @app.task(base=BreakerTask, bind=True, shared=False, name="rib.job", max_retries=2)
    def job(self: Any) -> str:
        with self.breaker:
            if self.request.retries == 0:
                raise self.retry(exc=RateLimited("slow down"), countdown=0)
        return "done"

    app.finalize()
    result = app.tasks["rib.job"].apply()
    assert result.get() == "done"
    snapshot = app.tasks["rib.job"].breaker.snapshot()
    assert snapshot.state is State.CLOSED  # the ignored cause did not trip it
    assert snapshot.failures == 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_a_breaker_key_that_raises_fails_the_task_naming_breaker_key() -> None:
    # (the failure showed KeyError('tenant') from a lambda, as if the task's body raised it)
    app = throwaway_app("key-raises")
    ran: list[str] = []

    @app.task(base=BreakerTask, shared=False, name="kr.job", breaker_key=lambda args, kwargs: kwargs["tenant"])
    def job(**kwargs: Any) -> None:
        ran.append("ran")

    app.finalize()
    result = app.tasks["kr.job"].apply(kwargs={"other": 1})
    assert isinstance(result.result, KeyError)
    notes = getattr(result.result, "__notes__", [])
    assert any("raised by the breaker_key of task 'kr.job'" in note for note in notes), notes
    assert ran == []
    assert app.tasks["kr.job"].apply(kwargs={"tenant": "t-1"}).get() is None  # (a key: it runs)
    assert ran == ["ran"]


def test_a_fallback_defined_as_a_method_of_a_task_class_gets_self() -> None:
    app = throwaway_app("fallback-method")

    class QuoteTask(BreakerTask):
        def breaker_fallback(self, symbol: str) -> str:
            return f"stale quote for {symbol} from {self.name}"

    @app.task(base=QuoteTask, bind=True, shared=False, name="fm.quote")
    def quote(self: Any, symbol: str) -> str:
        return f"live quote for {symbol}"

    app.finalize()
    task = app.tasks["fm.quote"]
    task.breaker.force_open()
    assert task.apply(args=("ACME",)).get() == "stale quote for ACME from fm.quote"


def test_a_fallback_method_name_that_does_not_exist_stops_the_worker_at_start() -> None:
    app = throwaway_app("fallback-typo")

    @app.task(base=BreakerTask, bind=True, shared=False, name="ft.job", breaker_fallback="stale_quoet")
    def job(self: Any) -> None:
        return None

    app.finalize()
    with pytest.raises(ConfigurationError, match=r"breaker_fallback='stale_quoet' names no method"):
        check_app(app)


@pytest.mark.parametrize(
    ("annotations", "options", "named", "hint"),
    [
        ({}, {"breaker_polcy": {"failure_threshold": 1}}, "'breaker_polcy'", "did you mean breaker_policy?"),
        ({"ot.job": {"breaker_polcy": {}}}, {}, "'breaker_polcy'", "did you mean breaker_policy?"),
        ({"*": {"breaker_scpoe": "calls"}}, {}, "'breaker_scpoe'", "did you mean breaker_scope?"),
        ({}, {"breaker_fallbak": lambda: 1}, "'breaker_fallbak'", "did you mean breaker_fallback?"),
        ({}, {"breakr": "crm"}, "'breakr'", "did you mean breaker?"),  # (the task ran on a breaker of its own)
        ({}, {"braeker": "crm"}, "'braeker'", "did you mean breaker?"),
        ({"ot.job": {"brekaer_policy": {}}}, {}, "'brekaer_policy'", "did you mean breaker_policy?"),
    ],
    ids=[
        "decorator",
        "annotation",
        "annotation-for-all",
        "decorator-callable",
        "near-breaker",
        "swapped",
        "ann-swap",
    ],
)
def test_a_misspelt_task_option_is_refused_naming_the_option_it_is_close_to(
    annotations: dict[str, Any], options: dict[str, Any], named: str, hint: str
) -> None:
    # Ignored silently before: the task ran with the default policy, while a typo in a
    # breaker_* setting stops the worker.
    app = throwaway_app("option-typo", task_annotations=annotations)

    def checked() -> None:
        @app.task(base=BreakerTask, bind=True, shared=False, name="ot.job", **options)
        def job(self: Any) -> None:
            return None

        app.finalize()
        check_app(app)

    with pytest.raises(ConfigurationError) as info:
        checked()
    assert named in str(info.value)
    assert hint in str(info.value)


@pytest.mark.parametrize(
    ("annotations", "options", "named"),
    [({}, {"probe": "tests.celery.probe_tasks:check_option"}, "probe"), ({"ot.job": {"max_deferrals": 3}}, {},
     "max_deferrals")],
    ids=["decorator", "annotation"],
)  # fmt: skip
def test_an_option_without_its_prefix_is_warned_of(
    annotations: dict[str, Any], options: dict[str, Any], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Ignored silently: `probe=` (the name CircuitBreaker takes) left the breaker without a
    # health check, and its real tasks went as its probes (an acceptance tester's run). A
    # word an app may use for an attribute of its own: warned of, not refused.
    app = throwaway_app("option-unprefixed", task_annotations=annotations)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):

        @app.task(base=BreakerTask, bind=True, shared=False, name="ot.job", **options)
        def job(self: Any) -> None:
            return None

        app.finalize()
        check_app(app)
    [warning] = [r.getMessage() for r in caplog.records if "is no celery-breaker task option" in r.getMessage()]
    assert f"task 'ot.job': '{named}' is no celery-breaker task option" in warning
    assert f"did you mean breaker_{named}?" in warning


def test_the_option_check_leaves_celerys_task_class_unbound_so_annotations_apply() -> None:
    # A first version asked hasattr(Task, "app"): Celery's class property then bound
    # Celery's own Task class to the current app, every task class made later inherited
    # "bound", and Celery annotated none of them (task_annotations silently ignored).
    from celery import Task

    first = throwaway_app("unbound-first")

    @first.task(base=BreakerTask, bind=True, shared=False, name="ub.first", acks_late=True)
    def one(self: Any) -> None:
        return None

    first.finalize()
    assert Task.__bound__ is False
    second = throwaway_app("unbound-second", task_annotations={"ub.second": {"rate_limit": "5/s"}})

    @second.task(base=BreakerTask, bind=True, shared=False, name="ub.second")
    def two(self: Any) -> None:
        return None

    second.finalize()
    assert second.tasks["ub.second"].rate_limit == "5/s"


def test_task_options_and_celerys_own_pass_the_option_check() -> None:
    app = throwaway_app("option-ok", task_annotations={"*": {"rate_limit": "10/s", "breaker_scope": "calls"}})

    @app.task(
        base=BreakerTask, bind=True, shared=False, name="ok.job", acks_late=True, autoretry_for=(KeyError,),
        breaker="option-ok", breaker_policy={"failure_threshold": 2}, breaker_max_deferrals=3,
    )  # fmt: skip
    def job(self: Any) -> None:
        return None

    class Mixin:
        breakers = ("a", "b")  # (close to "breaker", but not breaker_*: the user's own)
        breaker_probe_url = "http://partner/health"  # (an option's name and more: the user's own)

    class Own(Mixin, BreakerTask):
        name = "ok.own"
        breaker_key = "breaker_tenant"  # (a method of its own, named like an option)
        breaker_timeout_budget = 30  # (a helper of the user's, close to no option)
        tracker = "not an option, and not close to one"

        def breaker_tenant(self, args: Any, kwargs: Any) -> str:
            return "t"

        def breaker_keys(self) -> list[str]:  # (a method: close to breaker_key, but no option value)
            return []

    app.register_task(Own())
    app.finalize()
    assert set(check_app(app)) >= {"option-ok", "ok.own"}


def test_a_library_breaker_of_the_same_name_inside_the_task_uses_the_tasks_probe() -> None:
    clock = FakeClock()
    app = throwaway_app(
        "library-breaker",
        breaker_default_policy={"failure_threshold": 1, "reset_timeout": 10, "half_open_max_calls": 1},
    )
    use_clock(app, clock)
    library = CircuitBreaker("crm", app.conf.breaker_default_policy, storage=app.conf.breaker_storage_url, clock=clock)

    @app.task(base=BreakerTask, bind=True, shared=False, name="lb.sync", breaker="crm")
    def sync(self: Any) -> str:
        return library.call(lambda: "synced")  # a client library guarding its own calls

    app.finalize()
    with pytest.raises(ConnectionError):
        library.call(_down)
    clock.advance(10)  # the breaker may half-open: one probe
    result = app.tasks["lb.sync"].apply()
    assert result.get() == "synced"  # not rejected by the probe its own task holds
    assert library.state is State.CLOSED


def _down() -> None:
    raise ConnectionError("down")


def test_routes_apply_to_plain_tasks_when_the_app_also_has_breaker_tasks() -> None:
    app = throwaway_app("routes-mixed", breaker_routes={"rm.plain": "rm-routed"})

    @app.task(base=BreakerTask, bind=True, shared=False, name="rm.guarded")
    def guarded(self: Any) -> str:
        return "guarded"

    @app.task(shared=False, name="rm.plain")
    def plain() -> str:
        return "plain"

    app.finalize()
    task = app.tasks["rm.plain"]
    assert isinstance(task, BreakerTask)
    assert task.breaker.name == "rm-routed"


@pytest.mark.parametrize(("scope", "failures_after"), [("run", 1), ("calls", 0)])
def test_breaker_scope_decides_whether_a_run_without_guarded_calls_counts(scope: str, failures_after: int) -> None:
    app = throwaway_app(f"scope-{scope}")

    @app.task(base=BreakerTask, bind=True, shared=False, name=f"scope{scope}.job", breaker_scope=scope)
    def job(self: Any, cached: bool) -> str:
        if cached:
            raise RuntimeError("cache miss handled badly")  # never reached the downstream
        with self.breaker:
            return "fresh"

    app.finalize()
    task = app.tasks[f"scope{scope}.job"]
    assert task.apply(args=(False,)).get() == "fresh"
    assert task.apply(args=(True,)).state == "FAILURE"
    snapshot = task.breaker.snapshot()
    assert (snapshot.successes, snapshot.failures) == (1, failures_after)


def test_a_bad_breaker_scope_is_a_configuration_error() -> None:
    app = throwaway_app("scope-bad")

    @app.task(base=BreakerTask, bind=True, shared=False, name="scopebad.job", breaker_scope="block")
    def job(self: Any) -> None:
        return None

    app.finalize()
    with pytest.raises(ConfigurationError, match=r"breaker_scope must be 'run' or 'calls', got 'block'"):
        check_app(app)


def test_the_task_run_is_current_in_the_body_and_its_handlers_and_left_after_every_ending() -> None:
    app = throwaway_app("run-current", breaker_default_policy={"failure_threshold": 1})
    seen: list[object] = []

    def fallback(fail: bool) -> str:
        seen.append(current_run())  # the failed run's handlers run while it is current
        return "fallback"

    @app.task(base=BreakerTask, bind=True, shared=False, name="rc.job", breaker_fallback=fallback)
    def job(self: Any, fail: bool) -> str:
        run = current_run()
        seen.append(run)
        assert run is not None
        assert self.breaker is run.breaker
        if fail:
            with self.breaker:
                raise ConnectionError("down")  # trips the breaker: the run falls back
        return "ok"

    app.finalize()
    task = app.tasks["rc.job"]
    assert task(False) == "ok"  # called in process
    assert current_run() is None
    assert task.apply(args=(False,)).get() == "ok"  # eager
    assert current_run() is None
    assert task(True) == "fallback"
    assert current_run() is None
    assert seen[-1] is seen[-2]  # the fallback saw the body's run
    assert task.breaker.state is State.OPEN
    assert task(False) == "fallback"  # rejected at admission: no run was made current
    assert seen[-1] is None
    assert current_run() is None
    assert len(seen) == 5


@pytest.mark.parametrize("keyed", [False, True])
def test_self_breaker_stays_the_runs_own_after_the_body_calls_its_own_task_directly(keyed: bool) -> None:
    # (A run that calls its own task directly, on the request it runs on (eager, as a
    # worker's run), makes a nested run. The run was found through an attribute of the
    # request, which the nested run cleared as it ended: after it, self.breaker was the
    # task's key-less breaker, not the run's own; for a per-key task its block counted on
    # the key-less breaker, not the run's.)
    app = throwaway_app(f"run-nested-self-{keyed}", breaker_default_policy={"failure_threshold": 5})
    owners: list[bool] = []
    options: dict[str, Any] = {"breaker_key": (lambda args, kwargs: "t1")} if keyed else {}

    @app.task(base=BreakerTask, bind=True, shared=False, name="rns.job", breaker_scope="calls", **options)
    def job(self: Any, depth: int) -> str:
        if depth:
            assert self(depth - 1) == "ok"  # a direct call: a nested run, on this request
        run = current_run()
        assert run is not None
        own = getattr(self.breaker, "_run", None)  # (the run's own breaker refers to its run)
        owners.append(own is not None and own() is run)
        with self.breaker:
            pass
        return "ok"

    app.finalize()
    task = app.tasks["rns.job"]
    assert task.apply(args=(1,)).get() == "ok"  # eager: on a request of its own, as a worker's run
    assert owners == [True, True]
    # Each run's block counted once, on the run's breaker, and nothing besides (scope
    # "calls"): the inner run's block took the outer run's unclaimed ticket, so the outer's
    # own block is a call of its own: two successes.
    runs_breaker = CircuitBreaker("rns.job", key="t1", storage=task.breaker.store) if keyed else task.breaker
    assert runs_breaker.snapshot().successes == 2
    if keyed:
        assert task.breaker.snapshot().successes == 0  # (the key-less breaker: nothing)


def test_a_class_that_decides_is_guarded_is_asked_on_every_run() -> None:
    app = throwaway_app("guard-override")
    guarded = [True]

    class Switchable(BreakerTask):
        def is_guarded(self) -> bool:
            return guarded[0]

    @app.task(base=Switchable, bind=True, shared=False, name="go.job")
    def job(self: Any) -> bool:
        return current_run() is not None

    app.finalize()
    task = app.tasks["go.job"]
    assert task.apply().get() is True
    assert task.apply().get() is True  # (a stock task keeps its breaker by now)
    guarded[0] = False
    assert task.apply().get() is False  # unguarded from this run on


def test_a_runs_probe_slot_is_leased_for_its_hard_time_limit_where_its_pool_enforces_it() -> None:
    from celery_breaker.breaker import CHECK_LEASE_MARGIN
    from celery_breaker.integration.task import _run_lease
    from celery_breaker.integration.task_limits import TIME_LIMITS_ENFORCED_ATTR

    app = throwaway_app("run-lease")

    @app.task(base=BreakerTask, shared=False, name="rl.job")
    def job() -> None:
        return None

    app.finalize()
    task = app.tasks["rl.job"]

    def lease(**request: Any) -> float | None:
        task.push_request(**{"is_eager": False, "called_directly": False, "timelimit": (None, None), **request})
        try:
            return _run_lease(task)
        finally:
            task.pop_request()

    setattr(app, TIME_LIMITS_ENFORCED_ATTR, True)  # (a prefork worker notes it; a throwaway app has none)
    assert lease(timelimit=(2.0, None)) == 2.0 + CHECK_LEASE_MARGIN  # the message's hard limit
    assert lease() is None  # no limit anywhere: half_open_max_wait
    app.conf.task_time_limit = 3.0
    assert lease() == 3.0 + CHECK_LEASE_MARGIN  # the setting
    assert lease(is_eager=True) is None  # nothing enforces a limit on an eager call
    assert lease(called_directly=True) is None  # ... nor on a direct one
    setattr(app, TIME_LIMITS_ENFORCED_ATTR, False)  # a threads or solo pool
    assert lease(timelimit=(2.0, None)) is None
    assert _run_lease("not a task") is None  # (a run of a program, or another integration's)


def _killed_app(prefork: bool) -> Any:
    app = throwaway_app("killed-at-limit")
    if prefork:
        setattr(app, task_limits.SOFT_TIME_LIMITS_ENFORCED_ATTR, True)  # (as a prefork worker notes it)
    return app


@pytest.mark.parametrize(
    ("prefork", "code", "into_run", "counted"),
    [
        (True, task_module._SIGTERM_EXIT, 9.8, True),  # the pool's SIGTERM at the 10 s limit
        (True, task_module._SIGTERM_EXIT, 8.8, False),  # an operator's terminating revoke, or a cold shutdown
        (True, task_module._SIGTERM_EXIT, 3.0, False),  # the same, early in the run
        (True, 1, 9.9, False),  # the body's own sys.exit(1)
        (False, task_module._SIGTERM_EXIT, 9.9, False),  # a pool that does not kill at the limit
    ],
)
@pytest.mark.parametrize("timed", [True, False], ids=["timed", "untimed"])
def test_only_an_exit_at_the_hard_time_limit_on_prefork_counts_as_a_timeout(
    prefork: bool, code: int, into_run: float, counted: bool, timed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On prefork the pool SIGTERMs a run at its hard time limit, and billiard's handler
    # raises SystemExit(-241) in it: neutral as an exit, so a partner that hung every call
    # never opened its breaker (tests/integration/test_shared_breaker.py shows it on a
    # real worker). Such an exit, within KILLED_SLACK of the limit after the task's call
    # began, is a TimeLimitExceeded now; any other stays what it was. An operator who
    # terminates runs at 88 % of their limit (a deploy's cold shutdown) had them counted
    # as timeouts, and tripped a healthy downstream's breaker. A breaker that does not
    # time its calls (a memory store without a slow-call rule: its run has no start) is
    # judged the same.
    app = _killed_app(prefork)

    @app.task(base=BreakerTask, breaker="killed", time_limit=10, shared=False)
    def job() -> None:
        """A task with a hard time limit."""

    clock = FakeClock()
    monkeypatch.setattr(task_module, "_clock", clock.monotonic)
    slow = {"slow_call_duration": 60.0, "slow_call_rate_threshold": 1.0} if timed else {}
    breaker = CircuitBreaker("killed", slow, storage=fresh_store(), clock=clock)
    job.push_request(called_directly=False)
    task_module._call_began[0] = clock.monotonic()  # (as the task's call does, before its admission)
    run = breaker.enter_run(task_module._translate, True, None, job)
    assert (run.start is not None) is timed
    try:
        clock.advance(into_run)
        exit_ = SystemExit(code)
        seen = task_module._translate(exit_)
    finally:
        run.leave()
        job.pop_request()
    if counted:
        assert isinstance(seen, TimeLimitExceeded)
        assert breaker.policy.classify(seen) is Outcome.FAILURE
    else:
        assert seen is exit_


@pytest.mark.parametrize(("into_run", "failures"), [(9.8, 1), (8.8, 0)])
def test_a_worker_run_ended_by_sigterm_counts_only_near_its_hard_time_limit(
    into_run: float, failures: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The task's own call notes when it began (not the test): a run SIGTERMed within
    # KILLED_SLACK of its 10 s limit is a timeout on its breaker; one an operator ended at
    # 8.8 s is not.
    app = _killed_app(prefork=True)
    clock = FakeClock()
    monkeypatch.setattr(task_module, "_clock", clock.monotonic)

    name = f"sigtermed-{into_run}"  # (the app's memory store outlives the test)

    @app.task(base=BreakerTask, breaker=name, time_limit=10, shared=False)
    def job() -> None:
        clock.advance(into_run)
        raise SystemExit(task_module._SIGTERM_EXIT)  # (what billiard's handler raises)

    job.push_request(called_directly=False)  # (as the worker's tracer does)
    try:
        with pytest.raises(SystemExit):
            job()
    finally:
        job.pop_request()
    found = CircuitBreaker(name, storage=app.conf.breaker_storage_url).snapshot()
    assert found.failures == failures
