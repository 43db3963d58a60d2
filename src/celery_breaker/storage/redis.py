"""The Redis store (``redis://`` and friends): breakers shared by every process, each step one Lua script."""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from ..clock import Clock
from ..core import BreakerPolicy, BreakerSnapshot, Outcome, Probe, State, Ticket, Transition
from ..core.machine import _tally
from ..errors import CircuitOpenError, ConfigurationError
from .base import StorageError

__all__ = [
    "DEFAULT_IDLE_TTL",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_SOCKET_CONNECT_TIMEOUT",
    "DEFAULT_SOCKET_TIMEOUT",
    "SCHEMES",
    "RedisCell",
    "RedisStore",
    "policy_text",
]

logger = logging.getLogger("celery_breaker")

#: Our schemes, and the one redis-py understands for each (valkey speaks the same protocol).
SCHEMES = {
    "redis": "redis",
    "rediss": "rediss",
    "redis+unix": "unix",
    "valkey": "redis",
    "valkeys": "rediss",
    "valkey+unix": "unix",
}
DEFAULT_KEY_PREFIX = "breaker"
DEFAULT_IDLE_TTL = 86_400.0
#: A breaker must never make a call wait on a dead store for long: both timeouts are
#: always set (redis-py's own default would be 5 s, or none for connecting).
DEFAULT_SOCKET_TIMEOUT = 0.5
DEFAULT_SOCKET_CONNECT_TIMEOUT = 0.5
_OPTIONS = ("key_prefix", "idle_ttl", "socket_timeout", "socket_connect_timeout", "time")
_KEY_SUFFIXES = (":s", ":f", ":r", ":b", ":l")  # state, failure times, count ring, time buckets, leases
_SCRIPTS = ("acquire", "record", "operate", "snapshot")


def _script_sources() -> dict[str, str]:
    # Every script is the shared prelude (load, validate, save) plus one operation.
    folder = resources.files(__package__).joinpath("lua")
    common = folder.joinpath("common.lua").read_text(encoding="utf-8")
    return {name: common + "\n" + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in _SCRIPTS}


