"""celery-breaker quick start: a payments API goes down, the breaker trips, tasks wait, nothing fails.

Runs entirely in this process on the embedded defaults: Celery's in-memory broker, the
in-memory breaker store and a worker thread. No server is needed:

    python examples/quickstart.py

A "payments API" is down from second 1 to second 5. Charge tasks arrive all along. The
first failures are ordinary failures (the task's own ``autoretry_for`` retries them);
after three failures the breaker opens and every further charge is *deferred*:
requeued to run when the breaker can next probe, without spending a retry. Probes
find the API still down and the breaker reopens; once the API is back a probe succeeds,
the breaker closes, and the deferred charges complete. The script prints the timeline
and exits non-zero unless every charge completed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_breaker import BreakerTask
from celery_breaker.core import Transition
from celery_breaker.monitoring import add_transition_listener

OUTAGE = (1.0, 5.0)  # seconds after start: the payments API is down in between
CHARGES = 40
SEND_EVERY = 0.15  # seconds between charges: they keep arriving through the outage

app = Celery("quickstart", broker="memory://", backend="cache+memory://")
app.conf.update(
    breaker_default_policy={
        "failure_threshold": 3,  # 3 failures ...
        "window": 10,  # ... within 10 s open the breaker
        "reset_timeout": 1.5,  # open for 1.5 s, then half-open
        "half_open_max_calls": 2,  # 2 probes at a time
        "success_threshold": 2,  # 2 successful probes close it
    },
    breaker_defer_spread=1.0,  # deferred charges return spread over 1 s, not all at once
    worker_hijack_root_logger=False,
)

START = time.monotonic()
timeline: list[tuple[float, str]] = []
downstream_calls: Counter[str] = Counter()


def elapsed() -> float:
    return time.monotonic() - START


def note(text: str) -> None:
    timeline.append((elapsed(), text))


class PaymentsAPI:
    """The flaky downstream: refuses connections during the outage."""

    def charge(self, order: int) -> str:
        down = OUTAGE[0] <= elapsed() < OUTAGE[1]
        downstream_calls["during outage" if down else "while healthy"] += 1
        if down:
            raise ConnectionError("payments API refused the connection")
        return f"charged order {order}"


payments = PaymentsAPI()


@app.task(
    base=BreakerTask,
    bind=True,
    breaker="payments",
    autoretry_for=(ConnectionError,),
    retry_kwargs={"max_retries": 5, "countdown": 0.3},
)
def charge(self: Any, order: int) -> dict[str, Any]:
    with self.breaker:  # guard only the downstream call
        receipt = payments.charge(order)
    headers = self.request.headers or {}
    return {
        "receipt": receipt,
        "retries": self.request.retries,
        "deferrals": int(headers.get("x-breaker-deferrals", 0)),
    }


def on_transition(transition: Transition) -> None:
    note(f"breaker {transition.source.value} -> {transition.target.value} ({transition.reason})")


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the timeline below tells the story
    add_transition_listener(app, on_transition)  # every breaker of this app
    # An embedded worker thread (in production: ``celery -A proj worker``).
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="ERROR", shutdown_timeout=10):
        results = []
        for order in range(CHARGES):
            results.append(charge.delay(order))
            time.sleep(SEND_EVERY)  # a steady trickle of charges, through the outage
        values = []
        failed = 0
        for result in results:
            try:
                values.append(result.get(timeout=60))
            except Exception as exc:  # report, don't hide
                failed += 1
                print(f"charge {result.id} failed: {exc!r}")

    timeline.extend([(OUTAGE[0], "payments API goes DOWN"), (OUTAGE[1], "payments API comes back UP")])
    print("timeline")
    for at, text in sorted(timeline):
        print(f"  {at:5.1f} s  {text}")
    snapshot = charge.breaker.snapshot()
    deferred = sum(1 for v in values if v["deferrals"])
    print()
    print(f"charges sent {CHARGES}, completed {len(values)}, failed {failed}")
    print(f"charges deferred {deferred} (deferrals in all: {sum(v['deferrals'] for v in values)}), "
          f"retries spent {sum(v['retries'] for v in values)}")  # fmt: skip
    print(f"payments API calls: {downstream_calls['during outage']} during the outage, "
          f"{downstream_calls['while healthy']} while healthy")  # fmt: skip
    print(f"breaker now {snapshot.state.value}: trips {snapshot.trips}, rejections {snapshot.rejections}, "
          f"deferrals {snapshot.deferrals}")  # fmt: skip
    return 0 if failed == 0 and len(values) == CHARGES else 1


if __name__ == "__main__":
    raise SystemExit(main())
