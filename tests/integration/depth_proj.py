"""The app ``test_delay_depth`` runs ``celery breaker status`` with (``-A``): one task under
``partner-api``, deferring on RabbitMQ. Each test points it at a vhost and a store of its own (``use``)."""

from __future__ import annotations

from celery import Celery

from celery_breaker import BreakerTask
from celery_breaker.integration.settings import reload_settings

POLICY = {"failure_threshold": 1, "reset_timeout": 30.0}

app = Celery("depth_proj", broker="memory://", set_as_current=False)
app.conf.update(breaker_default_policy=POLICY)


@app.task(base=BreakerTask, breaker="partner-api", name="depth.call_partner")
def call_partner(n: int) -> int:
    """Guarded by ``partner-api``."""
    return n


def use(broker_url: str, store_url: str, *, connect_timeout: float = 4.0) -> None:
    """Point the app at ``broker_url`` (``broker_connection_timeout``: ``connect_timeout``,
    Celery's default unless given) and the store ``store_url``; its settings are read again."""
    app.conf.update(broker_url=broker_url, broker_connection_timeout=connect_timeout, breaker_storage_url=store_url)
    reload_settings(app)
