"""Expiry enforced by the worker, not by the broker: a deferred task keeps its ``expires``, not a message TTL.

Celery turns a task's ``expires`` into the message's ``expiration`` property (a TTL). On
RabbitMQ a message whose TTL runs out in a queue is dropped: no worker sees it, no
``task_revoked`` is sent, and its result stays RETRY for ever. A deferred task's copy
often outlives its expiry on purpose (it is due just after it, to be revoked), so the
copies celery-breaker publishes (they carry ``x-breaker-deferrals``) go without a TTL:
the worker that receives one past its ``expires`` revokes it, as Celery does for any
expired task (REVOKED, ``task_revoked`` with ``expired=True``), on every broker.

Importing this module connects the handler (``defer`` imports it).
"""

from __future__ import annotations

from typing import Any

from celery.signals import before_task_publish

from .plan import DEFERRALS_HEADER

__all__ = ["keep_expired_deferrals"]


@before_task_publish.connect(weak=False, dispatch_uid="celery_breaker.keep_expired_deferrals")  # type: ignore[untyped-decorator]
def keep_expired_deferrals(headers: Any = None, properties: Any = None, **_: Any) -> None:
    """Drop the message TTL of a deferred task's copy (``before_task_publish`` handler)."""
    if isinstance(headers, dict) and DEFERRALS_HEADER in headers and isinstance(properties, dict):
        properties.pop("expiration", None)
