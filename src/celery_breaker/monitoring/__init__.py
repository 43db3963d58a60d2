"""Watching breakers: their state now (``collect_metrics``), their stored history, and
exports to Prometheus (``celery_breaker.monitoring.prometheus``) and Flower
(``celery_breaker.monitoring.flower``).

Public: the names below, ``prometheus`` and ``flower``. ``status`` and ``history`` hold them.
"""

from ..storage import ReleasePace
from .history import DEFAULT_METRICS_TTL, METRICS_TASK_NAME, install_metrics_task, metrics_history, record_metrics
from .status import BreakerStatus, app_store, collect_metrics, store_of
from .transitions import add_transition_listener

__all__ = [
    "DEFAULT_METRICS_TTL",
    "METRICS_TASK_NAME",
    "BreakerStatus",
    "ReleasePace",
    "add_transition_listener",
    "app_store",
    "collect_metrics",
    "install_metrics_task",
    "metrics_history",
    "record_metrics",
    "store_of",
]
