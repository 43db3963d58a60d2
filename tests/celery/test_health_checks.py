"""Health-check probes through a real (in-process) worker: during an outage only checks reach the downstream.

The breakers here trip on one failure and half-open after 0.3 s (``support.DEFAULT_POLICY``);
their deferred tasks come back with a countdown (memory broker, memory store), each run
that wins the half-open probe slot runs the health check instead of its body.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, BreakerTask, CircuitBreaker, ConfigurationError, State
from celery_breaker.core import Transition
from celery_breaker.health import Checked, CheckResult, CheckRun, checking
from celery_breaker.integration.inventory import check_app, near_misses
from celery_breaker.integration.probes import breaker_with_probe, resolve_probe
from celery_breaker.integration.settings import build_settings
from celery_breaker.integration.task_options import task_breaker_config

from . import probe_tasks, tasks
from .probe_tasks import CHECKS, check_two
from .support import TIMEOUT, wait_for
from .test_settings import throwaway_app


def get(result: Any) -> Any:
    return result.get(timeout=TIMEOUT, interval=0.02)


def outage_then_recovery(task: Any, name: str, operate: Any, count: int = 5) -> list[Transition]:
    """Trip ``name`` with one failing run, defer ``count`` more while it is down, and let it
    recover: only health checks reach the downstream meanwhile, and every task then runs
    once, none failed and no retry spent. Returns the transitions the worker made."""
    breaker: CircuitBreaker = operate(task.breaker)
    seen: list[Transition] = []
    breaker.add_listener(seen.append)
    tasks.DOWN[name] = True
    tasks.CALLS[name] = 0
    CHECKS[name] = 0
    try:
        first = task.delay(0)
        wait_for(lambda: breaker.state is not State.CLOSED, "the first run to trip the breaker")
        assert tasks.CALLS[name] == 1
        results = [first] + [task.delay(n) for n in range(1, count + 1)]
        wait_for(lambda: CHECKS[name] >= 3, "three failing health checks")
        assert tasks.CALLS[name] == 1  # no real task reached the downstream after the trip
        assert all(result.state in ("PENDING", "RETRY") for result in results)
        assert not any(t.target is State.CLOSED for t in seen)
    finally:
        tasks.DOWN[name] = False
    values = [get(result) for result in results]
    assert [value["value"][0] for value in values] == list(range(count + 1))
    assert all(value["retries"] == 0 for value in values)  # deferred, never retried
    assert all(result.state == "SUCCESS" for result in results)
    assert tasks.CALLS[name] == 1 + count + 1  # the trip, then every task exactly once
    closed = [t for t in seen if t.target is State.CLOSED]
    assert closed
    assert closed[0].reason == "health check succeeded"
    assert [t.reason for t in seen if t.target is State.OPEN][1:] == ["health check failed"] * (len(seen) // 2 - 1)
    return seen


def test_a_task_option_probe_decides_recovery_and_deferred_tasks_run_once(app: Any, operate: Any) -> None:
    outage_then_recovery(probe_tasks.probe_option_task, "t-probe-option", operate)


def test_a_probe_named_in_settings_by_dotted_path(app: Any, operate: Any) -> None:
    outage_then_recovery(probe_tasks.probe_setting_task, "t-probe-setting", operate, count=2)


def test_a_probe_named_in_settings_by_task_name_runs_its_body_in_process(app: Any, operate: Any) -> None:
    breaker = operate(probe_tasks.probe_by_task_task.breaker)
    assert breaker.probe is not None
    assert breaker.probe.name == "task tests.celery.probe_tasks.health"
    tasks.DOWN["t-probe-task"] = True
    CHECKS["t-probe-task"] = 0
    try:
        result = probe_tasks.probe_by_task_task.delay()
        wait_for(lambda: CHECKS["t-probe-task"] >= 1, "a health check by the task's body")
        assert result.state in ("PENDING", "RETRY")
    finally:
        tasks.DOWN["t-probe-task"] = False
    assert get(result)["retries"] == 0


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize("value", [42, "", " padded "])
def test_a_probe_setting_of_the_wrong_shape_names_the_setting_and_the_fix(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"breaker_probes\['crm'\] must be a dotted path"):
        build_settings(throwaway_app("probe-shape", breaker_probes={"crm": value}).conf)


def test_a_probe_timeout_must_be_seconds() -> None:
    with pytest.raises(ConfigurationError, match="breaker_probe_timeout must be a number of seconds > 0"):
        build_settings(throwaway_app("probe-timeout", breaker_probe_timeout=0).conf)


def start_refused(probes: dict[str, str], breaker: str) -> str:
    """The error a worker's start check gives for a task of ``breaker`` under ``breaker_probes=probes``."""
    app = throwaway_app("probe-refused", breaker_probes=probes)

    @app.task(base=BreakerTask, breaker=breaker, shared=False)
    def job() -> None:
        """A task whose breaker's probe cannot be used."""

    with pytest.raises(ConfigurationError) as info:
        check_app(app)
    return str(info.value)


