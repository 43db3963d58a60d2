"""The Celery app ``celery -A tests.web.webproj:app breaker web`` runs on: its store comes from ``WEBPROJ_STORE``,
its broker from ``WEBPROJ_BROKER`` and its ``breaker_park`` from ``WEBPROJ_PARK``."""

from __future__ import annotations

import os

from celery import Celery

#: The environment variable naming the store (default: a memory store, which the command refuses).
STORE_ENV = "WEBPROJ_STORE"
#: The environment variables naming the broker (default: ``memory://``) and saying ``breaker_park``
#: (``true``: park in the store whatever the broker; ``false``: never; default ``auto``).
BROKER_ENV, PARK_ENV = "WEBPROJ_BROKER", "WEBPROJ_PARK"
#: Trips at a 50 % failure rate over 10 calls or more in the last minute; open for a minute.
POLICY = {
    "failure_threshold": None,
    "failure_rate_threshold": 0.5,
    "minimum_calls": 10,
    "window": 60.0,
    "reset_timeout": 60.0,
}

app = Celery("webproj", broker=os.environ.get(BROKER_ENV, "memory://"), set_as_current=False)
app.conf.update(
    breaker_storage_url=os.environ.get(STORE_ENV, "memory://"), breaker_default_policy=POLICY,
    breaker_park={"true": True, "false": False}.get(os.environ.get(PARK_ENV, ""), "auto"),
)  # fmt: skip
