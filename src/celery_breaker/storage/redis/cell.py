"""One breaker in Redis, seen through a local view that every script reply refreshes."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ...clock import Clock
from ...core import BreakerPolicy, BreakerSnapshot, Outcome, Probe, State, Ticket, Transition
from ...core.machine import _tally
from ...errors import CircuitOpenError, ConfigurationError
from ..base import StorageError

if TYPE_CHECKING:
    from .store import RedisStore

__all__ = ["VIEW_TTL", "RedisCell", "policy_text"]

logger = logging.getLogger("celery_breaker")

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
