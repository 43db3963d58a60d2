"""The project's Celery app: every setting, celery-breaker's included, comes from Django's settings."""

from __future__ import annotations

import os

from celery import Celery

import celery_breaker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
# CELERY_BROKER_URL -> broker_url, CELERY_BREAKER_DEFAULT_POLICY -> breaker_default_policy, ...
app.config_from_object("django.conf:settings", namespace="CELERY")
# Finds tasks.py in every installed app (shop/tasks.py here).
app.autodiscover_tasks()
# Needed because shop.tasks.send_receipt is a plain task put under a breaker by
# CELERY_BREAKER_ROUTES alone (a BreakerTask subclass calls install() itself).
celery_breaker.install(app)
