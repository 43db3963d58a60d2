"""Settings on throwaway apps: validation, Django's namespace, worker-start checks, ``task_cls``.

Throwaway apps are made with ``set_as_current=False`` so the session app stays current.
No test here starts a worker thread: ``start_worker`` is only used where the bad setting
stops the worker in its constructor, before any thread exists (a second worker thread
stopping would also stop the session worker, through Celery's global ``should_terminate``).
"""

from __future__ import annotations

import logging
import math
import ssl
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, Task
from celery.concurrency.solo import TaskPool as SoloPool
from celery.contrib.testing.worker import TestWorkController, start_worker

from celery_breaker import BreakerTask, CircuitOpenError, ConfigurationError, State, install
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.core.pacing import START_RATE
from celery_breaker.health import HealthCheck
from celery_breaker.integration import events
from celery_breaker.integration.deferral.backlog import WorkerBacklog
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.integration.inventory import check_app, near_misses
from celery_breaker.integration.settings import build_settings, get_settings, reload_settings
from celery_breaker.integration.task_options import task_breaker_config
from celery_breaker.integration.worker import BreakerStep, ReleaserStep
from celery_breaker.storage import store_from_url


def throwaway_app(name: str, **settings: Any) -> Any:
    app = Celery(name, set_as_current=False, broker="memory://", backend="cache+memory://")
    app.conf.update(
        task_default_queue=f"{name}-queue",  # the memory transport is process-global
        worker_hijack_root_logger=False,
        **settings,
    )
    return app


def start_and_stop(app: Any) -> None:
    with start_worker(app, perform_ping_check=False, shutdown_timeout=10):
        pass


# -- every bad value names the setting and the value ---------------------------

#: (setting, bad value, what the message must say besides the setting's name).
BAD_VALUES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("breaker_storage_url", 42, ("got 42",)),
    ("breaker_storage_url", "localhost:6379", ("got 'localhost:6379'",)),
    ("breaker_key_prefix", "", ("got ''",)),
    ("breaker_key_prefix", "{app}", ("got '{app}'",)),
    # (a byte that is not UTF-8, as an environment variable gives it: was an UnicodeEncodeError)
    ("breaker_key_prefix", "app\udcff", ("'app\\udcff' holds '\\udcff': a byte that is not UTF-8",)),
    ("breaker_default_policy", "fast", ("got 'fast'",)),
    ("breaker_default_policy", {"failure_threshold": -3}, ("failure_threshold", "got -3")),
    ("breaker_default_policy", {"failure_treshold": 3}, ("'failure_treshold'",)),
    ("breaker_default_policy", {"success_threshold": 5, "half_open_max_calls": 2}, ("success_threshold (5)",)),
    ("breaker_policies", ["crm"], ("got list ['crm']",)),
    ("breaker_policies", {"crm": {"reset_timeout": -1}}, ("breaker_policies['crm']", "reset_timeout", "got -1")),
    ("breaker_policies", {"": {"reset_timeout": 1}}, ("got ''",)),
    (
        "breaker_policies",
        {"crm": {"record_exceptions": ["socket:no_such_error"]}},
        ("breaker_policies['crm']", "record_exceptions", "'socket:no_such_error'", "write 'package.module:Exc"),
    ),
    ("breaker_routes", "proj.*", ("'proj.*'",)),
    ("breaker_routes", {"proj.*": 5}, ("breaker_routes['proj.*']", "got 5")),
    ("breaker_routes", {"proj.*": ""}, ("breaker_routes['proj.*']", "got ''")),
    ("breaker_max_deferrals", -1, ("got -1",)),
    ("breaker_max_deferrals", 2.5, ("got 2.5",)),
    ("breaker_max_deferrals", "3", ("got '3'",)),
    ("breaker_max_deferrals", True, ("got True",)),
    ("breaker_max_defer_age", 0, ("got 0",)),
    ("breaker_max_defer_age", -5, ("got -5",)),
    ("breaker_max_defer_age", "1h", ("got '1h'",)),
    ("breaker_max_defer_age", math.inf, ("got inf",)),
    ("breaker_defer_spread", -0.5, ("seconds >= 0", "got -0.5")),  # (0 is allowed: it said "> 0")
    ("breaker_release_ramp", -1, ("seconds >= 0", "got -1")),
    ("breaker_defer_spread", "wide", ("got 'wide'",)),
    ("breaker_on_storage_error", "explode", ("got 'explode'",)),
    ("breaker_send_events", "yes", ("got 'yes'",)),
    # A whole number too large for a float (was a bare OverflowError, naming nothing).
    ("breaker_max_defer_age", 10**400, ("got 10000",)),
    ("breaker_defer_spread", 10**400, ("got 10000",)),
    ("breaker_consumer_timeout", 10**400, ("got 10000",)),
    ("breaker_release_rate", 10**400, ("got 10000",)),
    ("breaker_release_ramp", 10**400, ("got 10000",)),
    # Past the ceilings (1e300 s passed, then failed every record_metrics on Redis).
    ("breaker_metrics_ttl", 1e300, ("at most 315360000", "got 1e+300")),
    ("breaker_max_defer_age", 4e8, ("at most 315360000", "got 400000000.0")),
    ("breaker_probe_timeout", 4e8, ("at most 315360000",)),
    ("breaker_max_deferrals", 10**7, ("from 0 to 1,000,000", "got 10000000")),
    ("breaker_release_rate", 1e7, ("to 1,000,000", "got 10000000.0")),
    # Below the floors (accepted, they stopped the release, or failed every check, silently).
    ("breaker_release_rate", 1e-300, ("from 1/3600 (one an hour)", "got 1e-300", "celery breaker open")),
    ("breaker_probe_timeout", 1e-300, ("at least 0.01", "got 1e-300")),
]


@pytest.mark.parametrize(("setting", "value", "fragments"), BAD_VALUES)
def test_bad_setting_value_raises_configuration_error_naming_setting_and_value(
    setting: str, value: Any, fragments: tuple[str, ...]
) -> None:
    app = throwaway_app("bad-value", **{setting: value})
    with pytest.raises(ConfigurationError) as info:
        build_settings(app.conf)
    message = str(info.value)
    assert setting in message
    for fragment in fragments:
        assert fragment in message
    with pytest.raises(ConfigurationError, match=setting):
        get_settings(app)  # the cached accessor validates the same way


def test_unknown_breaker_setting_is_reported_with_a_suggestion() -> None:
    app = throwaway_app("typo", breaker_max_deferals=3)
    with pytest.raises(ConfigurationError, match="breaker_max_deferals") as info:
        build_settings(app.conf)
    assert "did you mean breaker_max_deferrals?" in str(info.value)


