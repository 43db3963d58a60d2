"""The one place Celery settings are read: validated once, cached per app, Django's ``CELERY_`` namespace included."""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from ..core import BreakerPolicy
from ..core.pacing import RATE_LEAST, PacingLaw
from ..core.policy import LARGEST_COUNT
from ..errors import ConfigurationError
from ..health import DEFAULT_PROBE_TIMEOUT, HealthCheck, ProbeFunction, check_timeout, shown_probe
from ..names import check_name
from ..storage import check_storage_url, describe_url, is_shared_url
from ..storage.fallback import MODES as ON_STORAGE_ERROR_CHOICES
from ..storage.urls import scrub_each, urls_in
from . import values
from .broker import DEFAULT_CONSUMER_TIMEOUT, hold_limit, store_url_from_broker
from .problems import Problems

__all__ = [
    "FIXED_RELEASE_RATE",
    "ON_STORAGE_ERROR_CHOICES",
    "OPTIONS_FORGOTTEN",
    "RELEASE_PACES",
    "SETTINGS",
    "BreakerSettings",
    "entry_matches",
    "get_settings",
    "reload_settings",
    "with_key_prefix",
]

logger = logging.getLogger("celery_breaker")

T = TypeVar("T")

#: How parked tasks are released once their breaker closes (``breaker_release_pace``).
RELEASE_PACES = ("adaptive", "fixed")
#: ``breaker_release_rate`` under ``breaker_release_pace="fixed"`` when it is not set.
FIXED_RELEASE_RATE = 50.0
#: The lowest ``breaker_release_rate``: one task an hour. Below it a rate is a slip (a
#: ``1e-300`` released nothing, silently, as long as the backlog waited).
LEAST_RELEASE_RATE = RATE_LEAST

#: Every setting celery-breaker reads, with its default. Anything else named
#: ``breaker_*`` is a typo and fails at worker start.
SETTINGS: dict[str, Any] = {
    "breaker_storage_url": None,
    "breaker_key_prefix": "breaker",
    "breaker_default_policy": None,
    "breaker_policies": {},
    "breaker_routes": {},
    "breaker_max_deferrals": None,
    "breaker_max_defer_age": None,
    "breaker_defer_spread": None,
    "breaker_on_storage_error": "local",
    "breaker_send_events": None,
    "breaker_park": "auto",
    "breaker_release_pace": "adaptive",
    "breaker_release_rate": None,
    "breaker_release_ramp": 30.0,
    "breaker_metrics_port": None,
    "breaker_metrics_address": "127.0.0.1",
    "breaker_metrics_ttl": 86_400.0,
    "breaker_consumer_timeout": DEFAULT_CONSUMER_TIMEOUT,
    "breaker_probes": {},
    "breaker_probe_timeout": DEFAULT_PROBE_TIMEOUT,
}

_LOCK = threading.Lock()
_ATTRIBUTE = "_celery_breaker_settings"

