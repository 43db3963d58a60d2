"""The Celery app the in-process CLI tests name with ``-A``: tasks under breakers three ways.

``partner-api`` is a ``BreakerTask``'s breaker, ``crm`` a per-key one, ``billing`` is
named only in ``breaker_policies`` and ``legacy.sync`` is put under ``ledger`` by
``breaker_routes``. Each test points the app at its own store (``use_store``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from celery_breaker import BreakerTask
from celery_breaker.integration.settings import reload_settings

POLICY = {"failure_threshold": 1, "reset_timeout": 30.0}
CRM_POLICY = {"failure_threshold": 3, "reset_timeout": 60.0}

app = Celery("cliproj", broker="memory://", set_as_current=False)
app.conf.update(
    breaker_default_policy=POLICY,
    breaker_policies={"crm*": CRM_POLICY, "billing": {"reset_timeout": 90.0}},
    breaker_routes={"legacy.*": "ledger"},
)


@app.task(base=BreakerTask, breaker="partner-api")
def call_partner(n: int) -> int:
    """Guarded by the key-less breaker ``partner-api``."""
    return n


@app.task(base=BreakerTask, breaker="crm", breaker_key=lambda args, kwargs: kwargs.get("tenant"))
def sync_tenant(**kwargs: Any) -> None:
    """Guarded by ``crm[<tenant>]``."""


@app.task(name="legacy.sync")
def legacy_sync() -> None:
    """A plain task that ``breaker_routes`` puts under ``ledger``."""


def use_store(url: str) -> None:
    """Point the app's breakers at ``url`` (settings read again)."""
    app.conf.update(breaker_storage_url=url)
    reload_settings(app)
