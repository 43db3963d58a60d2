"""Breakers in Flower's ``/metrics``: the two lines a ``flowerconfig.py`` needs.

Flower runs ``flowerconfig.py`` as Python when it starts, and its ``/metrics`` serves the
process's default ``prometheus_client.REGISTRY``; a collector registered there shows up
next to Flower's own ``flower_*`` series::

    # flowerconfig.py
    from celery_breaker.monitoring.flower import register_breakers
    register_breakers("redis://localhost:6379/0")

Flower has no app of ours, so the breakers are read straight from the store: give the
``breaker_storage_url`` the workers use, or their Redis broker URL (the store the workers
default to). See ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..integration.broker import store_url_from_broker
from ..integration.settings import SETTINGS, with_key_prefix
from ..storage import check_storage_url, describe_url, is_shared_url

if TYPE_CHECKING:
    from .prometheus import BreakerCollector

__all__ = ["register_breakers", "store_url"]


def store_url(url: str, *, key_prefix: str | None = None, transport_options: Mapping[str, Any] | None = None) -> str:
    """The breaker store a worker with this store or broker URL uses.

    A Redis broker URL becomes the store URL a worker derives from it when
    ``breaker_storage_url`` is unset (``redis+socket://`` as ``redis+unix://``; kombu's
    ``sentinel://h1;sentinel://h2`` with ``transport_options={"master_name": ...}`` as
    ``redis+sentinel://``); a store URL is kept. ``key_prefix`` is the workers'
    ``breaker_key_prefix``, when they set one. A ``memory://`` URL (or any store only one
    process sees) raises ConfigurationError: Flower runs in a process of its own.
    """
    if not isinstance(url, str) or "://" not in url:
        got = repr(describe_url(url)) if isinstance(url, str) else f"a {type(url).__name__}"
        raise ConfigurationError(f"register_breakers: expected a Redis store or broker URL, got {got}")
    conf = {"broker_url": url, "broker_transport_options": dict(transport_options or {})}
    found = store_url_from_broker(conf) or url
    check_storage_url(found)
    if not is_shared_url(found):
        raise ConfigurationError(
            f"register_breakers: {describe_url(url)!r} is a store of one process only, and Flower runs in a "
            f"process of its own; give the Redis URL your workers keep their breakers in (breaker_storage_url, "
            f"or their Redis broker URL)"
        )
    return with_key_prefix(found, key_prefix or SETTINGS["breaker_key_prefix"])


def register_breakers(
    source: Any,
    *,
    key_prefix: str | None = None,
    transport_options: Mapping[str, Any] | None = None,
    registry: Any = None,
) -> BreakerCollector:
    """Export every breaker of ``source`` through ``prometheus_client.REGISTRY`` (or
    ``registry``); idempotent. Returns the collector (``celery_breaker.prometheus``).

    ``source`` is a store or broker URL (see ``store_url``: ``key_prefix`` and
    ``transport_options`` apply to it) or a Celery app (its own settings apply).
    """
    from .prometheus import register  # needs prometheus-client

    if isinstance(source, str):
        source = store_url(source, key_prefix=key_prefix, transport_options=transport_options)
    elif key_prefix is not None or transport_options is not None:
        raise ConfigurationError(
            "register_breakers: key_prefix and transport_options apply to a URL; an app's own settings "
            "(breaker_key_prefix, broker_transport_options) already say where its breakers are"
        )
    return register(source) if registry is None else register(source, registry)
