"""BreakerPolicy: the frozen, validated rules that decide when a breaker trips and recovers."""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import enum
import inspect
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import CircuitOpenError, ConfigurationError, RetryAfter
from ..labels import shown_callable
from .dotted import find_by_path, split_path
from .reference import doc

__all__ = ["CALLER_ERRORS", "BreakerPolicy", "ExceptionMatcher", "Outcome", "downstream_error"]

logger = logging.getLogger("celery_breaker")

#: An exception type, a dotted path to one (for settings files), or a predicate.
ExceptionMatcher = type[BaseException] | str | Callable[[BaseException], bool]

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_WINDOW = 60.0
DEFAULT_MINIMUM_CALLS = 10
DEFAULT_RESET_TIMEOUT = 30.0
DEFAULT_HALF_OPEN_MAX_CALLS = 3
DEFAULT_SUCCESS_THRESHOLD = 2
DEFAULT_HALF_OPEN_MAX_WAIT = 60.0
DEFAULT_BACKOFF_MULTIPLIER = 2.0
#: ``max_reset_timeout`` when unset: this many times ``reset_timeout``.
DEFAULT_MAX_RESET_FACTOR = 10.0
DEFAULT_RESET_JITTER = 0.0
#: The largest whole number a policy field takes: a window or a threshold beyond it would
#: have a breaker keep millions of outcomes, and larger numbers stop being exact or
#: finite somewhere on the way to Redis (a JSON number, a Lua double, a C size).
LARGEST_COUNT = 1_000_000
#: The longest duration a policy field takes (ten years): ten times it (the default
#: ``max_reset_timeout``) must stay a finite, exact number of milliseconds.
LONGEST_SECONDS = 10 * 365 * 86_400.0
#: The shortest duration a policy field takes (a millisecond): a window, an open period
#: or a lease shorter than that is none the clocks these decisions run on keep apart
#: (``window=1e-300`` never tripped, ``reset_timeout=1e-300`` let every call through
#: while the breaker read OPEN), accepted without a word.
SHORTEST_SECONDS = 0.001

# What the configuration reference says a field accepts (shared wording).
_SECONDS_DOC = "seconds from 0.001 to ten years (number or `timedelta`)"
_MATCHERS_DOC = (
    "exception types, paths to them (`package.module:Error` or `package.module.Error`), or predicates "
    "`exc -> bool` (one that cannot be called with the "
    "exception alone is refused)"
)


#: Exceptions that say the caller is wrong, not the downstream: bad arguments or input, a
#: missing key, a bug. ``downstream_error`` (the default ``record_exceptions``) does not
#: count them, nor any exception named ``ValidationError`` (pydantic, Django, marshmallow,
#: jsonschema, DRF), unless it is an ``OSError``.
CALLER_ERRORS: tuple[type[Exception], ...] = (
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    AssertionError,
    NotImplementedError,
)


def downstream_error(exc: BaseException) -> bool:
    """The default ``record_exceptions``: every ``Exception`` except the caller's own errors.

    An ``OSError`` (sockets, TLS, timeouts, and the HTTP clients built on them, ``requests``
    included) always counts, even when it is also a ``ValueError`` as
    ``ssl.SSLCertVerificationError`` is. Otherwise ``CALLER_ERRORS`` and any exception with
    a ``ValidationError`` class in its ancestry do not count: input that fails validation
    says nothing about the downstream (the seed counted it, and so tripped on bad input).
    Anything else that is an ``Exception`` counts. Put it in your own list to extend it:
    ``record_exceptions=(downstream_error, CardNetworkDown)``.
    """
    if isinstance(exc, OSError):
        return True
    if not isinstance(exc, Exception) or isinstance(exc, CALLER_ERRORS):
        return False
    return not any(klass.__name__ == "ValidationError" for klass in type(exc).__mro__)


class Outcome(enum.IntEnum):
    """How a finished call counts."""

    SUCCESS = 0
    FAILURE = 1
    IGNORED = 2
    """Neutral: the call says nothing about the downstream (a probe slot is freed)."""


