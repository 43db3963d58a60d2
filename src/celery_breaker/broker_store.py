"""The default ``breaker_storage_url``: the broker's own Redis, when the broker is Redis.

A worker whose broker is Redis (standalone, TLS, a unix socket, Sentinel, Valkey) keeps
its breakers in that server unless ``breaker_storage_url`` says otherwise; this module
turns the broker's settings (URL, ``broker_transport_options``, ``broker_use_ssl``) into
a store URL. Free of Redis imports: only text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

__all__ = ["store_url_from_broker"]

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
    transport's ``sentinel_kwargs`` say ``ssl``, as kombu does). Anything else: None.
    """
    url = str(getattr(conf, "broker_url", None) or conf.get("broker_url") or "")
    first = url.split(";", maxsplit=1)[0].strip()
    scheme = urlsplit(first).scheme.lower() if "://" in first else ""
    target = _REDIS_BROKERS.get(scheme)
    if target is None:
        return None
    transport_options = conf.get("broker_transport_options") or {}
    use_ssl = conf.get("broker_use_ssl")
    if target == "redis+sentinel":
        master = transport_options.get("master_name")
        if not master:
            return None
        hosts = [urlsplit(part.strip()) for part in url.split(";") if part.strip()]
        auth = hosts[0].netloc.rpartition("@")[0]
        netloc = ",".join(part.netloc.rpartition("@")[2] for part in hosts)
        store = f"redis+sentinel://{auth + '@' if auth else ''}{netloc}/{quote(master, safe='')}"
        # kombu hands broker_use_ssl to the master's connections only; the Sentinels
        # get TLS from the transport's own sentinel_kwargs, if at all.
        sentinel_ssl = bool((transport_options.get("sentinel_kwargs") or {}).get("ssl"))
        return _with_broker_ssl(store, use_ssl, sentinel_ssl=sentinel_ssl)
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