#: How many times any task's resolved options were forgotten (``OPTIONS_FORGOTTEN[0]``):
#: its options changed, or the settings they were resolved against were read again
#: (``reload_settings``). What a task kept from its options since (its breaker:
#: ``BreakerTask._breaker_held``) is stale.
OPTIONS_FORGOTTEN = [0]


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSettings:
    """celery-breaker's settings for one app, validated."""

    storage_url: str
    key_prefix: str
    default_policy: BreakerPolicy
    policies: tuple[tuple[str, BreakerPolicy | Mapping[str, Any]], ...]
    routes: tuple[tuple[str, str], ...]
    max_deferrals: int | None
    max_defer_age: float | None
    defer_spread: float | None
    on_storage_error: str
    send_events: bool
    park: bool | str
    """Park deferred tasks in the store (``True``), never (``False``), or when the store is Redis (``"auto"``)."""
    release_pace: str
    """``"adaptive"``: parked tasks go at a pace that follows their outcomes (``core/pacing.py``);
    ``"fixed"``: at ``release_rate``, reached after ``release_ramp``."""
    release_rate: float | None
    """Parked tasks released per second per breaker once it closes (cluster-wide): the fixed
    pace (``FIXED_RELEASE_RATE`` unless set), or the adaptive pace's ceiling (``None``: none)."""
    release_ramp: float
    """Seconds from a tenth of ``release_rate`` to all of it after the breaker closes (fixed pace only)."""
    consumer_timeout: float
    """RabbitMQ's ``consumer_timeout`` as the broker is configured (``breaker_consumer_timeout``)."""
    hold_limit: float | None
    """How long the broker lets a worker hold an unacknowledged message (Redis and SQS
    ``visibility_timeout``, RabbitMQ ``consumer_timeout``); countdown deferrals stay well inside it."""
    metrics_port: int | None
    """The TCP port of the worker's Prometheus endpoint; ``None``: no endpoint."""
    metrics_address: str
    """The address that endpoint binds (this host only unless set otherwise)."""
    metrics_ttl: float
    """Seconds stored metrics snapshots (``record_metrics``) are kept."""
    probes: tuple[tuple[str, str | ProbeFunction | HealthCheck | None], ...] = ()
    """``breaker_probes``: breaker name or glob -> a health check (dotted path, task name or callable)."""
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT
    """Seconds a health check may take before it counts as failed (``breaker_probe_timeout``)."""
    _policy_cache: dict[str, BreakerPolicy] = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        # Every field as a dataclass shows it, the store URL with its password masked, and
        # each health check as ``shown_probe`` shows it (a URL given as one, masked).
        shown = ", ".join(f"{f.name}={self._shown(f.name)}" for f in fields(self) if f.repr)
        return f"{type(self).__name__}({shown})"

    def _shown(self, name: str) -> str:
        if name == "storage_url":
            return repr(describe_url(self.storage_url))
        if name == "probes":
            return "(" + "".join(f"({pattern!r}, {shown_probe(probe)}), " for pattern, probe in self.probes) + ")"
        return repr(getattr(self, name))

    def policy_for(self, name: str) -> BreakerPolicy:
        """The default policy, then every matching ``breaker_policies`` entry in order
        (globs first, the exact name last)."""
        found = self._policy_cache.get(name)
        if found is not None:
            return found
        policy = self.default_policy
        matches = [
            (pattern, value) for pattern, value in self.policies if pattern != name and entry_matches(pattern, name)
        ]
        matches += [(pattern, value) for pattern, value in self.policies if pattern == name]
        for pattern, value in matches:
            policy = BreakerPolicy.coerce(value, base=policy, source=f"breaker_policies[{pattern!r}]")
        self._policy_cache[name] = policy
        return policy

    def probe_for(self, name: str) -> tuple[str, str | ProbeFunction | HealthCheck] | None:
        """The ``breaker_probes`` entry of breaker ``name``, as ``(pattern, probe)``: its
        exact name, else the first matching glob; ``None`` when no entry matches, or when
        the one that does is ``None`` (no health check: ``{"pay*": check, "pay-legacy":
        None}`` exempts one breaker from a glob)."""
        found = next((entry for entry in self.probes if entry[0] == name), None)
        if found is None:
            found = next((entry for entry in self.probes if entry_matches(entry[0], name)), None)
        if found is None or found[1] is None:
            return None
        return found[0], found[1]

    def release_law(self) -> PacingLaw | None:
        """The adaptive release's law (its ceiling ``release_rate``); ``None`` for the fixed pace."""
        if self.release_pace != "adaptive":
            return None
        return PacingLaw(ceiling=self.release_rate)

    def route_for(self, task_name: str) -> str | None:
        """The breaker a plain task is put under by ``breaker_routes``, if any."""
        for pattern, breaker in self.routes:
            if entry_matches(pattern, task_name):
                return breaker
        return None

    def defer_cap(self, time_limit: float | None) -> float | None:
        """The longest countdown the broker tolerates for a task with ``time_limit``: a tenth
        of ``hold_limit`` (or the time limit, if longer) short of it.

        A time limit that leaves less than a tenth of ``hold_limit`` (a ``task_time_limit``
        of hours under Redis's one-hour ``visibility_timeout``) cannot be kept clear of
        redelivery by any countdown: such a run can outlast the window undeferred too. The
        countdown is then a tenth of ``hold_limit``, not one second, which would send each
        deferred task round the broker every second for the whole outage (and spend a
        ``breaker_max_deferrals`` budget in as many seconds)."""
        if self.hold_limit is None:
            return None
        margin = max(self.hold_limit * 0.1, time_limit or 0.0)
        return max(1.0, self.hold_limit - margin, self.hold_limit * 0.1)


