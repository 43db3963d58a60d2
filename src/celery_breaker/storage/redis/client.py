"""Redis clients from store URLs: one place knows every topology (standalone, unix socket, Sentinel, Cluster; TLS)."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, unquote, urlencode

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from ...errors import ConfigurationError, StorageError
from ..urls import describe_url as describe
from ..urls import scrub_secrets
from .schemes import SCHEMES, TLS_SCHEMES

__all__ = [
    "CLIENT_ERRORS",
    "CLUSTER_POOL_WAITS",
    "DEFAULT_SOCKET_CONNECT_TIMEOUT",
    "DEFAULT_SOCKET_TIMEOUT",
    "SENTINEL_POOL_WAITS",
    "check_url",
    "describe",
    "is_cluster",
    "make_client",
    "node_of",
]

_REDIS_PY_SCHEMES = {"standalone": "redis", "tls": "rediss", "unix": "unix"}
_DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}
_FORMS = {
    "sentinel": "redis+sentinel://[[user]:password@]host:26379[,host:port...]/service_name[/db]",
    "cluster": "redis+cluster://[[user]:password@]host:6379[,host:port...]",
}


#: kombu's spelling of ``ssl_cert_reqs`` (a Celery broker URL's) and redis-py's.
_CERT_REQS = {"CERT_REQUIRED": "required", "CERT_OPTIONAL": "optional", "CERT_NONE": "none"}
_UNEXPECTED = re.compile(r"unexpected keyword argument '([^']+)'")


def _flag(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


#: The options redis-py reads as flags (any text but its few false ones reads as true),
#: and those that name a file or a directory.
_FLAGS = frozenset({"socket_keepalive", "retry_on_timeout", "ssl_check_hostname", "readonly", "sentinel_ssl"})
_FILES = frozenset({"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile"})


def _protocol(text: str) -> int:
    if text not in ("2", "3"):
        raise ValueError(text)
    return int(text)


def _cert_reqs(text: str) -> str:
    value = _CERT_REQS.get(text, text)
    if value not in ("required", "optional", "none"):
        raise ValueError(text)
    return value


#: The redis-py options a Sentinel or Cluster URL may carry, and how each is read
#: (anything else is a typo that redis-py would report only on first use, or drop).
_OPTION_TYPES: dict[str, tuple[Callable[[str], Any], str]] = {
    "username": (str, "text"),
    "password": (str, "text"),
    "client_name": (str, "text"),
    "db": (int, "a whole number"),
    "protocol": (_protocol, "2 or 3"),
    "max_connections": (int, "a whole number"),
    "health_check_interval": (float, "a number of seconds"),
    "socket_keepalive": (_flag, "true or false"),
    "sentinel_username": (str, "text"),
    "sentinel_password": (str, "text"),
    # TLS (rediss+ schemes only): what redis-py's SSLConnection takes, and what its
    # cluster client passes on to every node (it silently drops ssl_min_version and
    # ssl_ciphers, so neither is offered).
    "ssl_ca_certs": (str, "a file path"),
    "ssl_ca_path": (str, "a directory path"),
    "ssl_certfile": (str, "a file path"),
    "ssl_keyfile": (str, "a file path"),
    "ssl_password": (str, "text"),
    "ssl_cert_reqs": (_cert_reqs, "required, optional or none (or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE)"),
    "ssl_check_hostname": (_flag, "true or false"),
    "sentinel_ssl": (_flag, "true or false"),
}
_SSL_OPTIONS = tuple(name for name in _OPTION_TYPES if name.startswith("ssl_"))
_PLAIN_OPTIONS = {
    "sentinel": ("username", "password", "client_name", "db", "protocol", "max_connections",
                 "health_check_interval", "socket_keepalive", "sentinel_username", "sentinel_password"),
    # Cluster: db 0 only; redis-py drops health_check_interval for cluster nodes.
    "cluster": ("username", "password", "client_name", "db", "protocol", "max_connections", "socket_keepalive"),
}  # fmt: skip
_TLS_OPTIONS = {
    "sentinel": (*_PLAIN_OPTIONS["sentinel"], *_SSL_OPTIONS, "sentinel_ssl"),
    "cluster": (*_PLAIN_OPTIONS["cluster"], *_SSL_OPTIONS),
}

#: Every exception a client call may raise: a Cluster client's own errors (no slot
#: covered, no node reachable) are not ``RedisError``.
CLIENT_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)

#: A breaker must never make a call wait on a dead store for long: both timeouts are
#: always set (redis-py's own default would be 5 s, or none for connecting).
DEFAULT_SOCKET_TIMEOUT = 0.5
DEFAULT_SOCKET_CONNECT_TIMEOUT = 0.5


def _retry() -> Retry:
    # One immediate retry heals a pooled connection the server closed; a timeout is not
    # retried (redis-py's default would retry 10 times). Behind Sentinel, a connection
    # closed by a failover is reopened on the new master by the pool on the next
    # command; the in-call retry reopens the old address (redis-py 8.1), so at most
    # one call per connection sees the failover as a ConnectionError.
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def _release(version: str) -> tuple[int, ...]:
    """``"8.2.0"`` as ``(8, 2, 0)``: the leading numbers of a version string."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in found.group(0).split(".")) if found else ()


