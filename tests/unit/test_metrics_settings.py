"""The metrics settings: ``breaker_metrics_port``, ``breaker_metrics_address``, ``breaker_metrics_ttl``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import Celery

from celery_breaker import ConfigurationError
from celery_breaker.integration.settings import build_settings


def settings_of(**conf: Any) -> Any:
    app = Celery("metrics-settings", set_as_current=False, broker="memory://")
    app.conf.update(**conf)
    return build_settings(app.conf)


def test_defaults_serve_nothing_and_bind_loopback_only() -> None:
    settings = settings_of()
    assert settings.metrics_port is None
    assert settings.metrics_address == "127.0.0.1"
    assert settings.metrics_ttl == 86_400.0


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({"breaker_metrics_port": 9808}, ("metrics_port", 9808)),
        ({"breaker_metrics_port": 65535}, ("metrics_port", 65535)),
        ({"breaker_metrics_address": "0.0.0.0"}, ("metrics_address", "0.0.0.0")),
        ({"breaker_metrics_address": "::1"}, ("metrics_address", "::1")),
        ({"breaker_metrics_address": "metrics.internal"}, ("metrics_address", "metrics.internal")),
        ({"breaker_metrics_ttl": 3600}, ("metrics_ttl", 3600.0)),
        ({"breaker_metrics_ttl": timedelta(hours=2)}, ("metrics_ttl", 7200.0)),
    ],
)
def test_good_values(conf: dict[str, Any], expected: tuple[str, Any]) -> None:
    field, value = expected
    assert getattr(settings_of(**conf), field) == value


def test_djangos_namespace() -> None:
    app = Celery("metrics-settings-django", set_as_current=False, broker="memory://")
    app.config_from_object({"CELERY_BREAKER_METRICS_PORT": 9900}, namespace="CELERY")
    assert build_settings(app.conf).metrics_port == 9900


#: (setting, bad value, what the message must also say).
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("breaker_metrics_port", "9808", "as an int"),
    ("breaker_metrics_port", 0, "from 1 to 65535"),
    ("breaker_metrics_port", 65536, "from 1 to 65535"),
    ("breaker_metrics_port", -1, "from 1 to 65535"),
    ("breaker_metrics_port", True, "from 1 to 65535"),
    ("breaker_metrics_port", 9808.0, "as an int"),
    ("breaker_metrics_address", "", "'127.0.0.1' (this host only, the default)"),
    ("breaker_metrics_address", None, "'0.0.0.0' (every interface)"),
    ("breaker_metrics_address", "0.0.0.0:9808", "an IP address or host name to bind"),
    ("breaker_metrics_address", "http://localhost", "an IP address or host name to bind"),
    ("breaker_metrics_address", "local host", "an IP address or host name to bind"),
    ("breaker_metrics_address", 127, "an IP address or host name to bind"),
    ("breaker_metrics_ttl", 0, "seconds > 0"),
    ("breaker_metrics_ttl", -5, "seconds > 0"),
    ("breaker_metrics_ttl", None, "seconds > 0"),
    ("breaker_metrics_ttl", "1d", "seconds > 0"),
    ("breaker_metrics_ttl", float("nan"), "seconds > 0"),
    ("breaker_metrics_ttl", float("inf"), "seconds > 0"),
]


@pytest.mark.parametrize(("setting", "value", "says"), BAD_VALUES)
def test_a_bad_value_names_the_setting_the_value_and_the_fix(setting: str, value: Any, says: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        settings_of(**{setting: value})
    message = str(raised.value)
    assert message.startswith(f"{setting} must be")
    assert f"got {value!r}" in message
    assert says in message


def test_a_typo_names_the_setting_meant() -> None:
    with pytest.raises(ConfigurationError, match="breaker_metrics_prot: did you mean breaker_metrics_port"):
        settings_of(breaker_metrics_prot=9808)
