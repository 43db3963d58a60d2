"""The worked configuration of docs/guides/deferral-tuning.md: it runs, validates, and means what the guide says.

The guide's block is executed as printed, in a fresh interpreter (its ``@app.task`` must
not reach this session's other apps), with a stand-in ``proj.payments`` module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

GUIDE = Path(__file__).parents[1] / "docs" / "guides" / "deferral-tuning.md"

_STUB = textwrap.dedent(
    """
    import sys, types
    proj = types.ModuleType("proj")
    payments = types.ModuleType("proj.payments")

    class ProviderUnavailable(Exception):
        pass

    class Provider:
        def charge(self, order_id, amount_cents, idempotency_key):
            return f"charged {order_id}"

    payments.ProviderUnavailable = ProviderUnavailable
    payments.provider = Provider()
    proj.payments = payments
    sys.modules.update({"proj": proj, "proj.payments": payments})
    """
)

_CHECK = textwrap.dedent(
    """
    import json
    from celery_breaker.integration.settings import get_settings
    from celery_breaker.integration.inventory import check_app
    from celery_breaker.integration.task_options import task_breaker_config
    from celery_breaker.storage import resolve_store

    settings = get_settings(app)
    config = task_breaker_config(charge)
    policy = config.policy
    print(json.dumps({
        "storage_url": settings.storage_url,
        "parks": settings.park == "auto" and resolve_store(settings.storage_url).parking is not None,
        "breakers": check_app(app),
        "cap": settings.defer_cap(60.0),
        "max_defer_age": config.max_defer_age,
        "max_deferrals": config.max_deferrals,
        "spread": config.defer_spread,
        "release": [settings.release_pace, settings.release_rate],
        "durations": [policy.reset_timeout, policy.max_reset_timeout, policy.backoff_multiplier],
        "rules": [policy.failure_threshold, policy.window, policy.failure_rate_threshold, policy.minimum_calls],
        "probes": [policy.half_open_max_calls, policy.success_threshold],
        "declined_is_failure": policy.classify(ValueError("card declined")).name,
        "outage_is_failure": policy.classify(ConnectionError("down")).name,
        "on_storage_error": settings.on_storage_error,
        "send_events": settings.send_events,
        "acks_late": charge.acks_late,
    }))
    """
)


def worked_configuration() -> str:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.DOTALL)
    found = [block for block in blocks if "breaker_policies" in block]
    assert len(found) == 1, "docs/guides/deferral-tuning.md should hold one worked configuration"
    return str(found[0])


def test_the_worked_payment_configuration_validates_and_means_what_the_guide_says() -> None:
    program = _STUB + worked_configuration() + _CHECK
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["storage_url"] == "redis://redis.internal:6379/1"
    assert seen["parks"] is True
    assert seen["breakers"] == {"payments": ["proj.charge"]}
    assert seen["cap"] == 3240.0  # 3600 - max(10 %, time_limit 60)
    assert seen["max_defer_age"] == 6 * 3600
    assert seen["max_deferrals"] is None
    assert seen["spread"] is None  # None: the policy's reset_timeout
    assert seen["release"] == ["adaptive", 20.0]  # the adaptive pace (the default), at most 20/s
    assert seen["durations"] == [15.0, 120.0, 2.0]  # 15, 30, 60, 120 s while probes fail
    assert seen["rules"] == [20, 30.0, 0.5, 10]
    assert seen["probes"] == [2, 2]
    assert seen["declined_is_failure"] == "SUCCESS"  # the provider answered
    assert seen["outage_is_failure"] == "FAILURE"
    assert seen["on_storage_error"] == "local"
    assert seen["send_events"] is True
    assert seen["acks_late"] is True  # from task_acks_late