def test_a_probe_that_names_nothing_stops_the_worker_at_start() -> None:
    text = start_refused({"crm*": "no_such_module:check"}, "crm-eu")
    assert "breaker_probes['crm*']='no_such_module:check' names no task of this app and cannot be imported" in text
    assert "write 'package.module:function', or the name of a task of this app" in text


def test_a_probe_of_a_breaker_no_task_uses_is_resolved_at_start_too() -> None:
    # Only the entries of the tasks' breakers were resolved: this worker started, and its
    # releaser met the error at every tick for the tasks parked behind 'legacy-eu' (by an
    # earlier deploy, or another app on the store), which it never released.
    text = start_refused({"legacy-*": "no_such_module:check", "crm": "tests.celery.probe_tasks:check_setting"}, "crm")
    assert "breaker_probes['legacy-*']='no_such_module:check' names no task of this app and cannot be imported" in text


@pytest.mark.parametrize(
    ("probe", "meant"),
    [
        ("ping_partnr", "'ping_partner'"),
        ("tests.celery.probe_tasks.chek_setting", "'tests.celery.probe_tasks:check_setting'"),
    ],
)
def test_a_misspelt_probe_task_name_names_the_task_meant(probe: str, meant: str) -> None:
    # A task name one typo off was refused as "names no task of this app and is no dotted
    # path", with nothing to say which task was meant; the task name of a module's tasks
    # ('tests.celery.probe_tasks.chek_setting') read as a path that has no such attribute.
    app = throwaway_app("probe-typo", breaker_probes={"partner": probe})

    @app.task(name="ping_partner", shared=False)
    def ping_partner() -> None:
        """A task used as a health check."""

    @app.task(base=BreakerTask, breaker="partner", shared=False)
    def job() -> None:
        """A task whose breaker's probe is misspelt."""

    with pytest.raises(ConfigurationError) as info:
        check_app(app)
    text = str(info.value)
    assert f"breaker_probes['partner']={probe!r} names no task of this app" in text
    assert f"(did you mean {meant}?)" in text


def test_a_misspelt_probe_function_names_the_closest_one_of_its_module() -> None:
    text = start_refused({"crm": "tests.celery.probe_tasks:check_settings"}, "crm")
    assert "did you mean 'tests.celery.probe_tasks:check_setting'?" in text


def test_a_task_option_probe_wins_over_the_setting_and_takes_its_timeout() -> None:
    app = throwaway_app(
        "probe-option", breaker_probes={"crm": "tests.celery.probe_tasks:check_setting"}, breaker_probe_timeout=3
    )

    @app.task(base=BreakerTask, breaker="crm", breaker_probe=probe_tasks.check_option, shared=False)
    def job() -> None:
        """A task with its own probe."""

    @app.task(base=BreakerTask, breaker="crm", breaker_probe_timeout=1.5, shared=False)
    def other() -> None:
        """A task with the setting's probe and its own timeout."""

    own = task_breaker_config(job).probe
    assert own is not None
    assert (own.fn, own.timeout) == (probe_tasks.check_option, 3.0)
    setting = task_breaker_config(other).probe
    assert setting is not None
    assert (setting.fn, setting.timeout) == (probe_tasks.check_setting, 1.5)


def test_an_entry_of_none_exempts_a_breaker_from_a_glob_and_false_a_tasks_breaker() -> None:
    # One breaker under a glob's health check could not be left without one: None was
    # refused ("must be a dotted path ..."), the worker did not start, and the task option
    # had no way either (None there means "the setting's").
    app = throwaway_app(
        "probe-exempt",
        breaker_probes={"crm*": "tests.celery.probe_tasks:check_setting", "crm-legacy": None, "old-*": None},
    )

    @app.task(base=BreakerTask, breaker="crm-eu", shared=False)
    def eu() -> None:
        """Checked by the glob's probe."""

    @app.task(base=BreakerTask, breaker="crm-legacy", shared=False)
    def legacy() -> None:
        """Exempted by name: its real tasks are its probes."""

    @app.task(base=BreakerTask, breaker="crm-us", breaker_probe=False, shared=False)
    def us() -> None:
        """Exempted by its own option."""

    @app.task(base=BreakerTask, breaker="old-crm", shared=False)
    def old() -> None:
        """Under a glob of None."""

    check_app(app)  # (the worker starts)
    checked = task_breaker_config(eu).probe
    assert checked is not None
    assert checked.fn is probe_tasks.check_setting
    assert task_breaker_config(legacy).probe is None
    assert task_breaker_config(us).probe is None
    assert task_breaker_config(old).probe is None
    settings = build_settings(app.conf)
    assert settings.probe_for("crm-legacy") is None
    assert settings.probe_for("crm-eu") == ("crm*", "tests.celery.probe_tasks:check_setting")
    assert breaker_with_probe(app, "crm-legacy", None, task_breaker_config(legacy).policy, None).probe is None


