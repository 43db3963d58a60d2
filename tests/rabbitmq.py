"""A real RabbitMQ broker for tests: one node on free loopback ports, in a temp dir.

It runs the ``rabbitmq-server`` script that Debian's package ships in its own
``rabbitmq/bin`` directory, as the current user (the ``/usr/sbin`` wrapper would switch
to the ``rabbitmq`` user). Each node has its own AMQP, distribution and epmd ports,
node name, Mnesia and log dirs and Erlang cookie (``HOME`` is in its temp dir), so
nodes started side by side never meet. Everything listens on 127.0.0.1 only: AMQP,
Erlang distribution, and the node's own ``epmd``, which this module starts and stops.
No plugins are enabled. ``guest``/``guest`` may log in, from loopback only (the default).

Given ``consumer_timeout_ms``, the broker closes a channel with PRECONDITION_FAILED
(406) once a delivery on it stays unacknowledged that long. RabbitMQ looks on each
channel's tick (60 s by default), so the tick is shortened to ``CHANNEL_TICK_MS``: a
timed-out channel is closed within ``consumer_timeout_ms + CHANNEL_TICK_MS``.
Waiting on the node polls with short sleeps: that is waiting for a process to get
somewhere, never for time to pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from kombu.connection import Connection

from .servers import Owned, ServerError, free_port, poll

__all__ = ["CONSUMER_TIMEOUT_S", "RabbitMQServer", "Vhost", "own_vhost", "rabbitmq_scripts_dir", "taken_off"]

#: RabbitMQ's consumer_timeout in these tests (the session's broker, ``tests/conftest.py``, is started with it).
CONSUMER_TIMEOUT_S = 6

#: Seconds a node gets to start (about 5 s on 2 cores) and to stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
#: Milliseconds between a channel's checks of ``consumer_timeout`` (RabbitMQ's default: 60000).
CHANNEL_TICK_MS = 1000
#: Where Debian's ``rabbitmq-server`` package keeps its own scripts (``rabbitmq-server``, ``rabbitmqctl``...).
_SCRIPTS_DIRS = ("/usr/lib/rabbitmq/bin",)


def rabbitmq_scripts_dir() -> Path:
    """The package's own ``rabbitmq/bin`` directory, holding ``rabbitmq-server`` and ``rabbitmqctl``."""
    for candidate in _SCRIPTS_DIRS:
        if (Path(candidate) / "rabbitmq-server").exists():
            return Path(candidate)
    raise ServerError("rabbitmq-server is not installed; run: apt-get install -y rabbitmq-server")


