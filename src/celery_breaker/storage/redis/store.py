"""The Redis store (``redis://`` and friends): breakers shared by every process, each step one Lua script."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis

from ...clock import Clock
from ...core import BreakerPolicy, BreakerSnapshot, State
from ...core.policy import LONGEST_SECONDS
from ...errors import ConfigurationError, StorageError
from ...labels import breaker_label
from ..contract import Selected, UnreadableBreaker
from ..masking import MaskedText
from ..registry import remember
from ..urls import ENCODE_PASSWORD, describe_url, password_misread, scrub_secrets
from .agent import Agent
from .cell import Orphan, RedisCell
from .client import (
    CLIENT_ERRORS,
    DEFAULT_SOCKET_CONNECT_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    check_url,
    is_cluster,
    make_client,
    node_of,
)
from .damage import advice, classify, failure
from .history import RedisHistory
from .keys import breaker_tag, quote_part
from .listing import list_snapshots, read_snapshots
from .parking import RedisParking
from .replies import opt_float
from .schemes import SCHEMES
from .scripts import Scripts

__all__ = ["DEFAULT_IDLE_TTL", "DEFAULT_KEY_PREFIX", "RedisStore"]

logger = logging.getLogger("celery_breaker")

DEFAULT_KEY_PREFIX = "breaker"
DEFAULT_IDLE_TTL = 86_400.0
_OPTIONS = ("key_prefix", "idle_ttl", "socket_timeout", "socket_connect_timeout", "time")
#: Scripts sent per round trip by ``run_many`` (listing breakers for operators).
PIPELINE_BATCH = 500
_KEY_SUFFIXES = (":s", ":f", ":r", ":b", ":l")  # state, failure times, count ring, time buckets, leases
_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _url_problem(exc: BaseException, url: str) -> str:
    """What is wrong with store URL ``url`` (``exc``'s text), with no password or piece of
    one in it: a parser that misreads a password quotes the piece it took for a port."""
    if password_misread(url):
        return (
            f"redis store URL {describe_url(url)!r}: its password holds an unencoded '/', '?' or '#', "
            f"so the host cannot be read; {ENCODE_PASSWORD}"
        )
    problem = scrub_secrets(str(exc), url)
    if not problem.startswith("redis store URL"):
        problem = f"redis store URL {describe_url(url)!r}: {problem}"
    return problem


def _positive(url: str, option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= LONGEST_SECONDS):
        raise ConfigurationError(
            f"redis store URL {describe_url(url)!r}: {option}={text!r} must be a number of seconds > 0, "
            f"at most {LONGEST_SECONDS:.0f} (ten years)"
        )
    return value


#: Seconds ``RedisStore.flush`` goes on sending other cells' counts after one failed.
FLUSH_AFTER_FAILURE = 1.0
#: Seconds a Cluster node (or a single server) that did not answer a script is not asked
#: to read a new breaker (the fallback's retry interval: a store that is down is tried as often).
UNANSWERED_FOR = 5.0


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

    shared = True
    """Every process that opens the same URL sees the same breakers."""
    down = False
    """Outages are tracked by the ``FallbackStore`` each breaker wraps this store in."""

    def __init__(
        self,
        url: str,
        *,
        parts: Any = None,
        passed: list[tuple[str, str]] | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        idle_ttl: float = DEFAULT_IDLE_TTL,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_SOCKET_CONNECT_TIMEOUT,
        client_time: bool = False,
    ) -> None:
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ConfigurationError(
                f"redis store URL {describe_url(url)!r}: key_prefix={key_prefix!r} must be non-empty and "
                "without braces (they delimit the Redis Cluster hash tag)"
            )
        if isinstance(idle_ttl, bool) or not isinstance(idle_ttl, (int, float)) or not 0 < idle_ttl <= LONGEST_SECONDS:
            # (Redis refuses a key lifetime past its clock's range: every call would fail.)
            raise ConfigurationError(
                f"redis store {describe_url(url)!r}: idle_ttl must be seconds > 0, at most "
                f"{LONGEST_SECONDS:.0f} (ten years), got {idle_ttl!r:.100}"
            )
        self.url = url
        self.label = describe_url(url)  # for messages: the password masked
        self.key_prefix = key_prefix
        #: The prefix as every key and the channel hold it (``keys.py``).
        self.quoted_prefix = quote_part(key_prefix)
        self.idle_ttl = idle_ttl
        self.client_time = client_time
        self._parts = parts if parts is not None else urlsplit(url)
        self._passed = passed or []
        self._timeouts = (socket_timeout, socket_connect_timeout)
        self.socket_timeout = socket_timeout
        self.channel = f"{self.quoted_prefix}:transitions"
        #: True while this process hears every transition (its agent is subscribed).
        self.live = False
        #: True once the agent, subscribed, has read again every view it held (set after
        #: ``live``; cleared with it). Until then a breaker deleted meanwhile may be re-read.
        self.settled = False
        #: Bumped whenever ``live`` changes: a view read in an earlier epoch never passes calls.
        self.epoch = 0
        self._agent: Agent | None = None
        self._dark_since: float | None = None
        #: How many times this process lost the transitions channel (and went dark).
        self.losses = 0
        self._by_state_key: weakref.WeakValueDictionary[str, RedisCell] = weakref.WeakValueDictionary()
        self._barriers: dict[str, threading.Event] = {}
        #: Told the state key of every transition heard (``watch``): the releaser's wake-ups.
        self._watchers: list[Callable[[str], object]] = []
        self._parking: RedisParking | None = None
        self._history: RedisHistory | None = None
        self.ttl_ms = str(max(1, int(idle_ttl * 1000)))
        #: Seconds a breaker's keys outlive any script that read them, at the least: a script
        #: gives them idle_ttl again only once a tenth of it, at most a minute, has run down
        #: (``common.lua`` save()). A view older may be of a breaker that expired since.
        self.sure_life = idle_ttl - min(idle_ttl / 10, 60.0)
        self._lock = threading.Lock()
        self._pid = -1
        self._client: redis.Redis | None = None
        self._scripts: Scripts | None = None
        self._cells: weakref.WeakValueDictionary[tuple[str, str | None], RedisCell] = weakref.WeakValueDictionary()
        #: Cluster nodes a script could not reach (``""``: the server, on a single server or a
        #: Sentinel master), and until when a new breaker's first read is not sent there
        #: (``UNANSWERED_FOR``): it fails at once, as on a store that is down.
        self._unanswered: dict[str, float] = {}
        #: What cells no breaker object uses any more had counted and not sent
        #: (``RedisCell.__del__``): the next flush sends it.
        self.orphans: list[Orphan] = []
        #: Held while orphans are sent: a flush on another thread waits for the ones taken.
        self._sending_orphans = threading.Lock()
        _STORES.add(self)
        remember(self)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """Make a store from a Redis URL: ``redis``, ``rediss``, ``redis+unix``, ``+sentinel`` or ``+cluster``."""
        try:
            return cls._from_url(url)
        except (ConfigurationError, ValueError) as exc:
            raise ConfigurationError(_url_problem(exc, url)) from None

    @classmethod
    def _from_url(cls, url: str) -> RedisStore:
        if password_misread(url):  # (refused before a parser reads a piece of it as the host)
            raise ConfigurationError(ENCODE_PASSWORD)
        parts = urlsplit(url)
        scheme = SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            raise ConfigurationError(
                f"redis store URL {describe_url(url)!r}: scheme must be one of {', '.join(SCHEMES)}"
            )
        ours: dict[str, str] = {}
        passed: list[tuple[str, str]] = []
        for field, value in parse_qsl(parts.query, keep_blank_values=True):
            if field in _OPTIONS:
                ours[field] = value
            else:
                passed.append((field, value))  # db, password, ssl_*: redis-py's own
        time_source = ours.get("time", "server")
        if time_source not in ("server", "client"):
            raise ConfigurationError(
                f"redis store URL {describe_url(url)!r}: time={time_source!r}; allowed: server, client (tests)"
            )
        check_url(url, parts, passed)  # a bad URL fails when configured, not on a breaker's first call
        return cls(
            url,
            parts=parts,
            passed=passed,
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

    def forget_client(self, client: Any) -> None:
        """Make the next ``client()`` connect afresh, if ``client`` is still this process's
        (a Cluster client that knows no node any more: redis-py 5.1 after every node
        failed it once). Its connections close as it is collected."""
        with self._lock:
            if self._client is client:
                self._client = None

    def _connect(self) -> None:
        socket_timeout, connect_timeout = self._timeouts
        try:
            client = make_client(
                self.url,
                self._parts,
                self._passed,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
            )
        except StorageError as exc:  # (a Cluster's slot map: redis-py's error may quote the URL)
            fix = advice(exc.__cause__)  # (a refused password, say: as every other command's error)
            raise StorageError(scrub_secrets(str(exc), self.url) + (f" ({fix})" if fix else "")) from exc.__cause__
        except ConfigurationError as exc:
            raise ConfigurationError(_url_problem(exc, self.url)) from None
        self._client = client
        self._scripts = Scripts(client)
        self._pid = os.getpid()

    def scripts(self) -> Scripts:
        """This process's scripts (registered with its client)."""
        client = self.client()
        scripts = self._scripts
        if scripts is None or scripts.client is not client:
            with self._lock:
                if self._scripts is None or self._scripts.client is not client:
                    self._scripts = Scripts(client)
                scripts = self._scripts
        return scripts

    def eval(self, script: str, keys: Sequence[str | bytes], args: Sequence[Any], *, doing: str) -> Any:
        """Run one script (``storage/lua/<script>.lua``) and return its raw reply; any Redis
        failure becomes ``StorageError`` saying what was being done (``doing``)."""
        try:
            reply = self.scripts()(script, keys, args)
        except CLIENT_ERRORS as exc:
            if isinstance(exc, redis.ReadOnlyError):
                self._leave_replica()
            elif isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and keys:
                self._unanswering(keys[0])
            raise StorageError(failure(self.label, doing, exc)) from exc
        if self._unanswered and keys:
            # (A node that answers again is asked for new breakers at once: else each new
            # one there took its stand-in until 5 s after its last failure, the outage said again.)
            self._unanswered.pop(self._node_of(keys[0]) or "", None)
        return reply

    def _node_of(self, key: str | bytes) -> str | None:
        """The Cluster node serving ``key``; ``""`` on a single server or a Sentinel master
        (one serves every key); ``None`` where the Cluster's slot map names none."""
        client = self._client
        if client is None or not is_cluster(client):
            return ""
        return node_of(client, key.decode() if isinstance(key, bytes) else key)

    def _unanswering(self, key: str | bytes) -> None:
        """The node serving ``key`` (on a Cluster; else the server) did not answer: new
        breakers there are not asked for ``UNANSWERED_FOR`` (``_refuse_unanswered``), or
        until a script there is answered (``eval``)."""
        node = self._node_of(key)
        if node is not None:
            self._unanswered[node] = time.monotonic() + UNANSWERED_FOR

    def _refuse_unanswered(self, cell: RedisCell) -> None:
        """Raise ``StorageError`` for a new breaker whose node (a Cluster's, or the server)
        just failed another: asked, it would wait out the timeouts again, for each new
        per-key breaker (a second each on a hung node), where a store that is down gives
        its stand-in at once. (The fallback asks a store that is down for a new breaker
        while it still hears its transitions: a Cluster with another primary down, or a
        hung server for the 1.5 s its agent takes to notice.)"""
        if not self._unanswered:
            return
        self.client()  # (made: its topology names the node)
        node = self._node_of(cell.state_key)
        until = None if node is None else self._unanswered.get(node)
        if node is None or until is None:
            return
        left = until - time.monotonic()
        if left <= 0:
            self._unanswered.pop(node, None)
            return
        where = f"its cluster node {node}" if node else "the server"
        raise StorageError(
            f"redis store {self.label}: breaker {cell.label}: {where} did not answer another "
            f"breaker's call; asked again in {left:.1f} s"
        )

    def _leave_replica(self) -> None:
        """A write met a replica at the store's address: a failover that moved a DNS name
        or a virtual IP to the new master leaves the connections already open on the old
        one, demoted, and redis-py keeps a connection that got an error reply (every retry
        met the replica again, for good). The idle ones are closed, so the next command
        connects anew. (Sentinel's connections leave a demoted master themselves; a
        Cluster's replicas redirect.)"""
        client = self._client
        if client is None or is_cluster(client):
            return
        pool = client.connection_pool
        with contextlib.suppress(*CLIENT_ERRORS, OSError):
            try:
                pool.disconnect(inuse_connections=False)
            except TypeError:  # (before redis-py 7.0 a waiting pool's takes no argument: it closes all)
                pool.disconnect()

    def run(self, script: str, keys: list[Any], args: list[Any]) -> list[Any]:
        """Run one breaker script (``keys``: text or bytes); any Redis failure becomes ``StorageError``."""
        return self._checked(script, self.eval(script, keys, args, doing=script))

    def _checked(self, script: str, reply: Any) -> list[Any]:
        """A script's reply, which is always a non-empty list; anything else is a ``StorageError``."""
        if not isinstance(reply, list) or not reply:
            raise StorageError(f"redis store {self.label}: {script} answered {reply!r}")
        return reply

    # -- breakers ------------------------------------------------------------

    def keys_for(self, name: str, key: str | None) -> list[str]:
        """The keys of one breaker; they share the hash tag ``{prefix:name[:key]}``, each
        part quoted (``keys.py``)."""
        tag = breaker_tag(self.quoted_prefix, name, key)
        return [tag + suffix for suffix in _KEY_SUFFIXES]

    def cell(self, name: str, key: str | None, policy: BreakerPolicy, clock: Clock, *, read: bool = True) -> RedisCell:
        """This process's cell of the breaker, made and read (which makes the breaker in
        Redis if it is not there) if need be; ``read=False``: made unread, left to be read
        by its next use (``_flush_orphans``: an orphan's send must not make the breaker)."""
        ident = (name, key)
        found = self._cells.get(ident)
        made = False
        if found is None:
            with self._lock:
                found = self._cells.get(ident)
                if found is None:
                    found = self._cells[ident] = RedisCell(self, name, key, policy, clock)
                    self._by_state_key[found.state_key] = found
                    found.evicted = True  # nothing read yet
                    made = True
        self.ensure_agent()
        if read and found.evicted:
            if made:
                self._refuse_unanswered(found)
            # A new cell learns the stored policy and state; an old rejecting view is
            # read again. (Outside the lock: the round trip may create the client.)
            found.refresh(clock.monotonic())
            found.evicted = False
        return found

    def delete(self, name: str, key: str | None) -> bool:
        """Delete breaker ``name``/``key``: its state, windows, leases and metrics history, in
        one script (``forget.lua``) that tells every process. A later call through it, in any
        process, creates it afresh (CLOSED, counters zeroed, that caller's policy). Its parked
        tasks are left alone. True when it existed."""
        keys = [*self.keys_for(name, key), self.history.key(name, key)]
        doing = f"deleting breaker {breaker_label(name, key)}"
        reply = self._checked("forget", self.eval("forget", keys, [self.channel], doing=doing))
        cell = self._cells.get((name, key))
        if cell is not None:
            # What forget.lua publishes, taken here at once: heard later (or, the agent not
            # yet subscribed, never), the next read found the breaker's state lost.
            cell.hear("0", 0, State.CLOSED, None)
        return bool(int(reply[0]))

    @property
    def parking(self) -> RedisParking:
        """Where this store keeps parked (deferred) tasks."""
        parking = self._parking
        if parking is None:
            parking = self._parking = RedisParking(self)
        return parking

    @property
    def history(self) -> RedisHistory:
        """Where this store keeps breakers' metrics snapshots (``celery_breaker.monitoring.record_metrics``)."""
        history = self._history
        if history is None:
            history = self._history = RedisHistory(self)
        return history

    # -- the agent's side: transitions heard, counts sent ----------------------

    def ensure_agent(self) -> None:
        """Start this process's agent unless it is running."""
        agent = self._agent
        if agent is None or agent.pid != os.getpid() or not agent.is_alive():
            self._start_agent()

    def _start_agent(self) -> None:
        with self._lock:
            agent = self._agent
            if agent is not None and agent.pid == os.getpid() and agent.is_alive():
                return
            self._agent = Agent(self)
            self._agent.start()

    def live_cells(self) -> list[RedisCell]:
        """This process's cells, copied in one step: walking the weak map itself failed
        ("dictionary changed size during iteration") when another thread made a cell meanwhile,
        or dropped one while another looked one up."""
        return [cell for ref in self._cells.valuerefs() if (cell := ref()) is not None]

    def cell_count(self) -> int:
        """How many breakers this process holds a cell for."""
        return len(self._cells)

    def watch(self, watcher: Callable[[str], object]) -> None:
        """Tell ``watcher`` the state key of every transition this process hears from now
        on (in the agent's thread: it must be quick and must not raise), and keep the agent
        running for it. Whether it hears them at a given moment: ``live`` and ``settled``,
        both set again (``epoch`` bumped) after a loss, during which some were missed."""
        with self._lock:
            self._watchers = [*self._watchers, watcher]
        self.ensure_agent()

    def unwatch(self, watcher: Callable[[str], object]) -> None:
        """Stop telling ``watcher`` of transitions."""
        with self._lock:
            self._watchers = [found for found in self._watchers if found is not watcher]

    @property
    def watched(self) -> bool:
        """Whether anything watches the transitions (the agent then keeps running)."""
        return bool(self._watchers)

    def go_live(self) -> None:
        """The agent is subscribed: views read from now on are kept fresh."""
        with self._lock:
            self.epoch += 1
            self.live = True
            self.settled = False

    def settle(self) -> None:
        """The agent, subscribed, has read every view again (``settled``)."""
        with self._lock:
            self.settled = True
            dark_since, self._dark_since = self._dark_since, None
        if dark_since is not None:
            logger.info(
                "redis store %s: hearing breaker transitions again after %.1f s",
                self.label, time.monotonic() - dark_since,
            )  # fmt: skip

    def go_dark(self, exc: BaseException | None) -> None:
        """The agent lost its subscription: every cell asks Redis again until it is back."""
        with self._lock:
            was_live = self.live
            self.live = False
            self.settled = False
            self.epoch += 1
            cells = self.live_cells()
        for cell in cells:
            cell.go_dark()
        if was_live and exc is not None:
            self.losses += 1
            self._dark_since = time.monotonic()
            logger.warning(
                "redis store %s: lost the breaker transitions channel (%s); every call asks Redis until it is back",
                self.label, MaskedText(exc),
            )  # fmt: skip

    def agent_stopped(self, agent: Agent) -> None:
        """Forget ``agent`` once its thread has ended, so the next call starts a new one."""
        with self._lock:
            if self._agent is not agent:
                return
            self._agent = None
        self.go_dark(None)

    def hear(self, data: Any) -> None:
        """One published transition: ``state key, incarnation, generation, state, seconds
        until a probe``. Anything else on the channel is ignored."""
        try:
            if data.startswith(b"sync\n"):
                barrier = self._barriers.get(data[5:].decode())
                if barrier is not None:
                    barrier.set()
                return
            state_key, incarnation, generation, state, remaining = data.decode().split("\n")
            cell = self._by_state_key.get(state_key)
            if cell is not None and int(generation) >= 0:
                cell.hear(incarnation, int(generation), State(state), opt_float(remaining))
        except (AttributeError, UnicodeDecodeError, ValueError):
            logger.debug("redis store %s: ignored a foreign message on %s: %r", self.label, self.channel, data)
            return
        for watcher in self._watchers:
            try:
                watcher(state_key)
            except Exception:  # (one watcher's mistake stops neither the others nor the agent)
                logger.exception("redis store %s: a transitions watcher failed", self.label)

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until this process has heard every transition published before the call
        (a barrier message through the same channel). False if it could not tell within
        ``timeout``; while the store is not live there is nothing to wait for (every call
        asks Redis), so True.

        On a Cluster the barrier is published on every primary: messages from different
        nodes reach the subscriber over different cluster-bus links, ordered per link only.
        """
        if not self.live:
            return True
        client: Any = self.client()  # a Redis or a RedisCluster
        primaries = client.get_primaries() if is_cluster(client) else [None]
        tokens = [os.urandom(8).hex() for _ in primaries]
        barriers = [self._barriers.setdefault(token, threading.Event()) for token in tokens]
        deadline = time.monotonic() + timeout
        try:
            try:
                for node, token in zip(primaries, tokens, strict=True):
                    options = {} if node is None else {"target_nodes": node}
                    client.execute_command("PUBLISH", self.channel, f"sync\n{token}", **options)
            except CLIENT_ERRORS as exc:
                raise StorageError(failure(self.label, "sync", exc)) from exc
            for barrier in barriers:
                if not barrier.wait(max(0.0, deadline - time.monotonic())) and self.live:
                    return False
            return True
        finally:
            for token in tokens:
                self._barriers.pop(token, None)

    def flush(self, *, everything: bool = False) -> None:
        """Send what each cell counted locally (``everything``: read every cell again).
        Counts another thread's flush has taken are in Redis when this returns too.
        (A forked child's cells hold none of its parent's counts: forgotten at the fork.)

        A cell that fails (its node cannot be reached: a Cluster's primary down) does not
        stop the others: they are sent, those that failed last time after the rest, for
        at most ``FLUSH_AFTER_FAILURE`` seconds after the first failure (a node that does
        not answer costs a socket timeout per cell); cells not tried then stop passing
        calls until their next call has asked Redis. The first failure is raised at the
        end (the counts stay with their cells, sent next time)."""
        failed: StorageError | None = None
        stop_at = math.inf
        for cell in sorted(self.live_cells(), key=_failed_last):
            if not (everything or cell.pending):
                cell.wait_sent()
            elif time.monotonic() >= stop_at:
                cell.go_dark()
            else:
                try:
                    cell.flush()
                except StorageError as exc:
                    if failed is None:
                        failed, stop_at = exc, time.monotonic() + FLUSH_AFTER_FAILURE
        if failed is not None:
            with contextlib.suppress(StorageError):
                self._flush_orphans()
            raise failed
        self._flush_orphans()

    def _flush_orphans(self) -> None:
        """Send the counts of cells dropped before they were sent (``RedisCell.__del__``)."""
        with self._sending_orphans:  # (an orphan another thread took is in Redis once this is held)
            orphans = self.orphans
            while orphans:
                orphan = orphans.pop()
                try:
                    # (Unread: reading it would make again a breaker deleted since, for
                    # counts that are then dropped; the flush makes it only for counts kept.)
                    cell = self.cell(orphan.name, orphan.key, orphan.policy, orphan.clock, read=False)
                    # Its counts go under the view they were counted under (a reset since
                    # drops them, as it drops any cell's): the cell's own go first, under its own.
                    if cell.pending:
                        cell.flush()
                except BaseException:
                    orphans.append(orphan)  # (sent by a later flush)
                    raise
                cell.adopt(orphan.counts, orphan.counted)
                cell.flush()  # (failing, it keeps them, and hands them on if it is dropped)

    def close(self, timeout: float = 2.0) -> None:
        """Send what this process counted, stop following transitions and close this
        process's connections. A later breaker call connects and follows again.

        For scripts and tests that are done with Redis before it goes away (otherwise
        the agent thread would log the lost channel); workers need not call it.
        """
        with contextlib.suppress(StorageError):
            self.flush()
        with self._lock:
            agent, self._agent = self._agent, None
            client, self._client = self._client, None
            self._pid = -1  # (the next call connects again)
        if agent is not None and agent.pid == os.getpid():
            agent.stop()
            if agent is not threading.current_thread():
                agent.join(timeout)
        self.go_dark(None)
        if client is not None:
            with contextlib.suppress(*CLIENT_ERRORS, OSError):
                client.close()

    def snapshots(self, clock: Clock, where: Selected | None = None) -> list[BreakerSnapshot]:
        """Every breaker under this store's key prefix (a SCAN: for operators, not hot
        paths), or those ``where`` picks by name and key (told from the keys, before any
        is read). A breaker that cannot be read is listed in ``Listing.unreadable``, left as
        it is, and keys of no breaker of this store are left out, each with a WARNING
        (``listing.py``); ``StorageError`` only when the store cannot be read at all."""
        return list_snapshots(self, clock, _KEY_SUFFIXES, where)

    def find(self, name: str, key: str | None, clock: Clock) -> BreakerSnapshot | UnreadableBreaker | None:
        """Breaker ``name``/``key`` as ``snapshots`` would list it (``UnreadableBreaker``:
        found unreadable, left as it is), or ``None``: one script, however many breakers the
        store holds (creating or changing none)."""
        found, unreadable = read_snapshots(self, clock, _KEY_SUFFIXES, [self.keys_for(name, key)[0].encode()])
        return found[0] if found else unreadable[0] if unreadable else None

    def run_many(self, script: str, calls: Sequence[tuple[list[Any], list[Any]]]) -> list[list[Any] | StorageError]:
        """``run`` for many breakers, ``PIPELINE_BATCH`` scripts per round trip (one by one
        on a Cluster, whose keys live on several nodes): each call's reply, or the
        ``StorageError`` its error reply became. A store that fails (no connection, a
        failing server) raises ``StorageError`` for all."""
        client = self.client()
        if is_cluster(client):
            return [self._one_of_many(script, keys, args) for keys, args in calls]
        replies: list[Any] = []
        try:
            for start in range(0, len(calls), PIPELINE_BATCH):
                pipe = client.pipeline(transaction=False)
                scripts = self.scripts()
                for keys, args in calls[start : start + PIPELINE_BATCH]:
                    scripts(script, keys, args, client=pipe)
                replies += pipe.execute(raise_on_error=False)
        except CLIENT_ERRORS as exc:
            raise StorageError(failure(self.label, script, exc)) from exc
        found: list[list[Any] | StorageError] = []
        for reply in replies:
            if isinstance(reply, Exception):
                error = StorageError(failure(self.label, script, reply))
                error.__cause__ = reply
                if classify(reply) == "store":
                    raise error
                found.append(error)
                continue
            try:
                found.append(self._checked(script, reply))
            except StorageError as exc:
                found.append(exc)
        return found

    def _one_of_many(self, script: str, keys: list[Any], args: list[Any]) -> list[Any] | StorageError:
        try:
            return self.run(script, keys, args)
        except StorageError as exc:
            if classify(exc.__cause__) == "store":
                raise
            return exc

    def __repr__(self) -> str:
        return f"RedisStore({self.label!r})"


def _failed_last(cell: RedisCell) -> bool:
    """``RedisStore.flush``'s order: cells whose last flush failed after the others."""
    return cell.flush_failed


def _reinit_locks_after_fork() -> None:
    # A lock held by another thread at fork time would stay held forever in the child,
    # and the parent's agent thread does not exist here: until this process's own agent
    # subscribes, every call asks Redis. The client is replaced lazily (``client`` checks
    # the pid).
    for store in list(_STORES):
        store._lock = threading.Lock()
        store._sending_orphans = threading.Lock()
        store.live = False
        store.settled = False
        store.epoch += 1
        store._agent = None
        store.orphans = []  # (the parent sends them)
        for cell in list(store._cells.values()):
            cell._lock = threading.Lock()
            cell._sending = threading.Lock()
            cell.passing = False
            cell.forget_pending()  # what it counted so far is the parent's to send


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)
