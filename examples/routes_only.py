"""A plain Celery task put under a breaker by the ``breaker_routes`` setting alone.

The task is an ordinary ``@app.task`` (no ``BreakerTask`` base, no ``with self.breaker``):
one setting maps its name to a breaker, and ``celery_breaker.install(app)`` applies the
mapping. Runs in this process on the embedded defaults (in-memory broker and breaker
store, a worker thread); no server is needed:

    python examples/routes_only.py

An "SMS gateway" is down from second 1 to second 4 while ``send_sms`` tasks arrive.
The whole run of a routed task is the guarded call: its exception is a failure, its
return a success. The first failures are retried by the task's own ``autoretry_for``;
after three the breaker opens and the rest are deferred (requeued without spending a
retry) until a probe finds the gateway back. The script prints the timeline and exits
non-zero unless the breaker opened, tasks were deferred, and every task completed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

import celery_breaker
from celery_breaker.core import Transition
from celery_breaker.monitoring import add_transition_listener

OUTAGE = (1.0, 4.0)  # seconds after start: the SMS gateway is down in between
MESSAGES = 30
SEND_EVERY = 0.15  # seconds between messages: they keep arriving through the outage

app = Celery("routes_only", broker="memory://", backend="cache+memory://")
app.conf.update(
    # Every task named notifications.* runs under the breaker "sms-gateway"
    # (True instead of a name: a breaker named after each task).
    breaker_routes={"notifications.*": "sms-gateway"},
    breaker_default_policy={
        "failure_threshold": 3,  # 3 failures within 10 s open the breaker
        "window": 10,
        "reset_timeout": 1.0,  # open for 1 s (doubling on each failed probe), then half-open
        "half_open_max_calls": 1,  # one probe at a time
        "success_threshold": 1,  # one successful probe closes it
    },
    breaker_defer_spread=0.5,  # deferred tasks return spread over 0.5 s
    worker_hijack_root_logger=False,
)
# Tasks that never subclass BreakerTask need this once; routes apply when the app finalizes.
celery_breaker.install(app)

START = time.monotonic()
timeline: list[tuple[float, str]] = []
gateway_calls: Counter[str] = Counter()


def elapsed() -> float:
    return time.monotonic() - START


def note(text: str) -> None:
    timeline.append((elapsed(), text))


def deliver(phone: str, text: str) -> None:
    """The flaky downstream: refuses connections during the outage."""
    down = OUTAGE[0] <= elapsed() < OUTAGE[1]
    gateway_calls["during outage" if down else "while healthy"] += 1
    if down:
        raise ConnectionError("SMS gateway refused the connection")


# A plain task: nothing here knows about breakers.
@app.task(
    name="notifications.send_sms",
    bind=True,
    autoretry_for=(ConnectionError,),
    retry_kwargs={"max_retries": 5, "countdown": 0.3},
)
def send_sms(self: Any, n: int) -> dict[str, Any]:
    deliver(f"+100000{n:04d}", "your code is 1234")
    headers = self.request.headers or {}
    return {"retries": self.request.retries, "deferrals": int(headers.get("x-breaker-deferrals", 0))}


def on_transition(transition: Transition) -> None:
    note(f"breaker {transition.source.value} -> {transition.target.value} ({transition.reason})")


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the timeline below tells the story
    add_transition_listener(app, on_transition)
    app.finalize()  # (a worker or the first .delay() does this too) routes apply here
    routed = isinstance(app.tasks["notifications.send_sms"], celery_breaker.BreakerTask)
    print(
        f"notifications.send_sms is a plain task; under breaker {send_sms.breaker_name!r} by breaker_routes: {routed}"
    )
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="ERROR", shutdown_timeout=10):
        results = []
        for n in range(MESSAGES):
            results.append(send_sms.delay(n))
            time.sleep(SEND_EVERY)  # a steady trickle of messages, through the outage
        values = []
        failed = 0
        for result in results:
            try:
                values.append(result.get(timeout=60))
            except Exception as exc:  # report, don't hide
                failed += 1
                print(f"message {result.id} failed: {exc!r}")

    timeline.extend([(OUTAGE[0], "SMS gateway goes DOWN"), (OUTAGE[1], "SMS gateway comes back UP")])
    print("timeline")
    for at, text in sorted(timeline):
        print(f"  {at:5.1f} s  {text}")
    snapshot = send_sms.breaker.snapshot()
    deferred = sum(1 for v in values if v["deferrals"])
    print()
    print(f"messages sent {MESSAGES}, completed {len(values)}, failed {failed}")
    print(f"messages deferred {deferred} (deferrals in all: {sum(v['deferrals'] for v in values)}), "
          f"retries spent {sum(v['retries'] for v in values)}")  # fmt: skip
    print(f"SMS gateway calls: {gateway_calls['during outage']} during the outage, "
          f"{gateway_calls['while healthy']} while healthy")  # fmt: skip
    print(f"breaker now {snapshot.state.value}: trips {snapshot.trips}, rejections {snapshot.rejections}, "
          f"deferrals {snapshot.deferrals}")  # fmt: skip
    shown = routed and snapshot.trips >= 1 and deferred > 0
    return 0 if shown and failed == 0 and len(values) == MESSAGES else 1


if __name__ == "__main__":
    raise SystemExit(main())