def entry_matches(pattern: str, name: str) -> bool:
    """Whether a settings entry (a breaker or task name, or a glob) applies to ``name``."""
    return pattern == name or fnmatch.fnmatchcase(name, pattern)


def _conf_get(conf: Any, key: str) -> Any:
    # conf.get resolves Django's namespace (CELERY_BREAKER_X) as well as breaker_x.
    return conf.get(key, SETTINGS[key])


def _strip_namespace(conf: Any, raw: str) -> str:
    prefix = (getattr(conf, "prefix", None) or "").lower()
    key = raw.lower()
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key


#: Django's namespace, written in a configuration loaded without it (``CELERY_BREAKER_PARK``
#: in a module read by ``config_from_object(...)`` with no ``namespace="CELERY"``, or
#: with another one).
_STRAY_NAMESPACE = "celery_"


def _stray_namespace(conf: Any, key: str) -> bool:
    """Whether ``key`` (as ``_strip_namespace`` gives it) is one of ours behind Django's
    namespace in a configuration loaded with no namespace or another one: Celery reads
    it nowhere."""
    prefix = (getattr(conf, "prefix", None) or "").lower()
    return prefix != _STRAY_NAMESPACE and key.startswith(_STRAY_NAMESPACE + "breaker")


def _respell(raw: str, key: str, setting: str) -> str:
    """``setting`` as the user writes settings: Django's ``CELERY_BREAKER_DEFAULT_POLICY``
    for ``CELERY_BREAKER_DEFAULT_POLCY``, Celery's ``breaker_default_policy`` otherwise."""
    namespace = raw[: len(raw) - len(key)]
    spelled = namespace + setting
    return spelled.upper() if namespace and raw.isupper() else spelled  # (no namespace: Celery reads lowercase)


def _as_written(conf: Any, text: str) -> str:
    """``text`` with each of our settings it names as the configuration writes it
    (Django's ``CELERY_BREAKER_MAX_DEFERRALS``): a search of settings.py for the name an
    error gave, ``breaker_max_deferrals``, found nothing."""
    for raw in list(conf.keys()):
        if isinstance(raw, str) and (key := _strip_namespace(conf, raw)) in SETTINGS and raw != key:
            text = re.sub(rf"(?<![\w.]){re.escape(key)}(?!\w)", _respell(raw, key, key), text)
    return text


def unknown_settings(conf: Any) -> list[str]:
    """Settings named like ours (``breaker*``, any case, any namespace: ``breakers_``
    and ``breaker-`` are typos too) that we do not know."""
    unknown = []
    for raw in list(conf.keys()):
        if not isinstance(raw, str):
            continue
        key = _strip_namespace(conf, raw)
        if _stray_namespace(conf, key):
            key = key[len(_STRAY_NAMESPACE) :]
        if key.startswith("breaker") and key not in SETTINGS:
            unknown.append(raw)
    return sorted(set(unknown))


def with_key_prefix(url: str, key_prefix: str) -> str:
    """Carry ``breaker_key_prefix`` into a shared store's URL (unless the URL names one:
    then both must agree, or the setting is left at its default)."""
    parts = urlsplit(url)
    if not is_shared_url(url):
        return url
    named = [value for option, value in parse_qsl(parts.query, keep_blank_values=True) if option == "key_prefix"]
    if named:
        if key_prefix != SETTINGS["breaker_key_prefix"] and named[-1] != key_prefix:
            raise ConfigurationError(
                f"breaker_key_prefix={key_prefix!r} disagrees with key_prefix={named[-1]!r} in "
                f"breaker_storage_url; set one of them"
            )
        return url
    if key_prefix == SETTINGS["breaker_key_prefix"]:
        return url
    return f"{url}{'&' if parts.query else '?'}key_prefix={quote(key_prefix, safe='')}"


