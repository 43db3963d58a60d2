"""Tests of the shop's tasks under Django's test runner: ``python manage.py test shop``.

Run eagerly (``task.apply()``), a task whose breaker is open raises CircuitOpenError
instead of deferring, so a test can assert on it without a worker or a broker.
"""

from __future__ import annotations

from celery import Celery
from celery.contrib.testing.worker import start_worker
from django.test import SimpleTestCase, override_settings
from proj.celery import app

import celery_breaker
from celery_breaker import CircuitOpenError

from . import tasks


class BreakerTasksTest(SimpleTestCase):
    def setUp(self) -> None:
        app.finalize()  # CELERY_BREAKER_ROUTES apply when the app finalizes

    def tearDown(self) -> None:
        # The in-memory store lives as long as the process: leave no breaker open.
        tasks.charge.breaker.reset()
        tasks.send_receipt.breaker.reset()

    def test_charge_runs_while_its_breaker_is_closed(self) -> None:
        result = tasks.charge.apply(args=(7,))
        assert result.get()["receipt"] == "payments API: charge order 7 done"

    def test_an_open_breaker_rejects_the_charge(self) -> None:
        with self.assertLogs("celery_breaker", "WARNING"):  # the breaker logs its transition
            tasks.charge.breaker.force_open()
        with self.assertLogs("celery.app.trace", "ERROR"):  # Celery logs the task's failure
            result = tasks.charge.apply(args=(7,))
        assert isinstance(result.result, CircuitOpenError)
        assert result.result.name == "payments"

    def test_settings_route_the_plain_task_to_the_mailer_breaker(self) -> None:
        assert tasks.send_receipt.breaker_name == "mailer"
        assert tasks.send_receipt.breaker.policy.failure_threshold == 2  # CELERY_BREAKER_POLICIES["mailer"]
        with self.assertLogs("celery_breaker", "WARNING"):
            tasks.send_receipt.breaker.force_open()
        with self.assertLogs("celery.app.trace", "ERROR"):
            result = tasks.send_receipt.apply(args=(7,))
        assert isinstance(result.result, CircuitOpenError)

    @override_settings(CELERY_BREAKER_DEFAULT_POLCY={"failure_threshold": 3})
    def test_a_worker_refuses_a_misspelt_setting(self) -> None:
        misspelt = Celery("typo-check", set_as_current=False)
        misspelt.config_from_object("django.conf:settings", namespace="CELERY")
        celery_breaker.install(misspelt)
        try:
            # (finalizing the app logs the error first; the worker then refuses to start)
            with (
                self.assertLogs("celery_breaker", "ERROR"),
                self.assertRaises(celery_breaker.ConfigurationError) as refused,
                start_worker(misspelt, pool="solo", perform_ping_check=False),
            ):
                pass
        finally:
            app.set_current()  # start_worker made the misspelt app the current one
            app.set_default()
        assert "CELERY_BREAKER_DEFAULT_POLCY: did you mean CELERY_BREAKER_DEFAULT_POLICY?" in str(refused.exception)
