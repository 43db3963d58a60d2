"""Settings of the example project: a minimal Django project whose Celery settings carry the CELERY_ prefix."""

from __future__ import annotations

import os

SECRET_KEY = "example-project-only"  # never use a key like this in production
DEBUG = True
ALLOWED_HOSTS: list[str] = []
INSTALLED_APPS = ["shop"]
DATABASES: dict[str, dict[str, str]] = {}  # the example stores nothing
USE_TZ = True
TIME_ZONE = "UTC"

# -- Celery (read by proj/celery.py with namespace="CELERY") ------------------
# The embedded defaults: an in-memory broker and results, so the demo needs no server.
# In production: CELERY_BROKER_URL = "redis://localhost:6379/0"; breaker state is then
# kept in that Redis too, shared by every worker (or set CELERY_BREAKER_STORAGE_URL).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "cache+memory://")
CELERY_BROKER_TRANSPORT_OPTIONS = {"polling_interval": 0.05}  # the demo's worker looks for tasks often
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# -- celery-breaker: every breaker_* setting, spelled CELERY_BREAKER_* ----------
# The policy of every breaker...
CELERY_BREAKER_DEFAULT_POLICY = {
    "failure_threshold": 3,  # 3 failures within 10 s open a breaker
    "window": 10,
    "reset_timeout": 1.0,  # open for 1 s (doubling while probes fail), then half-open
    "half_open_max_calls": 1,
    "success_threshold": 1,
}
# ... with overrides per breaker name (or glob).
CELERY_BREAKER_POLICIES = {
    "mailer": {"failure_threshold": 2},
}
# Plain tasks (not BreakerTask subclasses) put under a breaker: task-name glob -> breaker name.
CELERY_BREAKER_ROUTES = {
    "shop.tasks.send_receipt": "mailer",
}
CELERY_BREAKER_DEFER_SPREAD = 0.5  # deferred tasks return spread over 0.5 s
CELERY_BREAKER_MAX_DEFER_AGE = 3600  # a task deferred for an hour fails with CircuitOpenError
