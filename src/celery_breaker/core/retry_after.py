"""How long a failed call's downstream asked us to stay away: ``RetryAfter`` or an HTTP Retry-After."""

from __future__ import annotations

import math
import time
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any

from ..errors import RetryAfter, TooManyRequests

__all__ = ["REFUSAL_WAIT", "RETRY_AFTER_STATUSES", "asked_of", "parse_retry_after", "refusal_of", "retry_after_of"]

#: Responses whose Retry-After means "the service is unavailable for this long" (RFC 9110
#: 10.2.3); on a redirect it means something else.
RETRY_AFTER_STATUSES = frozenset((429, 503))
#: Seconds a release waits after a refusal that named no Retry-After.
REFUSAL_WAIT = 1.0


def retry_after_of(exc: BaseException, now: float | None = None) -> float | None:
    """Seconds ``exc`` asks the breaker to stay open, or ``None``.

    ``exc`` is a ``RetryAfter``, or carries an HTTP 429/503 response with a
    ``Retry-After`` header: ``requests.HTTPError`` and ``httpx.HTTPStatusError`` (found by
    duck typing: ``exc.response.status_code`` and ``exc.response.headers``; neither
    library is imported), and the standard library's ``urllib.error.HTTPError``
    (``exc.code`` and ``exc.headers``). ``now`` is the wall clock (epoch seconds) an HTTP-date is
    measured from. A value that is missing, unreadable, not positive or not finite gives
    ``None``: the failure then counts as an ordinary one. Never raises.
    """
    try:
        if isinstance(exc, RetryAfter):
            return _positive(exc.seconds)
        response = _response_of(exc)
        if response is None or getattr(response, "status_code", None) not in RETRY_AFTER_STATUSES:
            return None
        headers = getattr(response, "headers", None)
        if headers is None:
            return None
        value = headers.get("Retry-After")
        if value is None:
            value = headers.get("retry-after")  # a plain dict is case-sensitive
        return parse_retry_after(value, time.time() if now is None else now)
    except Exception:  # a response object we do not understand must not break recording
        return None


def refusal_of(exc: BaseException, now: float | None = None) -> float | None:
    """Seconds to wait if ``exc`` is the downstream refusing calls this fast, else ``None``.

    A refusal is a ``TooManyRequests``, or an HTTP 429 response error of the kinds
    ``retry_after_of`` reads; it waits its Retry-After, or ``REFUSAL_WAIT`` when it names
    none (or an unreadable one). A 503, even with a Retry-After, is no refusal: the
    downstream is unavailable, not busy. Never raises.
    """
    return asked_of(exc, now)[1]


def asked_of(exc: BaseException, now: float | None = None) -> tuple[float | None, float | None]:
    """``(retry_after_of(exc, now), refusal_of(exc, now))``, its Retry-After read once: what
    a failure's recording asks of it (the failure path only). Never raises."""
    retry_after = retry_after_of(exc, now)
    try:
        if isinstance(exc, RetryAfter):
            refusing = isinstance(exc, TooManyRequests)
        else:
            refusing = getattr(_response_of(exc), "status_code", None) == 429
    except Exception:  # a response object we do not understand must not break recording
        refusing = False
    return retry_after, (retry_after or REFUSAL_WAIT) if refusing else None


def parse_retry_after(value: Any, now: float) -> float | None:
    """A ``Retry-After`` header value (delta-seconds or an HTTP-date) as seconds from ``now``;
    several headers' delta-seconds joined by commas give the longest."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text:
        return None
    if text[0].isdigit() or text[0] in "+-.":
        # Several Retry-After headers reach us as one value, joined by commas (requests and
        # httpx do so: "120, 120"); the longest wait any of them asks for is the one kept.
        waits = [wait for wait in map(_delta_seconds, text.split(",")) if wait is not None]
        return max(waits, default=None)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": an HTTP-date is always GMT
        when = when.replace(tzinfo=timezone.utc)
    return _positive(when.timestamp() - now)


def _delta_seconds(text: str) -> float | None:
    try:
        return _positive(float(text))
    except ValueError:
        return None


def _positive(seconds: Any) -> float | None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return None
    seconds = float(seconds)
    return seconds if seconds > 0 and math.isfinite(seconds) else None


def _response_of(exc: BaseException) -> Any:
    """The HTTP response ``exc`` carries (``status_code``, ``headers``), or ``None``:
    ``exc.response`` (requests, httpx), or urllib's ``HTTPError`` seen as one."""
    response = getattr(exc, "response", None)
    if response is None and isinstance(getattr(exc, "code", None), int) and hasattr(exc, "headers"):
        response = _UrllibResponse(exc)  # urllib.error.HTTPError: .code and .headers on itself
    return response


class _UrllibResponse:
    """``urllib.error.HTTPError`` seen as a response (status and headers)."""

    def __init__(self, exc: Any) -> None:
        self.status_code = exc.code
        self.headers = exc.headers