def test_valid_settings_resolve_to_the_users_values() -> None:
    app = throwaway_app(
        "valid",
        breaker_max_deferrals=0,
        breaker_max_defer_age=90,
        breaker_defer_spread=0,
        breaker_release_ramp=timedelta(0),  # (refused, as "seconds >= 0": 0 was, its timedelta was not)
        breaker_default_policy={"failure_threshold": 4},
        breaker_policies={"crm*": {"reset_timeout": 5}, "crm": {"failure_threshold": 2}},
        breaker_routes={"proj.*": True},
    )
    settings = build_settings(app.conf)
    assert settings.max_deferrals == 0
    assert settings.max_defer_age == 90.0
    assert settings.defer_spread == 0.0
    assert settings.release_ramp == 0.0
    assert settings.policy_for("crm").failure_threshold == 2
    assert settings.policy_for("crm").reset_timeout == 5.0  # the glob, then the exact name
    assert settings.policy_for("crm-eu").failure_threshold == 4
    assert settings.route_for("proj.sync") == ""  # True: the task's own name


# -- Django's CELERY_ namespace, and no shadowing by plugin defaults ------------


class DjangoSettings:
    CELERY_BROKER_URL = "memory://"
    CELERY_BREAKER_MAX_DEFERRALS = 3
    CELERY_BREAKER_KEY_PREFIX = "mine"
    CELERY_BREAKER_DEFAULT_POLICY = {"failure_threshold": 7}