def test_an_exemption_one_typo_from_a_breaker_a_glob_checks_is_warned_of() -> None:
    # {"crm*": check, "crm-legcy": None}: the exemption missed, and crm-legacy kept the
    # glob's check, silently (a near miss was warned of only for a breaker with no check
    # at all, for which None changes nothing). A None one typo from a breaker that gets no
    # check anyway is no slip; nor is an exemption from a breaker whose task says its own.
    app = throwaway_app(
        "probe-exempt-typo",
        breaker_probes={
            "crm*": "tests.celery.probe_tasks:check_setting",
            "crm-legcy": None,
            "partnr": None,
            "crm-uss": None,
        },
    )

    @app.task(base=BreakerTask, breaker="crm-legacy", shared=False)
    def legacy() -> None:
        """Meant to be exempted."""

    @app.task(base=BreakerTask, breaker="partner", shared=False)
    def partner() -> None:
        """No check in any case."""

    @app.task(base=BreakerTask, breaker="crm-us", breaker_probe=False, shared=False)
    def us() -> None:
        """Exempted by its own option."""

    slips = near_misses(app, check_app(app))
    assert slips == [
        "breaker_probes['crm-legcy'] is None (no health check) but names no breaker of this app's tasks; did you "
        "mean 'crm-legacy' (the breaker of task 'tests.celery.test_health_checks.legacy')? As it is, breaker "
        "'crm-legacy' gets the health check of breaker_probes['crm*']. Ignore this if 'crm-legcy' is a breaker used "
        "outside tasks"
    ]


def test_tasks_sharing_a_breaker_one_without_a_check_are_told_none_is_a_way() -> None:
    app = throwaway_app("probe-exempt-conflict", breaker_probes={"crm*": "tests.celery.probe_tasks:check_setting"})

    @app.task(base=BreakerTask, breaker="crm-us", breaker_probe=False, shared=False)
    def first() -> None:
        """None for its breaker."""

    @app.task(base=BreakerTask, breaker="crm-us", shared=False)
    def second() -> None:
        """The glob's check."""

    with pytest.raises(ConfigurationError, match=r"breaker_probes\['crm-us'\] \(and breaker_probe_timeout once; None"):
        check_app(app)


def test_a_task_option_probe_timeout_too_short_for_any_check_names_the_task() -> None:
    app = throwaway_app("probe-option-short", breaker_probes={"crm": "tests.celery.probe_tasks:check_setting"})

    @app.task(base=BreakerTask, breaker="crm", breaker_probe_timeout=0.001, shared=False)
    def job() -> None:
        """A check of 1 ms: none would answer, and the breaker would never close."""

    with pytest.raises(
        ConfigurationError, match=r"job.*breaker_probe_timeout must be a number of seconds of at least 0\.01"
    ):
        task_breaker_config(job)


def test_a_half_open_wait_too_short_for_a_health_check_stops_the_worker_at_start() -> None:
    # half_open_max_wait=0.01 s: the check gets a fifth less, 0.008 s, under the 0.01 s no
    # check answers sooner than; every check was cut short, and the breaker never closed.
    app = throwaway_app(
        "probe-wait-short", breaker_probes={"crm": "tests.celery.probe_tasks:check_setting"},
        breaker_policies={"crm": {"half_open_max_wait": 0.01}},
    )  # fmt: skip

    @app.task(base=BreakerTask, breaker="crm", shared=False)
    def job() -> None:
        """A task whose breaker's half-open wait leaves its check no time."""

    with pytest.raises(ConfigurationError) as info:
        task_breaker_config(job)
    text = str(info.value)
    assert "half_open_max_wait=0.01 s leaves its health check" in text
    assert "0.008 s, less than the 0.01 s a check needs; raise half_open_max_wait to 0.0125 s or more" in text


#: A task guarded by the breaker it checks, whose name is not its dotted path.
PATH_APP = throwaway_app("probe-by-path", breaker_probes={"crm-path": f"{__name__}:ping_crm"})


@PATH_APP.task(base=BreakerTask, breaker="crm-path", name="crm.ping", shared=False)
def ping_crm() -> str:
    """The downstream's health endpoint, reached as the breaker's other tasks reach it."""
    return "pong"