def _resolve_matchers(
    field_name: str, value: Any
) -> tuple[tuple[type[BaseException], ...], tuple[Callable[[BaseException], bool], ...]]:
    if value is None:
        value = ()
    if isinstance(value, (type, str)) or (callable(value) and not isinstance(value, type)):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigurationError(
            f"BreakerPolicy.{field_name} must be a sequence of exception types, dotted "
            f"paths or predicates, got {value!r:.100}"
        ) from None
    types: list[type[BaseException]] = []
    predicates: list[Callable[[BaseException], bool]] = []
    for given in items:
        item = _import_exception(field_name, given) if isinstance(given, str) else given
        if isinstance(item, type):
            if not issubclass(item, BaseException):
                raise ConfigurationError(f"BreakerPolicy.{field_name}: {item.__qualname__} is not an exception type")
            types.append(item)
        elif callable(item):
            _check_predicate(field_name, item)
            predicates.append(item)
        else:
            raise ConfigurationError(
                f"BreakerPolicy.{field_name}: {item!r} is neither an exception type, "
                f"a dotted path to one, nor a predicate"
            )
    return tuple(types), tuple(predicates)


def _check_predicate(field_name: str, predicate: Callable[..., Any]) -> None:
    """Refuse a predicate that cannot be called with the exception alone: every call of it
    would raise (``_any_match`` logs it and reads no match), so the breaker would never
    count (or never ignore) what it was meant to."""
    try:
        signature = inspect.signature(predicate)
    except (TypeError, ValueError):
        return  # (no signature to read, e.g. a builtin: called as given)
    try:
        signature.bind(BaseException())
    except TypeError as exc:
        shown = getattr(predicate, "__qualname__", None) or type(predicate).__name__
        raise ConfigurationError(
            f"BreakerPolicy.{field_name}: predicate {shown} cannot be called with the exception alone "
            f"({exc}); write it as predicate(exc) -> bool (functools.partial can fill in other arguments)"
        ) from None


def _import_exception(field_name: str, path: str) -> type[BaseException]:
    """The exception type ``path`` names: ``package.module:Error`` or ``package.module.Error``
    (read as every setting that names an object by its path is: ``find_by_path``), or a
    builtin's bare name (``TimeoutError``)."""
    module_name, attr = split_path(path)
    if not module_name and attr and ":" not in path:
        module_name = builtins.__name__
    fix = (
        "write 'package.module:ExceptionClass' or 'package.module.ExceptionClass', "
        "such as 'requests.exceptions:ConnectionError'"
    )
    if not module_name or not attr:
        raise ConfigurationError(f"BreakerPolicy.{field_name}: {path!r} names no module and class; {fix}")
    try:
        found = find_by_path(f"{module_name}:{attr}")
    except (ImportError, AttributeError) as exc:
        hint = _exception_like(module_name, attr) if isinstance(exc, AttributeError) else ""
        raise ConfigurationError(f"BreakerPolicy.{field_name}: cannot import {path!r} ({exc}){hint}; {fix}") from None
    except Exception as exc:  # (the module itself fails as it is imported: a SyntaxError, its own code)
        raise ConfigurationError(
            f"BreakerPolicy.{field_name}: cannot import {path!r}: importing {module_name!r} failed "
            f"({type(exc).__name__}: {exc}); fix that module, or name another exception type"
        ) from exc
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ConfigurationError(
            f"BreakerPolicy.{field_name}: {path!r} is not an exception type; name an exception class ({fix})"
        )
    return found


def _exception_like(module_name: str, attr: str) -> str:
    """A did-you-mean for ``attr``, not found in the module ``module_name`` (imported): the
    exception class of that module whose name is closest, if one is close."""
    module = sys.modules.get(module_name)
    found = vars(module) if module is not None else {}
    names = [name for name, value in found.items() if isinstance(value, type) and issubclass(value, BaseException)]
    close = difflib.get_close_matches(attr, names, n=1)
    return f" (did you mean '{module_name}:{close[0]}'?)" if close else ""