def test_django_namespace_settings_resolve_and_are_not_shadowed() -> None:
    app = Celery("django-style", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    install(app)

    @app.task(base=BreakerTask, bind=True, shared=False, name="django.job")
    def job(self: Any) -> None:
        return None

    app.finalize()  # binds the BreakerTask: nothing it does may shadow the user's values
    settings = reload_settings(app)
    assert settings.max_deferrals == 3
    assert settings.key_prefix == "mine"
    assert settings.default_policy.failure_threshold == 7
    assert task_breaker_config(app.tasks["django.job"]).policy.failure_threshold == 7
    assert app.conf.get("breaker_max_deferrals") == 3


class PlainSettings:
    breaker_max_deferrals = 7
    breaker_key_prefix = "theirs"


def test_plain_settings_object_is_not_shadowed_by_plugin_defaults() -> None:
    app = Celery("plain-style", set_as_current=False)
    app.config_from_object(PlainSettings)
    install(app)

    @app.task(base=BreakerTask, bind=True, shared=False, name="plain.job")
    def job(self: Any) -> None:
        return None

    app.finalize()
    settings = reload_settings(app)
    assert settings.max_deferrals == 7
    assert settings.key_prefix == "theirs"
    assert app.conf.breaker_max_deferrals == 7


class DjangoSettingsWithTypo:
    CELERY_BROKER_URL = "memory://"
    CELERY_BREAKER_TYPO = 1


def test_unknown_django_namespace_setting_is_reported() -> None:
    app = Celery("django-typo", set_as_current=False)
    app.config_from_object(DjangoSettingsWithTypo, namespace="CELERY")
    with pytest.raises(ConfigurationError, match="CELERY_BREAKER_TYPO"):
        build_settings(app.conf)


class DjangoSettingsWithCloseTypo:
    CELERY_BROKER_URL = "memory://"
    CELERY_BREAKER_DEFAULT_POLCY = {"failure_threshold": 3}


class DjangoSettingsWithPluralTypo:
    # ``CELERY_BREAKERS_STORAGE_URL`` did not start with ``breaker_``: it was ignored, and
    # every worker kept its breakers in its own memory, shared with no other.
    CELERY_BROKER_URL = "memory://"
    CELERY_BREAKERS_STORAGE_URL = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize(
    ("django", "hint"),
    [
        (DjangoSettingsWithCloseTypo, "CELERY_BREAKER_DEFAULT_POLCY: did you mean CELERY_BREAKER_DEFAULT_POLICY?"),
        (DjangoSettingsWithPluralTypo, "CELERY_BREAKERS_STORAGE_URL: did you mean CELERY_BREAKER_STORAGE_URL?"),
    ],
)
def test_a_django_spelt_typo_gets_a_django_spelt_suggestion(django: type, hint: str) -> None:
    app = Celery("django-close-typo", set_as_current=False)
    app.config_from_object(django, namespace="CELERY")
    with pytest.raises(ConfigurationError) as info:
        build_settings(app.conf)
    assert hint in str(info.value)


def test_a_plural_breakers_setting_is_reported_not_ignored() -> None:
    app = throwaway_app("plural", breakers_default_policy={"failure_threshold": 2})
    with pytest.raises(ConfigurationError, match="breakers_default_policy: did you mean breaker_default_policy"):
        build_settings(app.conf)


def test_an_uppercase_setting_without_a_namespace_is_reported_not_ignored() -> None:
    # Celery reads lowercase names (no namespace): BREAKER_DEFAULT_POLICY was ignored
    # silently, its invalid value never checked, and a typo's hint recommended it.
    app = throwaway_app("upper", BREAKER_DEFAULT_POLICY={"failure_threshold": 0}, BREAKER_DEFAULTPOLCY=1)
    with pytest.raises(ConfigurationError) as info:
        build_settings(app.conf)
    message = str(info.value)
    assert "BREAKER_DEFAULT_POLICY is not read (Celery reads this setting as breaker_default_policy)" in message
    assert "BREAKER_DEFAULTPOLCY: did you mean breaker_default_policy?" in message


class DjangoSettingsLoadedWithoutTheNamespace:
    broker_url = "memory://"
    CELERY_BREAKER_PARK = False  # (read only under namespace="CELERY", which this load lacks)
    CELERY_BREAKER_PARKK = True


def test_our_setting_behind_djangos_namespace_in_a_config_loaded_without_it_is_reported() -> None:
    # config_from_object(settings) without namespace="CELERY": CELERY_BREAKER_PARK=False
    # was ignored without a word, and tasks were parked as by default.
    app = Celery("no-namespace", set_as_current=False)
    app.config_from_object(DjangoSettingsLoadedWithoutTheNamespace)
    with pytest.raises(ConfigurationError) as info:
        build_settings(app.conf)
    message = str(info.value)
    assert (
        "CELERY_BREAKER_PARK is not read (Celery reads this setting as breaker_park, or as CELERY_BREAKER_PARK "
        "under namespace='CELERY'): rename it"
    ) in message
    assert "unknown celery-breaker setting(s): CELERY_BREAKER_PARKK" in message


def test_our_setting_behind_djangos_namespace_in_a_config_loaded_under_another_is_reported() -> None:
    # namespace="WORKER" reads WORKER_BREAKER_PARK: CELERY_BREAKER_PARK was ignored silently.
    app = Celery("other-namespace", set_as_current=False)
    app.config_from_object(DjangoSettingsLoadedWithoutTheNamespace, namespace="WORKER")
    with pytest.raises(ConfigurationError) as info:
        build_settings(app.conf)
    message = str(info.value)
    assert (
        "CELERY_BREAKER_PARK is not read (Celery reads this setting as WORKER_BREAKER_PARK, or as "
        "CELERY_BREAKER_PARK under namespace='CELERY'): rename it"
    ) in message
    assert "unknown celery-breaker setting(s): CELERY_BREAKER_PARKK" in message


class DjangoSettingsSpeltWithoutTheNamespace:
    CELERY_BROKER_URL = "memory://"
    BREAKER_PARK = False  # (Django's settings are uppercase: Celery reads CELERY_BREAKER_PARK)
    celery_breaker_send_events = True
    breaker_release_ramp = 3.0  # (read: a name Celery knows without the namespace)


def test_a_django_setting_celery_does_not_read_is_reported() -> None:
    app = Celery("django-unread", set_as_current=False)
    app.config_from_object(DjangoSettingsSpeltWithoutTheNamespace, namespace="CELERY")
    with pytest.raises(ConfigurationError) as info:
        build_settings(app.conf)
    message = str(info.value)
    assert "BREAKER_PARK is not read (Celery reads this setting as CELERY_BREAKER_PARK)" in message
    assert "celery_breaker_send_events is not read (Celery reads this setting as CELERY_BREAKER_SEND_EVENTS)" in message
    assert "breaker_release_ramp" not in message


class DjangoSettingsWithBadValue:
    CELERY_BROKER_URL = "memory://"
    CELERY_BREAKER_MAX_DEFERRALS = -2


def test_bad_django_namespace_value_is_reported_as_it_is_written() -> None:
    # (named breaker_max_deferrals, it was not found by a search of settings.py)
    app = Celery("django-bad", set_as_current=False)
    app.config_from_object(DjangoSettingsWithBadValue, namespace="CELERY")
    with pytest.raises(ConfigurationError, match=r"^CELERY_BREAKER_MAX_DEFERRALS .*got -2") as info:
        build_settings(app.conf)
    assert "breaker_max_deferrals" not in str(info.value)
    plain = throwaway_app("plain-bad", breaker_max_deferrals=-2)  # (Celery's own spelling: kept)
    with pytest.raises(ConfigurationError, match=r"^breaker_max_deferrals .*got -2"):
        build_settings(plain.conf)


# -- worker start ----------------------------------------------------------------


@pytest.mark.usefixtures("restore_worker_globals")
def test_worker_with_a_bad_breaker_setting_refuses_to_start_before_any_task_runs() -> None:
    app = throwaway_app("bad-worker", breaker_max_deferrals=-1)
    ran: list[int] = []

    @app.task(base=BreakerTask, bind=True, shared=False, name="bad_worker.job")
    def job(self: Any) -> None:
        ran.append(1)

    job.delay()  # waiting in the queue when the worker starts
    with pytest.raises(ConfigurationError, match=r"breaker_max_deferrals .*got -1"):
        start_and_stop(app)
    assert ran == []


@pytest.mark.usefixtures("restore_worker_globals")
def test_worker_with_an_unknown_breaker_setting_refuses_to_start() -> None:
    app = throwaway_app("typo-worker", breaker_max_defer_agee=5)

    @app.task(base=BreakerTask, bind=True, shared=False, name="typo_worker.job")
    def job(self: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="breaker_max_defer_agee"):
        start_and_stop(app)


@pytest.mark.usefixtures("restore_worker_globals")
def test_worker_refuses_breaker_options_on_a_plain_task() -> None:
    """``@app.task(breaker="payments", autoretry_for=...)`` without ``base=BreakerTask``
    started a worker without a word: no breaker guarded the task, and an outage spent
    every retry on the downstream."""
    app = throwaway_app("plain-options")

    @app.task(bind=True, shared=False, name="plain_options.charge", breaker="payments", max_retries=3)
    def charge(self: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"'plain_options.charge' is given breaker='payments'.*base=Breaker"):
        start_and_stop(app)


class AuditedTask(Task):  # type: ignore[misc]
    """A project's own task base, which tasks keep when they are put under a breaker."""


def test_breaker_options_on_a_task_of_another_base_name_the_class_that_keeps_both() -> None:
    # "give it base=BreakerTask" would drop the task's own base (its auditing, its
    # retries): the fix is a class deriving from both, or a route, which keeps it.
    app = throwaway_app("other-base")

    @app.task(base=AuditedTask, shared=False, name="other_base.refund", breaker="payments")
    def refund() -> None:
        return None

    with pytest.raises(ConfigurationError) as refused:
        check_app(app)
    message = str(refused.value)
    assert "'other_base.refund' is given breaker='payments'" in message
    assert "its base AuditedTask is not a BreakerTask" in message
    assert "class AuditedBreakerTask(AuditedTask, BreakerTask)" in message
    assert "base=AuditedBreakerTask" in message
    assert "breaker_routes" in message


def test_a_breaker_task_whose_function_takes_self_unbound_is_refused_naming_bind() -> None:
    # Without bind=True Celery passes the task's first argument as ``self``: every call
    # failed with "charge() missing 1 required positional argument", naming no fix.
    app = throwaway_app("unbound-self")

    @app.task(base=BreakerTask, shared=False, name="unbound_self.charge", breaker="payments")
    def charge(self: Any, order_id: int) -> int:
        with self.breaker:
            return order_id

    @app.task(base=BreakerTask, bind=True, shared=False, name="unbound_self.bound", breaker="payments")
    def bound(self: Any, order_id: int) -> int:
        return order_id

    with pytest.raises(ConfigurationError) as refused:
        check_app(app)
    message = str(refused.value)
    assert "task 'unbound_self.charge'" in message
    assert "bind=True" in message
    assert "unbound_self.bound" not in message


def test_breaker_options_a_plain_task_gets_from_annotations_or_routes_are_accepted() -> None:
    app = throwaway_app(
        "plain-options-ok",
        task_annotations={"*": {"breaker_max_deferrals": 3}},  # reaches plain tasks too
        breaker_routes={"plain_options_ok.routed": "routed"},
    )

    @app.task(shared=False, name="plain_options_ok.annotated")
    def annotated() -> None:
        return None

    @app.task(shared=False, name="plain_options_ok.routed", breaker_max_deferrals=2)
    def routed() -> None:
        return None

    app.finalize()
    assert check_app(app)["routed"] == ["plain_options_ok.routed"]  # and no refusal


class RunsTheBody(Task):  # type: ignore[misc]
    """An app's task class whose ``__call__`` runs the body itself, as many projects' do."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)


class ChainsTheCall(Task):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


@pytest.mark.usefixtures("restore_worker_globals")
def test_worker_refuses_a_routed_task_whose_task_class_never_reaches_the_breaker() -> None:
    """``breaker_routes`` puts BreakerTask after the app's task class: one whose
    ``__call__`` runs ``self.run`` itself never reached BreakerTask's, and the routed task
    ran while its breaker was forced open, the worker logging it as guarded."""
    app = Celery("bypass", set_as_current=False, broker="memory://", task_cls=RunsTheBody)
    app.conf.update(task_default_queue="bypass-queue", breaker_routes={"bypass.*": "smtp"})

    @app.task(shared=False, name="bypass.send")
    def send() -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"'bypass.send': .*RunsTheBody.__call__ does not call super"):
        start_and_stop(app)


def test_a_task_class_whose_call_chains_to_the_breaker_is_accepted() -> None:
    app = Celery("chains", set_as_current=False, broker="memory://", task_cls=ChainsTheCall)
    app.conf.update(breaker_routes={"chains.*": "smtp"}, breaker_storage_url="memory://celery-tests-chains")
    install(app)

    @app.task(shared=False, name="chains.send")
    def send() -> None:
        return None

    app.finalize()
    assert check_app(app)["smtp"] == ["chains.send"]
    send.breaker.force_open()
    try:
        with pytest.raises(CircuitOpenError):
            send()
    finally:
        send.breaker.reset()


def two_tasks_sharing_a_breaker(
    app: Any, prefix: str, thresholds: tuple[int, int], probes: tuple[Any, Any] = (None, None)
) -> None:
    """Register ``{prefix}.a`` and ``{prefix}.b`` on breaker "shared" with these thresholds
    and these ``breaker_probe`` options (``None``: the option is not given)."""
    for suffix, threshold, probe in zip("ab", thresholds, probes, strict=True):

        def job(self: Any) -> None:
            return None

        app.task(
            base=BreakerTask,
            bind=True,
            shared=False,
            name=f"{prefix}.{suffix}",
            breaker="shared",
            breaker_policy={"failure_threshold": threshold},
            breaker_probe=probe,
        )(job)


def crm_health() -> None:
    """A health check two tasks of one breaker may both give."""


def other_health() -> None:
    """Another health check."""


@pytest.mark.usefixtures("restore_worker_globals")
def test_worker_refuses_tasks_sharing_a_breaker_with_different_policies() -> None:
    app = throwaway_app("conflict-worker")
    two_tasks_sharing_a_breaker(app, "conflict", (2, 3))
    with pytest.raises(ConfigurationError, match="'shared'") as info:
        start_and_stop(app)
    assert "conflict.a" in str(info.value)
    assert "conflict.b" in str(info.value)


def test_tasks_sharing_a_breaker_with_the_same_policy_are_accepted() -> None:
    app = throwaway_app("agree")
    two_tasks_sharing_a_breaker(app, "agree", (2, 2))
    app.finalize()
    assert sorted(check_app(app)["shared"]) == ["agree.a", "agree.b"]


@pytest.mark.parametrize(
    ("probes", "shown"),
    [
        ((crm_health, other_health), f"{__name__}:crm_health within 10 s and {__name__}:other_health within 10 s"),
        ((crm_health, None), f"{__name__}:crm_health within 10 s and none"),
        ((None, crm_health), f"none and {__name__}:crm_health within 10 s"),
        (
            (crm_health, HealthCheck(crm_health, 5)),
            f"{__name__}:crm_health within 10 s and {__name__}:crm_health within 5 s",
        ),
    ],
    ids=["different", "only-the-first", "only-the-second", "other-timeout"],
)
@pytest.mark.usefixtures("restore_worker_globals")
def test_worker_refuses_tasks_sharing_a_breaker_with_different_health_checks(
    probes: tuple[Any, Any], shown: str
) -> None:
    # The tasks share one breaker object: each run set its own task's check on it, so a
    # task without one reached the downstream as a real probe while it half-opened.
    app = throwaway_app("probe-conflict-worker")
    two_tasks_sharing_a_breaker(app, "probe-conflict", (2, 2), probes)
    with pytest.raises(ConfigurationError, match="'shared'") as info:
        start_and_stop(app)
    message = str(info.value)
    assert "'probe-conflict.a' and 'probe-conflict.b'" in message
    assert f"different health checks ({shown})" in message
    assert "set it once in breaker_probes['shared']" in message


def test_tasks_sharing_a_breaker_with_the_same_health_check_are_accepted() -> None:
    app = throwaway_app("probe-agree", breaker_probes={"shared": f"{__name__}:crm_health"})
    two_tasks_sharing_a_breaker(app, "probe-agree", (2, 2), (crm_health, None))  # the setting gives b the same
    app.finalize()
    assert sorted(check_app(app)["shared"]) == ["probe-agree.a", "probe-agree.b"]


def test_a_health_check_object_is_taken_by_the_setting_with_its_own_timeout() -> None:
    # It was taken as a task option (breaker_probe=HealthCheck(...)) and refused in
    # breaker_probes, with a message that said "a callable" (a HealthCheck is not one).
    check = HealthCheck(crm_health, 1.5)
    app = throwaway_app("probe-object", breaker_probes={"shared": check})
    two_tasks_sharing_a_breaker(app, "probe-object", (2, 2), (None, None))
    app.finalize()
    found = app.tasks["probe-object.a"].breaker.probe
    assert found is not None
    assert (found.fn, found.timeout) == (crm_health, 1.5)


@pytest.mark.parametrize("url", ["nosuch://somewhere", "memory://named?max_breakers=lots", "", "  "])
@pytest.mark.usefixtures("restore_worker_globals")
def test_worker_with_an_unusable_storage_url_refuses_to_start(url: str) -> None:
    app = throwaway_app("bad-store", breaker_storage_url=url)

    @app.task(base=BreakerTask, bind=True, shared=False, name="bad_store.job")
    def job(self: Any) -> None:
        return None

    app.finalize()
    # Build the worker exactly as start_worker does, without starting its thread: should
    # the check be missing, no second worker thread may run in this process.
    with pytest.raises(ConfigurationError, match="breaker_storage_url"):
        TestWorkController(
            app=app, pool="solo", concurrency=1, without_heartbeat=True, without_mingle=True, without_gossip=True
        )


# -- 14. task_cls makes every task a BreakerTask --------------------------------


def test_task_cls_makes_every_task_a_breaker_task_named_after_itself() -> None:
    app = Celery("task-cls", set_as_current=False, broker="memory://", task_cls="celery_breaker:BreakerTask")
    app.conf.update(breaker_storage_url="memory://celery-tests-task-cls")

    @app.task(bind=True, shared=False, name="taskcls.sync_crm")
    def sync_crm(self: Any, x: int) -> int:
        return x + 1

    app.finalize()
    task = app.tasks["taskcls.sync_crm"]
    assert isinstance(task, BreakerTask)
    assert task_breaker_config(task).name == "taskcls.sync_crm"
    breaker = task.breaker
    assert breaker.name == "taskcls.sync_crm"
    assert check_app(app)["taskcls.sync_crm"] == ["taskcls.sync_crm"]

    assert task.apply(args=(1,)).result == 2
    breaker.force_open()
    try:
        result = task.apply(args=(1,))
        assert result.state == "FAILURE"
        assert isinstance(result.result, CircuitOpenError)
        assert result.result.name == "taskcls.sync_crm"
        assert result.result.state is State.FORCED_OPEN
    finally:
        breaker.reset()


def test_task_cls_leaves_celerys_own_tasks_unguarded() -> None:
    app = Celery("task-cls-builtins", set_as_current=False, broker="memory://", task_cls="celery_breaker:BreakerTask")
    app.conf.update(breaker_storage_url="memory://celery-tests-task-cls-builtins")
    app.finalize()
    backend_cleanup = app.tasks["celery.backend_cleanup"]
    assert isinstance(backend_cleanup, BreakerTask)
    assert not backend_cleanup.is_guarded()
    assert backend_cleanup.apply().state == "SUCCESS"
    store = store_from_url(app.conf.breaker_storage_url)
    assert store.snapshots(SYSTEM_CLOCK) == []  # no breaker was made for it


def test_task_cls_tasks_follow_breaker_routes() -> None:
    """Under ``task_cls="celery_breaker:BreakerTask"`` every plain ``@app.task`` is a
    BreakerTask, and ``breaker_routes`` skipped them all: two tasks routed to "smtp"
    each got a breaker of their own name, without a word. The route now names the
    breaker of a task made from the app's task class that names none itself."""
    app = Celery("task-cls-routes", set_as_current=False, broker="memory://", task_cls="celery_breaker:BreakerTask")
    app.conf.update(
        breaker_storage_url="memory://celery-tests-task-cls-routes",
        breaker_routes={"taskclsroutes.send_*": "smtp", "taskclsroutes.own": True},
    )

    def job() -> None:
        return None

    for name in ("send_a", "send_b", "own", "other"):
        app.task(shared=False, name=f"taskclsroutes.{name}")(job)
    app.task(shared=False, name="taskclsroutes.send_named", breaker="named")(job)
    app.task(shared=False, name="taskclsroutes.send_base", base=BreakerTask)(job)
    app.finalize()

    names = {name: task_breaker_config(task).name for name, task in app.tasks.items() if name.startswith("taskcls")}
    assert names == {
        "taskclsroutes.send_a": "smtp",
        "taskclsroutes.send_b": "smtp",
        "taskclsroutes.own": "taskclsroutes.own",
        "taskclsroutes.other": "taskclsroutes.other",
        "taskclsroutes.send_named": "named",  # the task's own breaker= wins
        "taskclsroutes.send_base": "taskclsroutes.send_base",  # base=BreakerTask: as documented
    }
    assert sorted(check_app(app)["smtp"]) == ["taskclsroutes.send_a", "taskclsroutes.send_b"]
    assert app.tasks["taskclsroutes.send_a"].breaker.name == "smtp"


class UnnamedSync(BreakerTask):
    """A class-based task without a ``name``: ``app.register_task`` names the instance."""

    def run(self, x: int) -> tuple[int, str]:
        return x, self.breaker.name


def test_a_registered_task_class_without_a_name_gets_a_breaker_of_its_generated_name() -> None:
    """Celery names such a task's instance (``module.Class``) and leaves its class's
    ``name`` at ``None``: the worker refused to start, with "task None: breaker name
    must be a non-empty string, got None"."""
    app = throwaway_app("unnamed", breaker_storage_url="memory://celery-tests-unnamed", breaker_routes={"x.*": True})
    task = app.register_task(UnnamedSync())
    app.finalize()
    assert task.name == f"{__name__}.UnnamedSync"
    assert check_app(app)[task.name] == [task.name]
    assert task(1) == (1, task.name)


def test_breaker_routes_apply_outside_workers_too() -> None:
    app = Celery("routes-eager", set_as_current=False, broker="memory://", backend="cache+memory://")
    app.conf.update(
        breaker_storage_url="memory://celery-tests-routes-eager",
        breaker_routes={"eager.*": "eager-routed"},
    )
    install(app)

    @app.task(shared=False, name="eager.plain")
    def plain(x: int) -> int:
        return x * 2

    app.finalize()
    task = app.tasks["eager.plain"]
    assert isinstance(task, BreakerTask)  # routed when the app finalized, no worker needed
    assert task.apply(args=(2,)).result == 4
    task.breaker.force_open()
    try:
        result = task.apply(args=(2,))
        assert result.state == "FAILURE"
        assert isinstance(result.result, CircuitOpenError)
        assert result.result.name == "eager-routed"
    finally:
        task.breaker.reset()


def test_task_options_resolved_before_the_settings_are_read_again_follow_them() -> None:
    """A worker reads the settings again at start (``reload_settings``), after a
    ``celeryd_init`` handler or a test has changed ``app.conf``: a task whose options
    were resolved before (its breaker touched, a direct or eager call) kept the old
    policy and deferral budget, while the worker validated and logged the new ones."""
    app = throwaway_app(
        "reread",
        breaker_storage_url="memory://celery-tests-reread",
        breaker_default_policy={"failure_threshold": 1},
    )

    @app.task(base=BreakerTask, bind=True, shared=False, name="reread.job")
    def job(self: Any) -> tuple[int | None, int | None]:
        return self.breaker.policy.failure_threshold, task_breaker_config(self).max_deferrals

    app.finalize()
    assert job() == (1, None)  # resolved, and its breaker kept, against the first read
    app.conf.update(breaker_default_policy={"failure_threshold": 7}, breaker_max_deferrals=3)
    reload_settings(app)  # what the worker's step does at start
    assert job() == (7, 3)
    assert job.breaker.policy.failure_threshold == 7
    assert task_breaker_config(job).max_deferrals == 3


# -- where breakers are stored by default ---------------------------------------------


@pytest.mark.parametrize(
    ("broker", "options", "expected"),
    [
        ("redis://:secret@cache:6379/3", {}, "redis://:secret@cache:6379/3"),
        ("rediss://cache:6380/0?ssl_cert_reqs=required", {}, "rediss://cache:6380/0?ssl_cert_reqs=required"),
        ("valkey://cache/1", {}, "valkey://cache/1"),
        ("redis+socket:///run/redis.sock", {}, "redis+unix:///run/redis.sock"),
        (
            "sentinel://:pw@s1:26379;sentinel://s2:26380",
            {"broker_transport_options": {"master_name": "mymaster"}},
            "redis+sentinel://:pw@s1:26379,s2:26380/mymaster",
        ),
        ("sentinel://s1:26379", {}, "memory://"),  # no master_name: cannot tell which master
        (  # a master named by a number, which kombu asks for as text (it raised TypeError here)
            "sentinel://s1:26379",
            {"broker_transport_options": {"master_name": 5}},
            "redis+sentinel://s1:26379/5",
        ),
        (  # the Sentinels' own credentials, from the transport's sentinel_kwargs
            "sentinel://:pw@s1:26379",
            {
                "broker_transport_options": {
                    "master_name": "mymaster",
                    "sentinel_kwargs": {"username": "watcher", "password": "p&w/d", "ssl": True},
                },
                "broker_use_ssl": True,
            },
            "rediss+sentinel://:pw@s1:26379/mymaster?sentinel_username=watcher&sentinel_password=p%26w%2Fd",
        ),
        # The broker's TLS settings reach the store: the scheme, then the certificates.
        ("redis://cache:6380/0", {"broker_use_ssl": True}, "rediss://cache:6380/0"),
        (
            "redis://cache:6380/0",
            {
                "broker_use_ssl": {
                    "ssl_cert_reqs": ssl.CERT_REQUIRED,
                    "ssl_ca_certs": "/etc/ca.pem",
                    "ssl_certfile": "/etc/client.crt",
                    "ssl_keyfile": "/etc/client.key",
                }
            },
            "rediss://cache:6380/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Fca.pem"
            "&ssl_certfile=%2Fetc%2Fclient.crt&ssl_keyfile=%2Fetc%2Fclient.key",
        ),
        (
            "rediss://cache/0?ssl_cert_reqs=none",
            {"broker_use_ssl": {"ssl_cert_reqs": "CERT_REQUIRED", "ssl_ca_certs": "/ca.pem"}},
            "rediss://cache/0?ssl_cert_reqs=none&ssl_ca_certs=%2Fca.pem",
        ),  # the URL's own option wins
        (
            "redis://cache/0",
            {"broker_use_ssl": {"ssl_check_hostname": False, "ssl_ca_path": "/etc/cas", "ssl_password": "pw"}},
            "rediss://cache/0?ssl_ca_path=%2Fetc%2Fcas&ssl_check_hostname=false&ssl_password=pw",
        ),
        # A Sentinel broker with TLS: kombu speaks TLS to the master, and to the Sentinels
        # only when its sentinel_kwargs say so; the store does the same.
        (
            "sentinel://:pw@s1:26379;sentinel://s2:26380",
            {"broker_transport_options": {"master_name": "mymaster"}, "broker_use_ssl": True},
            "rediss+sentinel://:pw@s1:26379,s2:26380/mymaster?sentinel_ssl=false",
        ),
        (
            "sentinel://s1:26379",
            {
                "broker_transport_options": {"master_name": "mymaster", "sentinel_kwargs": {"ssl": True}},
                "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"},
            },
            "rediss+sentinel://s1:26379/mymaster?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Fca.pem",
        ),
        (
            "sentinel://s1:26379",
            {"broker_transport_options": {"master_name": "mymaster"}, "broker_use_ssl": {"ssl_certfile": "/c.crt"}},
            "rediss+sentinel://s1:26379/mymaster?sentinel_ssl=false&ssl_certfile=%2Fc.crt",
        ),
        ("sentinel://s1:26379", {"broker_use_ssl": True}, "memory://"),  # still no master_name
        ("redis+socket:///run/redis.sock", {"broker_use_ssl": True}, "redis+unix:///run/redis.sock"),
        ("amqp://guest@rabbit//", {}, "memory://"),
        ("memory://", {}, "memory://"),
    ],
)
def test_storage_defaults_to_the_brokers_redis(broker: str, options: dict[str, Any], expected: str) -> None:
    app = Celery("default-store", broker=broker, set_as_current=False)
    app.conf.update(options)
    assert build_settings(app.conf).storage_url == expected


