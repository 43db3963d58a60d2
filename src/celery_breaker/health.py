"""HealthCheck: a breaker's health-check probe (a sync or async callable), run in a helper thread under a timeout.

A breaker with a health check runs it, instead of a real call, when it may half-open
(``CircuitBreaker(probe=...)``): a failing probe is then a cheap request, not a payment
or an e-mail. The check runs in a daemon thread of its own so that one that hangs cannot
hang its caller: after ``timeout`` seconds it counts as failed and is left behind (a
sync callable cannot be interrupted; an async one is cancelled). A caller on an event
loop (``async with``, ``acall``, an async decorator) uses ``arun``, which never blocks
that loop: a coroutine function is awaited on the caller's own loop (what it awaits, a
client session say, may belong to that loop), anything else runs in the helper thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, cast

from .core import State
from .core.policy import finite_number
from .errors import ConfigurationError
from .labels import shown_callable
from .storage.masking import masked_in_text
from .storage.urls import describe_url

__all__ = [
    "DEFAULT_PROBE_TIMEOUT",
    "CheckAbandoned",
    "CheckResult",
    "CheckStillHung",
    "HealthCheck",
    "HealthState",
    "PendingCheck",
    "ProbeFunction",
    "ProbeTimeout",
    "UnhealthyResponse",
    "abandon_checks_on",
    "abandon_pending_checks",
    "await_pending_checks",
    "check_timeout",
    "shown_callable",
    "shown_probe",
]

#: Seconds a health check may take before it counts as failed.
DEFAULT_PROBE_TIMEOUT = 10.0
#: The shortest timeout a check may have: below it no check answers (a thread starts, a
#: connection opens), so every check would fail and no breaker would close.
LEAST_PROBE_TIMEOUT = 0.01
#: Seconds between two looks at the abandon event while a check runs (``abandon_checks_on``).
_ABANDON_POLL = 0.1

#: Set by ``abandon_checks_on`` in the thread that waits for checks (the worker's releaser).
_ABANDON_ON: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "celery_breaker_abandon_checks_on", default=None
)


#: A health check's function: taking nothing, or the key of the breaker it checks.
ProbeFunction = Callable[[], object] | Callable[[str | None], object]


class CheckRun:
    """One run of a health check: ``over`` once it ended (returned, or given up for good).
    Work the check leaves behind (a thread it started, a task on the caller's loop, its own
    thread after its timeout) keeps the check's context, but its calls no longer pass."""

    __slots__ = ("over",)

    def __init__(self) -> None:
        self.over = False

    def end(self) -> None:
        self.over = True


class Checked(NamedTuple):
    """The breaker whose health check runs (``checking``): its store, name and key, and
    the run of the check (``CheckRun``)."""

    store: object
    name: str
    key: str | None
    run: CheckRun


#: The breaker whose health check runs in this context (``checking``): the check's own
#: guarded calls on that breaker pass, served by its probe slot, and a check that takes an
#: argument is given its key. Carried into the threads a check runs in, which start with
#: a context of their own.
_CHECKING: contextvars.ContextVar[Checked | None] = contextvars.ContextVar("celery_breaker_checking", default=None)


@contextlib.contextmanager
def checking(breaker: Checked) -> Iterator[None]:
    """In this block (and in the threads of the checks run in it), ``breaker``'s health
    check is running (``checking_now``)."""
    token = _CHECKING.set(breaker)
    try:
        yield
    finally:
        _CHECKING.reset(token)


def checking_now() -> Checked | None:
    """The breaker whose health check runs in this context (``checking``), if any."""
    return _CHECKING.get()


class CheckAbandoned(Exception):
    """The caller stopped waiting for a health check (its worker is shutting down): no
    verdict, and the check's probe slot is freed at once (``CircuitBreaker._no_verdict``)."""


@contextlib.contextmanager
def abandon_checks_on(event: threading.Event) -> Iterator[None]:
    """In this block, a sync check still running when ``event`` is set raises
    ``CheckAbandoned`` in its caller: a releaser that stops mid-check frees the check's
    probe slot instead of holding it until ``half_open_max_wait`` after its worker left."""
    token = _ABANDON_ON.set(event)
    try:
        yield
    finally:
        _ABANDON_ON.reset(token)


