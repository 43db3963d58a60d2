"""BreakerPolicy validation: every bad value is a ConfigurationError naming the field and the value."""

from __future__ import annotations

import dataclasses
import math
from datetime import timedelta
from typing import Any

import pytest

from celery_breaker import BreakerPolicy, CircuitBreaker, ConfigurationError
from celery_breaker.core.policy import (
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_HALF_OPEN_MAX_CALLS,
    DEFAULT_HALF_OPEN_MAX_WAIT,
    DEFAULT_MINIMUM_CALLS,
    DEFAULT_RESET_TIMEOUT,
    DEFAULT_SUCCESS_THRESHOLD,
    DEFAULT_WINDOW,
    LARGEST_COUNT,
    LONGEST_SECONDS,
)
from celery_breaker.testing import FakeClock

COUNTS = [
    "failure_threshold",
    "consecutive_failures",
    "minimum_calls",
    "count_window",
    "half_open_max_calls",
    "success_threshold",
]
SECONDS = ["window", "slow_call_duration", "reset_timeout", "half_open_max_wait"]
RATES = ["failure_rate_threshold", "slow_call_rate_threshold"]
BAD_FOR_ALL: list[Any] = [0, -1, True, False, "5", math.nan, math.inf, -math.inf, [5]]

# Companion settings so the only thing wrong is the field under test.
COMPANIONS: dict[str, dict[str, Any]] = {
    "slow_call_duration": {"slow_call_rate_threshold": 0.5},
    "slow_call_rate_threshold": {"slow_call_duration": 1.0},
}


def build(field: str, value: Any) -> BreakerPolicy:
    return BreakerPolicy.from_mapping({**COMPANIONS.get(field, {}), field: value})


def cases(fields: list[str], values: list[Any]) -> list[Any]:
    return [pytest.param(f, v, id=f"{f}={v!r}") for f in fields for v in values]