@pytest.mark.parametrize(
    ("broker", "options", "named"),
    [
        ("redis://cache/0", {"broker_transport_options": "visibility_timeout=3600"}, "broker_transport_options"),
        ("redis://cache/0", {"broker_transport_options": ["redis://:s3cret-pw@h/0"]}, "broker_transport_options"),
        ("redis://cache/0", {"broker_transport_options": 3600}, "broker_transport_options"),
        (
            "sentinel://s1:26379",
            {"broker_transport_options": {"master_name": "mymaster", "sentinel_kwargs": "password=s3cret-pw"}},
            "broker_transport_options['sentinel_kwargs']",
        ),
    ],
    ids=["text", "list", "number", "sentinel_kwargs"],
)
def test_broker_transport_options_that_are_no_dict_are_refused_by_name(
    broker: str, options: dict[str, Any], named: str
) -> None:
    # (they failed the worker's start with an AttributeError from this package: "'str'
    # object has no attribute 'get'", naming neither the setting nor the fix)
    app = Celery("odd-transport-options", broker=broker, set_as_current=False)
    app.conf.update(options)
    with pytest.raises(ConfigurationError) as info:
        build_settings(app.conf)
    text = str(info.value)
    assert text.startswith(f"{named} must be a dict")
    assert "give a dict such as" in text
    assert "s3cret-pw" not in text  # (its type is named, not its value: it may hold a password)