def test_a_task_named_by_its_dotted_path_is_checked_by_its_body_not_through_its_breaker() -> None:
    # Imported, the task itself was the check: calling it went through its breaker, the
    # very one it checks, which rejected it while open or half-open. Every check failed
    # and the breaker never closed (its parked tasks were never released).
    probe = task_breaker_config(ping_crm).probe
    assert probe is not None
    breaker = ping_crm.breaker
    breaker.force_open()
    try:
        assert probe.run() == CheckResult(True)
    finally:
        breaker.reset()
    assert probe.name == "task crm.ping"


def test_a_dotted_path_naming_a_health_check_object_is_that_check() -> None:
    # A HealthCheck is accepted in breaker_probes and as the task option, but one named by
    # its dotted path (all a setting read from a file or the environment can give) was
    # refused as "not a callable", and its worker did not start.
    app = throwaway_app("probe-kept", breaker_probes={"kept": "tests.celery.probe_tasks:KEPT_CHECK"})
    for where, value in (("breaker_probes['kept']", "tests.celery.probe_tasks:KEPT_CHECK"),
                         ("breaker_probe", "tests.celery.probe_tasks.KEPT_CHECK")):  # fmt: skip
        assert resolve_probe(app, value, where=where, timeout=10.0) is probe_tasks.KEPT_CHECK

    @app.task(base=BreakerTask, breaker="kept", shared=False, name="kept.job")
    def job() -> None:
        """A task whose breaker's check is the module's HealthCheck, with its own 3 s timeout."""

    probe = task_breaker_config(job).probe
    assert probe is probe_tasks.KEPT_CHECK
    assert probe.timeout == 3.0


def test_a_dotted_path_naming_no_callable_is_refused_saying_what_it_names() -> None:
    app = throwaway_app("probe-not-callable")
    with pytest.raises(ConfigurationError) as info:
        resolve_probe(app, "tests.celery.probe_tasks:SLOW_CHECK_ANSWERS", where="breaker_probe", timeout=10.0)
    assert str(info.value) == (
        "breaker_probe='tests.celery.probe_tasks:SLOW_CHECK_ANSWERS' is a Event, not a callable; "
        "write 'package.module:function', or the name of a task of this app"
    )


def test_a_probe_defined_as_a_method_of_a_task_class_gets_self() -> None:
    # As breaker_key and breaker_fallback methods are. Taken from the class, it was called
    # without self: every check failed (TypeError) and the breaker never closed. (Its own
    # breaker name: a shared task of another test module may use "crm" in this app.)
    app = throwaway_app("probe-method")
    seen: list[str] = []

    class CrmTask(BreakerTask):
        def breaker_probe(self) -> None:
            seen.append(self.name)

    @app.task(base=CrmTask, breaker="crm-method", shared=False, name="pm.sync")
    def sync() -> None:
        """A task checked by its class's method."""

    @app.task(base=CrmTask, breaker="crm-method", shared=False, name="pm.push")
    def push() -> None:
        """Another, sharing the breaker and the method."""

    app.finalize()
    check_app(app)  # one check for their breaker, not two the worker refuses as different
    probe = task_breaker_config(app.tasks["pm.sync"]).probe
    assert probe is not None
    assert probe.run() == CheckResult(True)
    assert seen == ["pm.sync"]
    assert probe.name.endswith("CrmTask.breaker_probe")


@pytest.mark.parametrize("optional", [False, True], ids=["required key", "optional key"])
def test_a_probe_method_that_takes_the_key_is_given_it(optional: bool) -> None:
    # An optional key (``def breaker_probe(self, key=None)``) is passed as ``key=``, which
    # the method's wrapper took by position only: every check failed with a TypeError, the
    # method never ran, and the per-key breaker never closed.
    app = throwaway_app(f"probe-method-key-{optional}")
    seen: list[tuple[str, str | None]] = []

    def with_a_key(self: Any, key: str | None) -> None:
        seen.append((self.name, key))

    def with_an_optional_key(self: Any, key: str | None = None) -> None:
        seen.append((self.name, key))

    class TenantTask(BreakerTask):
        breaker_probe = with_an_optional_key if optional else with_a_key  # (a method of the class)

    @app.task(
        base=TenantTask, breaker="tenant-method", breaker_key=lambda args, kwargs: args[0], shared=False, name="pk.job"
    )
    def job(tenant: str) -> None:
        """A per-key task checked by its class's method, per key."""

    app.finalize()
    check_app(app)
    probe = task_breaker_config(app.tasks["pk.job"]).probe
    assert probe is not None
    assert probe.takes_key
    assert probe.key_by_name is optional
    with checking(Checked(None, "tenant-method", "t-7", CheckRun())):
        assert probe.run() == CheckResult(True)
    assert seen == [("pk.job", "t-7")]
    if optional:
        assert probe.run() == CheckResult(True)  # (outside a breaker: its own default)
        assert seen[-1] == ("pk.job", None)