class ProbeTimeout(TimeoutError):
    """A health check that did not answer within its timeout (it counts as failed)."""


class CheckStillHung(ProbeTimeout):
    """A health check not started, because the one its breaker's last check was given up
    on still runs (``HealthCheck.run``): it fails at once, whatever its caller's wait. It
    is no check cut short by that wait, which gives no verdict (``CircuitBreaker._checks``)."""


class UnhealthyResponse(Exception):
    """A health check returned an HTTP response with an error status (``_verdict``)."""


def _verdict(value: object) -> CheckResult:
    """What a check's return says: ``False`` is unhealthy, and so is an HTTP response with
    an error status (400 or more: requests' and httpx's ``status_code``, aiohttp's and
    urllib's ``status`` beside its ``headers``); anything else is healthy. A check written
    ``return requests.get(url)`` without ``raise_for_status()`` passed on a 503 and closed
    the breaker on a downstream that was down (decision 109)."""
    if value is False:
        return CheckResult(False)
    try:
        status = getattr(value, "status_code", None)
        if status is None and hasattr(value, "headers"):
            status = getattr(value, "status", None)
    except Exception:  # (the user's object: a property that raises says nothing of its health)
        return CheckResult(True)
    if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
        return CheckResult(False, UnhealthyResponse(f"the check returned an HTTP {status} response"))
    return CheckResult(True)