def epmd_binary() -> str:
    binary = shutil.which("epmd")
    if binary is None:
        raise ServerError("epmd is not installed (Erlang's, which rabbitmq-server depends on)")
    return binary


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class RabbitMQServer(Owned):
    """One RabbitMQ node on 127.0.0.1; ``stop()`` then ``start()`` keeps its ports and its data.

    ``consumer_timeout_ms``: RabbitMQ's ``consumer_timeout`` (default: its own, 30 minutes).
    ``config``: extra ``rabbitmq.conf`` lines (``"max_message_size = 1048576"``...).
    The temp dir (``workdir``) holds the config, the node's Mnesia dir and its logs
    (``log`` is the server's own output); it is removed by ``close()`` unless given.
    A stopped node keeps its durable queues and persistent messages for the next ``start()``.
    """

    def __init__(
        self,
        *config: str,
        consumer_timeout_ms: int | None = None,
        port: int | None = None,
        workdir: str | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"rabbit-test-{self.port}@localhost"
        self.consumer_timeout_ms = consumer_timeout_ms
        self.config = config
        self._own_dir = workdir is None
        self.workdir = Path(workdir if workdir is not None else tempfile.mkdtemp(prefix="celery-breaker-rabbitmq-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / f"rabbitmq-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A broker URL for Celery and kombu (vhost ``/``)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def write_config(self) -> None:
        """``rabbitmq.conf``, ``advanced.config`` (what the new format cannot say) and an empty plugin list."""
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "distribution.listener.interface = 127.0.0.1",
            "loopback_users.guest = true",
            "log.file.level = info",
            "log.console = false",
            *((f"consumer_timeout = {self.consumer_timeout_ms}",) if self.consumer_timeout_ms is not None else ()),
            *self.config,
        ]
        (self.workdir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        tick = f"{{channel_tick_interval, {CHANNEL_TICK_MS}}}"
        (self.workdir / "advanced.config").write_text(f"[{{rabbit, [{tick}]}}].\n")
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")  # not the system's /etc/rabbitmq/rabbitmq-env.conf
        (self.workdir / "home").mkdir(exist_ok=True)

    def environment(self) -> dict[str, str]:
        """What ``rabbitmq-server`` and ``rabbitmqctl`` need to find (or be) this node, and only it."""
        return {
            **os.environ,
            "HOME": str(self.workdir / "home"),  # the Erlang cookie, made by the node on its first start
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            # rabbitmqctl's own distribution listener: loopback too (its port is one of 35672-35682).
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self) -> RabbitMQServer:
        """Start epmd and the node, and return once the node accepts an AMQP login."""
        if self._process is not None and self._process.poll() is None:
            return self
        self.write_config()
        try:
            self._start_epmd()
            with self.log.open("ab") as log:
                # Its own session: stop() signals the script, kill() the whole group (script, beam, helpers).
                self._process = subprocess.Popen(
                    [str(rabbitmq_scripts_dir() / "rabbitmq-server")], env=self.environment(), cwd=self.workdir,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            poll(self._accepts_login, f"{self} to accept an AMQP login", timeout=START_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        return self

    def _start_epmd(self) -> None:
        """The node's own epmd, a child of ours (a node that finds none starts a daemon nobody would stop)."""
        if self._epmd is not None and self._epmd.poll() is None:
            return
        with self.log.open("ab") as log:
            self._epmd = subprocess.Popen(
                [epmd_binary(), "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        poll(
            lambda: self._alive(self._epmd, "epmd") and _listening(self.epmd_port),
            f"epmd on {self.epmd_port}",
            timeout=START_TIMEOUT,
        )

    def _alive(self, process: subprocess.Popen[bytes] | None, what: str) -> bool:
        if process is not None and process.poll() is not None:
            raise ServerError(f"{what} of {self} exited with {process.returncode}: {self.log_tail()}")
        return True

    def _accepts_login(self) -> bool:
        self._alive(self._process, "rabbitmq-server")
        if not _listening(self.port):
            return False
        with Connection(self.url, connect_timeout=2.0) as connection:  # type: ignore[no-untyped-call]
            try:
                connection.connect()
            except (OSError, *connection.connection_errors):  # still booting: not there yet
                return False
        return True

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl ARGS`` against this node (about 1 s each: it boots an Erlang VM); its stdout."""
        done = subprocess.run(
            [str(rabbitmq_scripts_dir() / "rabbitmqctl"), *args], env=self.environment(), cwd=self.workdir,
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise ServerError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    def queues(self, *fields: str, vhost: str = "/") -> list[dict[str, Any]]:
        """``rabbitmqctl list_queues``: one dict per queue of ``vhost`` (default fields: name,
        messages, consumers, arguments)."""
        names = fields or ("name", "messages", "messages_unacknowledged", "consumers", "arguments")
        out = self.rabbitmqctl("list_queues", "--vhost", vhost, "--quiet", "--formatter", "json", *names)
        return cast(list[dict[str, Any]], json.loads(out))

    def connections(self, vhost: str) -> list[dict[str, Any]]:
        """``rabbitmqctl list_connections``: one dict per client connection to ``vhost`` (its name, user, vhost)."""
        out = self.rabbitmqctl("list_connections", "--quiet", "--formatter", "json", "name", "user", "vhost")
        return [found for found in cast(list[dict[str, Any]], json.loads(out)) if found["vhost"] == vhost]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The node frozen (SIGSTOP to its process group) until the block ends, then resumed:
        the kernel still takes connections and bytes, and nothing answers, as a node cut off
        by a partition."""
        process = self._process
        if process is None or process.poll() is not None:
            raise ServerError(f"{self} is not running")
        os.killpg(process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(process.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 20) -> str:
        texts = []
        for path in (self.log, self.workdir / "log" / f"{self.nodename}.log"):
            try:
                texts.append("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
            except OSError:
                continue
        return "\n".join(texts) or "(no log)"

    def stop(self) -> None:
        """Stop the node as a service manager would (SIGTERM to the script: about 2 s), then its epmd.

        Its ports, Mnesia dir (durable queues, persistent messages) and cookie stay for ``start()``.
        """
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()  # the script passes it on to the VM, which shuts down cleanly
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=STOP_TIMEOUT)
            _kill_group(process)
        self._stop_epmd()

    def kill(self) -> None:
        """SIGKILL the node (script, VM and its helpers) and its epmd: no shutdown, no goodbye to clients.

        Messages a clean stop would have flushed to disk may be lost; ``start()`` recovers the rest.
        """
        process, self._process = self._process, None
        if process is not None:
            _kill_group(process)
        self._stop_epmd()

    def _stop_epmd(self) -> None:
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            _kill_group(epmd)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.nodename} 127.0.0.1:{self.port}>"


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``process`` leads (it was started in a session of its own) and reap it."""
    with contextlib.suppress(ProcessLookupError):  # none of the group is left
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def taken_off(url: str, queue: Any) -> list[Any]:
    """The messages waiting in ``queue`` (a kombu ``Queue``) on the broker at ``url``, in
    order, taken off it: read until none comes for 0.5 s."""
    found = []
    with Connection(url) as connection:  # type: ignore[no-untyped-call]
        bound = connection.SimpleQueue(queue, no_ack=True)
        try:
            while True:
                try:
                    found.append(bound.get(timeout=0.5))
                except bound.Empty:
                    break
        finally:
            bound.close()
    return found


@dataclass(frozen=True)
class Vhost:
    """A vhost on a test's RabbitMQ, and the URL reaching it (as the user ``own_vhost`` was given)."""

    name: str
    url: str


@contextlib.contextmanager
def own_vhost(server: RabbitMQServer, prefix: str, *, user: str = "guest", password: str = "guest") -> Iterator[Vhost]:
    """A vhost of its own on ``server``, deleted after with all it holds: broker-delay's
    topology is one per vhost, so a count of its queues is exact only there. Its URL logs
    in as ``user`` (made for it, and deleted after, unless ``guest``); ``guest`` and
    ``user`` may do anything there."""
    name = f"{prefix}-{time.monotonic_ns()}"
    server.rabbitmqctl("add_vhost", name)
    try:
        server.rabbitmqctl("set_permissions", "--vhost", name, "guest", ".*", ".*", ".*")
        if user != "guest":
            server.rabbitmqctl("add_user", user, password)
            server.rabbitmqctl("set_permissions", "--vhost", name, user, ".*", ".*", ".*")
        yield Vhost(name, f"amqp://{user}:{password}@127.0.0.1:{server.port}/{name}")
    finally:
        server.rabbitmqctl("delete_vhost", name)
        if user != "guest":
            with contextlib.suppress(ServerError):  # (not made: add_user failed)
                server.rabbitmqctl("delete_user", user)
