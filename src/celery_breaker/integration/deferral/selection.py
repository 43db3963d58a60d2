"""Which strategies defer an app's tasks, tried in order: chosen once per app, from the broker and the settings.

``breaker_park`` decides, with the broker (``integration/broker.py``):

* parking in the breaker store (``parking.py``) when it is asked for (``True``), or by
  default (``"auto"``) when the broker is Redis: then the store is as durable as the queue;
* on RabbitMQ, unless ``breaker_park=False``, RabbitMQ's own delayed delivery
  (``broker_delay.py``): durable like the queue, held by no worker;
* last, a countdown the receiving worker holds (``countdown.py``), in whole seconds when
  the app uses quorum queues (Celery then delays it in the broker itself, where its
  delay queues are set up for the queue: ``native_delay.py``; where they are not, the
  run is parked in a Redis store unless ``breaker_park=False``, else sent straight back).

Adding a mechanism is one module implementing ``DeferralStrategy`` and one line here.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ...storage import resolve_store
from ..broker import AMQP, MEMORY, REDIS, broker_kind, uses_quorum_queues
from ..settings import BreakerSettings, get_settings
from .broker_delay import BrokerDelay
from .countdown import CountdownRepublish
from .parking import ParkInStore
from .strategy import DeferralStrategy

__all__ = [
    "IN_DELAY_QUEUES", "choose_strategies", "deferral_strategies", "delays_in_rabbitmq", "falls_back_to_rabbitmq",
    "uses_delay_queues", "waiting_elsewhere",
]  # fmt: skip

#: Where broker-delay's runs wait, as operators' views say it.
IN_DELAY_QUEUES = "in RabbitMQ's delay queues (celery_breaker_delayed_*)"

_ATTRIBUTE = "_celery_breaker_strategies"
_LOCK = threading.Lock()


def choose_strategies(app: Any, settings: BreakerSettings) -> tuple[DeferralStrategy, ...]:
    """The strategies for ``app`` with these settings, most preferred first; the last always delivers."""
    kind = broker_kind(app.conf)
    parks_in_store = resolve_store(settings.storage_url).parking is not None
    chosen: list[DeferralStrategy] = []
    if parks_in_store and (settings.park is True or (settings.park == "auto" and kind == REDIS)):
        chosen.append(ParkInStore())
    if kind == AMQP and settings.park is not False:
        chosen.append(BrokerDelay())
    # (a run Celery's native delay would not bring back is parked rather than sent straight
    # back, where the app may park: decision 95)
    park = ParkInStore() if parks_in_store and settings.park is not False else None
    chosen.append(CountdownRepublish(whole_seconds=uses_quorum_queues(app), park=park))
    return tuple(chosen)


def deferral_strategies(app: Any) -> tuple[DeferralStrategy, ...]:
    """The app's strategies (chosen again when its settings are read again)."""
    settings = get_settings(app)
    found: tuple[BreakerSettings, tuple[DeferralStrategy, ...]] | None = getattr(app, _ATTRIBUTE, None)
    if found is None or found[0] is not settings:
        with _LOCK:
            found = (settings, choose_strategies(app, settings))
            setattr(app, _ATTRIBUTE, found)
    return found[1]


def delays_in_rabbitmq(app: Any) -> bool:
    """Whether ``app`` defers its tasks into RabbitMQ's delay queues (broker-delay first):
    what waits there is counted there (``delay_depth.py``), not in the store."""
    return isinstance(deferral_strategies(app)[0], BrokerDelay)


def uses_delay_queues(app: Any) -> bool:
    """Whether any of ``app``'s deferred tasks may wait in RabbitMQ's delay queues: it
    defers there first (``delays_in_rabbitmq``) or falls back there
    (``falls_back_to_rabbitmq``). What waits there is worth counting for it."""
    return any(isinstance(strategy, BrokerDelay) for strategy in deferral_strategies(app))


def falls_back_to_rabbitmq(app: Any) -> bool:
    """Whether ``app`` parks its deferred tasks in the breaker store and defers into
    RabbitMQ's delay queues the runs parking does not take (``breaker_park=True`` on
    RabbitMQ): every run while its store is down, and, with the store up, a run that
    would expire before it could be released or one a breaker nested in its body rejected."""
    first, *others = deferral_strategies(app)
    return isinstance(first, ParkInStore) and any(isinstance(strategy, BrokerDelay) for strategy in others)


def waiting_elsewhere(app: Any) -> str | None:
    """Where ``app``'s deferred tasks wait when they are not parked in the breaker store
    (what operators' counts of parked tasks cannot show, nor a purge reach): ``None``
    when the app parks them there, or its broker is in-process (``memory://``: tests)."""
    first = deferral_strategies(app)[0]
    if isinstance(first, ParkInStore) or broker_kind(app.conf) == MEMORY:
        return None
    if delays_in_rabbitmq(app):
        return IN_DELAY_QUEUES
    return "as countdown messages in the broker, held by workers until they are due"


def _reinit_locks_after_fork() -> None:
    # A lock another thread (the releaser, the store's agent) held at fork time would
    # stay held for ever in the child: a prefork child forked after start (autoscale,
    # max-tasks-per-child, one replacing a child killed at its limit) hung on it.
    global _LOCK  # noqa: PLW0603 (the lock is made again in the child)
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)