def unread_settings(conf: Any) -> list[tuple[str, str]]:
    """Our settings spelled so that Celery does not read them (``BREAKER_PARK`` without a
    namespace, ``celery_breaker_park`` under Django's ``CELERY_``), each with the spelling
    it reads."""
    names = list(conf.keys())  # (first: a configuration read lazily sets its namespace here)
    prefix = getattr(conf, "prefix", None) or ""
    unread = []
    for raw in names:
        if not isinstance(raw, str):
            continue
        key = _strip_namespace(conf, raw)
        if _stray_namespace(conf, key) and (setting := key[len(_STRAY_NAMESPACE) :]) in SETTINGS:
            # (silently ignored before: no check saw it as ours)
            read_as = prefix + setting.upper() if prefix else setting
            unread.append((raw, f"{read_as}, or as {raw} under namespace='CELERY'"))
        elif key in SETTINGS and conf.get(key, _UNSET) is not conf[raw]:
            unread.append((raw, prefix + key.upper() if prefix else key))
    return sorted(set(unread))


_UNSET = object()


def _unknown(conf: Any) -> list[str]:
    """The problem of settings named like ours that we do not know, with a did-you-mean,
    and of ours spelled so that Celery does not read them."""
    problems = [
        f"{raw} is not read (Celery reads this setting as {spelling}): rename it"
        for raw, spelling in unread_settings(conf)
    ]
    unknown = unknown_settings(conf)
    if not unknown:
        return problems
    hints = []
    for name in unknown:
        key = _strip_namespace(conf, name)
        close = difflib.get_close_matches(key, SETTINGS, n=1)
        if close:
            hints.append(f"{name}: did you mean {_respell(name, key, close[0])}?")
    return [
        *problems,
        f"unknown celery-breaker setting(s): {', '.join(unknown)}"
        + (f" ({'; '.join(hints)})" if hints else "")
        + f"; known settings: {', '.join(sorted(SETTINGS))}",
    ]


def _key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "{}"):
        raise ConfigurationError(f"breaker_key_prefix must be a non-empty string without braces, got {value!r:.100}")
    surrogate = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    if surrogate is not None:  # (a byte that is not UTF-8, from an environment variable say: no key can hold it)
        raise ConfigurationError(
            f"breaker_key_prefix {value!r} holds {surrogate!r}: a byte that is not UTF-8 (a lone surrogate), which "
            "no Redis key can hold; write the prefix in UTF-8"
        )
    return value


def _storage_url(conf: Any, key_prefix: str) -> str:
    given = _conf_get(conf, "breaker_storage_url")
    if isinstance(given, str) and not given.strip():
        # (an environment variable set empty: read as unset, it chose the default store
        # without a word, memory:// on any broker but Redis)
        raise ConfigurationError(
            "breaker_storage_url is empty; give a store URL such as 'redis://host:6379/0', or leave the setting "
            "out for the default (the broker's Redis, else memory://)"
        )
    url = given or store_url_from_broker(conf) or "memory://"
    if isinstance(url, (list, tuple)):
        # (broker_url's failover form, whose URLs hold passwords: shown masked, as any URL)
        shown = ", ".join(repr(describe_url(part)) if isinstance(part, str) else type(part).__name__ for part in url)
        raise ConfigurationError(
            f"breaker_storage_url must be one URL string, got a {type(url).__name__}: [{shown}]; a list of URLs "
            "is broker_url's failover form: give the one store URL (for a Redis that fails over, its Sentinels: "
            "redis+sentinel://host:26379,host:26379/service_name)"
        )
    if not isinstance(url, str) or "://" not in url:
        # (a number as it is; any other value by its type: bytes or a dict may hold a password)
        if isinstance(url, str):
            shown = repr(describe_url(url))
        else:
            shown = repr(url) if isinstance(url, int | float) else f"a {type(url).__name__}"
        raise ConfigurationError(f"breaker_storage_url must be a URL such as 'memory://', got {shown:.100}")
    check_storage_url(url)
    return with_key_prefix(url, key_prefix)


def _policy_entry(
    pattern: str, value: Any, default_policy: BreakerPolicy
) -> tuple[str, BreakerPolicy | Mapping[str, Any]]:
    check_name(pattern, f"breaker_policies key {pattern!r}")
    # Validated now (over the default), so a typo fails at worker start.
    BreakerPolicy.coerce(value, base=default_policy, source=f"breaker_policies[{pattern!r}]")
    return pattern, value


def _route(pattern: str, breaker: Any) -> tuple[str, str]:
    # True: each matching task gets a breaker of its own name ("").
    if breaker is True:
        return pattern, ""
    if not isinstance(breaker, str):
        raise ConfigurationError(
            f"breaker_routes[{pattern!r}] must be a breaker name (or True for the task's own name), got {breaker!r}"
        )
    return pattern, check_name(breaker, f"breaker_routes[{pattern!r}]")