def test_an_explicit_storage_url_wins_over_the_broker() -> None:
    app = Celery("explicit-store", broker="redis://cache/0", set_as_current=False)
    app.conf.update(breaker_storage_url="memory://")
    assert build_settings(app.conf).storage_url == "memory://"


def test_breaker_key_prefix_is_carried_into_a_redis_url() -> None:
    app = Celery("prefix", broker="redis://cache/0", set_as_current=False)
    app.conf.update(breaker_key_prefix="payments")
    url = build_settings(app.conf).storage_url
    assert url == "redis://cache/0?key_prefix=payments"
    assert store_from_url(url).key_prefix == "payments"  # type: ignore[attr-defined]
    app.conf.update(breaker_storage_url="redis://cache/0?db=1")
    assert build_settings(app.conf).storage_url == "redis://cache/0?db=1&key_prefix=payments"


def test_a_url_key_prefix_must_agree_with_the_setting() -> None:
    app = Celery("prefix-conflict", broker="memory://", set_as_current=False)
    app.conf.update(breaker_storage_url="redis://cache/0?key_prefix=a")
    assert build_settings(app.conf).storage_url == "redis://cache/0?key_prefix=a"  # the setting left at its default
    app.conf.update(breaker_key_prefix="a")
    assert build_settings(app.conf).storage_url == "redis://cache/0?key_prefix=a"
    app.conf.update(breaker_key_prefix="b")
    with pytest.raises(ConfigurationError, match=r"breaker_key_prefix='b' disagrees with key_prefix='a'"):
        build_settings(app.conf)