_SOURCES = _script_sources()
_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _positive(url: str, option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigurationError(f"redis store URL {url!r}: {option}={text!r} must be a number of seconds > 0")
    return value


# -- the policy as the scripts read it ------------------------------------------

_POLICY_FIELDS = (
    "failure_threshold", "window", "failure_rate_threshold", "minimum_calls", "count_window",
    "slow_call_duration", "slow_call_rate_threshold", "reset_timeout", "half_open_max_calls",
    "success_threshold", "half_open_max_wait",
)  # fmt: skip
_INT_FIELDS = frozenset(
    ("failure_threshold", "minimum_calls", "count_window", "half_open_max_calls", "success_threshold")
)


def policy_text(policy: BreakerPolicy) -> str:
    """The policy's numeric fields as one ARGV, also its fingerprint: equal text, equal rules.

    Classification (``record_exceptions``, ``ignore_exceptions``) stays with the caller:
    it runs in the worker and cannot be stored.
    """
    values = [getattr(policy, name) for name in _POLICY_FIELDS] + [policy.calls_to_judge, policy.probes_to_close]
    return "1;" + ";".join("" if value is None else repr(value) for value in values)


def _policy_from_text(text: str, base: BreakerPolicy) -> BreakerPolicy:
    fields = text.split(";")[1 : 1 + len(_POLICY_FIELDS)]
    changes = {
        name: None if value == "" else int(value) if name in _INT_FIELDS else float(value)
        for name, value in zip(_POLICY_FIELDS, fields, strict=True)
    }
    return base.replace(**changes)


def _opt_float(value: Any) -> float | None:
    return None if value in (b"", "", None) else float(value)


_REJECTING = (State.OPEN, State.FORCED_OPEN)
#: Real seconds a local OPEN or FORCED_OPEN view may reject calls before it is read
#: again, so an operator's close or reset in another process reaches this one.
VIEW_TTL = 1.0


class RedisCell:
    """One breaker in Redis, seen through a local view that every script reply refreshes.

    First cut: ``passing`` is always False, so every admission asks Redis and a trip in
    any process is seen by every other on its very next call (two round trips per
    admitted call: acquire, then the outcome). Rejections from the local view (OPEN
    until ``open_until``, FORCED_OPEN) cost nothing; they are counted in
    ``rejection_tally`` and flushed to Redis with this cell's next script call.
    """

    __slots__ = (
        "name", "key", "policy", "state", "generation", "open_until", "passing", "last_used",
        "rejection_tally", "events", "_store", "_clock", "_keys", "_key_arg", "_policy_text",
        "_offset", "_flushed", "_seen", "_dropped", "_lock", "__weakref__",
    )  # fmt: skip

    def __init__(self, store: RedisStore, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> None:
        self.name = name
        self.key = key
        self.policy = policy
        self.state = State.CLOSED
        self.generation = 0
        self.open_until: float | None = None
        self.passing = False
        self.last_used = clock.monotonic()
        self.rejection_tally = itertools.count()
        self.events: deque[Transition] = deque()
        self._store = store
        self._clock = clock
        self._keys = store.keys_for(name, key)
        self._key_arg = "-" if key is None else "+" + key
        self._policy_text = policy_text(policy)
        # Script times are Redis TIME (epoch seconds) unless the test seam is on, when
        # they are the caller's monotonic clock and need its offset to read as epoch.
        self._offset = clock.time() - self.last_used if store.client_time else 0.0
        self._flushed = 0
        self._seen = time.monotonic()
        self._dropped = False
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.name if self.key is None else f"{self.name}[{self.key}]"

    @property
    def evicted(self) -> bool:
        """True when the holder must ask the store again: a rejecting view older than ``VIEW_TTL``."""
        return self._dropped or (self.state in _REJECTING and time.monotonic() - self._seen > VIEW_TTL)

    @evicted.setter
    def evicted(self, value: bool) -> None:
        self._dropped = value

    # -- one round trip ------------------------------------------------------

    def _call(self, script: str, now: float, *args: str, policy: str | None = None) -> list[Any]:
        pending = self._take_pending()
        store = self._store
        head = [repr(now) if store.client_time else "", store.ttl_ms, str(pending)]
        try:
            reply = store.run(script, self._keys, [*head, policy or self._policy_text, self.name, self._key_arg, *args])
        except StorageError:
            with self._lock:
                self._flushed -= pending  # not counted in Redis: send them next time
            raise
        try:
            self._apply(reply, now)
        except (ValueError, IndexError, AttributeError, TypeError) as exc:
            raise StorageError(f"redis store {store.url}: {script} answered {reply!r}") from exc
        return reply

    def _take_pending(self) -> int:
        with self._lock:
            seen = _tally(self.rejection_tally)
            pending = seen - self._flushed
            self._flushed = seen
            return pending

    def forget_pending(self) -> None:
        """After fork: the rejections counted so far are the parent's to flush."""
        with self._lock:
            self._flushed = _tally(self.rejection_tally)

    def _apply(self, reply: list[Any], now: float) -> None:
        state = State(reply[0].decode())
        remaining = _opt_float(reply[2])
        self.generation = int(reply[1])
        self.open_until = None if remaining is None else now + remaining
        self.state = state
        self.last_used = now
        self._seen = time.monotonic()
        if reply[6]:
            logger.warning(
                "breaker %s: reset unreadable state in Redis (%s)", self.label, reply[6].decode(),
                extra={"breaker": self.name, "breaker_key": self.key},
            )  # fmt: skip
        if reply[7]:
            self._adopt(reply[7].decode())
        if reply[8]:
            at = float(reply[3]) + self._offset
            target = State(reply[9].decode())
            self.events.append(
                Transition(
                    name=self.name,
                    key=self.key,
                    source=State(reply[8].decode()),
                    target=target,
                    reason=reply[10].decode(),
                    generation=int(reply[11]),
                    at=at,
                    open_until=at + remaining if target is State.OPEN and remaining is not None else None,
                    failures=int(reply[12]),
                    calls=int(reply[13]),
                    trips=int(reply[14]),
                )
            )

    def _adopt(self, text: str) -> None:
        # Another process created (or reset) this breaker with other rules: they win.
        try:
            self.policy = _policy_from_text(text, self.policy)
        except (ConfigurationError, ValueError):
            logger.warning("breaker %s: stored policy %r is unreadable here; Redis keeps using it", self.label, text)
            return
        self._policy_text = text

    # -- the Cell protocol ---------------------------------------------------

    def refresh(self, now: float) -> None:
        """Read the breaker's state (creating it if needed) into the local view."""
        self._call("operate", now, "view")

    def acquire(self, policy: BreakerPolicy, now: float) -> Ticket:
        reply = self._call("acquire", now)
        verdict = reply[4]
        if verdict == b"probe":
            return Probe(int(reply[1]), int(reply[5]))
        if verdict == b"reject":
            raise CircuitOpenError._rejected(self.name, self.key, State(reply[0].decode()), _opt_float(reply[5]))
        return int(reply[1])

    def finish(self, ticket: Ticket, outcome: Outcome, duration: float, policy: BreakerPolicy, now: float) -> None:
        generation, lease = (ticket.generation, ticket.lease) if isinstance(ticket, Probe) else (ticket, -1)
        self._call("record", now, str(generation), str(lease), str(int(outcome)), repr(float(duration)))

    def record_success(self, ticket: Ticket, duration: float, policy: BreakerPolicy, now: float) -> None:
        self.finish(ticket, Outcome.SUCCESS, duration, policy, now)

    def force(self, target: State, policy: BreakerPolicy, now: float) -> None:
        self._call("operate", now, "force", target.value)

    def reset(self, policy: BreakerPolicy, now: float) -> None:
        text = policy_text(policy)
        self._call("operate", now, "reset", policy=text)
        self.policy, self._policy_text = policy, text

    def note_deferral(self) -> None:
        self._call("operate", self._clock.monotonic(), "deferral")

    def snapshot(self, now: float) -> BreakerSnapshot:
        return self.decode_snapshot(self._call("snapshot", now), self._offset)

    @staticmethod
    def decode_snapshot(reply: list[Any], offset: float) -> BreakerSnapshot:
        """A snapshot script's reply as a ``BreakerSnapshot`` (script times + ``offset`` = epoch)."""

        def wall(value: Any) -> float | None:
            seconds = _opt_float(value)
            return None if seconds is None else seconds + offset

        key_arg = reply[30].decode()
        return BreakerSnapshot(
            name=reply[29].decode(),
            key=None if key_arg == "-" else key_arg[1:],
            state=State(reply[0].decode()),
            generation=int(reply[1]),
            successes=int(reply[15]),
            failures=int(reply[16]),
            rejections=int(reply[17]),
            deferrals=int(reply[18]),
            trips=int(reply[19]),
            last_failure=wall(reply[20]),
            last_success=wall(reply[21]),
            opened_at=wall(reply[22]),
            open_until=wall(reply[23]),
            retry_after=_opt_float(reply[24]),
            window_calls=int(reply[25]),
            window_failures=int(reply[26]),
            window_slow_calls=int(reply[27]),
            probes_in_flight=int(reply[28]),
        )

    def __repr__(self) -> str:
        return f"<RedisCell {self.label!r} {self.state.value} generation {self.generation}>"


class RedisStore:
    """Breakers in Redis, shared by every process and host that opens the same URL.

    URL: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
    ``redis+unix:///path/to.sock`` and the ``valkey`` spellings of each, with options
    ``key_prefix`` (default ``breaker``), ``idle_ttl`` (seconds a breaker's keys live
    unused, default one day), ``socket_timeout`` and ``socket_connect_timeout`` (default
    0.5 s each); any other query option goes to redis-py.

    ``time=client`` is a **test seam**: the scripts then use the caller's clock (a
    ``FakeClock``) instead of Redis ``TIME``, so a fake-clock test suite runs against a
    real server. Never use it in production: shared decisions would then depend on
    every worker's clock agreeing.

    One redis-py client per process, created on first use and again after a fork.
    """

    def __init__(
        self,
        url: str,
        *,
        connection_url: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        idle_ttl: float = DEFAULT_IDLE_TTL,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_SOCKET_CONNECT_TIMEOUT,
        client_time: bool = False,
    ) -> None:
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ConfigurationError(
                f"redis store URL {url!r}: key_prefix={key_prefix!r} must be non-empty and "
                "without braces (they delimit the Redis Cluster hash tag)"
            )
        self.url = url
        self.key_prefix = key_prefix
        self.idle_ttl = idle_ttl
        self.client_time = client_time
        self._connection_url = connection_url or url
        self._timeouts = (socket_timeout, socket_connect_timeout)
        self.ttl_ms = str(max(1, int(idle_ttl * 1000)))
        self._lock = threading.Lock()
        self._pid = -1
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}
        self._cells: weakref.WeakValueDictionary[tuple[str, str | None], RedisCell] = weakref.WeakValueDictionary()
        _STORES.add(self)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        parts = urlsplit(url)
        scheme = SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            raise ConfigurationError(f"redis store URL {url!r}: scheme must be one of {', '.join(SCHEMES)}")
        ours: dict[str, str] = {}
        passed: list[tuple[str, str]] = []
        for field, value in parse_qsl(parts.query, keep_blank_values=True):
            if field in _OPTIONS:
                ours[field] = value
            else:
                passed.append((field, value))  # db, password, ssl_*: redis-py's own
        time_source = ours.get("time", "server")
        if time_source not in ("server", "client"):
            raise ConfigurationError(f"redis store URL {url!r}: time={time_source!r}; allowed: server, client (tests)")
        return cls(
            url,
            connection_url=_connection_url(scheme, parts.netloc, parts.path, urlencode(passed)),
            key_prefix=ours.get("key_prefix", DEFAULT_KEY_PREFIX),
            idle_ttl=_positive(url, "idle_ttl", ours.get("idle_ttl", str(DEFAULT_IDLE_TTL))),
            socket_timeout=_positive(url, "socket_timeout", ours.get("socket_timeout", str(DEFAULT_SOCKET_TIMEOUT))),
            socket_connect_timeout=_positive(
                url, "socket_connect_timeout", ours.get("socket_connect_timeout", str(DEFAULT_SOCKET_CONNECT_TIMEOUT))
            ),
            client_time=time_source == "client",
        )

    # -- the connection ------------------------------------------------------

    def client(self) -> redis.Redis:
        """This process's client (a client inherited through fork shares its parent's sockets)."""
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._connect()
            assert self._client is not None
            return self._client

    def _connect(self) -> None:
        socket_timeout, connect_timeout = self._timeouts
        try:
            client = redis.Redis.from_url(
                self._connection_url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                # One immediate retry heals a pooled connection the server closed; a
                # timeout is not retried (redis-py's default would retry 10 times).
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        except ValueError as exc:
            raise ConfigurationError(f"redis store URL {self.url!r}: {exc}") from None
        if self._pid != -1:
            for cell in list(self._cells.values()):
                cell.forget_pending()  # the parent flushes its own rejections
        self._client = client
        self._scripts = {name: Script(client, source) for name, source in _SOURCES.items()}
        self._pid = os.getpid()

    def run(self, script: str, keys: list[str], args: list[str]) -> list[Any]:
        """Run one script; any Redis failure becomes ``StorageError``."""
        client = self.client()
        try:
            reply = self._scripts[script](keys, args, client=client)
        except redis.RedisError as exc:
            raise StorageError(f"redis store {self.url}: {script} failed: {exc}") from exc
        if not isinstance(reply, list) or not reply:
            raise StorageError(f"redis store {self.url}: {script} answered {reply!r}")
        return reply

    # -- breakers ------------------------------------------------------------

    def keys_for(self, name: str, key: str | None) -> list[str]:
        """The keys of one breaker; they share the hash tag ``{prefix:name[:key]}``."""
        tag = f"{self.key_prefix}:{quote(name, safe='')}"
        if key is not None:
            tag += f":{quote(key, safe='')}"
        return [f"{{{tag}}}{suffix}" for suffix in _KEY_SUFFIXES]

    def cell(self, name: str, key: str | None, policy: BreakerPolicy, clock: Clock) -> RedisCell:
        ident = (name, key)
        found = self._cells.get(ident)
        if found is None:
            with self._lock:
                found = self._cells.get(ident)
                if found is None:
                    found = self._cells[ident] = RedisCell(self, name, key, policy, clock)
                    found.evicted = True  # nothing read yet
        if found.evicted:
            # A new cell learns the stored policy and state; an old rejecting view is
            # read again. (Outside the lock: the round trip may create the client.)
            found.refresh(clock.monotonic())
            found.evicted = False
        return found

    def snapshots(self, clock: Clock) -> list[BreakerSnapshot]:
        """Every breaker under this store's key prefix (a SCAN: for operators, not hot paths)."""
        pattern = "{" + _glob_escape(self.key_prefix) + ":*}:s"
        now = clock.monotonic()
        offset = clock.time() - now if self.client_time else 0.0
        found: list[BreakerSnapshot] = []
        try:
            state_keys = [k.decode() for k in self.client().scan_iter(match=pattern, count=500)]
        except redis.RedisError as exc:
            raise StorageError(f"redis store {self.url}: listing breakers failed: {exc}") from exc
        for state_key in state_keys:
            tag = state_key[: -len(":s")]
            keys = [tag + suffix for suffix in _KEY_SUFFIXES]
            now_arg = repr(now) if self.client_time else ""
            reply = self.run("snapshot", keys, [now_arg, self.ttl_ms, "0", "", "", ""])
            if reply[0] == b"absent":
                continue  # expired since the scan saw it
            found.append(RedisCell.decode_snapshot(reply, offset))
        return found

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"


def _connection_url(scheme: str, netloc: str, path: str, query: str) -> str:
    # Not urlunsplit: it drops the empty host of unix:///path, which redis-py requires.
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _reinit_locks_after_fork() -> None:
    # A lock held by another thread at fork time would stay held forever in the child;
    # the client itself is replaced lazily (``RedisStore.client`` checks the pid).
    for store in list(_STORES):
        store._lock = threading.Lock()
        for cell in list(store._cells.values()):
            cell._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)