def test_a_probe_method_that_is_a_generator_stops_the_worker_at_start() -> None:
    # As a generator function given as the probe is: the method's wrapper hid it, the
    # worker started, and every check failed (its body never ran), so the breaker never closed.
    app = throwaway_app("probe-method-generator")

    class CrmTask(BreakerTask):
        def breaker_probe(self) -> Any:
            yield None

    @app.task(base=CrmTask, breaker="crm-gen", shared=False, name="pg.job")
    def job() -> None:
        """A task whose class's probe method has a yield in its body."""

    with pytest.raises(ConfigurationError, match=r"probe .*CrmTask\.breaker_probe is a generator function"):
        check_app(app)


def test_an_async_probe_method_is_awaited_on_the_callers_loop() -> None:
    app = throwaway_app("probe-method-async")
    seen: list[str] = []

    class CrmTask(BreakerTask):
        async def breaker_probe(self) -> None:
            seen.append(self.name)

    @app.task(base=CrmTask, breaker="crm-async", shared=False, name="pa.job")
    def job() -> None:
        """A task checked by its class's coroutine method."""

    app.finalize()
    check_app(app)
    probe = task_breaker_config(app.tasks["pa.job"]).probe
    assert probe is not None
    assert asyncio.run(probe.arun()) == CheckResult(True)
    assert probe.run() == CheckResult(True)
    assert seen == ["pa.job", "pa.job"]


def test_a_url_given_as_a_probe_is_refused_with_its_password_masked() -> None:
    # It names no module: the refusal quoted it whole, password and all.
    url = "https://svc:hunter2@crm.example.com/health"
    text = start_refused({"crm": url}, "crm")
    assert "breaker_probes['crm']='https://svc:***@crm.example.com/health' is a URL, not a health check" in text
    assert "write a function that calls it" in text
    assert "hunter2" not in text
    settings = build_settings(throwaway_app("probe-url-repr", breaker_probes={"crm": url}).conf)
    assert "svc:***@crm.example.com" in repr(settings)
    assert "hunter2" not in repr(settings)


def test_a_probe_that_needs_arguments_stops_the_worker_at_start() -> None:
    # probe_tasks.check_two needs two: the worker started, and every check then failed with
    # a TypeError, so the breaker never closed and its tasks waited for good. (One it may
    # take: the key of the breaker it checks.)
    # The refusal names the setting it came from (it named only the function).
    text = start_refused({"crm": "tests.celery.probe_tasks:check_two"}, "crm")
    assert (
        "breaker_probes['crm']: probe tests.celery.probe_tasks:check_two cannot be called without arguments, "
        "nor with the breaker" in text
    )
    assert "missing a required argument: 'name'" in text


def test_a_task_option_probe_that_needs_arguments_names_the_task_and_the_option() -> None:
    app = throwaway_app("probe-two-arguments")

    @app.task(base=BreakerTask, breaker="crm", breaker_probe=check_two, shared=False)
    def job() -> None:
        """A task whose probe no check can call."""

    with pytest.raises(ConfigurationError) as info:
        check_app(app)
    assert f"task {job.name!r}: breaker_probe: probe tests.celery.probe_tasks:check_two cannot be called" in str(
        info.value
    )


def test_a_task_option_probe_of_the_wrong_type_is_refused() -> None:
    app = throwaway_app("probe-bad-option")

    @app.task(base=BreakerTask, breaker="crm", breaker_probe=42, shared=False)
    def job() -> None:
        """A task with a probe that cannot be one."""

    with pytest.raises(ConfigurationError, match="breaker_probe must be a callable, a HealthCheck, a dotted path, a"):
        check_app(app)


def test_a_soft_time_limit_during_the_check_defers_the_task_it_is_not_lost(app: Any, operate: Any) -> None:
    # The winner of a probe slot runs the check inside its own admission: the task's soft
    # time limit can fire there. It failed, never having run (with acks_late: gone).
    breaker = operate(probe_tasks.probe_soft_limit_task.breaker)
    tasks.DOWN["t-probe-soft-limit"] = True
    tasks.DOWN["t-probe-soft-limit-check"] = True
    CHECKS["t-probe-soft-limit"] = 0
    try:
        with contextlib.suppress(ConnectionError):
            breaker.call(tasks.call_downstream, "t-probe-soft-limit")  # trips the breaker
        assert breaker.state is State.OPEN
        result = probe_tasks.probe_soft_limit_task.delay()
        wait_for(lambda: CHECKS["t-probe-soft-limit"] >= 1, "a check cut by the soft time limit")
        wait_for(lambda: result.state == "RETRY", "the task to be deferred")
        assert breaker.snapshot().probes_in_flight == 0  # no verdict: the slot is free
    finally:
        tasks.DOWN["t-probe-soft-limit"] = False
        tasks.DOWN["t-probe-soft-limit-check"] = False
    assert get(result)["retries"] == 0


