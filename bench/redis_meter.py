"""Meters for bench/redis_store.py: redis-py round trips per thread, a server's commandstats, a throwaway redis-server.

``RoundTripMeter`` patches four methods of redis-py's ``AbstractConnection`` while it is
installed and keeps one ``Tally`` per thread:

* ``commands``: commands sent (each command of a pipeline counts once);
* ``round_trips``: request/response exchanges, i.e. one or more commands written, then
  the first of their replies read back. A pipeline is one round trip; EVALSHA that
  answers NOSCRIPT, then SCRIPT LOAD, then EVALSHA again is three;
* ``replies``: replies read to those commands (error replies included);
* ``pushes``: replies read while no command was outstanding on that connection
  (pub/sub messages and other server pushes).

Counts go to the thread that made the redis-py call, so a library's own background
thread is counted apart from the thread that called the breaker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import redis
from redis.connection import AbstractConnection
from redis.exceptions import ResponseError

__all__ = [
    "RedisServer",
    "RoundTripMeter",
    "Tally",
    "TreeRss",
    "free_port",
    "process_tree_cpu",
    "process_tree_rss",
    "server_stats",
]

_STATE_ATTR = "_bench_meter_state"
_PATCHED = ("send_command", "pack_commands", "send_packed_command", "read_response")


@dataclass
class Tally:
    """What one thread (or several, summed) did through redis-py."""

    round_trips: int = 0
    commands: int = 0
    replies: int = 0
    pushes: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def copy(self) -> Tally:
        return Tally(self.round_trips, self.commands, self.replies, self.pushes)

    @property
    def activity(self) -> int:
        return self.round_trips + self.commands + self.replies + self.pushes


@dataclass
class _ConnectionState:
    """Per connection: replies still owed, and whether the next one ends a round trip."""

    outstanding: int = 0
    fresh: bool = False
    packed: int = 0  # commands in the buffer about to be sent (set by send_command/pack_commands)


def _state(conn: Any) -> _ConnectionState:
    found: _ConnectionState | None = conn.__dict__.get(_STATE_ATTR)
    if found is None:
        found = _ConnectionState()
        conn.__dict__[_STATE_ATTR] = found
    return found


class RoundTripMeter:
    """Per-thread redis-py traffic, counted while installed (``with meter:``)."""

    def __init__(self) -> None:
        self._tallies: dict[int, Tally] = {}
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._originals: dict[str, Any] = {}

    # -- counting ------------------------------------------------------------

    def _tally(self) -> Tally | None:
        if getattr(self._local, "paused", False):
            return None
        ident = threading.get_ident()
        tally = self._tallies.get(ident)
        if tally is None:
            with self._lock:
                tally = self._tallies[ident] = Tally()
                self._names[ident] = threading.current_thread().name
        return tally

    def _sent(self, conn: Any, count: int) -> None:
        state = _state(conn)
        state.outstanding += count
        state.fresh = True
        tally = self._tally()
        if tally is not None:
            tally.commands += count

    def _replied(self, conn: Any) -> None:
        state = _state(conn)
        tally = self._tally()
        if state.outstanding > 0:
            state.outstanding -= 1
            fresh, state.fresh = state.fresh, False
            if tally is not None:
                tally.replies += 1
                tally.round_trips += fresh
        elif tally is not None:
            tally.pushes += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave this thread's traffic uncounted (the bench's own INFO calls)."""
        self._local.paused = True
        try:
            yield
        finally:
            self._local.paused = False

    def snapshot(self) -> dict[int, Tally]:
        with self._lock:
            return {ident: tally.copy() for ident, tally in self._tallies.items()}

    def thread_name(self, ident: int) -> str:
        return self._names.get(ident, str(ident))

    @staticmethod
    def split(snapshot: dict[int, Tally], caller: int) -> tuple[Tally, Tally]:
        """(the calling thread's tally, every other thread's summed)."""
        others = Tally()
        for ident, tally in snapshot.items():
            if ident != caller:
                others += tally
        return snapshot.get(caller, Tally()), others

    def background_activity(self, caller: int) -> int:
        return self.split(self.snapshot(), caller)[1].activity

    def settle(self, caller: int, quiet: float, limit: float) -> None:
        """Wait until threads other than ``caller`` made no redis-py call for ``quiet``
        seconds (at most ``limit`` seconds in all)."""
        if quiet <= 0:
            return
        start = last_change = time.monotonic()
        seen = self.background_activity(caller)
        while time.monotonic() - start < limit:
            time.sleep(min(0.01, quiet))  # polling another thread's progress
            now = self.background_activity(caller)
            if now != seen:
                seen, last_change = now, time.monotonic()
            elif time.monotonic() - last_change >= quiet:
                return

    # -- patching redis-py ---------------------------------------------------

    def install(self) -> None:
        cls: Any = AbstractConnection
        originals = {name: getattr(cls, name) for name in _PATCHED}
        self._originals = originals
        meter = self

        def send_command(conn: Any, *args: Any, **kwargs: Any) -> Any:
            _state(conn).packed = 1
            return originals["send_command"](conn, *args, **kwargs)

        def pack_commands(conn: Any, commands: Iterable[Any]) -> Any:
            listed = list(commands)
            _state(conn).packed = len(listed)
            return originals["pack_commands"](conn, listed)

        def send_packed_command(conn: Any, command: Any, check_health: bool = True) -> Any:
            state = _state(conn)
            count, state.packed = state.packed or 1, 0  # taken before a health-check PING reuses it
            result = originals["send_packed_command"](conn, command, check_health)
            meter._sent(conn, count)
            return result

        def read_response(conn: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                reply = originals["read_response"](conn, *args, **kwargs)
            except ResponseError:  # an error reply is still a reply
                meter._replied(conn)
                raise
            except BaseException:  # nothing read: the connection is dropped
                _state(conn).outstanding = 0
                raise
            meter._replied(conn)
            return reply

        patched: dict[str, Callable[..., Any]] = {
            "send_command": send_command,
            "pack_commands": pack_commands,
            "send_packed_command": send_packed_command,
            "read_response": read_response,
        }
        for name, wrapper in patched.items():
            setattr(cls, name, wrapper)

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(AbstractConnection, name, original)
        self._originals = {}

    def __enter__(self) -> RoundTripMeter:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def server_stats(client: redis.Redis) -> tuple[Counter[str], float]:
    """(calls per command, CPU seconds used) since the server started.

    ``INFO commandstats`` counts the commands run inside scripts under their own names,
    and the script calls themselves under ``evalsha``. The CPU time is the server
    process's (user + system), networking included.
    """
    info: dict[str, Any] = client.info("commandstats", "cpu")
    calls = Counter(
        {
            name.removeprefix("cmdstat_"): int(values["calls"])
            for name, values in info.items()
            if name.startswith("cmdstat_")
        }
    )
    return calls, float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (field 3, the state, first)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def process_tree_cpu(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` and its live children
    (Linux ``/proc``; ``None`` elsewhere). Resolution: one clock tick (10 ms)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        family = [str(pid)]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    if _stat_fields(entry)[1] == str(pid):
                        family.append(entry)
        total = 0
        for member in family:
            fields = _stat_fields(member)
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    except (OSError, ValueError, IndexError):
        return None
    return total / ticks


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (``/proc/*/stat`` field 4, the parent pid)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if _stat_fields(entry)[1] == str(pid):
                    found.append(int(entry))
    return found


def _rss_bytes(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in bytes (``None`` once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class TreeRss:
    """Resident memory of a worker: its main process and its pool children, in bytes."""

    main: int
    children: int
    child_count: int

    @property
    def total(self) -> int:
        return self.main + self.children


def process_tree_rss(pid: int) -> TreeRss | None:
    """RSS of process ``pid`` and of its live children (Linux ``/proc``; ``None`` elsewhere
    or once ``pid`` is gone). Shared pages count in every process that maps them."""
    main = _rss_bytes(pid)
    if main is None:
        return None
    sizes = [size for size in map(_rss_bytes, _children(pid)) if size is not None]
    return TreeRss(main, sum(sizes), len(sizes))


# -- a throwaway redis-server --------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence, until ``stop()``."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (scripts/test.sh installs it)")
        self.port = free_port()
        self._dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            self._wait_for_ping(time.monotonic() + 20)
        except BaseException:
            self.stop()
            raise

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _wait_for_ping(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)  # polling a server that is starting
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def version(self) -> str:
        info: dict[str, Any] = redis.Redis(port=self.port).info("server")
        return str(info.get("redis_version", "?"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
