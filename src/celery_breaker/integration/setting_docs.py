"""What each ``breaker_*`` setting and ``BreakerTask`` option means, for the configuration reference.

``docs/configuration.md`` is generated from these tables (``scripts/gen_reference.py``)
together with the defaults the code holds (``settings.SETTINGS``, ``BreakerTask``'s class
attributes); the policy fields carry theirs as field metadata in ``core/policy.py``.
``tests/test_docs_reference.py`` fails when a setting or option has no row here.
"""

from __future__ import annotations

from ..core.reference import Doc
from .settings import ON_STORAGE_ERROR_CHOICES

__all__ = ["SETTING_DOCS", "TASK_OPTION_DOCS"]

_SECONDS_DOC = "seconds > 0, at most ten years (number or `timedelta`)"

#: What each setting means, for the configuration reference (docs/configuration.md is
#: generated from this table and the defaults in ``settings.SETTINGS``; every setting must have a row).
SETTING_DOCS: dict[str, Doc] = {
    "breaker_storage_url": Doc(
        accepts="URL; an unknown scheme, a bad option or an empty text (leave the setting out for the default) "
        "stops the worker",
        meaning="where breaker state lives: `memory://[name][?max_breakers=N&idle_ttl=SECONDS]`, `redis://`, "
        "`rediss://`, `redis+unix://`, `redis+sentinel://`, `redis+cluster://`, their TLS forms "
        "`rediss+sentinel://` and `rediss+cluster://`, and the `valkey` spellings "
        "([Redis internals](redis.md#urls)). The worker logs the store it uses at start.",
        default="the broker's Redis when the broker is Redis (Sentinel too), with its `broker_use_ssl`, "
        "else `memory://`",
    ),
    "breaker_key_prefix": Doc(
        accepts="non-empty string without `{` or `}`",
        meaning="namespace of every key (and of the transitions channel) in a Redis store; added to the URL as "
        "`key_prefix`, and must agree with a `key_prefix` the URL names",
    ),
    "breaker_default_policy": Doc(
        accepts="dict of policy fields, or a `BreakerPolicy`",
        meaning="the policy of every breaker",
        default="the `BreakerPolicy` defaults ([policy fields](#policy-fields-breakerpolicy))",
    ),
    "breaker_policies": Doc(
        accepts="dict: breaker name or glob → dict of policy fields, or a `BreakerPolicy`; "
        "each entry is validated at start",
        meaning="overrides over the default policy; matching globs apply in order, then the exact name. A name "
        "one typo from a task's breaker is warned of at start",
    ),
    "breaker_routes": Doc(
        accepts="dict: task-name glob → breaker name, or `True` for the task's own name",
        meaning="puts plain tasks (not subclassing `BreakerTask`) under a breaker, and names the breaker of "
        'tasks that `task_cls="celery_breaker:BreakerTask"` makes BreakerTasks (unless they give `breaker=`); '
        "the first matching glob wins. An exact name one typo from a task no route matches (`send_reciept`) "
        "is warned of at start",
    ),
    "breaker_max_deferrals": Doc(
        accepts="whole number from 0 to 1,000,000, or `None`",
        meaning="deferrals after which the task fails with `CircuitOpenError`",
        default="no limit",
    ),
    "breaker_max_defer_age": Doc(
        accepts=f"{_SECONDS_DOC}, or `None`",
        meaning="time since the first deferral after which the task fails with `CircuitOpenError`",
        default="no limit",
    ),
    "breaker_defer_spread": Doc(
        accepts="seconds ≥ 0, at most ten years, or `None`",
        meaning="a random extra delay of up to this long on each deferral, so a backlog does not return all at once",
        default="the policy's `reset_timeout`",
    ),
    "breaker_on_storage_error": Doc(
        accepts="one of " + ", ".join(f"`{choice}`" for choice in ON_STORAGE_ERROR_CHOICES),
        meaning="while a shared store cannot be reached: a breaker of this process stands in (`local`), every call "
        "passes (`allow`), or every call is rejected (`deny`); the store is tried again every 5 s and the "
        "shared state rejoined when it answers",
    ),
    "breaker_send_events": Doc(
        accepts="`True`, `False` or `None`",
        meaning="send `breaker-opened`/`-half-opened`/`-closed` and `task-breaker-deferred` events from workers "
        "([monitoring](monitoring.md#celery-events))",
        default="follow the worker's `-E` / `worker_send_task_events`",
    ),
    "breaker_park": Doc(
        accepts='`True`, `False` or `"auto"`; `True` needs a Redis store',
        meaning="park deferred tasks in the breaker's Redis instead of countdown messages held by workers "
        '(`"auto"`: when the broker is Redis too; on RabbitMQ `"auto"` defers in RabbitMQ\'s own delayed '
        "delivery instead, [brokers](brokers.md); [parking](concepts.md#parking-long-outages-big-backlogs))",
    ),
    "breaker_release_pace": Doc(
        accepts='`"adaptive"` or `"fixed"`',
        meaning="how parked tasks are released once their breaker has closed, decided in Redis for all workers: "
        '`"adaptive"` starts at 10 per second and grows (by 40 % every half second) while the released tasks '
        "succeed, is cut to 80 % at once on failures or slow calls (the policy's `slow_call_duration`) or on a "
        "429 met by a released task, or by any task while tasks are still parked and its Retry-After is at most "
        "`reset_timeout` (then it waits for the "
        "Retry-After, and grows back only to 95 % of what the downstream "
        "took: the successes per second back with the refusal), "
        "releases nothing after a cut while more than 1.5 s worth of tasks await their outcome (for at most 12 s "
        "after the cut, less once those tasks have come back: an estimate that never drains stops holding then), "
        "and stops "
        'while the breaker is open ([recovery](performance.md#recovery)); `"fixed"` goes at '
        "`breaker_release_rate` after `breaker_release_ramp`. No effect on the memory store, which has no parking",
    ),
    "breaker_release_rate": Doc(
        accepts="tasks per second from 1/3600 (one an hour) to 1,000,000, or `None`",
        meaning="parked tasks released per breaker per second once it has closed, across all workers: the "
        "adaptive pace's ceiling, or the fixed pace",
        default="no ceiling under the adaptive pace, 50 under the fixed pace",
    ),
    "breaker_release_ramp": Doc(
        accepts="seconds ≥ 0, at most ten years",
        meaning="the fixed pace starts at a tenth of `breaker_release_rate` and reaches it after this long (0: at "
        'once); unused by `"adaptive"`',
    ),
    "breaker_metrics_port": Doc(
        accepts="int from 1 to 65535, or `None`",
        meaning="the port of the worker's Prometheus endpoint (`/metrics`, served by its main process; needs "
        "`celery-breaker[prometheus]`); each worker on a host needs its own "
        "([metrics](metrics.md#a-workers-own-endpoint))",
        default="no endpoint",
    ),
    "breaker_metrics_address": Doc(
        accepts="an IP address or a host name",
        meaning='the address that endpoint binds: this host only unless you set e.g. `"0.0.0.0"` (every interface)',
    ),
    "breaker_consumer_timeout": Doc(
        accepts=_SECONDS_DOC,
        meaning="RabbitMQ's `consumer_timeout` as your broker is configured: a delivery a worker holds "
        "unacknowledged longer closes its channel and stops the worker, so no countdown deferral is held "
        "longer than nine tenths of it ([brokers](brokers.md#what-each-broker-does-with-a-deferred-task))",
        default="RabbitMQ's default, 30 minutes",
    ),
    "breaker_metrics_ttl": Doc(
        accepts=_SECONDS_DOC,
        meaning="how long `record_metrics` (the `celery_breaker.record_metrics` task) keeps each breaker's stored "
        "snapshots ([metrics](metrics.md#stored-history))",
        default="one day",
    ),
    "breaker_probes": Doc(
        accepts="dict: breaker name or glob → a dotted path to a function (`package.module:function`) or to a "
        "`HealthCheck`, the name of a task of the app, a callable, or a `celery_breaker.HealthCheck(fn, timeout)` "
        "(its own timeout in place of `breaker_probe_timeout`); each is resolved at worker start, and one that "
        "names no task and imports nothing, or that cannot be called without arguments nor with the breaker's key "
        "alone, stops the worker",
        meaning="a health check per breaker, run instead of a real task when the breaker may half-open; real tasks "
        "stay deferred or parked until the checks close it. A check fails by raising, returning `False` or "
        "returning an HTTP response with an error status (400 or more); one that "
        "requires an argument, or has an optional `key=None`, is given the key of the per-key breaker it "
        "checks. A task "
        "named here has its body called in the worker's process, without its breaker "
        "([health-check probes](concepts.md#health-check-probes)); the exact name wins over globs, then the first "
        'matching glob, and an entry of `None` gives what it names no health check (`{"pay*": check, '
        '"pay-legacy": None}`). A name one typo from a task\'s breaker (`partnr` for `partner`) is warned of at '
        "start",
        default="none (real tasks are the probes)",
    ),
    "breaker_probe_timeout": Doc(
        accepts="seconds of at least 0.01, at most ten years (number or `timedelta`)",
        meaning="how long a health check may take before it counts as failed (never longer than the policy's "
        "`half_open_max_wait` less 5 s, or a fifth of it where shorter); a check that hangs is left in its own thread",
        default="10 seconds",
    ),
}