@pytest.mark.parametrize("limited", [True, False], ids=["soft time limit", "no time limit"])
def test_a_check_slower_than_the_tasks_soft_time_limit_still_closes_the_breaker(
    app: Any, operate: Any, limited: bool
) -> None:
    # The run stops waiting for the check before its soft time limit (0.5 s) and is
    # deferred; the check goes on in its slot, and the runs that come back meanwhile
    # start no other. Each run's check used to be cut short and its slot freed: the next
    # run began another, and the breaker never closed. Where no time limit is enforced
    # (this worker's pool), the run waits ADMISSION_CHECK_WAIT (1 s): it waited for the
    # check's whole timeout (30 s here), holding its pool process meanwhile.
    from celery_breaker.integration.task_limits import SOFT_TIME_LIMITS_ENFORCED_ATTR, TIME_LIMITS_ENFORCED_ATTR

    name = "t-probe-slow"
    task = probe_tasks.probe_slow_check_task
    breaker = operate(task.breaker)
    probe_tasks.SLOW_CHECK_ANSWERS.clear()
    tasks.DOWN[name] = True
    CHECKS[name] = tasks.CALLS[name] = 0
    setattr(app, TIME_LIMITS_ENFORCED_ATTR, limited)  # (as a prefork worker; this pool enforces none)
    setattr(app, SOFT_TIME_LIMITS_ENFORCED_ATTR, limited)
    try:
        with contextlib.suppress(ConnectionError):
            breaker.call(tasks.call_downstream, name)  # trips the breaker
        tasks.DOWN[name] = False  # (recovered; its health check is slow to say so)
        result = task.delay()
        wait_for(lambda: CHECKS[name] == 1 and result.state == "RETRY", "the run to stop waiting for the check")
        rejected = breaker.snapshot().rejections
        wait_for(lambda: breaker.snapshot().rejections >= rejected + 2, "the task to come back, twice")
        assert CHECKS[name] == 1  # they waited for the one check under way
        assert tasks.CALLS[name] == 1  # (the trip)
    finally:
        probe_tasks.SLOW_CHECK_ANSWERS.set()
        setattr(app, TIME_LIMITS_ENFORCED_ATTR, False)
        setattr(app, SOFT_TIME_LIMITS_ENFORCED_ATTR, False)
    value = get(result)
    assert (value["retries"], CHECKS[name], tasks.CALLS[name]) == (0, 1, 2)  # closed by that check alone


def test_a_check_run_by_a_call_in_a_tasks_body_is_waited_for_as_at_its_admission(app: Any, operate: Any) -> None:
    # A client library's breaker with a check of its own, called in the body: the run
    # waited for its check's whole timeout (30 s here), holding its pool process, where
    # the task's own breaker would have waited ADMISSION_CHECK_WAIT (1 s). Now the call
    # is rejected after that second, the task deferred, and the check goes on in its slot.
    name = "t-body-client"
    client = operate(probe_tasks.BODY_CLIENT)
    probe_tasks.CLIENT_CHECK_ANSWERS.clear()
    tasks.DOWN[name] = True
    CHECKS[name] = tasks.CALLS[name] = 0
    try:
        with contextlib.suppress(ConnectionError):
            client.call(tasks.call_downstream, name)  # trips the client's breaker
        tasks.DOWN[name] = False  # (recovered; its health check is slow to say so)
        result = probe_tasks.body_client_task.delay()
        wait_for(lambda: CHECKS[name] == 1, "the body's call to start the client's check")
        rejected = client.snapshot().rejections  # (the task may have met the client open before)
        wait_for(lambda: client.snapshot().rejections > rejected, "the body to stop waiting for the check")
        wait_for(lambda: result.state == "RETRY", "the task to be deferred")
        assert client.snapshot().probes_in_flight == 1  # the check goes on in its slot
        assert tasks.CALLS[name] == 1  # (the trip)
    finally:
        probe_tasks.CLIENT_CHECK_ANSWERS.set()
    value = get(result)
    assert (value["retries"], CHECKS[name], tasks.CALLS[name]) == (0, 1, 2)  # closed by that check alone
    assert client.state is State.CLOSED