def test_memory_urls_ignore_the_key_prefix() -> None:
    app = Celery("prefix-memory", broker="memory://", set_as_current=False)
    app.conf.update(breaker_key_prefix="payments")
    assert build_settings(app.conf).storage_url == "memory://"


@pytest.mark.usefixtures("restore_worker_globals")
def test_a_worker_logs_where_its_breakers_are_stored(caplog: pytest.LogCaptureFixture) -> None:
    app = throwaway_app("logs-store", breaker_storage_url="redis://:hunter2@cache:6379/0")

    @app.task(base=BreakerTask, bind=True, shared=False, name="logs_store.job")
    def job(self: Any) -> None:
        return None

    app.finalize()
    with caplog.at_level("INFO", logger="celery_breaker"):
        TestWorkController(
            app=app, pool="solo", concurrency=1, without_heartbeat=True, without_mingle=True, without_gossip=True
        )  # built, not started: the bootstep logs while the worker is made
    assert "breakers stored in redis://:***@cache:6379/0;" in caplog.text
    assert "hunter2" not in caplog.text


# -- parking ---------------------------------------------------------------------------


def test_breaker_park_true_needs_a_redis_store() -> None:
    app = Celery("park-memory", set_as_current=False, broker="memory://")
    app.conf.update(breaker_storage_url="memory://", breaker_park=True)
    with pytest.raises(ConfigurationError, match="breaker_park=True needs a Redis breaker_storage_url"):
        build_settings(app.conf)


def test_a_worker_that_does_not_park_still_releases_what_others_parked() -> None:
    # Tasks parked before a change to breaker_park=False, or by a worker beside this one,
    # have no other way out of the store.
    app = Celery("park-false", set_as_current=False, broker="memory://")
    app.conf.update(breaker_storage_url="redis://127.0.0.1:1/0", breaker_park=False)
    worker = SimpleNamespace(app=app)
    assert isinstance(ReleaserStep(worker).create(worker), Releaser)


