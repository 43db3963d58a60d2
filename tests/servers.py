"""Real Redis servers for tests (standalone, Cluster, Sentinel) on free loopback ports, each in a temp dir.

Every server binds 127.0.0.1 only and never persists (``save ""``, ``appendonly no``).
Given ``tls`` (``tests.tls.Certificates``), each speaks TLS only, on the same port, and
requires a client certificate; the servers talk to each other over TLS too.
Waiting on them polls with short sleeps: that is waiting for a process to get somewhere,
never for time to pass.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import redis

from .tls import Certificates

__all__ = [
    "Owned", "RedisCluster", "RedisSentinel", "RedisServer", "ServerError", "check_connection_guard", "free_port",
    "poll",
]  # fmt: skip

#: Seconds a server gets to start, a cluster to agree, a failover to complete.
START_TIMEOUT = 20.0
_POLL_INTERVAL = 0.02


class ServerError(RuntimeError):
    """A test server would not start, agree or fail over in time."""


#: Ports ``free_port`` chose in this process (never handed out twice).
_CHOSEN: set[int] = set()
_PICK = random.Random()  # (seeded from the OS: parallel suites pick apart)


def _ephemeral_start() -> int:
    """The lowest port the kernel gives outgoing connections (Linux: 32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on right now, below the ephemeral range.

    A port the kernel chose (``bind(0)``) is an ephemeral one, which any process's next
    outgoing connection may take before the server binds it: CI runs two suites side by
    side, and a Redis or RabbitMQ node now and then failed with "Address already in use".
    Outgoing connections never take a port below the ephemeral range; the only race left
    is another suite choosing the same one of ~17,000 at the same moment."""
    top = min(_ephemeral_start(), 65536)
    for _ in range(200):
        port = _PICK.randrange(15000, top) if top > 15000 else 0
        if port in _CHOSEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
        _CHOSEN.add(chosen)
        return chosen
    raise ServerError("no free loopback port below the ephemeral range after 200 tries")


def check_connection_guard(
    address: tuple[str, int],
    most: int,
    quiet_for: Callable[[float], None],
    request_within: Callable[[float], None] | None = None,
) -> None:
    """Check a server of ours guarded as ``monitoring.serving.Guarded`` guards it: a
    connection that sends nothing is closed after the handler's timeout (set through
    ``quiet_for``: 0.5 s here), and with ``most`` connections held one more is closed at
    once, not served (nor after the timeout: 30 s then). With ``request_within`` (a
    ``serving.Deadlined`` handler's), a client that trickles its request a byte every
    0.05 s, each well within the timeout, is closed once the (shortened) deadline of
    0.5 s has passed, not after the minute it would take to finish."""
    quiet_for(0.5)
    with socket.create_connection(address, timeout=5) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server: it sent nothing for the (shortened) timeout
        assert time.monotonic() - started > 0.3  # (a lower bound: not closed at once)
    quiet_for(30.0)
    if request_within is not None:
        request_within(0.5)
        with socket.create_connection(address, timeout=5) as trickling:
            trickling.sendall(b"GET / HTTP/1.0\r\nX-Slow: ")
            started = time.monotonic()
            closed: OSError | None = None
            for _ in range(1200):  # a minute's worth, if nothing stopped it
                try:
                    trickling.sendall(b"x")
                except OSError as exc:  # the server's close: a reset or a broken pipe, as bytes keep coming
                    closed = exc
                    break
                time.sleep(0.05)  # a slow client: the behaviour under test, not a wait for a result
            assert closed is not None, "a client trickling its request was served for a minute"
            assert 0.3 < time.monotonic() - started < 30  # (bounds: not at once, not at the end of the trickle)
        request_within(30.0)
    held = [socket.create_connection(address, timeout=5) for _ in range(most)]
    try:
        for _ in range(3):
            with socket.create_connection(address, timeout=2) as extra:
                assert extra.recv(1) == b""  # closed at once, not after the timeout
    finally:
        for connection in held:
            connection.close()


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerError("redis-server is not installed; run ./scripts/test.sh, which installs it")
    return binary


def poll(predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    """Return once ``predicate()`` is true; ``ServerError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(_POLL_INTERVAL)  # polling servers that are getting somewhere, not waiting for time


def _answers(check: Callable[[], bool]) -> Callable[[], bool]:
    """``check`` as a poll predicate: a server that cannot answer yet is simply not there yet."""

    def predicate() -> bool:
        try:
            return check()
        except (redis.RedisError, OSError):
            return False

    return predicate


_Self = TypeVar("_Self", bound="Owned")


class Owned:
    """A context manager that closes itself on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class RedisServer(Owned):
    """One ``redis-server`` process on 127.0.0.1; ``stop()`` then ``start()`` keeps its port.

    ``options`` are extra command-line options (``"--replicaof", "127.0.0.1", "6379"``...).
    ``password``: the default user's password (``requirepass``); ``url`` carries it.
    The temp dir (``workdir``) holds its log; it is removed by ``close()`` unless given.
    """

    def __init__(
        self,
        *options: str,
        port: int | None = None,
        workdir: str | None = None,
        tls: Certificates | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.options = (*options, *(("--requirepass", password) if password else ()))
        self.password = password
        self.tls = tls
        self._own_dir = workdir is None
        self.workdir = Path(workdir if workdir is not None else tempfile.mkdtemp(prefix="celery-breaker-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / f"redis-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: redis.Redis | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{credentials}127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def command(self) -> list[str]:
        ports: tuple[str, ...] = ("--port", str(self.port))
        if self.tls:  # TLS only: the plain port closed
            ports = ("--port", "0", "--tls-port", str(self.port), *self.tls.server_args())
        return [
            redis_server_binary(), *ports, "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.options,
        ]  # fmt: skip

    def start(self) -> RedisServer:
        """Start the process and return once it answers PING."""
        if self._process is not None and self._process.poll() is None:
            return self
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        try:
            poll(self._pong, f"{self} to answer PING")
        except ServerError:
            self.stop()
            raise
        return self

    def _pong(self) -> bool:
        process = self._process
        if process is not None and process.poll() is not None:
            raise ServerError(f"{self} exited with {process.returncode}: {self.log_tail()}")
        return _answers(lambda: bool(self.admin().ping()))()

    def admin(self) -> redis.Redis:
        """A client for test set-up and checks (RESP2, text replies, short timeouts)."""
        if self._admin is None:
            self._admin = redis.Redis(
                host="127.0.0.1", port=self.port, protocol=2, decode_responses=True, password=self.password,
                socket_timeout=2.0, socket_connect_timeout=2.0, **(self.tls.client_kwargs() if self.tls else {}),
            )  # fmt: skip
        return self._admin

    def info(self, section: str) -> dict[str, Any]:
        return dict(self.admin().info(section))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to connected clients (``start()`` brings it back, empty)."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server frozen (SIGSTOP) until the block ends, then resumed: the kernel still
        takes connections and bytes, and nothing answers, as a hung server."""
        process = self._process
        if process is None or process.poll() is not None:
            raise ServerError(f"{self} is not running")
        process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the process (its port stays ours for ``start()``)."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 127.0.0.1:{self.port}>"


class _SentinelServer(RedisServer):
    """A ``redis-server sentinel.conf --sentinel`` process (Sentinel rewrites its own config file).

    With ``tls``, ``port`` is its TLS port, and it also answers plain connections on
    ``plain_port`` (a deployment's plain Sentinels watching a TLS master).
    """

    def __init__(
        self,
        service: str,
        master: tuple[str, int],
        *,
        workdir: str,
        tls: Certificates | None,
        password: str | None = None,
        master_password: str | None = None,
    ) -> None:
        super().__init__(workdir=workdir, tls=tls, password=password)
        self.config = self.workdir / f"sentinel-{self.port}.conf"
        self.plain_port = free_port() if tls else self.port
        ports = f"port {self.port}\n"
        if tls:
            ports = f"port {self.plain_port}\ntls-port {self.port}\n{tls.sentinel_config()}"
        host, port = master
        self.config.write_text(
            f"{ports}bind 127.0.0.1\nprotected-mode yes\ndir {self.workdir}\n"
            f"sentinel monitor {service} {host} {port} 1\n"
            f"sentinel down-after-milliseconds {service} 1000\n"
            f"sentinel failover-timeout {service} 5000\n"
            f"sentinel parallel-syncs {service} 1\n"
            + (f"requirepass {password}\n" if password else "")
            + (f"sentinel auth-pass {service} {master_password}\n" if master_password else "")
        )

    def command(self) -> list[str]:
        return [redis_server_binary(), str(self.config), "--sentinel"]


class RedisSentinel(Owned):
    """A master, one replica and ``sentinels`` Sentinels (quorum 1) watching service ``service``.

    ``failover()`` switches master and replica. Sentinel's internal periods are shortened
    (``SENTINEL DEBUG``), so a failover completes in about 2 s where a stock Sentinel
    takes about ten (see ``failover``).
    """

    def __init__(
        self,
        sentinels: int = 1,
        service: str = "breakers",
        tls: Certificates | None = None,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        """``password``: the master's and the replica's (``requirepass``, ``masterauth``);
        ``sentinel_password``: the Sentinels' own."""
        self.service = service
        self.tls = tls
        self.workdir = Path(tempfile.mkdtemp(prefix="celery-breaker-sentinel-"))
        # No diskless-sync delay: a replica (and the demoted master) syncs at once, not after 5 s.
        sync = ("--repl-diskless-sync-delay", "0", *(("--masterauth", password) if password else ()))
        master = RedisServer(*sync, workdir=str(self.workdir / "server-0"), tls=tls, password=password)
        replica = RedisServer(
            *sync, "--replicaof", *map(str, master.address), workdir=str(self.workdir / "server-1"), tls=tls,
            password=password,
        )  # fmt: skip
        self.servers = [master, replica]
        self.sentinels = [
            _SentinelServer(
                service,
                self.servers[0].address,
                workdir=str(self.workdir / "sentinel"),
                tls=tls,
                password=sentinel_password,
                master_password=password,
            )
            for _ in range(sentinels)
        ]

    @property
    def url(self) -> str:
        """Our store URL for this service (every Sentinel listed; TLS to every one, and the master, given ``tls``)."""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.service}"

    @property
    def plain_sentinels_url(self) -> str:
        """Given ``tls``: a store URL asking the Sentinels' plain ports where the TLS master is."""
        hosts = ",".join(f"127.0.0.1:{s.plain_port}" for s in self.sentinels)
        return f"rediss+sentinel://{hosts}/{self.service}?sentinel_ssl=false"

    def start(self) -> RedisSentinel:
        for server in self.servers:
            server.start()
        # Sentinels start once the replica is in sync, so their first INFO of the master lists it.
        poll(_answers(partial(self._replica_in_sync, self.servers[0])), "the replica to sync")
        # Shorter periods in ms (stock: INFO every 10 s, hello every 2 s). A Sentinel that
        # hears nothing of a failover demotes the promoted replica after 4 hello periods,
        # so with others around the period must stay well above the ~1 s a promotion takes.
        publish = 100 if len(self.sentinels) == 1 else 1000
        for sentinel in self.sentinels:
            sentinel.start()
            _command(sentinel, "SENTINEL", "DEBUG", "info-period", 100, "publish-period", publish)
        self._wait_settled(self.servers[0])
        return self

    def master_address(self, sentinel: RedisServer | None = None) -> tuple[str, int]:
        """The master's address as ``sentinel`` (default: the first) reports it."""
        reply = (sentinel or self.sentinels[0]).admin().sentinel_get_master_addr_by_name(self.service)
        host, port = cast(tuple[str, int], reply)
        return host, int(port)

    def master(self) -> RedisServer:
        """The server the Sentinels name master."""
        return self._server_at(self.master_address())

    def failover(self, *, crash: bool = False) -> RedisServer:
        """Fail over and return the new master once the failover is complete.

        By default an operator's ``SENTINEL FAILOVER``; with ``crash`` the master's
        process is stopped instead, Sentinel finds it down and promotes the replica, and
        the old master is started again, empty (Sentinel makes it the new replica).

        Complete means: the Sentinels report the new address, the new master answers
        ``ROLE`` as master, and the old master has been demoted to its replica and is in
        sync (so no client can still write to it, and another failover can follow).
        A stock Sentinel leaves a live old master writable for about 8 s after the
        switch (4 hello periods) before it demotes it; here for about 0.5 s.
        """
        old = self.master()
        if crash:
            old.stop()
        else:
            self.sentinels[0].admin().sentinel_failover(self.service)
        poll(
            _answers(lambda: all(self.master_address(s) != old.address for s in self.sentinels)),
            f"the Sentinels to report a master other than {old}",
        )
        new = self.master()
        if crash:
            old.start()
        self._wait_settled(new)
        return new

    def _server_at(self, address: tuple[str, int]) -> RedisServer:
        return next(server for server in self.servers if server.address == address)

    def _wait_settled(self, master: RedisServer) -> None:
        replica = next(server for server in self.servers if server is not master)
        poll(_answers(lambda: master.admin().role()[0] == "master"), f"{master} to answer ROLE as master")
        poll(_answers(partial(self._replica_in_sync, master)), f"{replica} to replicate {master}")
        for sentinel in self.sentinels:
            poll(_answers(partial(self._sees, sentinel, master, replica)), f"{sentinel} to see {master} and {replica}")

    def wait_replicated(self) -> None:
        """Return once the replica has every write the master has taken so far."""
        master = self.master()
        poll(_answers(partial(self._replica_in_sync, master)), f"the replica to catch up with {master}")

    def _replica_in_sync(self, master: RedisServer) -> bool:
        """The replica follows ``master`` and has applied every write the master had a moment ago.

        Offsets, not only ``master_link_status:up``: after a diskless sync the master
        holds back writes until the replica's first ACK, up to a second later.
        """
        written = master.info("replication")["master_repl_offset"]
        replica = next(server for server in self.servers if server is not master)
        info = replica.info("replication")
        following = info["role"] == "slave" and info["master_port"] == master.port
        return bool(following and info["master_link_status"] == "up" and info["slave_repl_offset"] >= written)

    def _sees(self, sentinel: RedisServer, master: RedisServer, replica: RedisServer) -> bool:
        """``sentinel`` names ``master``, knows the other Sentinels, and could promote ``replica``."""
        admin = sentinel.admin()
        state = cast(dict[str, Any], admin.sentinel_master(self.service))
        replicas = admin.sentinel_slaves(self.service)
        return (
            (state["ip"], int(state["port"])) == master.address
            and int(state["num-other-sentinels"]) == len(self.sentinels) - 1
            and any(
                (r["ip"], int(r["port"])) == replica.address
                and r["flags"] == "slave"
                and r["master-link-status"] == "ok"
                for r in replicas
            )
        )

    def close(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisCluster(Owned):
    """A Redis Cluster of ``masters`` primaries without replicas, the slots split evenly.

    Ready once every node says ``cluster_state:ok``: about 2 s after the nodes start,
    which is Redis's own delay before a new primary takes writes.
    """

    def __init__(self, masters: int = 3, tls: Certificates | None = None) -> None:
        self.tls = tls
        self.workdir = Path(tempfile.mkdtemp(prefix="celery-breaker-cluster-"))
        # Bus ports are chosen, not port + 10000 (which a free port above 55535 would overflow).
        self.bus_ports = [free_port() for _ in range(masters)]
        self.nodes = [self._node(index, bus) for index, bus in enumerate(self.bus_ports)]

    def _node(self, index: int, bus: int) -> RedisServer:
        return RedisServer(
            "--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000", *(("--tls-cluster", "yes") if self.tls else ()),
            workdir=str(self.workdir / f"node-{index}"), tls=self.tls,
        )  # fmt: skip

    @property
    def url(self) -> str:
        """Our store URL for this cluster (every node a startup node)."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisCluster:
        """What ``redis-cli --cluster create`` does, but every node meets every other
        directly: learning of each other by gossip alone may take seconds more."""
        for index in range(len(self.nodes)):
            for attempt in range(3):
                try:
                    self.nodes[index].start()
                    break
                except ServerError as exc:
                    # A port free_port chose was taken by another process before the node
                    # bound it (a CI run's parallel suites): the node again, on new ports.
                    if "Address already in use" not in str(exc) or attempt == 2:
                        raise
                    shutil.rmtree(self.workdir / f"node-{index}", ignore_errors=True)  # (its nodes.conf)
                    self.bus_ports[index] = free_port()
                    self.nodes[index] = self._node(index, self.bus_ports[index])
        count = len(self.nodes)
        # Every node takes its slots and its epoch before any meets another: a node that
        # already knows another (a MEET's handshake is quick on an idle machine, and may
        # not be on a busy one) refuses SET-CONFIG-EPOCH.
        for index, node in enumerate(self.nodes):
            _command(node, "CLUSTER", "ADDSLOTSRANGE", index * 16384 // count, (index + 1) * 16384 // count - 1)
            _command(node, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
        for index, node in enumerate(self.nodes):
            for other, bus in zip(self.nodes[index + 1 :], self.bus_ports[index + 1 :], strict=True):
                _command(node, "CLUSTER", "MEET", "127.0.0.1", other.port, bus)
        for node in self.nodes:
            poll(_answers(partial(_cluster_ok, node)), f"{node} to say cluster_state:ok")
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _command(server: RedisServer, *args: str | int) -> Any:
    """A command redis-py has no typed method for."""
    return server.admin().execute_command(*args)  # type: ignore[no-untyped-call]


def _cluster_ok(node: RedisServer) -> bool:
    return bool(node.admin().cluster("INFO")["cluster_state"] == "ok")