def finite_number(value: float) -> bool:
    """Whether a number is finite as a float: an ``int`` too large for one (``10**400``)
    is not (``math.isfinite`` raised ``OverflowError`` on it, no ConfigurationError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _seconds(name: str, value: Any, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds > 0" + (" or None" if optional else "")
        raise ConfigurationError(f"BreakerPolicy.{name} must be {kind}, got {value!r:.100}")
    if not (value > 0 and finite_number(value)):
        raise ConfigurationError(f"BreakerPolicy.{name} must be a finite number > 0, got {value!r:.100}")
    if value < SHORTEST_SECONDS:
        raise ConfigurationError(
            f"BreakerPolicy.{name} must be at least {SHORTEST_SECONDS:g} seconds (a millisecond: nothing shorter is "
            f"told apart by the clocks a breaker decides on), got {value!r:.100}"
        )
    if value > LONGEST_SECONDS:
        raise ConfigurationError(
            f"BreakerPolicy.{name} must be at most {LONGEST_SECONDS:.0f} seconds (ten years), got {value!r:.100}"
        )
    return float(value)


def _count(name: str, value: Any, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LARGEST_COUNT:
        kind = f"a whole number from 1 to {LARGEST_COUNT:,}" + (" or None" if optional else "")
        raise ConfigurationError(f"BreakerPolicy.{name} must be {kind}, got {value!r:.100}")
    return value


def _rate(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        hint = f"; for {value}% write {value / 100:g}" if isinstance(value, (int, float)) and 1 < value <= 100 else ""
        raise ConfigurationError(f"BreakerPolicy.{name} must be a fraction in (0, 1] or None, got {value!r:.100}{hint}")
    return float(value)


def _multiplier(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (finite_number(value) and value >= 1):
        raise ConfigurationError(
            f"BreakerPolicy.{name} must be a finite number >= 1 (1 = the same open duration "
            f"after every trip), got {value!r:.100}"
        )
    return float(value)


def _jitter(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        hint = f"; for {value}% write {value / 100:g}" if isinstance(value, (int, float)) and 1 <= value < 100 else ""
        raise ConfigurationError(f"BreakerPolicy.{name} must be a fraction in [0, 1), got {value!r:.100}{hint}")
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When a breaker trips, how long it stays open, and how it recovers.

    Trip rules (any one that is set can trip a CLOSED breaker):

    * ``failure_threshold`` recorded failures within the last ``window`` seconds
      (exact: the timestamps of the last ``failure_threshold`` failures are kept).
    * ``consecutive_failures`` recorded failures in a row: any success ends the run,
      an ignored outcome leaves it as it is.
    * ``failure_rate_threshold`` (a fraction) of the calls in the window failed,
      once at least ``minimum_calls`` calls were seen (default 10, or ``count_window``
      if smaller).
    * ``slow_call_rate_threshold`` of those calls took ``slow_call_duration`` or longer.

    Rates are measured over the last ``window`` seconds, or over the last
    ``count_window`` calls when that is set.

    Open duration: the k-th consecutive trip (a failed probe extends the streak, closing
    ends it) opens the breaker for ``min(max_reset_timeout, reset_timeout *
    backoff_multiplier ** (k - 1))`` seconds, times a random factor in ``[1 - reset_jitter,
    1 + reset_jitter]``, never past ``max_reset_timeout`` (default ``10 * reset_timeout``).
    A recorded failure carrying a Retry-After (``retry_after_of``) opens the breaker at
    once for that long, capped by ``max_reset_timeout``.

    Recovery: after the open duration, the breaker half-opens and admits
    at most ``half_open_max_calls`` probes; any recorded failure reopens it,
    ``success_threshold`` successes close it (default 2, or ``half_open_max_calls`` if
    fewer). A probe that does not report within
    ``half_open_max_wait`` seconds frees its slot.

    Classification: an exception matching ``ignore_exceptions`` is neutral; one
    matching ``record_exceptions`` (or a ``RetryAfter``; by default every ``Exception``
    except the caller's own errors, see ``downstream_error``) is a failure; a ``BaseException`` that is not an
    ``Exception`` (cancellation, interrupt, exit) is neutral; any other outcome is a
    success (the downstream answered). Matchers are exception types, dotted paths or predicates.
    """

    failure_threshold: int | None = field(
        default=DEFAULT_FAILURE_THRESHOLD,
        metadata=doc(
            accepts="whole number from 1 to 1,000,000, or `None` (this rule off)",
            meaning="failures within `window` that trip the breaker",
        ),
    )
    window: float = field(
        default=DEFAULT_WINDOW,
        metadata=doc(accepts=_SECONDS_DOC, meaning="the time window of every rule, unless `count_window` is set"),
    )
    consecutive_failures: int | None = field(
        default=None,
        metadata=doc(
            accepts="whole number from 1 to 1,000,000, or `None`",
            meaning="failures in a row that trip the breaker (pybreaker's `fail_max`): any success "
            "ends the run, an ignored outcome leaves it as it is",
            default="this rule off",
        ),
    )
    failure_rate_threshold: float | None = field(
        default=None,
        metadata=doc(
            accepts="fraction in (0, 1] (`0.5` = 50 %), or `None`",
            meaning="failure rate in the window that trips the breaker",
            default="this rule off",
        ),
    )
    minimum_calls: int | None = field(
        default=None,
        metadata=doc(
            accepts="whole number from 1 to 1,000,000, ≤ `count_window`",
            meaning="calls in the window before the rates are judged",
            default=f"{DEFAULT_MINIMUM_CALLS}, or `count_window` if smaller",
        ),
    )
    count_window: int | None = field(
        default=None,
        metadata=doc(
            accepts="whole number from 1 to 1,000,000",
            meaning="judge the rates over the last N calls instead of the last `window` seconds",
            default="judge over `window` seconds",
        ),
    )
    slow_call_duration: float | None = field(
        default=None,
        metadata=doc(
            accepts=f"{_SECONDS_DOC}; set together with `slow_call_rate_threshold`",
            meaning="a call that takes this long or longer is slow",
        ),
    )
    slow_call_rate_threshold: float | None = field(
        default=None,
        metadata=doc(
            accepts="fraction in (0, 1]; set together with `slow_call_duration`",
            meaning="slow-call rate in the window that trips the breaker",
            default="this rule off",
        ),
    )
    reset_timeout: float = field(
        default=DEFAULT_RESET_TIMEOUT,
        metadata=doc(
            accepts=_SECONDS_DOC, meaning="how long the breaker stays OPEN after a trip (the first of a streak)"
        ),
    )
    backoff_multiplier: float = field(
        default=DEFAULT_BACKOFF_MULTIPLIER,
        metadata=doc(
            accepts="number ≥ 1",
            meaning="each consecutive trip (a failed probe) multiplies the open duration by this; "
            "`1`: always `reset_timeout`",
        ),
    )
    max_reset_timeout: float | None = field(
        default=None,
        metadata=doc(
            accepts="seconds ≥ `reset_timeout`, at most ten years (number or `timedelta`)",
            meaning="the longest open duration: caps the backoff, the jitter and a Retry-After",
            default=f"{DEFAULT_MAX_RESET_FACTOR:g} times `reset_timeout`",
        ),
    )
    reset_jitter: float = field(
        default=DEFAULT_RESET_JITTER,
        metadata=doc(
            accepts="fraction in [0, 1)",
            meaning="the open duration is multiplied by a random factor in [1 - j, 1 + j] (still capped), "
            "so breakers tripped by one outage do not all probe at once",
        ),
    )
    half_open_max_calls: int = field(
        default=DEFAULT_HALF_OPEN_MAX_CALLS,
        metadata=doc(
            accepts="whole number from 1 to 1,000,000",
            meaning="probes (real calls, or the breaker's health checks) admitted per half-open period",
        ),
    )
    success_threshold: int | None = field(
        default=None,
        metadata=doc(
            accepts="whole number from 1 to 1,000,000, ≤ `half_open_max_calls`",
            meaning="successful probes (or health checks) that close the breaker",
            default=f"{DEFAULT_SUCCESS_THRESHOLD}, or `half_open_max_calls` if fewer",
        ),
    )
    half_open_max_wait: float = field(
        default=DEFAULT_HALF_OPEN_MAX_WAIT,
        metadata=doc(
            accepts=_SECONDS_DOC,
            meaning="a probe that has not reported by then frees its slot (sooner for a health check, its timeout "
            "and 5 s, and for a task run on a pool that enforces its hard time limit, that limit and 5 s); a health "
            "check that has not answered by then counts as failed",
        ),
    )
    record_exceptions: tuple[ExceptionMatcher, ...] = field(
        default=(downstream_error,),
        metadata=doc(
            accepts=_MATCHERS_DOC,
            meaning="outcomes that count as failures; a `RetryAfter` always does, unless ignored",
            default="every `Exception` except the caller's own "
            "(`TypeError`, `ValueError`, `LookupError`, `AttributeError`, `AssertionError`, "
            "`NotImplementedError`, any `ValidationError`), an `OSError` always",
        ),
    )
    ignore_exceptions: tuple[ExceptionMatcher, ...] = field(
        default=(),
        metadata=doc(
            accepts=_MATCHERS_DOC,
            meaning="neutral outcomes: they count for nothing and free a probe slot "
            "(`CircuitOpenError` from another breaker always is)",
        ),
    )

    if TYPE_CHECKING:
        # What the constructor takes, as ``__post_init__`` reads it: durations as a number
        # or a ``timedelta``, matchers as any iterable or a single one. The fields hold
        # the converted values (seconds, a tuple); dataclass's own signature would type
        # the arguments so, and refuse what the docs teach. (Kept to the fields by
        # tests/test_typing.py.)
        def __init__(
            self,
            *,
            failure_threshold: int | None = ...,
            window: float | timedelta = ...,
            consecutive_failures: int | None = ...,
            failure_rate_threshold: float | None = ...,
            minimum_calls: int | None = ...,
            count_window: int | None = ...,
            slow_call_duration: float | timedelta | None = ...,
            slow_call_rate_threshold: float | None = ...,
            reset_timeout: float | timedelta = ...,
            backoff_multiplier: float = ...,
            max_reset_timeout: float | timedelta | None = ...,
            reset_jitter: float = ...,
            half_open_max_calls: int = ...,
            success_threshold: int | None = ...,
            half_open_max_wait: float | timedelta = ...,
            record_exceptions: ExceptionMatcher | Iterable[ExceptionMatcher] | None = ...,
            ignore_exceptions: ExceptionMatcher | Iterable[ExceptionMatcher] | None = ...,
        ) -> None: ...

    probes_to_close: int = field(init=False, repr=False, compare=False)
    """``success_threshold``, or its default: 2, or ``half_open_max_calls`` if fewer."""
    calls_to_judge: int = field(init=False, repr=False, compare=False)
    """``minimum_calls``, or its default: 10, or ``count_window`` if smaller."""
    longest_open: float = field(init=False, repr=False, compare=False)
    """``max_reset_timeout``, or its default: ``10 * reset_timeout``."""
    _record_types: tuple[type[BaseException], ...] = field(init=False, repr=False, compare=False)
    _record_predicates: tuple[Callable[[BaseException], bool], ...] = field(init=False, repr=False, compare=False)
    _ignore_types: tuple[type[BaseException], ...] = field(init=False, repr=False, compare=False)
    _ignore_predicates: tuple[Callable[[BaseException], bool], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        problems: list[str] = []

        def check(name: str, parse: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            # Every field is checked, and every problem reported at once.
            try:
                put(self, name, parse(name, getattr(self, name), *args, **kwargs))
            except ConfigurationError as exc:
                problems.append(str(exc))

        check("failure_threshold", _count, optional=True)
        check("window", _seconds, optional=False)
        check("consecutive_failures", _count, optional=True)
        check("failure_rate_threshold", _rate)
        check("minimum_calls", _count, optional=True)
        check("count_window", _count, optional=True)
        check("slow_call_duration", _seconds, optional=True)
        check("slow_call_rate_threshold", _rate)
        check("reset_timeout", _seconds, optional=False)
        check("backoff_multiplier", _multiplier)
        check("max_reset_timeout", _seconds, optional=True)
        check("reset_jitter", _jitter)
        check("half_open_max_calls", _count, optional=False)
        check("success_threshold", _count, optional=True)
        check("half_open_max_wait", _seconds, optional=False)
        matchers = {}
        for name in ("record_exceptions", "ignore_exceptions"):
            try:
                matchers[name] = _resolve_matchers(name, getattr(self, name))
            except ConfigurationError as exc:
                problems.append(str(exc))
        if problems:
            raise _combined(problems)
        record_types, record_predicates = matchers["record_exceptions"]
        ignore_types, ignore_predicates = matchers["ignore_exceptions"]
        # CircuitOpenError from another breaker says nothing about this downstream.
        put(self, "_ignore_types", (CircuitOpenError, *ignore_types))
        put(self, "_ignore_predicates", ignore_predicates)
        # RetryAfter is the user saying "the downstream is down for this long": a failure
        # unless ignored explicitly, whatever record_exceptions says.
        put(self, "_record_types", (*record_types, RetryAfter))
        put(self, "_record_predicates", record_predicates)
        put(self, "record_exceptions", (*record_types, *record_predicates))
        put(self, "ignore_exceptions", (*ignore_types, *ignore_predicates))
        self._check_combinations()

    def _check_combinations(self) -> None:
        if (self.slow_call_duration is None) != (self.slow_call_rate_threshold is None):
            raise ConfigurationError(
                "BreakerPolicy.slow_call_duration and slow_call_rate_threshold go together: "
                f"got slow_call_duration={self.slow_call_duration!r}, "
                f"slow_call_rate_threshold={self.slow_call_rate_threshold!r}"
            )
        if self.failure_threshold is None and self.consecutive_failures is None and not self.uses_rates:
            raise ConfigurationError(
                "BreakerPolicy never trips: set failure_threshold, consecutive_failures, "
                "failure_rate_threshold or slow_call_rate_threshold (all are None)"
            )
        if self.success_threshold is not None and self.success_threshold > self.half_open_max_calls:
            raise ConfigurationError(
                f"BreakerPolicy.success_threshold ({self.success_threshold}) must not exceed "
                f"half_open_max_calls ({self.half_open_max_calls}): the breaker could never close"
            )
        if (
            self.uses_rates
            and self.count_window is not None
            and self.minimum_calls is not None
            and self.minimum_calls > self.count_window
        ):
            raise ConfigurationError(
                f"BreakerPolicy.minimum_calls ({self.minimum_calls}) must not exceed "
                f"count_window ({self.count_window}): the rate rules could never trip"
            )
        if self.max_reset_timeout is not None and self.max_reset_timeout < self.reset_timeout:
            raise ConfigurationError(
                f"BreakerPolicy.max_reset_timeout ({self.max_reset_timeout:g}) must not be less than "
                f"reset_timeout ({self.reset_timeout:g}): raise it, or leave it None for "
                f"{DEFAULT_MAX_RESET_FACTOR:g} x reset_timeout"
            )
        # Resolved once: the hot path reads plain ints.
        object.__setattr__(
            self, "longest_open", self.max_reset_timeout or self.reset_timeout * DEFAULT_MAX_RESET_FACTOR
        )
        object.__setattr__(
            self, "probes_to_close", self.success_threshold or min(DEFAULT_SUCCESS_THRESHOLD, self.half_open_max_calls)
        )
        object.__setattr__(
            self,
            "calls_to_judge",
            self.minimum_calls or min(DEFAULT_MINIMUM_CALLS, self.count_window or DEFAULT_MINIMUM_CALLS),
        )

    @property
    def uses_rates(self) -> bool:
        """Whether a rate rule is set, so every outcome must be counted in a window."""
        return self.failure_rate_threshold is not None or self.slow_call_rate_threshold is not None

    def open_duration(self, streak: int, draw: float) -> float:
        """Seconds OPEN after the ``streak``-th consecutive trip; ``draw`` is uniform in [0, 1).

        Mirrored by ``open_seconds`` in ``storage/lua/common.lua``.
        """
        longest = self.longest_open
        seconds = self.reset_timeout
        multiplier = self.backoff_multiplier
        if streak > 1 and multiplier > 1:
            # Compared in logs: multiplier ** (streak - 1) may not fit in a float.
            if (streak - 1) * math.log(multiplier) >= math.log(longest / seconds):
                seconds = longest
            else:
                seconds *= multiplier ** (streak - 1)
        jitter = self.reset_jitter
        if jitter:
            seconds *= 1 - jitter + 2 * jitter * draw
        return min(seconds, longest)

    def classify(self, exc: BaseException | None) -> Outcome:
        """How a call that raised ``exc`` (or returned, for ``None``) counts."""
        if exc is None:
            return Outcome.SUCCESS
        if isinstance(exc, self._ignore_types) or _any_match(self._ignore_predicates, exc):
            return Outcome.IGNORED
        if isinstance(exc, self._record_types) or _any_match(self._record_predicates, exc):
            return Outcome.FAILURE
        if not isinstance(exc, Exception):
            if _green_timeout(type(exc)):
                # gevent's and eventlet's Timeout: a call cut off by its time (the task's
                # hard time limit under gevent, or a ``with Timeout(...)``) got no answer
                # in time: it counts as a TimeoutError does under this policy's rules.
                return self.classify(TimeoutError(f"{type(exc).__name__}: the call was cut off by its time"))
            # Cancelled, interrupted or exiting (CancelledError, KeyboardInterrupt,
            # SystemExit): the downstream never answered, so it is no success.
            return Outcome.IGNORED
        return Outcome.SUCCESS

    def replace(self, **changes: Any) -> BreakerPolicy:
        """A copy with ``changes`` applied (validated like a new policy)."""
        return BreakerPolicy.from_mapping({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        """The public fields, as keyword arguments that rebuild this policy."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, base: BreakerPolicy | None = None, source: str = "policy"
    ) -> BreakerPolicy:
        """Build a policy from a settings dict, over ``base``; errors name ``source``."""
        if not isinstance(values, Mapping):
            raise ConfigurationError(
                f"{source} must be a dict of BreakerPolicy fields or a BreakerPolicy, got {values!r:.100}"
            )
        allowed = {f.name for f in dataclasses.fields(cls) if f.init}
        problems = []
        unknown = sorted(set(values) - allowed, key=str)
        if unknown:
            hints = [
                f"{name!r}: did you mean {close[0]!r}?"
                for name in unknown
                if (close := difflib.get_close_matches(str(name), allowed, n=1))
            ]
            problems.append(
                f"unknown BreakerPolicy field(s) {', '.join(map(repr, unknown))}"
                + (f" ({'; '.join(hints)})" if hints else "")
                + f"; allowed: {', '.join(sorted(allowed))}"
            )
        merged = {**(base.as_dict() if base is not None else {}), **{k: v for k, v in values.items() if k in allowed}}
        try:
            policy = cls(**merged)
        except ConfigurationError as exc:
            problems += exc.problems
            policy = None
        if policy is None or problems:
            prefix = "" if source == "policy" else f"{source}: "
            raise _combined([prefix + text for text in problems])
        return policy

    @classmethod
    def coerce(cls, value: Any, *, base: BreakerPolicy | None = None, source: str = "policy") -> BreakerPolicy:
        """Accept a BreakerPolicy, a dict of overrides over ``base``, or ``None``."""
        if value is None:
            return base if base is not None else cls()
        if isinstance(value, BreakerPolicy):
            return value
        return cls.from_mapping(value, base=base, source=source)


#: Where gevent and eventlet define ``Timeout`` (a ``BaseException``; neither is imported).
_GREEN_TIMEOUT_MODULES = frozenset({"gevent.timeout", "gevent", "eventlet.timeout", "eventlet"})


def _green_timeout(kind: type[BaseException]) -> bool:
    """Whether ``kind`` is (or derives from) gevent's or eventlet's ``Timeout``."""
    return any(cls.__name__ == "Timeout" and cls.__module__ in _GREEN_TIMEOUT_MODULES for cls in kind.__mro__)


def _any_match(predicates: tuple[Callable[[BaseException], bool], ...], exc: BaseException) -> bool:
    for predicate in predicates:
        try:
            if predicate(exc):
                return True
        except Exception:  # a predicate that raises cannot change the decision
            # (named, never its repr: a partial's arguments may hold a URL with a password)
            logger.exception(
                "celery_breaker: exception predicate %s raised; treated as no match", shown_callable(predicate)
            )
    return False


def _combined(problems: list[str]) -> ConfigurationError:
    """One error for every problem found (one alone as it was written)."""
    if len(problems) == 1:
        return ConfigurationError(problems[0])
    lines = "\n".join(f"  - {text}" for text in problems)
    return ConfigurationError(f"{len(problems)} problems in a BreakerPolicy:\n{lines}", problems=tuple(problems))
