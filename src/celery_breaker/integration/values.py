"""How a setting's or a task option's value is read: each parser names the setting, the bad value, the rule."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from ..core.policy import LARGEST_COUNT, LONGEST_SECONDS
from ..errors import ConfigurationError

__all__ = ["bind_address", "duration", "mapping", "port", "seconds", "seconds_or_zero", "whole"]


def positive_finite(value: Any) -> float | None:
    """``value`` as a float if it is a number > 0 and finite once a float (not a bool);
    else ``None`` (a whole number too large for a float, 10**400, included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        found = float(value)
    except OverflowError:
        return None
    return found if found > 0 and math.isfinite(found) else None


def seconds(key: str, value: Any) -> float | None:
    """Seconds > 0 (a number or a ``timedelta``), or ``None``."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    found = positive_finite(value)
    if found is None or found > LONGEST_SECONDS:
        raise ConfigurationError(f"{key} must be a number of seconds > 0{_AT_MOST} (or None), got {value!r:.100}")
    return found


def duration(key: str, value: Any) -> float:
    """Seconds > 0 (a number or a ``timedelta``); ``None`` is refused."""
    found = positive_finite(value.total_seconds() if isinstance(value, timedelta) else value)
    if found is None or found > LONGEST_SECONDS:
        raise ConfigurationError(
            f"{key} must be a number of seconds > 0{_AT_MOST} (or a timedelta), got {value!r:.100}"
        )
    return found


#: The longest duration a setting takes, as its errors say.
_AT_MOST = f", at most {LONGEST_SECONDS:.0f} (ten years)"


def whole(key: str, value: Any) -> int | None:
    """A whole number >= 0, or ``None`` (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= LARGEST_COUNT:
        raise ConfigurationError(
            f"{key} must be a whole number from 0 to {LARGEST_COUNT:,} (or None for no limit), got {value!r:.100}"
        )
    return value


def mapping(key: str, value: Any) -> Mapping[str, Any]:
    """A dict with non-empty string keys (``None``: empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{key} must be a dict, got {type(value).__name__} {value!r:.100}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{key}: every key must be a non-empty string, got {name!r:.100}")
    return value


def port(key: str, value: Any) -> int | None:
    """A TCP port number, or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigurationError(
            f"{key} must be a TCP port number from 1 to 65535 as an int (or None: no metrics endpoint), "
            f"got {value!r:.100}"
        )
    return value


#: A DNS host name: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def bind_address(key: str, value: Any) -> str:
    """An IP address or a host name to bind."""
    if isinstance(value, str) and len(value) <= 253:
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            if _HOST_NAME.match(value):
                return value
    raise ConfigurationError(
        f"{key} must be an IP address or host name to bind, such as '127.0.0.1' (this host only, the default) "
        f"or '0.0.0.0' (every interface), got {value!r:.100}"
    )


def seconds_or_zero(key: str, value: Any) -> float | None:
    """Seconds >= 0 (a number or a ``timedelta``), or ``None``."""
    if (value == 0 and not isinstance(value, bool)) or value == timedelta(0):
        return 0.0
    try:
        return seconds(key, value)
    except ConfigurationError:  # (its words: 0 is allowed here)
        raise ConfigurationError(
            f"{key} must be a number of seconds >= 0{_AT_MOST} (or None), got {value!r:.100}"
        ) from None