@pytest.mark.parametrize(
    ("worker_fields", "slots", "takes_what_it_runs"),
    [
        ({"concurrency": 8}, 8, False),  # (the app's worker_prefetch_multiplier: Celery's 4)
        ({"concurrency": 8, "prefetch_multiplier": 1}, 8, True),  # (celery worker --prefetch-multiplier 1)
        ({"concurrency": 3, "autoscale": (10, 3), "max_concurrency": 10}, 10, False),  # (an autoscaler's most)
        # (-P solo runs one task at a time, its concurrency still the CPU count)
        ({"concurrency": 8, "pool_cls": SoloPool, "prefetch_multiplier": 1}, 1, True),
        ({}, 1, False),
    ],
)
def test_a_workers_releaser_holds_back_on_its_own_pools_backlog(
    worker_fields: dict[str, Any], slots: int, takes_what_it_runs: bool
) -> None:
    # The adaptive release learns of busy workers only a latency late: a worker's releaser
    # is given its own pool's backlog (``WorkerBacklog``), sized to the pool's slots.
    app = Celery("park-backlog", set_as_current=False, broker="memory://")
    app.conf.update(breaker_storage_url="redis://127.0.0.1:1/0")
    worker = SimpleNamespace(app=app, **worker_fields)
    releaser = ReleaserStep(worker).create(worker)
    assert isinstance(releaser, Releaser)
    backlog = releaser.backlog
    assert backlog is not None
    owner = getattr(backlog, "__self__", None)
    assert isinstance(owner, WorkerBacklog)
    assert (owner.slots, owner.takes_what_it_runs) == (slots, takes_what_it_runs)


