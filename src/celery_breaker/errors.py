"""Every error celery-breaker raises, under one base class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .labels import breaker_label

if TYPE_CHECKING:
    from .core.state import State

__all__ = [
    "BreakerKeyError",
    "CircuitBreakerError",
    "CircuitOpenError",
    "ConfigurationError",
    "ParkedTasksError",
    "RetryAfter",
    "StorageError",
    "TooManyRequests",
    "UnknownBreakerError",
]


class CircuitBreakerError(Exception):
    """Base class of every error raised by celery-breaker."""


class ConfigurationError(CircuitBreakerError, ValueError):
    """A setting, policy field, URL or task option has a value we cannot use.

    The message always names the setting, the value it got and what is allowed. When
    several were found in one pass, ``problems`` holds each one's message (the message
    lists them all).
    """

    def __init__(self, message: str = "", *, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = problems or (message,)


class StorageError(CircuitBreakerError):
    """A shared store could not be reached or answered nonsense; breakers fall back
    (``breaker_on_storage_error``) and operator commands report it."""


class UnknownBreakerError(CircuitBreakerError, LookupError):
    """An operator named a breaker that neither the store nor the app knows.

    The message names the breaker, lists the known ones and says how to act anyway.
    """


class BreakerKeyError(CircuitBreakerError, ValueError):
    """An operator gave a per-key breaker's key that cannot name a breaker (empty,
    surrounded by whitespace, or holding control characters)."""


class ParkedTasksError(CircuitBreakerError, RuntimeError):
    """An operator asked to delete a breaker that tasks are parked behind: deleting it
    would release them at once (parked tasks whose breaker has no state are released as
    a closed breaker's), to run against its downstream. The message says how many and
    how to go on (purge them, or let them be released first)."""


#: ``BaseException.args`` itself (``CircuitOpenError.args`` reads it first).
_ARGS: Any = BaseException.__dict__["args"]


class CircuitOpenError(CircuitBreakerError):
    """A call was rejected because its breaker does not admit calls right now.

    Attributes:
        name: the breaker's name.
        key: the per-key part of the breaker, or ``None``.
        state: the breaker's state when it rejected the call (a ``State`` value).
        retry_after: seconds until the breaker can next admit a probe, or ``None``
            when only an operator can reopen it (``FORCED_OPEN``).
        detail: extra text appended to the message (for example the deferral).
        final: True when the task it ends will not be deferred again (its deferral
            budget ran out, or the deferral could not be published): it fails.

    Every attribute has a default, so the error survives Celery's exception
    serialisation (which rebuilds exceptions from ``args``) and pickling.
    """

    # Slots: the rejection hot path writes them without creating an instance dict.
    __slots__ = ("name", "key", "state", "retry_after", "detail", "final")
    name: str
    key: str | None
    state: State | None
    retry_after: float | None
    detail: str
    final: bool

    def __init__(
        self,
        message: str | None = None,
        *,
        name: str = "",
        key: str | None = None,
        state: State | None = None,
        retry_after: float | None = None,
        detail: str = "",
        final: bool = False,
    ) -> None:
        if message is None:
            super().__init__()
        else:
            super().__init__(message)
        self.name = name
        self.key = key
        self.state = state
        self.retry_after = retry_after
        self.detail = detail
        self.final = final

    @classmethod
    def rejected(
        cls, name: str, key: str | None, state: State | None, retry_after: float | None, detail: str = ""
    ) -> CircuitOpenError:
        """The error a breaker's rejection raises, made for the hot path: no keyword
        parsing, and the text is formatted only when read."""
        err = cls.__new__(cls)
        err.name = name
        err.key = key
        err.state = state
        err.retry_after = retry_after
        err.detail = detail
        err.final = False
        return err

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles args and __dict__ only: carry the slots too.
        state = {slot: getattr(self, slot, None) for slot in self.__slots__}
        return (type(self), self.args, {**getattr(self, "__dict__", {}), **state})

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        for name, value in (state or {}).items():
            setattr(self, name, value)

    @property
    def label(self) -> str:
        """``'crm'`` or ``'crm[tenant-7]'``: the breaker as people read it."""
        return breaker_label(self.name, self.key)

    # A rejection made on the hot path has no args (its text is formatted when read), but
    # Celery's result backends (JSON) rebuild an exception from its args: they read the
    # text instead, so a failed task's result names the breaker, not "breaker '' open".
    @property
    def args(self) -> tuple[Any, ...]:
        """The arguments it was made with; for a rejection made without any, its text."""
        given: tuple[Any, ...] = _ARGS.__get__(self)
        return given or (str(self),)

    @args.setter
    def args(self, value: tuple[Any, ...]) -> None:
        _ARGS.__set__(self, value)

    def __str__(self) -> str:
        given = _ARGS.__get__(self)
        if given:
            return str(given[0])
        state = getattr(self.state, "value", self.state) or "open"
        text = f"breaker {self.label!r} {state}"
        if self.retry_after is not None and not self.detail:
            text += f", next probe in {self.retry_after:.1f} s"
        if self.detail:
            text += f", {self.detail}"
        return text

    def __repr__(self) -> str:
        # Celery's task-retried event (and so Flower) shows ``safe_repr(exc)``:
        # make that read as a sentence, not as constructor syntax.
        return f"{type(self).__name__}: {self}"


class RetryAfter(CircuitBreakerError):
    """Raise it from a guarded call to say "the downstream asks us to stay away this long".

    It is a recorded failure (unless ``ignore_exceptions`` matches it) that opens the
    breaker at once, from CLOSED or from a failed probe, for ``seconds`` (capped by the
    policy's ``max_reset_timeout``), whatever the trip rules say.

    Args:
        seconds: how long the downstream asked to be left alone (> 0).
        message: the text of the error; default ``"retry after N s"``.
    """

    def __init__(self, seconds: float, message: str | None = None) -> None:
        super().__init__(seconds, message)  # both in args: rebuilt by pickling and Celery
        self.seconds = seconds
        self.message = message

    def __str__(self) -> str:
        if self.message is not None:
            return self.message
        try:
            return f"retry after {self.seconds:g} s"
        except (TypeError, ValueError):  # not a number: shown as given (and ignored as a hint)
            return f"retry after {self.seconds!r}"


class TooManyRequests(RetryAfter):
    """Raise it from a guarded call to say "the downstream refuses calls this fast" (what an
    HTTP ``429 Too Many Requests`` says; a 429 response error counts the same way).

    Outside a release it is a ``RetryAfter``: the breaker opens for ``seconds``. A task
    released from the parking that meets it while the breaker is CLOSED neither counts
    toward the trip rules nor opens the breaker: the task is parked again, and the
    adaptive release slows down and waits ``seconds`` (decision 48): the release went
    faster than the downstream takes.

    Args:
        seconds: how long the downstream asked to be left alone (> 0).
        message: the text of the error; default ``"retry after N s"``.
    """