def test_a_check_whose_error_cannot_be_shown_defers_the_task_it_does_not_fail_it(app: Any, operate: Any) -> None:
    # The check's error was rendered for the log before the reopening was announced, and
    # the RuntimeError its __str__ raised failed the task at its admission.
    name = "t-probe-unprintable"
    breaker = operate(probe_tasks.probe_unprintable_task.breaker)
    tasks.DOWN[name] = True
    CHECKS[name] = tasks.CALLS[name] = 0
    try:
        with contextlib.suppress(ConnectionError):
            breaker.call(tasks.call_downstream, name)  # trips the breaker
        assert breaker.state is State.OPEN
        result = probe_tasks.probe_unprintable_task.delay()
        wait_for(lambda: CHECKS[name] >= 1, "a failing health check")
        wait_for(lambda: result.state != "PENDING", "the task to be deferred")
        assert result.state == "RETRY"
        assert tasks.CALLS[name] == 1  # only the trip reached the downstream
    finally:
        tasks.DOWN[name] = False
    assert get(result)["retries"] == 0
    assert tasks.CALLS[name] == 2


def test_a_check_run_at_a_tasks_admission_is_waited_for_within_its_time_limits(app: Any) -> None:
    # (ADMISSION_CHECK_WAIT, 1 s, bounds it too: the limits here are below 1 / 0.8 s.)
    from celery_breaker.integration.deferral.plan import WORKER_SOFT_TIME_LIMIT_ATTR, WORKER_TIME_LIMIT_ATTR
    from celery_breaker.integration.task_limits import (
        ADMISSION_CHECK_WAIT,
        CHECK_SHARE_OF_TIME_LIMIT,
        SOFT_TIME_LIMITS_ENFORCED_ATTR,
        TIME_LIMITS_ENFORCED_ATTR,
        check_within,
    )

    task = probe_tasks.probe_option_task
    share = CHECK_SHARE_OF_TIME_LIMIT

    class Request:
        timelimit: Any = (None, None)
        is_eager = called_directly = False

    request = Request()
    setattr(app, TIME_LIMITS_ENFORCED_ATTR, True)  # (a prefork worker; the session worker's pool has none)
    setattr(app, SOFT_TIME_LIMITS_ENFORCED_ATTR, True)
    assert check_within(task, request) == ADMISSION_CHECK_WAIT  # no limit anywhere
    assert check_within(task, request, 2) == 2 * ADMISSION_CHECK_WAIT  # (a second each check closing needs)
    request.timelimit = (1.2, None)
    assert check_within(task, request) == 1.2 * share  # the message's hard limit
    request.timelimit = (1.2, 0.6)
    assert check_within(task, request) == 0.6 * share  # its soft limit, sooner
    request.timelimit = (30, None)
    assert check_within(task, request) == ADMISSION_CHECK_WAIT  # (a limit far off: the admission's own)
    request.timelimit = (None, None)
    app.conf.task_time_limit = 1.1
    try:
        assert check_within(task, request) == 1.1 * share  # the setting
        app.conf.task_time_limit = 10**400  # no float holds it: no limit, not an OverflowError
        assert check_within(task, request) == ADMISSION_CHECK_WAIT
        app.conf.task_time_limit = 1.1
        setattr(app, WORKER_TIME_LIMIT_ATTR, 1.0)  # celery worker --time-limit 1 (BreakerStep notes it)
        assert check_within(task, request) == 1.0 * share
        app.conf.task_soft_time_limit = 1.05  # (later than the hard limit: the hard one counts)
        assert check_within(task, request) == 1.0 * share
        setattr(app, WORKER_SOFT_TIME_LIMIT_ATTR, 0.5)  # --soft-time-limit 0.5
        assert check_within(task, request) == 0.5 * share
        setattr(app, SOFT_TIME_LIMITS_ENFORCED_ATTR, False)  # gevent: only the hard limit is enforced
        assert check_within(task, request) == 1.0 * share
        setattr(app, SOFT_TIME_LIMITS_ENFORCED_ATTR, True)
        request.is_eager = True  # nothing enforces a limit on an eager (or a direct) call
        assert check_within(task, request) is None
        request.is_eager = False
        setattr(app, TIME_LIMITS_ENFORCED_ATTR, False)  # a threads or solo pool: no limit is enforced
        assert check_within(task, request) == ADMISSION_CHECK_WAIT  # (it held a thread the check's timeout)
    finally:
        app.conf.task_time_limit = app.conf.task_soft_time_limit = None
        setattr(app, WORKER_TIME_LIMIT_ATTR, None)
        setattr(app, WORKER_SOFT_TIME_LIMIT_ATTR, None)
        setattr(app, TIME_LIMITS_ENFORCED_ATTR, False)
        setattr(app, SOFT_TIME_LIMITS_ENFORCED_ATTR, False)


