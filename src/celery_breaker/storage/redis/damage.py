"""What Redis may hold that no script wrote: the bounds every value is held to, and telling
a failure it caused from a failure of Redis itself.

The scripts check every value they read (``storage/lua/checks.lua``); the bounds here are
the same, for what Python reads. A script that still fails on a breaker's data is run
once more, asking it to check the key types (after a WRONGTYPE) or to reset the breaker
(after any other failure its data caused): ``repair_for``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import redis

from ..masking import masked_in_text
from .client import CLIENT_ERRORS

__all__ = [
    "CHECK_TYPES",
    "CLOCK_SLACK",
    "MAX_WHOLE",
    "RESET",
    "TIME_SPAN",
    "Damage",
    "advice",
    "classify",
    "failure",
    "finite",
    "repair_for",
    "text",
]

#: Counters, generations, lease ids: whole numbers up to 2**53 (a double's exact integers).
MAX_WHOLE = 2**53
#: A stored time lies within this many seconds of now (about 31,700 years).
TIME_SPAN = 1e12
#: Seconds a stored time may lie past the latest moment it can legitimately name (an open
#: period's end, a lease's deadline): the clock may have stepped back that much.
CLOCK_SLACK = 300.0

#: A script's check request (the 6th item of ``common.lua``'s ARGV[3], a parking script's
#: ARGV[1]): check the key types first, replacing a key of another type.
CHECK_TYPES = "1"
#: Check the types and reset the breaker: the script failed on its data.
RESET = "2"

Damage = Literal["types", "data", "refused", "store"]

#: Error replies that say Redis (or a Cluster) cannot serve right now, whatever the data.
_STORE_FAILING = ("Script killed", "non local key", "CROSSSLOT", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN")
#: A command inside a script that the connection's ACL user may not run, on a channel or
#: key it may not use (Redis 7.0 words it so, without the NOPERM code a plain command gets):
#: the user's doing, not the data's. Resetting the breaker would wipe it (a script's writes
#: before the error stay) and fail again on the same command.
_DENIED = ("The user executing the script can't", "no permissions")


def classify(exc: BaseException | None) -> Damage:
    """What a failed command or script says about one breaker's keys:

    - ``types``: a key holds another type (WRONGTYPE);
    - ``data``: a script failed on a stored value (a Lua error, a command refusing it);
    - ``refused``: the breaker's keys are not at fault as far as we can tell: a script
      refused its caller's arguments (``celery-breaker: ...``) or answered nonsense (no
      Redis error at all);
    - ``store``: Redis itself failing (no connection, read-only, out of memory, busy,
      a command the ACL user may not run...), whatever the data.
    """
    if exc is None or not isinstance(exc, CLIENT_ERRORS):
        return "refused"
    if type(exc) is not redis.ResponseError:  # (its subclasses: NOSCRIPT, READONLY, OOM, LOADING...)
        return "store"
    message = str(exc)
    if "WRONGTYPE" in message:
        return "types"
    if "celery-breaker:" in message:
        return "refused"
    if any(mark in message for mark in _DENIED):
        return "store"
    code = message.split(" ", 1)[0]
    if (code.isalpha() and code.isupper()) or any(mark in message for mark in _STORE_FAILING):
        return "store"  # another error code (BUSY, MASTERDOWN...): not the data's doing
    return "data"


#: Redis refusing every call for a reason its operator must fix, and the fix: matched on the
#: error's class and text (redis-py drops the code, READONLY or OOM, from its own classes'
#: text; inside a script Redis words some errors without a code).
_FIXES = (
    (
        ("ReadOnlyError", "read only replica", "MasterDownError", "Link with MASTER is down"),
        "the store URL names a replica, which takes no writes: point breaker_storage_url at the master, or at "
        "its Sentinels (redis+sentinel://host:26379/service_name) to follow failovers; after a failover that "
        "moved the URL's address to the new master, the next try connects to it",
    ),
    (
        ("OutOfMemoryError", "used memory > 'maxmemory'"),
        "Redis is full (maxmemory): give it more memory or free some; until then breakers fall back and "
        "deferred tasks wait in the broker",
    ),
    (
        # (redis-py's words once a Cluster kept answering TRYAGAIN, or redirecting, 16 times)
        ("TTL exhausted", "Multiple keys request during rehashing of slot"),
        "the Cluster kept redirecting the call: the breaker's slot is being migrated (a reshard or a rebalance; "
        "calls go through again once it is done), or a reshard stopped halfway left it migrating: finish it with "
        "redis-cli --cluster fix HOST:PORT",
    ),
    (
        ("NOREPLICAS", "Not enough good replicas"),
        "the master refuses writes until min-replicas-to-write replicas are connected: bring a replica back",
    ),
    (
        (
            "AuthenticationError",
            "AuthenticationWrongNumberOfArgsError",
            "NOAUTH",
            "WRONGPASS",
            "invalid username-password pair",
            "must be called with the client already authenticated",
        ),
        "Redis wants a password, or another one: give it in the store URL (breaker_storage_url, or the broker "
        "URL it is taken from), redis://:PASSWORD@host:6379/0, or redis://USER:PASSWORD@host:6379/0 for an ACL "
        "user, with characters such as @ : / % in it percent-encoded",
    ),
    (
        ("DB index is out of range",),
        "the store URL names a database this Redis does not have (it has as many as its 'databases' setting, "
        "16 by default: /0 to /15): name one it has in breaker_storage_url (or the broker URL it is taken from)",
    ),
    (
        ("Client names cannot contain",),
        "the store URL's client_name holds a space, a line break or another character Redis refuses in a "
        "client name: give one without them",
    ),
    (
        ("NoPermissionError", *_DENIED),
        "the store URL's ACL user may not run a command, or use a key or channel, that breakers need: grant it "
        "+@read +@write +@scripting +publish +subscribe +ping on its keys (~*, or those of the key prefix) and "
        "&* (or the prefix's transitions channel)",
    ),
)


def advice(exc: BaseException | None) -> str:
    """What the operator must do when Redis refuses every call for a reason of its own
    (a read-only replica, out of memory, too few replicas, an ACL, a Cluster slot being
    migrated): ``''`` for anything
    else (an outage, the data's doing)."""
    if exc is None:
        return ""
    message = f"{type(exc).__name__} {exc}"
    return next((fix for marks, fix in _FIXES if any(mark in message for mark in marks)), "")


def failure(label: str, doing: str, exc: BaseException) -> str:
    """The text of the ``StorageError`` a failed command becomes: the store, what was being
    done, Redis's error (masked: redis-py's may quote a URL with its password) and, when
    Redis refuses for a reason of its own, the fix."""
    fix = advice(exc)
    return f"redis store {label}: {doing} failed: {masked_in_text(error_text(exc))}" + (f" ({fix})" if fix else "")


#: A client's repr in redis-py's ``MasterNotFoundError`` (one per Sentinel asked), which
#: nests its pool's and connection's: ``<redis.client.Redis(<...Connection(host=h,port=p,...)>)>``.
_CLIENT_REPR = "<redis.client.Redis("


def error_text(exc: BaseException) -> str:
    """``str(exc)``, with each Sentinel client redis-py names in a ``MasterNotFoundError``
    shown as ``sentinel HOST:PORT``: its repr, with its pool's and connection's settings,
    was some 1.5 KB a Sentinel, the cause (``CERTIFICATE_VERIFY_FAILED``) at its end."""
    text = str(exc)
    if _CLIENT_REPR not in text:
        return text
    shown, at = [], 0
    while (start := text.find(_CLIENT_REPR, at)) != -1:
        depth, end = 0, start
        for end in range(start, len(text)):  # (to its closing '>', past the nested ones)
            depth += {"<": 1, ">": -1}.get(text[end], 0)
            if depth == 0:
                break
        inner = text[start : end + 1]
        host, port = re.search(r"\bhost=([^,)>]*)", inner), re.search(r"\bport=(\d+)", inner)
        where = f"{host.group(1)}:{port.group(1)}" if host and port else "?"
        shown.append(text[at:start] + f"sentinel {where}")
        at = end + 1
    return "".join(shown) + text[at:]


def repair_for(exc: BaseException | None) -> str:
    """What to run a failed breaker script again with: ``CHECK_TYPES``, ``RESET``, or ``''``
    (do not: the failure was not the data's)."""
    return {"types": CHECK_TYPES, "data": RESET}.get(classify(exc), "")


def finite(value: float) -> float:
    """``value`` if it is a finite number; ``ValueError`` otherwise."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    return value


def text(value: Any) -> str:
    """What Redis returned, as text (bytes that are not UTF-8 are replaced, never raised on)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