#: Whether a Cluster client with ``max_connections`` gets pools that wait for a free
#: connection. Before redis-py 8.2 the cluster client with a waiting pool handed one
#: connection to two threads under contention (closed under a reading thread: a
#: ``ValueError`` out of a breaker's call, and stand-ins), 3 of 3 runs on 5.1, 6.0, 7.0,
#: 7.4, 8.0 and 8.1; there a Cluster keeps redis-py's default pool, which fails a call
#: at once when every connection is in use (a store failure: ``breaker_on_storage_error``).
CLUSTER_POOL_WAITS = _release(redis.__version__) >= (8, 2)
#: The same behind Sentinel: before redis-py 7.0 ``BlockingConnectionPool.disconnect``
#: takes no argument, and Sentinel's pool passes one when the master moves (``TypeError``,
#: seen in the lower-bounds run on 5.1), and on 7.0 the waiting test still failed; it
#: passes on 8.2, the version verified. Before it Sentinel keeps the default pool.
SENTINEL_POOL_WAITS = _release(redis.__version__) >= (8, 2)


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool for the master, waiting for a free connection as ``BlockingConnectionPool`` does."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Endpoint:
    """Where a store URL points, parsed and checked; nothing connected."""

    topology: str
    target: str = ""  # standalone, tls, unix: the URL redis-py opens
    nodes: tuple[tuple[str, int], ...] = ()  # the Sentinels, or the cluster's startup nodes
    service: str = ""  # Sentinel: the monitored master's name
    options: dict[str, Any] = field(default_factory=dict)  # the data connections' redis-py options
    sentinel_options: dict[str, Any] = field(default_factory=dict)  # Sentinel: its own credentials and TLS


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (one ``make_client`` made) talks to a Redis Cluster: its keys
    live on several nodes, so no pipeline across breakers and one PUBLISH per primary."""
    return isinstance(client, RedisCluster)


def node_of(client: Any, key: str) -> str | None:
    """The name (``host:port``) of the Cluster node serving ``key`` as ``client`` (a
    Cluster's) last saw the slots, without asking the Cluster; ``None`` where no node
    serves it (a slot not covered, a topology being refreshed)."""
    try:
        return str(client.get_node_from_key(key).name)
    except Exception:
        return None


def check_url(url: str, parts: SplitResult, passed: list[tuple[str, str]]) -> None:
    """Raise ``ConfigurationError`` naming the URL and the fix unless ``make_client`` can use it.

    Connects nowhere, so a store can call it when it is configured rather than on first use.
    """
    _endpoint(url, parts, passed)


def make_client(
    url: str,
    parts: SplitResult,
    passed: list[tuple[str, str]],
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
) -> Any:
    """A redis-py client for store URL ``url`` (already split into ``parts``); ``passed``
    are the query options that are redis-py's own (``db``, ``password``, ``ssl_*``...).

    Raises ``ConfigurationError`` naming the URL when the URL or redis-py rejects it.
    Connecting happens on first use, except for Cluster: redis-py reads the slot map
    when the client is made, so a cluster that cannot be reached raises
    ``StorageError`` here (call this on first use, as ``RedisStore.client`` does).
    """
    endpoint = _endpoint(url, parts, passed)
    for name, value in passed:
        if name in _FILES and value and not os.path.exists(value):
            # An outage like any other (breaker_on_storage_error applies), said as what it is:
            # redis-py's own reads "Error 2 connecting to host:port. No such file or directory".
            # (Not checked with the configuration: a file may exist only where workers run.)
            raise StorageError(
                f"redis store {describe(url)}: {name} names {value!r}, which does not exist here; give the path "
                "of a file (or directory) this process can read"
            )
    timeouts: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    # With max_connections, a call finding every connection in use waits for one, up to
    # both timeouts (redis-py's default pool would fail it at once, "Too many
    # connections", and one busy moment would be a store outage for every breaker).
    bounded = any(name == "max_connections" for name, _ in passed)
    waiting: dict[str, Any] = {"timeout": socket_timeout + socket_connect_timeout} if bounded else {}
    if endpoint.topology == "sentinel":
        # Sentinel's own connections only ask where the master is; the master's get the
        # URL's credentials, db and options. Neither connects before the first command.
        sentinel_kwargs = {**timeouts, "retry": _retry(), **endpoint.sentinel_options}
        sentinel = Sentinel(list(endpoint.nodes), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call,unused-ignore]
        if bounded and SENTINEL_POOL_WAITS:
            waiting["connection_pool_class"] = _BlockingSentinelPool
        else:
            waiting = {}
        return sentinel.master_for(endpoint.service, retry=_retry(), **timeouts, **waiting, **endpoint.options)  # type: ignore[no-untyped-call,unused-ignore]
    if endpoint.topology == "cluster":
        if bounded and CLUSTER_POOL_WAITS:
            waiting["connection_pool_class"] = redis.BlockingConnectionPool
        else:
            waiting = {}
        try:
            # A cluster-level retry: redis-py retries a timeout too, and reads the slot
            # map again after a connection error (node connections never retry).
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in endpoint.nodes],  # type: ignore[no-untyped-call]
                retry=Retry(NoBackoff(), 1),
                **timeouts,
                **waiting,
                **endpoint.options,
            )
        except CLIENT_ERRORS as exc:
            raise StorageError(
                f"redis store {describe(url)}: cannot read the cluster's slot map: {scrub_secrets(str(exc), url)}"
            ) from exc
    try:
        if not bounded:
            return redis.Redis.from_url(endpoint.target, retry=_retry(), **timeouts)
        pool = redis.BlockingConnectionPool.from_url(endpoint.target, retry=_retry(), **timeouts, **waiting)
        client = redis.Redis(connection_pool=pool)
        client.auto_close_connection_pool = True  # (as Redis.from_url: close() closes the pool)
        return client
    except ValueError as exc:
        raise ConfigurationError(f"redis store URL {describe(url)!r}: {scrub_secrets(str(exc), url)}") from None


def _below_two(text: str) -> bool:
    """Whether ``max_connections=text`` reads as a whole number below 2 (``-5``, ``+1``
    too: redis-py refused them only at the first call, with a bare ``ValueError``); text
    that is no number is refused where the option is read."""
    try:
        return int(text) < 2
    except ValueError:
        return False


def _endpoint(url: str, parts: SplitResult, passed: list[tuple[str, str]]) -> _Endpoint:
    topology = SCHEMES[parts.scheme.lower()]
    if any(name == "max_connections" and _below_two(value) for name, value in passed):
        # The transitions subscription holds one for good: every call would wait for none.
        raise ConfigurationError(
            f"redis store URL {describe(url)!r}: max_connections must be at least 2 (one is the process's "
            "subscription to the transitions channel); give it the threads that call breakers at once, plus one"
        )
    for name, value in passed:
        if name in _FLAGS and value != "":
            try:
                _flag(value)
            except ValueError:
                # (redis-py reads any text but "0", "f", "false", "n" and "no" as true)
                raise ConfigurationError(
                    f"redis store URL {describe(url)!r}: {name}={value!r} must be true or false (write "
                    f"{name}=true or {name}=false)"
                ) from None
    if topology == "sentinel":
        return _sentinel_endpoint(url, parts, passed)
    if topology == "cluster":
        nodes, options = _nodes_and_options(url, parts, passed, topology)
        if options.pop("db", 0) != 0 or parts.path.strip("/") not in ("", "0"):
            raise ConfigurationError(
                f"redis store URL {describe(url)!r}: Redis Cluster has only database 0; write {_FORMS['cluster']}"
            )
        if parts.scheme.lower() in TLS_SCHEMES:
            options["ssl"] = True  # every node: the startup nodes and those the slot map names
        return _Endpoint(topology=topology, nodes=nodes, options=options)
    if any(name == "decode_responses" for name, _ in passed):
        # The store reads every reply (scripts', transitions, listings) as bytes: decoded,
        # each call failed as a store outage and a listing raised TypeError. redis-py
        # keeps the option's text from a URL, so even "false" turned decoding on.
        raise ConfigurationError(
            f"redis store URL {describe(url)!r}: decode_responses (whatever its value: redis-py reads a URL's as "
            "text, and even 'false' turns decoding on) would hand the store text where it reads Redis's replies "
            "as bytes; remove it"
        )
    database = unquote(parts.path).strip("/")
    if topology != "unix" and database and not database.isdigit():
        # redis-py reads a path that is no number as no database at all: db 0, another
        # application's breakers, say, with no word of it.
        raise ConfigurationError(
            f"redis store URL {describe(url)!r}: database {database!r} is not a number; write "
            f"{parts.scheme}://[[user]:password@]host[:port][/db], the db a number (0 by default)"
        )
    # Not urlunsplit: it drops the empty host of unix:///path, which redis-py requires.
    query = urlencode([(name, _CERT_REQS.get(value, value) if name == "ssl_cert_reqs" else value)
                       for name, value in passed])  # fmt: skip
    target = f"{_REDIS_PY_SCHEMES[topology]}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    try:
        # redis-py's own checks, connecting nowhere: parsing the URL, then building the
        # connection the pool would make (where a misspelt option or a bad value shows;
        # redis-py would otherwise report it only on the first breaker call).
        pool = redis.ConnectionPool.from_url(target)
        pool.connection_class(**pool.connection_kwargs)
        if pool.connection_kwargs.get("ssl_min_version") is not None:  # read only when connecting
            ssl.TLSVersion(pool.connection_kwargs["ssl_min_version"])
    except TypeError as exc:
        unknown = _UNEXPECTED.search(str(exc))
        option = unknown.group(1) if unknown else str(exc)
        raise ConfigurationError(
            f"redis store URL {describe(url)!r}: unknown option {option!r}; a {parts.scheme}:// URL takes "
            "key_prefix, idle_ttl, socket_timeout, socket_connect_timeout, time and redis-py's own connection "
            "options (db, username, password, client_name, protocol, health_check_interval, ssl_* ...)"
        ) from None
    except (ValueError, redis.RedisError) as exc:
        raise ConfigurationError(f"redis store URL {describe(url)!r}: {scrub_secrets(str(exc), url)}") from None
    return _Endpoint(topology=topology, target=target)


def _sentinel_endpoint(url: str, parts: SplitResult, passed: list[tuple[str, str]]) -> _Endpoint:
    nodes, options = _nodes_and_options(url, parts, passed, "sentinel")
    path = parts.path.strip("/")
    segments = path.split("/") if path else []
    if not segments or len(segments) > 2:
        raise ConfigurationError(
            f"redis store URL {describe(url)!r} must name the master's service after the hosts "
            f"(the name in Sentinel's 'sentinel monitor' line); write {_FORMS['sentinel']}"
        )
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ConfigurationError(
                f"redis store URL {describe(url)!r}: database {segments[1]!r} is not a number; "
                f"write {_FORMS['sentinel']}"
            )
        if "db" in options and options["db"] != int(segments[1]):
            raise ConfigurationError(
                f"redis store URL {describe(url)!r} names two databases, {segments[1]} in its path and "
                f"{options['db']} in db=; keep one"
            )
        options["db"] = int(segments[1])
    sentinel_options = {
        option: options.pop(f"sentinel_{option}")
        for option in ("username", "password")
        if f"sentinel_{option}" in options
    }
    if parts.scheme.lower() in TLS_SCHEMES:
        # TLS to the master; to the Sentinels too unless sentinel_ssl=false (kombu's
        # default with broker_use_ssl: plain Sentinels, a TLS master), with the same
        # certificate options.
        options["ssl"] = True
        if options.pop("sentinel_ssl", True):
            sentinel_options.update(ssl=True, **{name: options[name] for name in _SSL_OPTIONS if name in options})
    return _Endpoint(
        topology="sentinel",
        nodes=nodes,
        service=unquote(segments[0]),
        options=options,
        sentinel_options=sentinel_options,
    )


def _nodes_and_options(
    url: str, parts: SplitResult, passed: list[tuple[str, str]], topology: str
) -> tuple[tuple[tuple[str, int], ...], dict[str, Any]]:
    """The ``host:port`` list of a Sentinel or Cluster URL, and the redis-py options it carries."""
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes = tuple(_address(url, host, topology) for host in hosts.split(",") if host.strip())
    if not nodes:
        raise ConfigurationError(f"redis store URL {describe(url)!r} lists no host; write {_FORMS[topology]}")
    options = _options(url, parts, passed, topology)
    if credentials:
        user, has_password, password = credentials.partition(":")
        if user:
            options["username"] = unquote(user)
        if has_password and password:
            options["password"] = unquote(password)
    return nodes, options


def _options(url: str, parts: SplitResult, passed: list[tuple[str, str]], topology: str) -> dict[str, Any]:
    """The query options of a Sentinel or Cluster URL, read and checked (none connects anywhere)."""
    tls = parts.scheme.lower() in TLS_SCHEMES
    allowed = (_TLS_OPTIONS if tls else _PLAIN_OPTIONS)[topology]
    unknown = sorted({name for name, _ in passed} - set(allowed))
    needs_tls = [name for name in unknown if name in _TLS_OPTIONS[topology]]
    if not tls and needs_tls:
        raise ConfigurationError(
            f"redis store URL {describe(url)!r}: {', '.join(needs_tls)} only apply over TLS; "
            f"write {parts.scheme.lower().replace('+', 's+', 1)}://..."
        )
    if unknown:
        raise ConfigurationError(
            f"redis store URL {describe(url)!r}: unknown option(s) {', '.join(unknown)}; "
            f"a {parts.scheme}:// URL takes key_prefix, idle_ttl, socket_timeout, socket_connect_timeout, "
            f"time and {', '.join(allowed)}"
        )
    options: dict[str, Any] = {}
    for name, text in passed:
        read, kind = _OPTION_TYPES[name]
        try:
            options[name] = read(text)
        except ValueError:
            raise ConfigurationError(f"redis store URL {describe(url)!r}: {name}={text!r} must be {kind}") from None
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        # redis-py would silently connect without the client certificate.
        raise ConfigurationError(
            f"redis store URL {describe(url)!r}: ssl_keyfile needs ssl_certfile (the client certificate it is for)"
        )
    return options


_HOST_PORT = re.compile(r"^(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>[^:]*))?$")


def _address(url: str, text: str, topology: str) -> tuple[str, int]:
    default = _DEFAULT_PORTS[topology]
    found = _HOST_PORT.match(text.strip())
    port_text = found and found.group("port")
    if found is None or (port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536)):
        raise ConfigurationError(
            f"redis store URL {describe(url)!r}: {text!r} is not host[:port] with a port from 1 to 65535; "
            f"write {_FORMS[topology]} (the port defaults to {default})"
        )
    host = unquote(found.group("ipv6") or found.group("host"))
    return host, int(port_text) if port_text else default