@pytest.mark.parametrize(
    ("module", "hard", "soft"),
    [
        ("celery.concurrency.prefork", True, True),
        ("celery.concurrency.asynpool", True, True),
        ("celery.concurrency.gevent", True, False),  # (its on_apply drops the soft limit)
        ("celery.concurrency.eventlet", False, False),  # (its on_apply takes no timeout at all)
        ("celery.concurrency.thread", False, False),
        ("celery.concurrency.solo", False, False),
    ],
)
def test_which_pools_enforce_which_time_limits(module: str, hard: bool, soft: bool) -> None:
    from types import SimpleNamespace

    from celery_breaker.integration.worker import _pool_enforces_time_limits

    pool = type("TaskPool", (), {"__module__": module})
    worker = SimpleNamespace(pool_cls=pool)
    assert (_pool_enforces_time_limits(worker), _pool_enforces_time_limits(worker, soft=True)) == (hard, soft)


@pytest.mark.parametrize(
    ("source", "error"), [("1 / 0\n", "ZeroDivisionError: division by zero"), ("def (:\n", "SyntaxError")]
)
def test_a_probe_module_that_fails_as_it_is_imported_names_the_setting_and_the_fix(
    source: str, error: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only ImportError and AttributeError were caught: a module that raised anything else
    # as it was imported stopped the worker with a bare traceback naming no setting.
    (tmp_path / "failing_probe_module.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "failing_probe_module", raising=False)
    text = start_refused({"crm": "failing_probe_module:check"}, "crm")
    assert "breaker_probes['crm']='failing_probe_module:check': importing 'failing_probe_module' failed" in text
    assert error in text
    assert "fix that module, or name another check" in text


@pytest.mark.parametrize("given", ["the decorator's proxy", "the registered task"])
def test_a_probe_given_as_a_task_object_runs_its_body_not_through_its_breaker(given: str) -> None:
    # Called as a callable, the task went through its own breaker (a BreakerTask on the
    # breaker it checks, or a plain task breaker_routes puts under it), whose half-open
    # slot the check itself held: every check was rejected, and the breaker never closed.
    policy = {"failure_threshold": 1, "reset_timeout": 0.05, "half_open_max_calls": 1, "success_threshold": 1}
    app = throwaway_app("probe-object", breaker_default_policy=policy)
    pings: list[int] = []

    @app.task(base=BreakerTask, breaker="payments", shared=False, name="po.ping")
    def ping() -> None:
        pings.append(1)

    app.finalize()
    probe = resolve_probe(
        app, ping if given == "the decorator's proxy" else app.tasks["po.ping"], where="breaker_probes['payments']",
        timeout=5,
    )  # fmt: skip
    assert probe.name == "task po.ping"
    breaker = breaker_with_probe(app, "payments", None, BreakerPolicy.coerce(policy), probe)

    def down() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        breaker.call(down)  # the trip
    wait_for(lambda: breaker.check_health().state is State.CLOSED, "the check to close the breaker")
    assert pings == [1]  # the body ran once, as the check


def test_a_per_key_breakers_task_probe_guards_its_body_with_the_key_it_checks() -> None:
    # The check's body, a BreakerTask of the breaker it checks, guards its call with
    # ``self.breaker``: outside a run that was the key-less breaker, not the tenant's. An
    # acceptance run (5 tenants down, real prefork workers): the tenants' failing checks
    # tripped a key-less ``acc`` no task used, which then ran checks of its own (key None)
    # and failed every tenant's check with its CircuitOpenError until it closed itself.
    policy = {"failure_threshold": 1, "reset_timeout": 0.05, "half_open_max_calls": 1, "success_threshold": 1}
    app = throwaway_app("probe-per-key", breaker_default_policy=policy)
    pings: list[str | None] = []

    @app.task(
        base=BreakerTask, bind=True, breaker="tenants", shared=False, name="pk.ping",
        breaker_key=lambda args, kwargs: kwargs.get("key") or args[0],
    )  # fmt: skip
    def ping(self: Any, key: str | None = None) -> None:
        with self.breaker:
            pings.append(key)

    app.finalize()
    probe = resolve_probe(app, "pk.ping", where="breaker_probes['tenants']", timeout=5)
    tenant = breaker_with_probe(app, "tenants", "t-1", BreakerPolicy.coerce(policy), probe)
    keyless = breaker_with_probe(app, "tenants", None, BreakerPolicy.coerce(policy), probe)
    keyless.force_open()  # (as the other tenants' failing checks left it)

    def down() -> None:
        raise ConnectionError("down")

    try:
        with pytest.raises(ConnectionError):
            tenant.call(down)  # the trip
        wait_for(lambda: tenant.check_health().state is State.CLOSED, "the check to close the tenant's breaker")
    finally:
        keyless.reset()
    assert pings == ["t-1"]  # the body ran once, as the tenant's check, on the tenant's breaker