class HealthState(NamedTuple):
    """Where ``CircuitBreaker.check_health`` leaves a breaker, as this process sees it."""

    state: State
    open_for: float | None = None
    """While OPEN: seconds until a probe (a check) may be admitted."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """How one health check went."""

    healthy: bool
    error: BaseException | None = None
    """What the check raised (a ``ProbeTimeout`` when it did not answer in time)."""
    pending: PendingCheck | None = field(default=None, compare=False, repr=False)
    """The check itself, still running, when its caller stopped waiting before the check's
    own timeout (``run(timeout)`` with less): ``PendingCheck.then`` hears its verdict."""

    @property
    def detail(self) -> str:
        """A short reason for the logs: ``'returned False'``, ``'ConnectionError: refused'``.
        A URL's password, or a ``password=``/``token=`` value, the check's error quotes
        (``cannot reach https://user:pw@partner/health``) is masked: the error is the
        user's, and the WARNING that quotes it may go anywhere logs go."""
        if self.healthy:
            return "healthy"
        if self.error is None:
            return "returned False"
        text = f"{type(self.error).__name__}: {masked_in_text(_text_of(self.error))}"
        return text if len(text) <= 200 else text[:197] + "..."


def _text_of(error: BaseException) -> str:
    """``str(error)``, or what the traceback module shows when that raises: the check's
    error is the user's object, and rendering it must not fail the breaker's caller."""
    try:
        return str(error)
    except Exception:
        return "<exception str() failed>"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A health check: ``fn()`` (sync, or returning an awaitable) that raises or returns
    ``False`` when the downstream is unhealthy, and returns anything else when it is healthy.
    A ``fn`` that requires one argument is given the key of the breaker it checks
    (``None`` for a breaker without keys, or run outside a breaker): a per-key breaker's
    check can ask after that key's own downstream (``takes_key``). So is one whose
    optional argument is ``key=None`` (``def check(key=None)``), by that name, when the
    breaker has a key.

    ``name`` says what it is in logs (by default the function's qualified name: a
    ``partial``'s function, a callable object's class, never a repr showing arguments),
    and in its repr, which never shows ``fn`` (a ``partial``'s arguments, an object's
    fields: a URL with a password, a token).
    """

    fn: Callable[..., object] = field(repr=False)
    timeout: float = DEFAULT_PROBE_TIMEOUT
    name: str = ""
    takes_key: bool = field(default=False, init=False, compare=False)
    """Whether ``fn`` is called with the key (it cannot be called without an argument,
    or it has an optional ``key=None``)."""
    key_by_name: bool = field(default=False, init=False, compare=False)
    """Whether the key is passed as ``key=`` (an optional ``key=None``), and only when the
    breaker has one."""

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigurationError(
                f"probe must be a callable (sync or async, taking no arguments or the breaker's key), got "
                f"{shown_probe(self.fn)}; "
                "a dotted path or a task name is read from the Celery settings (breaker_probes) or the "
                "breaker_probe task option"
            )
        object.__setattr__(self, "timeout", check_timeout("probe_timeout", self.timeout))
        if not self.name:
            object.__setattr__(self, "name", shown_callable(self.fn))
        if inspect.isclass(self.fn):
            # (calling it makes an instance, "anything else" than False: healthy, with its
            # __call__ never run; a Task class named by its path, not its task, likewise)
            raise ConfigurationError(
                f"probe {self.name} is a class: calling it makes an instance and checks nothing, so it would "
                f"pass every check; give an instance whose __call__ checks ({self.fn.__name__}()), a function, "
                "or a task's name"
            )
        unmet = _unmet_arguments(self.fn)
        if unmet is not None:
            if _unmet_arguments(self.fn, None) is None:
                object.__setattr__(self, "takes_key", True)  # (one argument: the breaker's key)
            else:
                raise ConfigurationError(
                    f"probe {self.name} cannot be called without arguments, nor with the breaker's key alone "
                    f"({unmet}), so every check would fail; give a function that takes none, or one: the key "
                    "(functools.partial can fill in the others)"
                )
        elif _wraps_a_key_check(self.fn):
            object.__setattr__(self, "takes_key", True)
        elif _has_an_optional_key(self.fn):
            object.__setattr__(self, "takes_key", True)
            object.__setattr__(self, "key_by_name", True)
        if _is_generator_function(self.fn):
            raise ConfigurationError(
                f"probe {self.name} is a generator function (a yield in its body): calling it runs none of "
                "that body, so it would pass every check unchecked; make it a function that returns, or "
                "raises when the downstream is unhealthy"
            )

    @classmethod
    def coerce(cls, probe: HealthCheck | ProbeFunction | None, timeout: float | None) -> HealthCheck | None:
        """``probe`` as a ``HealthCheck`` (a callable is wrapped, with ``timeout`` when given)."""
        if probe is None or isinstance(probe, HealthCheck):
            if timeout is not None and probe is not None:
                return replace(probe, timeout=timeout)  # (a subclass stays one: its run too)
            return probe
        return cls(probe, DEFAULT_PROBE_TIMEOUT if timeout is None else timeout)

    def run(self, timeout: float | None = None) -> CheckResult:
        """Run the check in a helper thread; wait at most ``timeout`` seconds (default:
        the check's own) for it. It never raises: a failure is a ``CheckResult``."""
        limit = self.timeout if timeout is None else min(self.timeout, timeout)
        outcome: list[CheckResult] = []
        breaker = _CHECKING.get()
        hung_as = _hung_key(self, breaker)
        still = _still_hung(hung_as)
        if still is not None:
            # The last check of this breaker, given up on, still runs: none is started beside
            # it (each half-open period of an outage against a downstream that never answers
            # left one more thread calling it: an acceptance tester's 100 per-key breakers
            # had 904 checks hanging on it at once). This one fails at once, calling nothing.
            if breaker is not None:
                breaker.run.end()
            return CheckResult(
                False,
                CheckStillHung(
                    f"health check {self.name}: the one given up on {still:.0f} s ago is still running, so no other "
                    "is started beside it; give the check a timeout of its own (its client's) shorter than "
                    "breaker_probe_timeout"
                ),
            )

        def target() -> None:
            _CHECKING.set(breaker)  # (this thread's own context: the check's calls on it pass)
            try:
                value: Any = self._called(breaker)
                if inspect.isawaitable(value):
                    value = asyncio.run(_bounded(value, self.timeout))  # (its own timeout: it may outlive the wait)
                elif inspect.isgenerator(value) or inspect.isasyncgen(value):
                    # (from a callable that returns one) healthy, it would pass with nothing checked
                    raise TypeError(f"the check returned {value!r}, whose body does not run: nothing was checked")
            except _SelfCancelled as own:  # (raised by ``_bounded``: what the check itself raised)
                outcome.append(CheckResult(False, own.error))
            except BaseException as exc:  # a probe's failure is data, whatever it raised
                outcome.append(CheckResult(False, exc))
            else:
                outcome.append(_verdict(value))
            finally:
                if breaker is not None:
                    breaker.run.end()  # (what it left behind no longer passes)
                _returned(hung_as)

        thread = threading.Thread(target=target, name=f"celery-breaker probe {self.name}", daemon=True)
        started = time.monotonic()
        thread.start()
        _wait_for(thread, limit)
        if outcome:
            return outcome[0]
        timed_out = ProbeTimeout(f"health check {self.name} did not answer within {limit:g} s")
        if limit < self.timeout:  # (the caller's wait is over, not the check's time)
            return CheckResult(False, timed_out, PendingCheck(self, thread, outcome, started, breaker))
        if breaker is not None:
            breaker.run.end()  # (given up for good: if it wakes, its calls must not pass)
        _given_up(hung_as, thread)
        return CheckResult(False, timed_out)

    async def arun(self, timeout: float | None = None) -> CheckResult:
        """``run()`` for a caller on an event loop, which it never blocks: a coroutine
        function is awaited on this loop, cancelled after the timeout; anything else runs
        in the helper thread, waited for in another (``_run_off_loop``). Whatever the
        check raises is a verdict (an ``Exception``, a ``SystemExit``, a ``BaseException``
        of its own: ``_exit_kept``): a cancellation of the caller (or a
        ``KeyboardInterrupt``) goes through."""
        limit = self.timeout if timeout is None else min(self.timeout, timeout)
        if not _is_coroutine_function(self.fn):
            return await self._run_off_loop(limit)
        checked = _CHECKING.get()
        try:
            value = await _bounded(cast("Awaitable[object]", self._called(checked)), limit)
        except ProbeTimeout:
            return CheckResult(False, ProbeTimeout(f"health check {self.name} did not answer within {limit:g} s"))
        except _SelfCancelled as cancelled:  # (what it awaited was cancelled: a failure too)
            return CheckResult(False, cancelled.error)
        except (Exception, SystemExit) as exc:  # a probe's failure is data (its own exit too: ``_bounded``)
            return CheckResult(False, exc)
        # (a CancelledError here is the caller's: it goes through, with no verdict)
        finally:
            if checked is not None:
                checked.run.end()  # (tasks it started on this loop no longer pass)
        return _verdict(value)

    def _called(self, checked: Checked | None) -> Any:
        """``fn()``, or ``fn(key)`` with the key of the breaker it checks (``takes_key``)."""
        if self.takes_key:
            key = None if checked is None else checked.key
            if not self.key_by_name:
                return self.fn(key)
            if key is not None:  # (else its own default, None, stands)
                return self.fn(key=key)
        return self.fn()

    async def _run_off_loop(self, limit: float) -> CheckResult:
        """``run(limit)`` in a thread of its own, awaited on the running loop. It ran in
        ``asyncio.to_thread``, queued for the loop's default executor, whose few threads
        a busy loop may all hold (``getaddrinfo`` during a DNS outage): a check with a
        0.2 s timeout answered after 15 s, holding its caller and its probe slot."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[CheckResult] = loop.create_future()
        breaker = _CHECKING.get()

        def wait_for_check() -> None:
            _CHECKING.set(breaker)
            try:
                result: CheckResult | BaseException = self.run(limit)
            except BaseException as exc:  # (a subclass's run): raised to the caller, as before
                result = exc
            with contextlib.suppress(RuntimeError):  # (the loop has closed: nobody waits)
                loop.call_soon_threadsafe(_settle, answered, result)

        threading.Thread(target=wait_for_check, name=f"celery-breaker probe {self.name} waiter", daemon=True).start()
        return await answered


class PendingCheck:
    """A health check still running when its caller stopped waiting: the caller's time was
    up (a task's time limit) before the check's own timeout. ``then`` hands on its verdict
    when it comes, so a check that takes longer than its callers can wait still counts
    (each caller used to free its probe slot, and the next began another check, cut short
    again: such a breaker never closed)."""

    __slots__ = (
        "_check", "_thread", "_outcome", "_started", "_deadline", "_lock", "_settle", "_abandon_on", "_checked",
        "_done",
    )  # fmt: skip

    def __init__(
        self,
        check: HealthCheck,
        thread: threading.Thread,
        outcome: list[CheckResult],
        started: float,
        checked: Checked | None = None,
    ) -> None:
        self._checked = checked  # (its run ends with its verdict: its calls pass until then)
        self._check = check
        self._thread = thread
        self._outcome = outcome
        self._started = started  # (monotonic)
        self._deadline = started + check.timeout  # (its own timeout; ``then`` may bring it closer)
        self._lock = threading.Lock()
        self._settle: Callable[[CheckResult | None], object] | None = None
        self._abandon_on: threading.Event | None = None
        self._done = threading.Event()  # (set once its verdict, or its abandonment, is handed on)

    def left(self) -> float:
        """Seconds until the check's time is up (0: it is)."""
        return max(0.0, self._deadline - time.monotonic())

    def then(self, settle: Callable[[CheckResult | None], object], *, within: float | None = None) -> None:
        """Call ``settle`` once, from a thread of its own, with the check's result when it
        ends (a ``ProbeTimeout`` failure once its time is up: its own timeout, or
        ``within`` seconds from now if sooner, the probe lease it holds), or with ``None``
        if it is abandoned first (``abandon_pending_checks``: its process is stopping).
        ``settle`` must not raise."""
        with self._lock:
            if within is not None:
                self._deadline = min(self._deadline, time.monotonic() + max(0.0, within))
            self._settle = settle
            self._abandon_on = _ABANDON_ON.get()
        with _PENDING_LOCK:
            _PENDING.add(self)
        name = f"celery-breaker probe {self._check.name} verdict"
        threading.Thread(target=self._wait, name=name, daemon=True).start()

    def give_up(self) -> None:
        """Stop waiting for the check for good (its caller records it as failed now): its
        calls no longer pass, and while it still runs, its breaker starts no other check
        beside it in this process (``HealthCheck.run``'s rule for a check cut at its own
        timeout)."""
        if self._checked is not None:
            self._checked.run.end()
        _given_up(_hung_key(self._check, self._checked), self._thread)

    def _wait(self) -> None:
        self._thread.join(self.left())
        if self._outcome:
            result = self._outcome[0]
        else:
            took = self._deadline - self._started
            late = ProbeTimeout(f"health check {self._check.name} did not answer within {took:.3g} s")
            result = CheckResult(False, late)
            _given_up(_hung_key(self._check, self._checked), self._thread)
        self._finish(result)

    def _finish(self, result: CheckResult | None) -> None:
        if self._checked is not None:
            self._checked.run.end()
        with self._lock:
            settle, self._settle = self._settle, None
        with _PENDING_LOCK:
            _PENDING.discard(self)
        try:
            if settle is not None:
                settle(result)
        finally:
            self._done.set()


#: The check threads given up on that still run, by what they check (``_hung_key``), with
#: when they were given up on (monotonic): a breaker's next check is not started beside one
#: (for ``HUNG_ALONE_FOR`` at most).
_HUNG: dict[object, tuple[threading.Thread, float]] = {}
_HUNG_LOCK = threading.Lock()


def _hung_key(check: HealthCheck, checked: Checked | None) -> object:
    """What a check checks: its breaker (the store it stands for, name and key), else the check."""
    if checked is None:
        return ("check", id(check))
    return (id(getattr(checked.store, "primary", checked.store)), checked.name, checked.key)


def _given_up(key: object, thread: threading.Thread) -> None:
    with _HUNG_LOCK:
        if thread.is_alive():
            _HUNG[key] = (thread, time.monotonic())


def _returned(key: object) -> None:
    """A check thread ends: if it was the one given up on for ``key``, forget it."""
    with _HUNG_LOCK:
        found = _HUNG.get(key)
        if found is not None and found[0] is threading.current_thread():
            del _HUNG[key]


#: Seconds a check given up on keeps its breaker's next checks off at most: one that never
#: returns (a read with no timeout on a dead connection) would otherwise keep that breaker
#: from closing in this process for good, and a shared breaker reopened by this process
#: each time it won the probe slot. After it, one more check may start beside it.
HUNG_ALONE_FOR = 60.0


def _still_hung(key: object) -> float | None:
    """Seconds since the check given up on for ``key`` was, if it still runs and has not
    kept checks off for ``HUNG_ALONE_FOR`` yet; else ``None`` (a check may start)."""
    with _HUNG_LOCK:
        found = _HUNG.get(key)
        if found is None:
            return None
        age = time.monotonic() - found[1]
        if not found[0].is_alive() or age > HUNG_ALONE_FOR:
            del _HUNG[key]
            return None
        return age


#: Checks handed on (``PendingCheck.then``) whose verdict has not come yet.
_PENDING: set[PendingCheck] = set()
_PENDING_LOCK = threading.Lock()


def abandon_pending_checks(event: threading.Event | None = None) -> int:
    """Give up on the checks still running after their callers stopped waiting: those
    handed on under ``abandon_checks_on(event)``, or every one of this process without
    ``event``. Each is settled now with no verdict, which frees its probe slot at once (a
    process that stops would otherwise hold it until its lease ran out). Returns how many."""
    with _PENDING_LOCK:
        found = [pending for pending in _PENDING if event is None or pending._abandon_on is event]
    for pending in found:
        pending._finish(None)
    return len(found)


#: Seconds ``await_pending_checks`` gives a check's verdict, once its time is up, to be
#: recorded (a round trip to the store).
VERDICT_GRACE = 2.0
#: Most seconds ``await_pending_checks`` waits in all: a process leaving waits no longer
#: for a check given a long ``probe_timeout`` (its pool slot stays empty meanwhile).
AWAIT_AT_MOST = DEFAULT_PROBE_TIMEOUT


def await_pending_checks() -> int:
    """Wait for the verdicts of this process's checks still running after their callers
    stopped waiting, each until its time is up (and ``VERDICT_GRACE`` to record it), all
    within ``AWAIT_AT_MOST``; then give up on any left (``abandon_pending_checks``).
    Returns how many were waited for.

    For a pool process leaving in order (``--max-tasks-per-child``,
    ``worker_max_memory_per_child``, a warm shutdown): abandoned at once, a healthy check
    slower than a task's admission waits gave no verdict, and with a process recycled
    after each task, every check was cut so and the breaker never closed."""
    with _PENDING_LOCK:
        found = list(_PENDING)
    end = time.monotonic() + AWAIT_AT_MOST
    for pending in found:
        pending._done.wait(max(0.0, min(pending.left() + VERDICT_GRACE, end - time.monotonic())))
    abandon_pending_checks()
    return len(found)


def _wait_for(thread: threading.Thread, limit: float) -> None:
    """Join ``thread`` for at most ``limit`` seconds; raise ``CheckAbandoned`` if the
    caller's abandon event (``abandon_checks_on``) is set first."""
    abandon = _ABANDON_ON.get()
    if abandon is None:
        thread.join(limit)
        return
    deadline = time.monotonic() + limit
    while thread.is_alive() and (left := deadline - time.monotonic()) > 0:
        if abandon.is_set():
            raise CheckAbandoned("the releaser stopped while the health check ran")
        thread.join(min(left, _ABANDON_POLL))


def _settle(future: asyncio.Future[CheckResult], result: CheckResult | BaseException) -> None:
    if future.done():
        return  # (its caller was cancelled)
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _unmet_arguments(fn: Callable[..., object], *args: object) -> str | None:
    """Why ``fn(*args)`` cannot be called (an argument it requires, or one too many), or
    ``None``: it can, or its signature cannot be read (some builtins). A wrapper is read
    as it is (its ``*args, **kwargs``), not as the function it wraps."""
    try:
        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args)
    except TypeError as exc:
        return str(exc)
    return None


def _wraps_a_key_check(fn: Callable[..., object]) -> bool:
    """Whether ``fn`` is a decorator's wrapper (``functools.wraps``: ``*args`` of its own)
    around a function whose one required argument is named ``key``: a per-key check under
    a logging or retrying decorator, called without it, failed every check. (A wrapper
    around another one-argument function may fill that argument in itself: left alone.)"""
    inner = inspect.unwrap(fn)
    if inner is fn:
        return False
    try:
        own = inspect.signature(fn, follow_wrapped=False)
        wrapped = inspect.signature(inner)
    except (TypeError, ValueError):
        return False
    if not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in own.parameters.values()):
        return False
    required = [
        p for p in wrapped.parameters.values()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]  # fmt: skip
    return [p.name for p in required] == ["key"] and _unmet_arguments(inner, None) is None


def _has_an_optional_key(fn: Callable[..., object]) -> bool:
    """Whether ``fn``, callable without arguments, has an optional argument ``key=None``
    (``def tenant_health(key=None)``): called with none, a per-key breaker's check could
    not tell its keys apart, though it was written to. A ``key`` with a default of its
    own (``def cache_alive(key="healthcheck")``, a cache key to probe) or one a
    ``functools.partial`` fills in is the check's own, as is any other optional argument
    (``timeout=5``)."""
    if isinstance(fn, functools.partial) and "key" in fn.keywords:
        return False
    try:
        found = inspect.signature(fn).parameters.get("key")
    except (TypeError, ValueError):
        return False
    return (
        found is not None
        and found.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and found.default is None
    )


def _is_generator_function(fn: Callable[..., object]) -> bool:
    """``fn`` is (or its ``__call__``, or the ``__func__`` it calls, is) a generator
    function, sync or async."""
    return any(inspect.isgeneratorfunction(each) or inspect.isasyncgenfunction(each) for each in _callees(fn))


def _is_coroutine_function(fn: Callable[..., object]) -> bool:
    """``fn`` is (or its ``__call__``, or the ``__func__`` it calls, is) an ``async def``:
    calling it only makes a coroutine."""
    return any(inspect.iscoroutinefunction(each) for each in _callees(fn))


def _callees(fn: Callable[..., object]) -> tuple[object, ...]:
    """``fn``, its class's ``__call__``, and the ``__func__`` of a method-like object (a
    task class's ``breaker_probe`` method, called with the task: its ``__call__`` is
    neither a generator function nor a coroutine function, whatever the method is)."""
    return (fn, type(fn).__call__, getattr(fn, "__func__", None))


def shown_probe(probe: object) -> str:
    """A probe value as errors and reprs show it, never with a secret it may hold: a
    string (a dotted path, a task name, or a URL given by mistake) with every password
    of a URL masked, as ``describe_url`` masks it; a ``HealthCheck`` by its name; a
    callable by its qualified name (``shown_callable``: never a ``partial``'s arguments or an
    object's fields); anything else by its type."""
    if isinstance(probe, str):
        return repr(describe_url(probe))
    if isinstance(probe, HealthCheck):
        return f"HealthCheck({probe.name!r})"
    if callable(probe):
        return shown_callable(probe)
    if probe is None or isinstance(probe, (bool, int, float)):
        return repr(probe)
    return f"a {type(probe).__name__}"


#: Async checks cancelled at their time limit and not waited for, until they end: a task
#: the loop refers to only weakly must be held, or it could be collected while pending.
_ABANDONED: set[asyncio.Future[object]] = set()


async def _bounded(awaitable: Awaitable[object], limit: float) -> object:
    """What ``awaitable`` gives, or ``ProbeTimeout`` once ``limit`` seconds have passed.

    It runs as a task of its own, waited for with ``asyncio.wait``, not ``wait_for``:
    only this limit makes a ``ProbeTimeout`` (a ``TimeoutError`` the check raises is its
    verdict, not ours), and at the limit the caller stops waiting at once. ``wait_for``
    waits for the cancelled check to end, and takes what it then returns: a check whose
    cleanup hangs held its caller (and the probe slot) past its timeout, and one that
    answered after it counted as healthy. Such a check is left behind, cancelled, as a
    sync check that hangs is left in its thread."""
    task = asyncio.ensure_future(_exit_kept(awaitable))
    try:
        await asyncio.wait((task,), timeout=limit)
    except BaseException:  # the caller is cancelled: so is its check
        _abandon(task)
        raise
    if not task.done():
        _abandon(task)
        raise ProbeTimeout(f"did not answer within {limit:g} s")
    try:
        value = task.result()
    except asyncio.CancelledError as exc:
        # The check's task ended cancelled while its caller was not (the caller's own
        # cancellation is raised by the wait above): the check cancelled itself. Told
        # apart here, where every Python can; after, on 3.10 (no ``Task.cancelling``),
        # it read as the caller's, which was cancelled instead of rejected.
        raise _SelfCancelled(exc) from None
    if type(value) is _Exited:
        if isinstance(value.exit, SystemExit):
            raise value.exit  # (in the caller's task, which makes it a verdict: ``arun``)
        raise _SelfCancelled(value.exit)  # (its own BaseException: a verdict too, in ``arun``)
    return value


class _SelfCancelled(Exception):
    """A check that cancelled itself (``_bounded``), carrying its ``CancelledError`` (or
    another ``BaseException`` of its own, ``_exit_kept``): a failed check, where the
    caller's own cancellation goes through."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class _Exited(NamedTuple):
    """A ``SystemExit`` (or another ``BaseException`` that is no ``Exception``) the check
    raised, carried out of its task as a value."""

    exit: BaseException


async def _exit_kept(awaitable: Awaitable[object]) -> object:
    """``await awaitable``, a ``SystemExit`` it raises kept as an ``_Exited``: raised out of
    a task, asyncio raises it out of the event loop, which ended the caller's loop, every
    other task on it, and its process, where the same check run in a thread failed (a
    check's ``sys.exit()`` is the check's, not the caller's). So is any other
    ``BaseException`` of the check's own (gevent's ``Timeout``, a test framework's
    failure), but a ``KeyboardInterrupt`` or a cancellation: re-raised out of ``_bounded``
    as it was, it read as the caller's in ``arun`` and went through to the caller, no
    verdict given, where run in a thread it failed the check (an acceptance tester's
    async check raising one left its breaker HALF_OPEN for good, every caller handed it)."""
    try:
        return await awaitable
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise
    except Exception:
        raise
    except BaseException as exc:
        return _Exited(exc)


def _abandon(task: asyncio.Future[object]) -> None:
    task.cancel()
    _ABANDONED.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Future[object]) -> None:
    _ABANDONED.discard(task)
    if not task.cancelled():
        task.exception()  # (retrieved: asyncio logs none "never retrieved")


def check_timeout(where: str, value: Any) -> float:
    """``value`` as a probe timeout (seconds, at least ``LEAST_PROBE_TIMEOUT``), or a
    ``ConfigurationError`` naming ``where``."""
    if (
        isinstance(value, bool) or not isinstance(value, (int, float))
        or not (value >= LEAST_PROBE_TIMEOUT and finite_number(value))
    ):  # fmt: skip
        raise ConfigurationError(
            f"{where} must be a number of seconds of at least {LEAST_PROBE_TIMEOUT:g} (no check answers sooner, "
            f"so every one would fail), got {value!r:.100}"
        )
    return float(value)


def _reinit_locks_after_fork() -> None:
    # A lock another thread (the releaser, the store's agent) held at fork time would
    # stay held for ever in the child: a prefork child forked after start (autoscale,
    # max-tasks-per-child, one replacing a child killed at its limit) hung on it.
    # The parent's pending checks are its own: settled here, they would free probe slots
    # its checks still hold.
    global _HUNG_LOCK, _PENDING_LOCK
    _HUNG_LOCK, _PENDING_LOCK = threading.Lock(), threading.Lock()
    _HUNG.clear()
    _PENDING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)
