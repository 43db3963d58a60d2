"""``python manage.py breaker_demo``: the shop's downstreams go down and come back while orders arrive.

Runs an in-process worker on the embedded defaults (in-memory broker, results and
breaker store), so no server is needed. Every order sends ``charge`` (a BreakerTask on
the "payments" breaker) and ``send_receipt`` (a plain task that CELERY_BREAKER_ROUTES
puts under the "mailer" breaker). Both services are down from second 1 to second 4: the
breakers open, the tasks are deferred without spending retries, and all complete once
the services are back. Then it shows that a misspelt setting stops a worker at start.
Fails (exit 1) unless both breakers opened, tasks were deferred and every task completed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from django.core.management.base import BaseCommand, CommandError
from django.test import override_settings
from proj.celery import app

import celery_breaker
from celery_breaker.core import Transition
from celery_breaker.monitoring import add_transition_listener

from ... import tasks
from ...services import mailer, payments

OUTAGE = (1.0, 4.0)  # seconds after the first order: both services are down in between
ORDERS = 30
SEND_EVERY = 0.15


class Command(BaseCommand):
    help = "Take the shop's downstreams down and back while orders arrive; show what the breakers did."

    def handle(self, *args: Any, **options: Any) -> None:
        start = time.monotonic()
        timeline: list[tuple[float, str]] = []

        def on_transition(transition: Transition) -> None:
            moved = f"{transition.source.value} -> {transition.target.value} ({transition.reason})"
            timeline.append((time.monotonic() - start, f"breaker {transition.label}: {moved}"))

        add_transition_listener(app, on_transition)
        app.finalize()  # (a worker does this too) CELERY_BREAKER_ROUTES apply here
        self.stdout.write(f"shop.tasks.send_receipt is a plain task under breaker {tasks.send_receipt.breaker_name!r} "
                          "(CELERY_BREAKER_ROUTES)")  # fmt: skip
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="ERROR", shutdown_timeout=10):
            start = time.monotonic()  # (the timeline counts from the first order)
            sent = []
            for order in range(ORDERS):
                down = OUTAGE[0] <= time.monotonic() - start < OUTAGE[1]
                payments.set_down(down)
                mailer.set_down(down)
                sent.append((tasks.charge.delay(order), tasks.send_receipt.delay(order)))
                time.sleep(SEND_EVERY)  # a steady trickle of orders, through the outage
            payments.set_down(False)
            mailer.set_down(False)
            charged = [charge.get(timeout=60, propagate=False) for charge, _ in sent]
            mailed = [receipt.get(timeout=60, propagate=False) for _, receipt in sent]

        timeline += [(OUTAGE[0], "payments API and mailer go DOWN"), (OUTAGE[1], "both come back UP")]
        self.stdout.write("timeline")
        for at, text in sorted(timeline):
            self.stdout.write(f"  {at:5.1f} s  {text}")
        done = [v for v in charged + mailed if isinstance(v, dict)]
        charges_ok = sum(1 for v in charged if isinstance(v, dict))
        receipts_ok = sum(1 for v in mailed if isinstance(v, dict))
        self.stdout.write("")
        self.stdout.write(f"orders {ORDERS}: charges completed {charges_ok}, receipts completed {receipts_ok}, "
                          f"failed {2 * ORDERS - len(done)}")  # fmt: skip
        deferred_charges = sum(1 for v in charged if isinstance(v, dict) and v["deferrals"])
        deferred_receipts = sum(1 for v in mailed if isinstance(v, dict) and v["deferrals"])
        self.stdout.write(f"deferred: charges {deferred_charges}, receipts {deferred_receipts}; "
                          f"retries spent {sum(v['retries'] for v in done)}")  # fmt: skip
        self.stdout.write(f"calls while down: payments API {payments.calls['while down']}, "
                          f"mailer {mailer.calls['while down']}")  # fmt: skip
        trips = {}
        for task in (tasks.charge, tasks.send_receipt):
            snapshot = task.breaker.snapshot()
            trips[snapshot.name] = snapshot.trips
        self.stdout.write(f"breakers: {', '.join(f'{name} trips {n}' for name, n in sorted(trips.items()))}")
        typo_rejected = self.show_typo_rejected()
        shown = all(trips.values()) and deferred_charges and deferred_receipts and typo_rejected
        if not shown or len(done) != 2 * ORDERS:
            raise CommandError("the demo did not show what it should (see above)")

    def show_typo_rejected(self) -> bool:
        """Start a worker with CELERY_BREAKER_DEFAULT_POLCY set: it must refuse to start."""
        with override_settings(CELERY_BREAKER_DEFAULT_POLCY={"failure_threshold": 3}):
            misspelt = Celery("typo-check", set_as_current=False)
            misspelt.config_from_object("django.conf:settings", namespace="CELERY")
            celery_breaker.install(misspelt)
            quiet = logging.getLogger("celery_breaker")
            level = quiet.level
            quiet.setLevel(logging.CRITICAL)  # (it also logs the error; once is enough here)
            try:
                with start_worker(misspelt, pool="solo", perform_ping_check=False, loglevel="ERROR"):
                    pass
            except celery_breaker.ConfigurationError as exc:
                message = str(exc).split("; known settings")[0]
                self.stdout.write(f"a worker with a misspelt setting does not start: ConfigurationError: {message}")
                return "CELERY_BREAKER_DEFAULT_POLCY" in message
            finally:
                quiet.setLevel(level)
                app.set_current()  # start_worker made the misspelt app the current one
                app.set_default()
        self.stdout.write("a worker with CELERY_BREAKER_DEFAULT_POLCY started: the typo went unnoticed")
        return False
