"""What celery-breaker knows about Celery's brokers, read from the app's settings (text only, no connections).

* The default ``breaker_storage_url``: a worker whose broker is Redis (standalone, TLS, a
  unix socket, Sentinel, Valkey) keeps its breakers in that server unless
  ``breaker_storage_url`` says otherwise; ``store_url_from_broker`` turns the broker's
  settings (URL, ``broker_transport_options``, ``broker_use_ssl``) into a store URL.
* What kind of broker it is (``broker_kind``: ``redis``, ``amqp`` for RabbitMQ, ``sqs``,
  ``memory``, ``other``), and whether the app's queues are RabbitMQ quorum queues.
* How long a worker may hold an unacknowledged message (``hold_limit``): Redis and SQS
  hand it to another worker after their ``visibility_timeout``; RabbitMQ closes the
  channel after its ``consumer_timeout`` (the worker then exits). A countdown deferral is
  such a held message, so it must stay inside the limit.
* RabbitMQ's dead-lettering headers, never carried into a deferral.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from ..errors import ConfigurationError

__all__ = [
    "AMQP",
    "DEAD_LETTER_HEADERS",
    "DEFAULT_CONSUMER_TIMEOUT",
    "DEFAULT_TRANSPORT",
    "REDIS",
    "broker_kind",
    "broker_scheme",
    "broker_url",
    "hold_limit",
    "redelivery_window",
    "store_url_from_broker",
    "transport_options",
    "uses_quorum_queues",
]

#: Broker kinds (``broker_kind``).
REDIS, AMQP, SQS, MEMORY, OTHER = "redis", "amqp", "sqs", "memory", "other"
_KINDS = {
    "redis": REDIS, "rediss": REDIS, "redis+socket": REDIS, "socket": REDIS, "sentinel": REDIS,
    "valkey": REDIS, "valkeys": REDIS,
    "amqp": AMQP, "amqps": AMQP, "pyamqp": AMQP, "librabbitmq": AMQP,
    "sqs": SQS, "memory": MEMORY,
}  # fmt: skip

#: RabbitMQ's own default ``consumer_timeout`` (30 minutes, since 3.8.15): a delivery not
#: acknowledged by then closes the consumer's channel.
DEFAULT_CONSUMER_TIMEOUT = 1800.0

#: Headers RabbitMQ adds, never carried into a deferral: its dead-lettering headers (it
#: would read them as a dead-letter cycle; Celery 5.7 drops the same set from retries,
#: 5.5 and 5.6 have no such list to import) and a quorum queue's delivery count.
DEAD_LETTER_HEADERS = frozenset(
    {
        "x-delivery-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)

#: Brokers that redeliver a message held unacknowledged longer than their
#: ``visibility_timeout``, with kombu's default for it (Redis 3600 s, SQS 1800 s).
_REDELIVERING_BROKERS = {
    "redis": 3600.0, "rediss": 3600.0, "redis+socket": 3600.0, "sentinel": 3600.0,
    "valkey": 3600.0, "valkeys": 3600.0, "sqs": 1800.0,
}  # fmt: skip


def broker_url(conf: Any) -> str:
    """The URL the app publishes its tasks to: ``broker_write_url`` when set, else
    ``broker_url`` (Celery's own reading, which honours ``CELERY_BROKER_WRITE_URL`` and
    ``CELERY_BROKER_URL``); a list of URLs (Celery's failover form,
    ``broker_url=["amqp://a//", "amqp://b//"]``) as kombu's text for it,
    ``amqp://a//;amqp://b//``. Read as ``str()``, a list was no URL: RabbitMQ was taken
    for an unknown broker (no broker-delay, countdowns not capped by ``consumer_timeout``:
    the worker exited), a Redis for none (breakers in memory)."""
    url = (
        getattr(conf, "broker_write_url", None)
        or conf.get("broker_write_url")
        or getattr(conf, "broker_url", None)
        or conf.get("broker_url")
        or ""
    )
    if isinstance(url, (list, tuple)):
        return ";".join(str(part).strip() for part in url if part)
    return str(url)


#: kombu's transport for a broker URL that names none (no URL at all: Celery's default
#: broker, ``amqp://guest@localhost//``; or only a host, ``broker_host``).
DEFAULT_TRANSPORT = "amqp"


def broker_scheme(conf: Any) -> str:
    """The scheme of the (first) broker URL, lowercase: ``redis``, ``amqp``, ``sqs``, ...;
    for a URL that names none, the transport kombu connects with: ``broker_transport``,
    else ``amqp`` (Celery's default broker is RabbitMQ on localhost)."""
    first = broker_url(conf).split(";", maxsplit=1)[0].strip()
    # (the scheme alone: ``urlsplit`` raised ValueError on the rest of a malformed URL,
    # ``redis://[::1:6379``, before Celery or the store could say what was wrong with it)
    if "://" in first:
        return first.partition("://")[0].lower()
    transport = conf.get("broker_transport")
    return str(transport).lower() if isinstance(transport, str) and transport else DEFAULT_TRANSPORT


def broker_kind(conf: Any) -> str:
    """``redis``, ``amqp`` (RabbitMQ), ``sqs``, ``memory`` or ``other``: what the broker URL names."""
    return _KINDS.get(broker_scheme(conf), OTHER)


def uses_quorum_queues(app: Any) -> bool:
    """Whether the app declares a RabbitMQ quorum queue (``task_default_queue_type`` or
    ``x-queue-type`` in ``task_queues``): Celery then delays countdown messages in the
    broker (native delayed delivery, whole seconds, ``celery_delayed_*``) instead of in the worker."""
    if broker_kind(app.conf) != AMQP:
        return False
    return any((queue.queue_arguments or {}).get("x-queue-type") == "quorum" for queue in app.amqp.queues.values())


def hold_limit(conf: Any, consumer_timeout: float) -> float | None:
    """Seconds a worker may hold an unacknowledged message before the broker acts: Redis
    and SQS redeliver it (``visibility_timeout``), RabbitMQ closes the channel
    (``consumer_timeout``, as the worker's ``breaker_consumer_timeout`` says); ``None``
    for brokers with no such limit."""
    if broker_kind(conf) == AMQP:
        return consumer_timeout
    return redelivery_window(conf)


def redelivery_window(conf: Any) -> float | None:
    """The broker's redelivery window in seconds, or None for brokers without one. A
    ``visibility_timeout`` that is no number of seconds > 0 (text, NaN, an int too large
    for a float) counts as the broker's default: it capped every countdown at 1 s (NaN)
    or stopped the worker's start on an ``OverflowError`` (``10**400``)."""
    default = _REDELIVERING_BROKERS.get(broker_scheme(conf))
    if default is None:
        return None
    value = transport_options(conf).get("visibility_timeout", default)
    try:
        found = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return found if found > 0 and not math.isnan(found) else default


def transport_options(conf: Any) -> Mapping[str, Any]:
    """Celery's ``broker_transport_options``: a dict, or none. Anything else is refused by
    name (its type only: a value put in the wrong place may hold a password); it failed
    with an ``AttributeError`` from this module, and kombu fails on it at its first
    connection."""
    options = conf.get("broker_transport_options") or {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            "broker_transport_options must be a dict of the broker transport's options, got a value "
            f"of type {type(options).__name__}; give a dict such as {{'visibility_timeout': 3600}}, or leave it unset"
        )
    return options


#: Broker URL schemes whose server can hold the breakers too, and the store scheme for each.
_REDIS_BROKERS = {
    "redis": "redis", "rediss": "rediss", "valkey": "valkey", "valkeys": "valkeys",
    "redis+socket": "redis+unix", "socket": "redis+unix", "sentinel": "redis+sentinel",
}  # fmt: skip


def store_url_from_broker(conf: Any) -> str | None:
    """The default ``breaker_storage_url``: the broker's own Redis, when the broker is Redis.

    ``redis://``, ``rediss://`` and ``valkey`` URLs are used as they are (database,
    credentials and TLS options included; ``broker_use_ssl`` makes them ``rediss://``
    with its certificate options); ``redis+socket://`` becomes ``redis+unix://``;
    kombu's ``sentinel://h1:26379;sentinel://h2:26379`` with
    ``broker_transport_options={"master_name": ...}`` becomes
    ``redis+sentinel://h1:26379,h2:26379/<master_name>``, or with ``broker_use_ssl``
    ``rediss+sentinel://...`` (TLS to the master; to the Sentinels only when the
    transport's ``sentinel_kwargs`` say ``ssl``, as kombu does), with the Sentinels'
    own ``username`` and ``password`` from those ``sentinel_kwargs``. Anything else: None.
    """
    url = broker_url(conf)
    first = url.split(";", maxsplit=1)[0].strip()
    scheme = broker_scheme(conf)
    target = _REDIS_BROKERS.get(scheme)
    if target is None or "://" not in first:  # (a host alone, broker_host: no URL to take the store's from)
        return None
    options = transport_options(conf)
    use_ssl = conf.get("broker_use_ssl")
    if target == "redis+sentinel":
        master = options.get("master_name")
        if not master:
            return None
        hosts = [urlsplit(part.strip()) for part in url.split(";") if part.strip()]
        auth = hosts[0].netloc.rpartition("@")[0]
        netloc = ",".join(part.netloc.rpartition("@")[2] for part in hosts)
        # (str: kombu asks the Sentinels for master_name=5 as "5"; quote() raised TypeError on it)
        store = f"redis+sentinel://{auth + '@' if auth else ''}{netloc}/{quote(str(master), safe='')}"
        # kombu hands the URL's credentials and broker_use_ssl to the master's connections
        # only; the Sentinels get theirs (TLS, a password) from the transport's own
        # sentinel_kwargs, if at all.
        sentinel_kwargs = options.get("sentinel_kwargs") or {}
        if not isinstance(sentinel_kwargs, Mapping):
            raise ConfigurationError(
                "broker_transport_options['sentinel_kwargs'] must be a dict of the Sentinels' connection options, "
                f"got a value of type {type(sentinel_kwargs).__name__}; give a dict such as {{'password': ...}}"
            )
        credentials = [
            f"sentinel_{name}={quote(str(sentinel_kwargs[name]), safe='')}"
            for name in ("username", "password")
            if sentinel_kwargs.get(name) is not None
        ]
        if credentials:
            store += "?" + "&".join(credentials)
        return _with_broker_ssl(store, use_ssl, sentinel_ssl=bool(sentinel_kwargs.get("ssl")))
    return _with_broker_ssl(target + first[len(scheme) :], use_ssl)


#: ``broker_use_ssl`` keys that the Redis transport passes on to redis-py and a store URL takes.
_BROKER_SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path",
                    "ssl_check_hostname", "ssl_password")  # fmt: skip