#: What each task option means, for the configuration reference (docs/configuration.md is
#: generated from it and the class defaults of ``BreakerTask``; every option needs a row).
TASK_OPTION_DOCS: dict[str, Doc] = {
    "breaker": Doc(
        accepts="a non-empty string",
        meaning="the breaker's name. Inside the body, `self.breaker` is this call's `CircuitBreaker` "
        '(the name is kept in `breaker_name`; a task class of your own sets `breaker_name = "crm"`, '
        "as `breaker` there is the typed accessor).",
        default="the task's name (under `task_cls`, the one `breaker_routes` names)",
    ),
    "breaker_key": Doc(
        accepts="a callable `(args, kwargs) -> str`, or the name of a task method; a name that is no method, "
        "or a callable that cannot be called `(args, kwargs)`, stops the worker at start",
        meaning="per-key breakers (one per tenant, host, ...); a method defined on a `BreakerTask` subclass is "
        "called as a method (`self.breaker_key(args, kwargs)`). The key is a `str` (a `StrEnum` as its value), "
        'a whole number (`7` and `"7"` are one breaker) or a `UUID` (its canonical text); anything else '
        "(`None`, a `float`, a `bool`, a tuple, an object) fails that run without running it, with a "
        "`ConfigurationError` naming the task (as a `breaker_key` that raises). A key longer than 200 "
        "characters, or one that is not text (a lone surrogate), is kept as its first characters, `~` and a "
        "digest of the whole, with a WARNING",
        default="one breaker for every call",
    ),
    "breaker_policy": Doc(
        accepts="dict of policy fields, or a `BreakerPolicy`",
        meaning="the breaker's policy, over `breaker_policies` and the default. Tasks sharing a breaker must agree "
        "on its policy: a conflict stops the worker at start (set it once in `breaker_policies`).",
        default="`breaker_policies`, then `breaker_default_policy`",
    ),
    "breaker_fallback": Doc(
        accepts="a callable, or the name of a task method, that takes the task's arguments (one that cannot "
        "take those the task's body requires stops the worker at start)",
        meaning="called with the task's arguments when the breaker rejects the task; its result is returned "
        "instead of deferring",
        default="defer",
    ),
    "breaker_scope": Doc(
        accepts='`"run"` or `"calls"`',
        meaning='`"run"`: a run that made no guarded call counts as one call, its outcome recorded; `"calls"`: '
        "only guarded calls count, so a run that never reached the downstream (a cache hit) says nothing "
        "about it",
        default='`"run"`',
    ),
    "breaker_probe": Doc(
        accepts="a callable (sync or async), a `HealthCheck`, a dotted path `package.module:function` (to either), "
        "a task name, or `False`",
        meaning="this task's breaker's health check, as in `breaker_probes` (`False`: none, whatever "
        "`breaker_probes` says); a method defined on a `BreakerTask` "
        "subclass is called as a method (`self.breaker_probe()`). Tasks sharing a breaker must give it the same "
        "check (and timeout), or all none: a conflict stops the worker at start (set it once in "
        "`breaker_probes`).",
        default="`breaker_probes`",
    ),
    "breaker_probe_timeout": Doc(
        accepts="as the setting", meaning="this task's `breaker_probe_timeout`", default="the setting"
    ),
    "breaker_max_deferrals": Doc(
        accepts="as the setting", meaning="this task's `breaker_max_deferrals`", default="the setting"
    ),
    "breaker_max_defer_age": Doc(
        accepts="as the setting", meaning="this task's `breaker_max_defer_age`", default="the setting"
    ),
    "breaker_defer_spread": Doc(
        accepts="as the setting", meaning="this task's `breaker_defer_spread`", default="the setting"
    ),
}
