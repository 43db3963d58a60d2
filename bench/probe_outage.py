"""One outage under steady traffic, with real calls as half-open probes and with a health check.

Run ``python bench/probe_outage.py`` (about 10 s; ``--outage S`` and ``--threads N`` to
change the scenario). This is a benchmark, not a timed test: it reports, it never fails.

Method: a memory store and the real clock. ``--threads`` threads call ``breaker.call(pay)``
back to back (1 ms apart) for ``--outage + 1.5`` s. ``pay`` stands for a non-idempotent
downstream call (a payment): it is counted, and fails while the downstream is down, from
0.2 s to ``0.2 + --outage`` s. The breaker (5 failures in 10 s, open 0.2 s doubling up to
0.8 s, 3 probes, 2 to close) runs once with its probes as real calls and once with a health
check ``health()`` (counted, failing while down). Reported per mode: real ``pay`` calls that
reached the downstream while it was down, after the trip; health checks run; time from the
downstream's recovery to the breaker's close.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from typing import Any

from celery_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError, State
from celery_breaker.core import Transition
from celery_breaker.testing import fresh_store

POLICY = BreakerPolicy(
    failure_threshold=5, window=10, reset_timeout=0.2, max_reset_timeout=0.8, half_open_max_calls=3, success_threshold=2
)
START = 0.2


class Downstream:
    """Down from ``start`` to ``end`` (monotonic seconds); counts what reached it while down."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.lock = threading.Lock()
        self.real_while_down: list[float] = []
        self.checks = 0

    def down(self, now: float) -> bool:
        return self.start <= now < self.end

    def pay(self) -> str:
        now = time.monotonic()
        if self.down(now):
            with self.lock:
                self.real_while_down.append(now)
            raise ConnectionError("payment gateway down")
        return "paid"

    def health(self) -> None:
        with self.lock:
            self.checks += 1
        if self.down(time.monotonic()):
            raise ConnectionError("health endpoint down")


def run(mode: str, outage: float, threads: int) -> dict[str, Any]:
    t0 = time.monotonic()
    downstream = Downstream(t0 + START, t0 + START + outage)
    probe = downstream.health if mode == "health check" else None
    breaker = CircuitBreaker("gateway", POLICY, storage=fresh_store(), probe=probe)
    moves: list[Transition] = []
    breaker.add_listener(moves.append)
    stop = t0 + START + outage + 1.5

    def traffic() -> None:
        while time.monotonic() < stop:
            with contextlib.suppress(CircuitOpenError, ConnectionError):
                breaker.call(downstream.pay)
            time.sleep(0.001)

    workers = [threading.Thread(target=traffic) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    trip = next(t.at for t in moves if t.target is State.OPEN)  # wall time of the first trip
    trip_mono = trip - (time.time() - time.monotonic())
    after_trip = [at for at in downstream.real_while_down if at > trip_mono]
    closes = [t for t in moves if t.target is State.CLOSED]
    recovered_wall = downstream.end + (time.time() - time.monotonic())
    return {
        "mode": mode,
        "real calls while down, after the trip": len(after_trip),
        "real calls while down, in all": len(downstream.real_while_down),
        "health checks": downstream.checks,
        "reopenings": sum(1 for t in moves if t.source is State.HALF_OPEN and t.target is State.OPEN),
        "recovery -> closed (s)": round(closes[-1].at - recovered_wall, 3) if closes else None,
        "closing reason": closes[-1].reason if closes else None,
        "state at the end": breaker.state.value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the downstream is down (default 3)")
    parser.add_argument("--threads", type=int, default=4, help="threads calling the breaker (default 4)")
    args = parser.parse_args()
    logging.getLogger("celery_breaker").setLevel(logging.ERROR)  # (the transitions would interleave the table)
    rows = [run(mode, args.outage, args.threads) for mode in ("real probes", "health check")]
    width = max(len(key) for key in rows[0])
    print(f"{'':{width}}  " + "  ".join(f"{row['mode']:>26}" for row in rows))
    for key in rows[0]:
        if key != "mode":
            print(f"{key:{width}}  " + "  ".join(f"{row[key]!s:>26}" for row in rows))


if __name__ == "__main__":
    main()