_TLS_SCHEMES = {"redis": "rediss", "valkey": "valkeys", "redis+sentinel": "rediss+sentinel"}


def _with_broker_ssl(url: str, use_ssl: Any, *, sentinel_ssl: bool = True) -> str:
    """The broker's TLS settings (``broker_use_ssl``) carried into the store URL derived
    from it: a ``redis://`` or Sentinel broker with ``broker_use_ssl`` speaks TLS, so the
    store does too, with the same certificates. Options the URL names already win.
    ``sentinel_ssl=False``: the Sentinels are asked over plain connections."""
    scheme, _, rest = url.partition("://")
    if not use_ssl or scheme not in {*_TLS_SCHEMES, *_TLS_SCHEMES.values()}:
        return url
    url = f"{_TLS_SCHEMES.get(scheme, scheme)}://{rest}"
    named = {name for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    extra = [] if sentinel_ssl else ["sentinel_ssl=false"]
    for name in _BROKER_SSL_KEYS if isinstance(use_ssl, Mapping) else ():
        value = use_ssl.get(name)
        if value is None or name in named:
            continue
        if name == "ssl_cert_reqs":  # ssl.CERT_REQUIRED (a VerifyMode) or kombu's text for it
            value = getattr(value, "name", str(value)).removeprefix("CERT_").lower()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        extra.append(f"{name}={quote(str(value), safe='')}")
    if not extra:
        return url
    return url + ("&" if "?" in url else "?") + "&".join(extra)
