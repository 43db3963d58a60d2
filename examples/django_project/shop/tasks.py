"""The shop's tasks: one BreakerTask, and one plain task that CELERY_BREAKER_ROUTES puts under a breaker."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from celery_breaker import BreakerTask

from .services import mailer, payments

RETRY = {"max_retries": 5, "countdown": 0.3}


def deferrals(task: Any) -> int:
    """How many times this delivery was deferred (celery-breaker's message header)."""
    return int((task.request.headers or {}).get("x-breaker-deferrals", 0))


@shared_task(base=BreakerTask, bind=True, breaker="payments", autoretry_for=(ConnectionError,), retry_kwargs=RETRY)
def charge(self: Any, order_id: int) -> dict[str, Any]:
    """A BreakerTask: only the guarded block counts as a call to the payments API."""
    with self.breaker:
        receipt = payments.call(f"charge order {order_id}")
    return {"receipt": receipt, "retries": self.request.retries, "deferrals": deferrals(self)}


@shared_task(bind=True, autoretry_for=(ConnectionError,), retry_kwargs=RETRY)
def send_receipt(self: Any, order_id: int) -> dict[str, Any]:
    """A plain task: CELERY_BREAKER_ROUTES puts it under the "mailer" breaker; its whole run is the call."""
    mailer.call(f"mail the receipt of order {order_id}")
    return {"retries": self.request.retries, "deferrals": deferrals(self)}