def test_a_worker_whose_task_counts_cannot_be_read_still_starts_and_releases(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A Celery whose worker state moved: the release goes unbounded, the worker starts.
    from celery_breaker.integration import worker as worker_module

    def unreadable(*args: Any, **kwargs: Any) -> WorkerBacklog:
        raise AttributeError("module 'celery.worker.state' has no attribute 'all_total_count'")

    monkeypatch.setattr(worker_module, "WorkerBacklog", unreadable)
    app = Celery("park-no-state", set_as_current=False, broker="memory://")
    app.conf.update(breaker_storage_url="redis://127.0.0.1:1/0")
    worker = SimpleNamespace(app=app, concurrency=4)
    with caplog.at_level("WARNING", logger="celery_breaker"):
        releaser = ReleaserStep(worker).create(worker)
    assert isinstance(releaser, Releaser)
    assert releaser.backlog is None
    assert "cannot read this worker's own task counts" in caplog.text


@pytest.mark.parametrize(
    ("setting", "value"), [("breaker_park", "yes"), ("breaker_release_rate", 0), ("breaker_release_ramp", -1)]
)
def test_bad_parking_settings_name_the_setting(setting: str, value: Any) -> None:
    app = Celery("park-bad", set_as_current=False, broker="memory://")
    app.conf.update({setting: value})
    with pytest.raises(ConfigurationError, match=setting):
        build_settings(app.conf)


# -- release pace ----------------------------------------------------------------------


def test_the_release_is_adaptive_without_a_ceiling_by_default() -> None:
    settings = build_settings(Celery("pace-default", set_as_current=False, broker="memory://").conf)
    assert (settings.release_pace, settings.release_rate) == ("adaptive", None)
    law = settings.release_law()
    assert law is not None
    assert law.ceiling is None
    assert law.start == START_RATE


def test_breaker_release_rate_is_the_adaptive_pace_ceiling() -> None:
    app = Celery("pace-ceiling", set_as_current=False, broker="memory://")
    app.conf.update(breaker_release_rate=150)
    law = build_settings(app.conf).release_law()
    assert law is not None
    assert law.ceiling == 150.0


def test_the_fixed_pace_keeps_its_rate_and_ramp() -> None:
    app = Celery("pace-fixed", set_as_current=False, broker="memory://")
    app.conf.update(breaker_release_pace="fixed")
    settings = build_settings(app.conf)
    assert (settings.release_rate, settings.release_ramp, settings.release_law()) == (50.0, 30.0, None)
    app.conf.update(breaker_release_pace="Fixed", breaker_release_rate=20, breaker_release_ramp=0)
    settings = build_settings(app.conf)
    assert (settings.release_pace, settings.release_rate, settings.release_ramp) == ("fixed", 20.0, 0.0)


@pytest.mark.parametrize(
    ("value", "hint"), [("adaptiv", "did you mean 'adaptive'?"), ("fixd", "did you mean 'fixed'?"), (1, "")]
)
def test_a_bad_release_pace_names_the_setting_the_choices_and_a_close_one(value: Any, hint: str) -> None:
    app = Celery("pace-bad", set_as_current=False, broker="memory://")
    app.conf.update(breaker_release_pace=value)
    with pytest.raises(ConfigurationError) as info:
        build_settings(app.conf)
    message = str(info.value)
    assert message.startswith("breaker_release_pace must be 'adaptive'")
    assert "or 'fixed'" in message
    assert f"got {value!r}" in message
    assert hint in message


def test_a_setting_entry_one_typo_from_a_tasks_breaker_is_warned_of_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # breaker_probes={"partnr": ...} gave breaker "partner" no health check, silently: its
    # real (non-idempotent) tasks went as its probes. Not an error (a breaker used outside
    # tasks may have that name), but the worker says so when it starts.
    app = throwaway_app(
        "near-misses",
        breaker_probes={
            "partnr": "tests.celery.probe_tasks:check_setting",  # a typo: warned of
            "mial": "os:getpid",  # one swap in a short name: warned of
            "ledgr": "os:getpid",  # "ledger" gives its own probe (a task option): not warned of
        },
        breaker_policies={
            "parnter": {"failure_threshold": 2},  # "partner" has no policy entry: warned of
            "tenant-2": {},  # a sibling of "tenant-1" (digits): not a typo
            "crm-us": {},  # "crm-eu" has its own entry
            "crm-eu": {},
            "shipment": {},  # two edits from "shipping", a name of 8: too far
            "mail*": {},
        },
        breaker_routes={
            "near.send_reciept": "mailer",  # a typo of a plain task's name: warned of
            "near.plain-2": "sms",  # a sibling of "near.plain-1" (digits): not a typo
            "near.invoices": "erp",  # "near.invoice" is routed too: not warned of
            "near.invoice": "erp",
            "near.tickt*": "desk",  # a glob: not warned of
        },
    )

    for name, breaker, own_probe in [
        ("near.pay", "partner", None),
        ("near.mail", "mail", None),
        ("near.book", "ledger", "os:getpid"),
        ("near.tenant", "tenant-1", None),
        ("near.crm", "crm-eu", None),
        ("near.ship", "shipping", None),
    ]:

        def body() -> None: ...

        app.task(base=BreakerTask, breaker=breaker, breaker_probe=own_probe, name=name, shared=False)(body)
    for name in ("near.send_receipt", "near.plain-1", "near.invoice", "near.ticket"):

        def plain() -> None: ...

        app.task(name=name, shared=False)(plain)

    slips = near_misses(app, check_app(app))
    assert len(slips) == 4, slips
    assert slips[0].startswith("breaker_policies['parnter'] names no breaker of this app's tasks; did you mean")
    assert slips[1].startswith("breaker_probes['partnr']")
    assert "'partner' (the breaker of task 'near.pay')? As it is, breaker 'partner' goes without" in slips[1]
    assert slips[2].startswith("breaker_probes['mial'] names no breaker of this app's tasks; did you mean 'mail'")
    assert slips[3] == (
        "breaker_routes['near.send_reciept'] names no task of this app; did you mean 'near.send_receipt'? As it "
        "is, no route puts task 'near.send_receipt' under a breaker. Ignore this if 'near.send_reciept' is "
        "another app's task"
    )
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        # (what a starting worker runs first; its events left as the session worker's)
        BreakerStep(SimpleNamespace(app=app, task_events=events.enabled()))
    assert "did you mean 'partner'" in caplog.text


@pytest.mark.parametrize(
    ("pool", "concurrency", "warned"),
    [("prefork", 4, True), ("prefork", 1, False), ("threads", 4, False), ("solo", 1, False)],
)
def test_a_prefork_worker_on_a_memory_store_is_told_its_breakers_are_per_process(
    caplog: pytest.LogCaptureFixture, pool: str, concurrency: int, warned: bool
) -> None:
    # The default on any broker but Redis: each pool process trips on its own (4 processes
    # let 4 times the failures through, and probe apart); the worker said so only at INFO.
    from celery import concurrency as pools

    app = throwaway_app(f"per-process-{pool}-{concurrency}")

    @app.task(base=BreakerTask, breaker="partner", name="per.process", shared=False)
    def call_partner() -> None: ...

    worker = SimpleNamespace(
        app=app, task_events=False, concurrency=concurrency, pool_cls=pools.get_implementation(pool)
    )
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        BreakerStep(worker)
    said = [r.getMessage() for r in caplog.records if "each pool process's own" in r.getMessage()]
    assert bool(said) is warned, said
    if warned:
        assert "with 4 processes, a breaker lets up to 4 times its failures reach the downstream" in said[0]


@pytest.mark.parametrize(
    ("pool", "recycled", "warned"),
    [
        ("prefork", {"max_tasks_per_child": 1}, True),
        ("prefork", {"max_memory_per_child": 200_000}, True),
        ("prefork", {}, False),
        ("threads", {"max_tasks_per_child": 1}, False),
    ],
)
def test_a_prefork_worker_recycling_its_processes_on_a_memory_store_is_told_its_breakers_are_forgotten(
    caplog: pytest.LogCaptureFixture, pool: str, recycled: dict[str, int], warned: bool
) -> None:
    # `-c 1 --max-tasks-per-child 1` on a memory store (the default on any broker but Redis):
    # each task ran in a new process on a new breaker, which never saw failure_threshold
    # failures; the breaker never tripped, and the worker said nothing (one process only).
    from celery import concurrency as pools

    app = throwaway_app(f"recycled-{pool}-{sorted(recycled)}")

    @app.task(base=BreakerTask, breaker="partner", name="recycled.call", shared=False)
    def call_partner() -> None: ...

    worker = SimpleNamespace(
        app=app, task_events=False, concurrency=1, pool_cls=pools.get_implementation(pool),
        **{"max_tasks_per_child": None, "max_memory_per_child": None, **recycled},
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        BreakerStep(worker)
    said = [r.getMessage() for r in caplog.records if "forgets its breakers" in r.getMessage()]
    assert bool(said) is warned, said
    if warned:
        assert "breaker_storage_url to a redis:// URL" in said[0]
        assert next(iter(recycled)) in said[0]


def test_an_empty_storage_url_is_refused_not_read_as_unset() -> None:
    # (an environment variable set empty chose the default store without a word: memory://
    # on any broker but Redis, each prefork process with breakers of its own)
    app = throwaway_app("empty-store")
    app.conf.breaker_storage_url = ""
    with pytest.raises(ConfigurationError, match="breaker_storage_url is empty; give a store URL"):
        reload_settings(app)


@pytest.mark.parametrize("given", [list, tuple])
def test_a_list_of_store_urls_is_refused_with_their_passwords_masked(given: type) -> None:
    # (broker_url's failover form given as the store: the refusal, which the worker logs
    # at CRITICAL, showed the list as it was, passwords and all)
    app = throwaway_app("listed-store")
    app.conf.breaker_storage_url = given(["redis://:s3cret-pw@h1:6379/0", "redis://:s3cret-pw@h2:6379/0"])
    with pytest.raises(ConfigurationError) as info:
        reload_settings(app)
    text = str(info.value)
    assert "s3cret-pw" not in text
    assert f"breaker_storage_url must be one URL string, got a {given.__name__}: ['redis://:***@h1:6379/0'" in text
    assert "redis+sentinel://" in text


def test_a_store_url_of_another_type_is_refused_naming_only_its_type() -> None:
    app = throwaway_app("bytes-store")
    app.conf.breaker_storage_url = b"redis://:s3cret-pw@h1:6379/0"
    with pytest.raises(ConfigurationError) as info:
        reload_settings(app)
    assert str(info.value) == "breaker_storage_url must be a URL such as 'memory://', got a bytes"


@pytest.mark.parametrize(
    "settings",
    [
        {"breaker_default_policy": "redis://:s3cret-pw@h:6379/0"},
        {"breaker_max_deferrals": "redis://:s3cret-pw@h:6379/0"},
        {"breaker_policies": {"crm": {"window": "redis://u:s3cret-pw@h:6379/0"}}},
        {"breaker_key_prefix": ["rediss://:s3cret-pw@h:6379/0"]},
    ],
    ids=["policy", "count", "nested", "listed"],
)
def test_a_store_url_given_to_another_setting_is_refused_with_its_password_masked(settings: dict[str, Any]) -> None:
    # (a URL put in the wrong setting: the refusal, logged at the worker's CRITICAL,
    # quoted the value, password and all)
    app = throwaway_app("url-elsewhere", **settings)
    with pytest.raises(ConfigurationError) as info:
        reload_settings(app)
    text = str(info.value)
    assert "s3cret-pw" not in text
    assert ":***@h:6379/0" in text


@pytest.mark.parametrize(
    "setting",
    ["breaker_storage_url", "breaker_default_policy", "breaker_policies", "breaker_routes", "breaker_on_storage_error",
     "breaker_send_events", "breaker_park", "breaker_release_pace", "breaker_metrics_port", "breaker_metrics_address",
     "breaker_probes"],
)  # fmt: skip
def test_a_huge_bad_value_is_quoted_in_part(setting: str) -> None:
    # (a value of a megabyte, an environment variable gone wrong, was quoted whole: the
    # worker's CRITICAL at start, and each refusal, a megabyte long)
    app = throwaway_app("huge-value", **{setting: "x" * 1_000_000})
    with pytest.raises(ConfigurationError) as info:
        reload_settings(app)
    assert setting in str(info.value)
    assert len(str(info.value)) < 1_000