def _probe_entry(pattern: str, probe: Any) -> tuple[str, str | ProbeFunction | HealthCheck | None]:
    # The shape only: whether a string names a task or an importable callable is known
    # once the app's tasks are (``probes.resolve_probe``, at worker start). ``None``: no
    # health check for what the entry names (an exact name exempted from a glob).
    check_name(pattern, f"breaker_probes key {pattern!r}")
    if probe is None:
        return pattern, None
    if isinstance(probe, str) and probe.strip() == probe and probe:
        return pattern, probe
    if isinstance(probe, HealthCheck) or (callable(probe) and not isinstance(probe, str)):
        return pattern, probe  # (a HealthCheck keeps its own timeout, as given as a task option)
    raise ConfigurationError(
        f"breaker_probes[{pattern!r}] must be a dotted path to a health-check function "
        f"('package.module:function'), a task name, a callable, a celery_breaker.HealthCheck, or None "
        f"(no health check), got {shown_probe(probe)}"
    )


def _one_of(key: str, value: Any, choices: tuple[Any, ...], shown: str) -> Any:
    """``value`` if it is one of ``choices`` (``True`` is no ``1``: booleans match booleans only)."""
    for choice in choices:
        if value is choice or (not isinstance(value, bool) and not isinstance(choice, bool) and value == choice):
            return choice
    raise ConfigurationError(f"{key} must be {shown}, got {value!r:.100}")


def _release_rate(value: Any) -> float | None:
    if value is None:
        return None
    found = values.positive_finite(value)
    if found is None or not LEAST_RELEASE_RATE <= found <= LARGEST_COUNT:
        raise ConfigurationError(
            f"breaker_release_rate must be a number of tasks per second from 1/3600 (one an hour) to "
            f"{LARGEST_COUNT:,}, or None (the adaptive pace without a ceiling; {FIXED_RELEASE_RATE:g} under the "
            f"fixed pace), got {value!r:.100}; to release nothing for a while, hold the breaker open "
            "(celery breaker open)"
        )
    return found


def _probe_timeout(key: str, value: Any) -> float:
    """Seconds (or a ``timedelta``), at least ``LEAST_PROBE_TIMEOUT``."""
    return check_timeout(key, values.duration(key, value))