@pytest.mark.parametrize(("field", "value"), cases(COUNTS + SECONDS + RATES, BAD_FOR_ALL))
def test_bad_value_names_the_field_and_the_value(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        build(field, value)
    message = str(info.value)
    assert f"BreakerPolicy.{field}" in message
    assert repr(value) in message


@pytest.mark.parametrize("field", [*SECONDS, "max_reset_timeout", "backoff_multiplier"])
def test_an_int_too_large_for_a_float_is_refused_naming_the_field(field: str) -> None:
    # (math.isfinite(10**400) raised OverflowError: no ConfigurationError, and a worker
    # given breaker_default_policy={"window": 10**400} stopped on a bare traceback.)
    with pytest.raises(ConfigurationError, match=f"BreakerPolicy.{field} must be a finite number"):
        build(field, 10**400)


@pytest.mark.parametrize(("field", "value"), cases(COUNTS, [2.5, 3.0, -7]))
def test_counts_must_be_whole_numbers(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"{field} must be a whole number from 1 to 1,000,000"):
        build(field, value)


@pytest.mark.parametrize(("field", "value"), cases(COUNTS, [LARGEST_COUNT + 1, 10**20, 10**400]))
def test_counts_have_a_ceiling(field: str, value: int) -> None:
    # (10**20 passed, then made Redis's scripts refuse the policy, which took the whole store
    # for down; 10**30 raised a bare OverflowError on every call.)
    with pytest.raises(ConfigurationError, match=f"{field} must be a whole number from 1 to 1,000,000"):
        build(field, value)


@pytest.mark.parametrize(("field", "value"), cases([*SECONDS, "max_reset_timeout"], [LONGEST_SECONDS * 1.01, 1e308]))
def test_durations_have_a_ceiling(field: str, value: float) -> None:
    # (reset_timeout=1e308 made the longest open duration inf: every call on Redis failed.)
    with pytest.raises(ConfigurationError, match=f"{field} must be at most 315360000 seconds"):
        build(field, value)


def test_the_largest_values_work_on_every_call() -> None:
    policy = BreakerPolicy(
        failure_threshold=LARGEST_COUNT,
        window=LONGEST_SECONDS,
        count_window=LARGEST_COUNT,
        failure_rate_threshold=1.0,
        minimum_calls=LARGEST_COUNT,
        reset_timeout=LONGEST_SECONDS,
        half_open_max_calls=LARGEST_COUNT,
        success_threshold=LARGEST_COUNT,
        half_open_max_wait=LONGEST_SECONDS,
    )
    assert policy.longest_open == 10 * LONGEST_SECONDS
    breaker = CircuitBreaker("largest", policy, clock=FakeClock())
    assert breaker.call(lambda: 1) == 1
    breaker.force_open()
    assert breaker.snapshot().open_until is None  # (forced: no end)


@pytest.mark.parametrize(("field", "value"), cases(RATES, [1.5, 50, 100, -0.1]))
def test_rates_must_be_fractions(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"{field} must be a fraction in \(0, 1\]"):
        build(field, value)


@pytest.mark.parametrize("field", RATES)
def test_percentage_rate_gets_a_hint(field: str) -> None:
    with pytest.raises(ConfigurationError, match=r"for 50% write 0\.5"):
        build(field, 50)


@pytest.mark.parametrize("field", SECONDS)
def test_negative_timedelta_is_rejected(field: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{field}.*-5.0"):
        build(field, timedelta(seconds=-5))


@pytest.mark.parametrize("field", ["window", "reset_timeout", "half_open_max_calls"])
def test_required_fields_reject_none(field: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{field}.*got None"):
        build(field, None)


@pytest.mark.parametrize("field", ["half_open_max_wait"])
def test_more_required_fields_reject_none(field: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{field}.*got None"):
        build(field, None)


# -- good values --------------------------------------------------------------------


def test_defaults_are_the_seed_values() -> None:
    policy = BreakerPolicy()
    assert (policy.failure_threshold, policy.window) == (DEFAULT_FAILURE_THRESHOLD, DEFAULT_WINDOW) == (5, 60.0)
    assert policy.reset_timeout == DEFAULT_RESET_TIMEOUT == 30.0
    assert policy.half_open_max_calls == DEFAULT_HALF_OPEN_MAX_CALLS == 3
    assert policy.success_threshold is None  # "the default that fits"
    assert policy.probes_to_close == DEFAULT_SUCCESS_THRESHOLD == 2
    assert policy.half_open_max_wait == DEFAULT_HALF_OPEN_MAX_WAIT
    assert policy.minimum_calls is None
    assert policy.calls_to_judge == DEFAULT_MINIMUM_CALLS == 10
    assert policy.uses_rates is False


def test_timedeltas_become_seconds() -> None:
    policy = BreakerPolicy(
        window=timedelta(minutes=2),
        reset_timeout=timedelta(seconds=1.5),
        half_open_max_wait=timedelta(hours=1),
    )
    assert (policy.window, policy.reset_timeout, policy.half_open_max_wait) == (120.0, 1.5, 3600.0)
    assert type(policy.window) is float


def test_integers_are_accepted_for_seconds_and_rates() -> None:
    policy = BreakerPolicy(window=10, failure_rate_threshold=1, reset_timeout=1)
    assert (policy.window, policy.failure_rate_threshold) == (10.0, 1.0)
    assert type(policy.failure_rate_threshold) is float


def test_tiny_positive_values_are_accepted_down_to_a_millisecond() -> None:
    policy = BreakerPolicy(window=0.001, reset_timeout=0.001, failure_rate_threshold=1e-9)
    assert policy.reset_timeout == 0.001


@pytest.mark.parametrize("field", ["window", "reset_timeout", "half_open_max_wait", "slow_call_duration"])
@pytest.mark.parametrize("value", [1e-300, 1e-6, 0.0009])
def test_durations_below_a_millisecond_are_refused(field: str, value: float) -> None:
    # window=1e-300 never tripped (8 failing calls, 0 trips), reset_timeout=1e-300 let every
    # call through while the breaker read OPEN: accepted without a word.
    extra = {"slow_call_rate_threshold": 0.5} if field == "slow_call_duration" else {}
    with pytest.raises(ConfigurationError, match=f"BreakerPolicy.{field} must be at least 0.001 seconds"):
        BreakerPolicy.from_mapping({field: value, **extra})


def test_policy_is_frozen_and_keyword_only() -> None:
    policy = BreakerPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.window = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        BreakerPolicy(5)  # type: ignore[call-arg]


def test_equal_fields_make_equal_hashable_policies() -> None:
    assert BreakerPolicy(window=60) == BreakerPolicy(window=60.0)
    assert hash(BreakerPolicy()) == hash(BreakerPolicy())
    assert BreakerPolicy(window=61) != BreakerPolicy()


# -- from_mapping, replace, coerce ------------------------------------------------------


def test_from_mapping_unknown_field_names_the_source_and_lists_allowed_fields() -> None:
    with pytest.raises(ConfigurationError) as info:
        BreakerPolicy.from_mapping({"failure_treshold": 3, "bogus": 1}, source="breaker_policies['crm']")
    message = str(info.value)
    assert message.startswith("breaker_policies['crm']: unknown BreakerPolicy field(s) 'bogus', 'failure_treshold'")
    allowed = sorted(f.name for f in dataclasses.fields(BreakerPolicy) if f.init)
    assert f"allowed: {', '.join(allowed)}" in message
    assert "_record_types" not in message


def test_from_mapping_bad_value_is_prefixed_with_the_source() -> None:
    with pytest.raises(ConfigurationError, match=r"^breaker_default_policy: BreakerPolicy.reset_timeout .* got -1"):
        BreakerPolicy.from_mapping({"reset_timeout": -1}, source="breaker_default_policy")


def test_from_mapping_rejects_a_non_mapping() -> None:
    with pytest.raises(ConfigurationError, match="breaker_policy must be a dict"):
        BreakerPolicy.from_mapping([("window", 5)], source="breaker_policy")  # type: ignore[arg-type]


def test_from_mapping_over_a_base() -> None:
    base = BreakerPolicy(failure_threshold=7, reset_timeout=5)
    policy = BreakerPolicy.from_mapping({"reset_timeout": 9}, base=base)
    assert (policy.failure_threshold, policy.reset_timeout) == (7, 9.0)


def test_replace_validates_and_leaves_the_original_alone() -> None:
    policy = BreakerPolicy(failure_threshold=3)
    changed = policy.replace(reset_timeout=timedelta(seconds=10))
    assert (changed.failure_threshold, changed.reset_timeout) == (3, 10.0)
    assert policy.reset_timeout == 30.0
    with pytest.raises(ConfigurationError, match="reset_timeout"):
        policy.replace(reset_timeout=0)
    with pytest.raises(ConfigurationError, match="unknown BreakerPolicy field"):
        policy.replace(nope=1)


def test_replace_with_nothing_is_an_equal_policy_even_with_matchers() -> None:
    def predicate(exc: BaseException) -> bool:
        return False

    policy = BreakerPolicy(record_exceptions=("builtins.OSError", predicate), ignore_exceptions=(KeyError,))
    assert policy.replace() == policy
    assert policy.replace().ignore_exceptions == (KeyError,)


def test_as_dict_rebuilds_the_policy() -> None:
    policy = BreakerPolicy(failure_rate_threshold=0.25, count_window=20, minimum_calls=5)
    assert BreakerPolicy(**policy.as_dict()) == policy
    assert "_record_types" not in policy.as_dict()


def test_coerce() -> None:
    policy = BreakerPolicy(window=5)
    assert BreakerPolicy.coerce(policy) is policy
    assert BreakerPolicy.coerce(None) == BreakerPolicy()
    assert BreakerPolicy.coerce(None, base=policy) is policy
    assert BreakerPolicy.coerce({"reset_timeout": 3}, base=policy) == BreakerPolicy(window=5, reset_timeout=3)
    with pytest.raises(ConfigurationError, match="task option"):
        BreakerPolicy.coerce("nope", source="task option")


def test_the_default_success_threshold_fits_a_single_probe() -> None:
    single = BreakerPolicy(half_open_max_calls=1)
    assert (single.success_threshold, single.probes_to_close) == (None, 1)
    with pytest.raises(ConfigurationError, match=r"success_threshold \(2\) must not exceed half_open_max_calls \(1\)"):
        BreakerPolicy(half_open_max_calls=1, success_threshold=2)
    # Merging over a base keeps "the default" rather than freezing the base's number.
    merged = BreakerPolicy.from_mapping({"half_open_max_calls": 1}, base=BreakerPolicy())
    assert merged.probes_to_close == 1


def test_the_default_minimum_calls_fits_a_small_count_window() -> None:
    small = BreakerPolicy(failure_rate_threshold=0.5, count_window=4)
    assert small.calls_to_judge == 4
    assert BreakerPolicy(count_window=4).calls_to_judge == 4  # no rate rule: nothing to check
    with pytest.raises(ConfigurationError, match=r"minimum_calls \(5\) must not exceed count_window \(4\)"):
        BreakerPolicy(failure_rate_threshold=0.5, count_window=4, minimum_calls=5)
