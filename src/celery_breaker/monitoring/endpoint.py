"""A worker's own Prometheus endpoint, as a worker step (``breaker_metrics_port``).

Named in ``integration.plugin.WORKER_STEPS``. prometheus-client is an optional
dependency (``celery-breaker[prometheus]``): it is imported only when the port is set.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from celery import bootsteps

from ..errors import ConfigurationError
from ..integration.settings import get_settings
from ..integration.worker import unseen_breakers

__all__ = ["MetricsStep"]

logger = logging.getLogger("celery_breaker")


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Serves the breakers' Prometheus metrics from the worker's main process when
    ``breaker_metrics_port`` is set (on ``breaker_metrics_address``, loopback by default).
    Started after the pool forks, so no child holds the listening socket."""

    label = "celery-breaker metrics"
    requires = ("celery.worker.components:Pool",)

    def create(self, worker: Any) -> Any:
        if get_settings(worker.app).metrics_port is None:
            return None
        unseen = unseen_breakers(worker, "its metrics endpoint (breaker_metrics_port)")
        if unseen is not None:  # an endpoint listing no breaker would say all is well: none at all
            logger.error("celery-breaker: the worker serves no Prometheus metrics: %s", unseen)
            return None
        try:
            prometheus = importlib.import_module(".prometheus", __package__)
        except ImportError as exc:
            raise ConfigurationError(
                f"breaker_metrics_port is set but prometheus-client is missing ({exc}): "
                "pip install 'celery-breaker[prometheus]', or unset breaker_metrics_port"
            ) from None
        return _MetricsService(worker.app, prometheus.start_metrics_server)


class _MetricsService:
    """The StartStopStep's object: the endpoint starts and stops with the worker."""

    def __init__(self, app: Any, start: Any) -> None:
        self.app, self._start = app, start
        self.server: Any = None

    def start(self) -> None:
        self.server = self._start(self.app)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
