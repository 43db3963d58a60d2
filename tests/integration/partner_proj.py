"""A Celery project whose one task calls a "partner" simulated by Redis keys and logs every call it makes."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import time
from typing import Any

import redis
from celery import Celery

from celery_breaker import BreakerTask
from celery_breaker.breaker import current_run
from celery_breaker.core import Probe

BROKER = os.environ.get("PROJ_BROKER", "redis://127.0.0.1:6379/0")
BREAKER = "partner"

app = Celery("partner_proj", broker=BROKER, backend=BROKER)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    result_extended=True,  # a RETRY result names the worker that deferred the task
    breaker_defer_spread=0.5,
)
app.conf.update(json.loads(os.environ.get("PROJ_EXTRA_CONF", "{}")))


def down_key(ns: str) -> str:
    """While this key exists the partner of namespace ``ns`` is down."""
    return f"{ns}:partner:down"


def calls_key(ns: str) -> str:
    """The partner's log: one JSON entry per call it received."""
    return f"{ns}:partner:calls"


@functools.cache
def partner() -> redis.Redis:
    """One client per worker process, made on first use (after the fork). The partner
    lives on the broker's server, never on the breaker's store."""
    return redis.Redis.from_url(BROKER, socket_timeout=5, socket_connect_timeout=5)


def _admitted_as() -> tuple[str, int | None]:
    """How the breaker admitted this run: ("probe", generation) in a half-open period,
    else ("call", generation). Only a tag for the partner's log."""
    run = current_run()
    ticket = None if run is None else run.ticket
    if isinstance(ticket, Probe):
        return "probe", ticket.generation
    return "call", ticket if isinstance(ticket, int) else None


@app.task(
    base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True,
    # A failure seen while the breaker is still CLOSED spends a real retry (the breaker
    # has not judged the partner down yet); once it is open, retries turn into deferrals.
    autoretry_for=(ConnectionError,), max_retries=1, default_retry_delay=0.5,
)  # fmt: skip
def call_partner(self: Any, ns: str, n: int) -> dict[str, Any]:
    """Calls the partner once under the breaker; the partner logs the call, then answers."""
    client = partner()
    with self.breaker:
        down = bool(client.exists(down_key(ns)))
        kind, generation = _admitted_as()
        entry = {"n": n, "down": down, "kind": kind, "generation": generation, "node": self.request.hostname,
                 "process": f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip
        client.rpush(calls_key(ns), json.dumps(entry))
        if down:
            raise ConnectionError("partner is down")
    headers = self.request.headers or {}
    return {
        "n": n,
        "id": self.request.id,
        "retries": self.request.retries,
        "deferrals": headers.get("x-breaker-deferrals"),
        "node": self.request.hostname,
        "pid": os.getpid(),
    }


def hung_key(ns: str) -> str:
    """Where ``hang_while_probing`` logs how its run was admitted, before it hangs."""
    return f"{ns}:partner:hung"


@app.task(base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True)
def hang_while_probing(self: Any, ns: str, seconds: float) -> None:
    """Logs how the breaker admitted it, then hangs (a partner that never answers) past
    the hard time limit it is sent with, deaf to SIGTERM, as a process stuck in C code
    is: the prefork pool's SIGTERM at the limit cannot end the run, its SIGKILL a tenth
    of a second later does, and the run never reports (as under the OOM killer)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kind, generation = _admitted_as()
    partner().rpush(hung_key(ns), json.dumps({"kind": kind, "generation": generation, "pid": os.getpid()}))
    time.sleep(seconds)


@app.task(base=BreakerTask, bind=True, breaker=BREAKER, acks_late=True)
def hang_in_block(self: Any, ns: str, seconds: float) -> None:
    """Calls a partner that never answers, inside its guarded block, past the hard time
    limit it is sent with: the prefork pool's SIGTERM at the limit ends it."""
    partner().rpush(hung_key(ns), json.dumps({"pid": os.getpid()}))
    with self.breaker:
        time.sleep(seconds)