def _release_pace(key: str, value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in RELEASE_PACES:
        return value.strip().lower()
    close = difflib.get_close_matches(value.strip().lower(), RELEASE_PACES, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigurationError(
        f"{key} must be 'adaptive' (the pace follows the released tasks' outcomes) or 'fixed' "
        f"(breaker_release_rate, reached after breaker_release_ramp), got {value!r:.100}{hint}"
    )


def build_settings(conf: Any) -> BreakerSettings:
    """Read and validate every ``breaker_*`` setting. Every problem is collected, and one
    ``ConfigurationError`` lists them all (each naming the setting, the bad value and the
    fix), so one start of the worker shows everything there is to fix."""
    problems = Problems("settings")
    for text in _unknown(conf):
        problems.add(text)

    def get(key: str, parse: Callable[[str, Any], T], fallback: T) -> T:
        """The setting ``key`` as ``parse`` reads it, or ``fallback`` once its problem is noted."""
        return problems.check(lambda: parse(key, _conf_get(conf, key)), fallback)

    key_prefix = problems.check(lambda: _key_prefix(_conf_get(conf, "breaker_key_prefix")), "breaker")
    storage_url = problems.check(lambda: _storage_url(conf, key_prefix), "memory://")
    default_policy = problems.check(
        lambda: BreakerPolicy.coerce(_conf_get(conf, "breaker_default_policy"), source="breaker_default_policy"),
        BreakerPolicy(),
    )
    empty: Mapping[str, Any] = {}
    policies = [
        entry
        for pattern, value in get("breaker_policies", values.mapping, empty).items()
        if (entry := problems.check(partial(_policy_entry, pattern, value, default_policy), None)) is not None
    ]
    routes = [
        route
        for pattern, breaker in get("breaker_routes", values.mapping, empty).items()
        if (route := problems.check(partial(_route, pattern, breaker), None)) is not None
    ]
    on_storage_error: str = get(
        "breaker_on_storage_error",
        lambda key, value: _one_of(
            key, value, ON_STORAGE_ERROR_CHOICES, f"one of {', '.join(ON_STORAGE_ERROR_CHOICES)}"
        ),
        "local",
    )
    send_events: bool | None = get(
        "breaker_send_events", lambda key, value: _one_of(key, value, (True, False, None), "True, False or None"), None
    )
    if send_events is None:
        send_events = bool(conf.get("worker_send_task_events", False))
    park: bool | str = get(
        "breaker_park", lambda key, value: _one_of(key, value, (True, False, "auto"), "True, False or 'auto'"), "auto"
    )
    if park is True and not is_shared_url(storage_url):
        problems.add(
            f"breaker_park=True needs a Redis breaker_storage_url (parked tasks must outlive the worker), "
            f"got {describe_url(storage_url)!r}; use breaker_park='auto' to park only with Redis"
        )
    consumer_timeout = get("breaker_consumer_timeout", values.duration, DEFAULT_CONSUMER_TIMEOUT)
    probes = [
        checked
        for pattern, probe in get("breaker_probes", values.mapping, empty).items()
        if (checked := problems.check(partial(_probe_entry, pattern, probe), None)) is not None
    ]

    release_pace = get("breaker_release_pace", _release_pace, "adaptive")
    release_rate = problems.check(lambda: _release_rate(_conf_get(conf, "breaker_release_rate")), None)
    if release_rate is None and release_pace == "fixed":
        release_rate = FIXED_RELEASE_RATE
    settings = BreakerSettings(
        storage_url=storage_url,
        key_prefix=key_prefix,
        default_policy=default_policy,
        policies=tuple(policies),
        routes=tuple(routes),
        max_deferrals=get("breaker_max_deferrals", values.whole, None),
        max_defer_age=get("breaker_max_defer_age", values.seconds, None),
        defer_spread=get("breaker_defer_spread", values.seconds_or_zero, None),
        on_storage_error=on_storage_error,
        send_events=send_events,
        park=park,
        release_pace=release_pace,
        release_rate=release_rate,
        release_ramp=get("breaker_release_ramp", values.seconds_or_zero, None) or 0.0,
        consumer_timeout=consumer_timeout,
        hold_limit=hold_limit(conf, consumer_timeout),
        metrics_port=get("breaker_metrics_port", values.port, None),
        metrics_address=get("breaker_metrics_address", values.bind_address, "127.0.0.1"),
        metrics_ttl=get("breaker_metrics_ttl", values.duration, 86_400.0),
        probes=tuple(probes),
        probe_timeout=get("breaker_probe_timeout", _probe_timeout, DEFAULT_PROBE_TIMEOUT),
    )
    urls = [url for key in SETTINGS for url in urls_in(_conf_get(conf, key))]
    problems.found = [scrub_each(_as_written(conf, text), urls) for text in problems.found]
    problems.raise_any()
    return settings


def get_settings(app: Any) -> BreakerSettings:
    """The app's validated settings, read once and cached on the app."""
    found: BreakerSettings | None = getattr(app, _ATTRIBUTE, None)
    if found is not None:
        return found
    with _LOCK:
        found = getattr(app, _ATTRIBUTE, None)
        if found is None:
            found = build_settings(app.conf)
            setattr(app, _ATTRIBUTE, found)
        return found


def reload_settings(app: Any) -> BreakerSettings:
    """Forget the cached settings and read them again (after changing ``app.conf``).

    Every task's options resolved against the old settings (``task_options``: the
    policy, the deferral budget, ``breaker_routes``, the health check) are resolved
    again on their next use, as is the breaker each task kept (``OPTIONS_FORGOTTEN``)."""
    with _LOCK:
        if hasattr(app, _ATTRIBUTE):
            delattr(app, _ATTRIBUTE)
    settings = get_settings(app)
    OPTIONS_FORGOTTEN[0] += 1  # (after: a run between the two keeps a count already stale)
    return settings


def _reinit_locks_after_fork() -> None:
    # A lock another thread (the releaser, the store's agent) held at fork time would
    # stay held for ever in the child: a prefork child forked after start (autoscale,
    # max-tasks-per-child, one replacing a child killed at its limit) hung on it.
    global _LOCK  # noqa: PLW0603 (the lock is made again in the child)
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)
