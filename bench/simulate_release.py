"""A deterministic model of the adaptive release: the real law against a modelled pool and downstream.

``bench/recovery.py`` measures the release on real servers, and its figures move by a
fifth between runs of unchanged code on the shared machine (N = 600, C = 60/s: 1.49x to
1.88x N / C). This model runs the same law (``core/pacing.py``'s ``AdaptivePacer``, on a
``FakeClock``: the very code the memory store uses, and that ``release.lua`` mirrors step
for step) against a model of everything else, in simulated time (an event queue, no
sleeping, no servers), so a grid of cases runs in seconds and a change of the law is
judged on every case with the same seeds.

What is modelled, after the real parts of ``bench/recovery.py``:

* **The releasers**: one per worker, each a pass every ``TICK`` (0.2 s) plus the pass's
  own cost, the workers' passes out of phase; a pass releases what the shared pace allows,
  bounded by what its worker's pool will take (``WorkerBacklog.room`` with
  ``worker_prefetch_multiplier = 1``, as the bench runs); each released task reaches the
  broker after a publish cost.
* **The workers**: ``workers`` x ``slots`` prefork processes (2 x 6, as the bench). A free
  slot takes the next task from the broker after a fetch lag; a task costs ``overhead``
  seconds of its own (Celery, the breaker's scripts: the bench's workers run ~490 tasks/s,
  ~24 ms a task a slot) around its call, with a seeded jitter.
* **The downstream** (``LIMITERS``): ``bench``, the bench's ``LimitedDownstream`` (a
  sliding second of calls answered, 3 ms a call, slower from 85 % of C up to +400 ms at C,
  ``429`` above C, refusals not counted); ``sliding``, the same with no slow zone;
  ``fixed``, C calls per wall second (a fixed window, its seconds at a seeded phase);
  ``bucket``, a token bucket of rate C holding ``burst`` seconds' worth; ``none``, no limit.
  A 429 carries ``Retry-After`` (1 s).
* **The breaker's counts**, as ``record.lua`` keeps them, ``outcome_lag`` seconds after the
  call returned: successes, failures, slow successes (the bench's policy: 100 ms or
  more), refusals, and ``held_until`` (each refusal holds the release until at least
  its Retry-After from then). A refused task is parked again (back in the backlog).
  Fresh traffic (``fresh`` tasks/s, published straight to the broker) is optional; its
  429s are refusals too while tasks are parked (decision 91), and it is parked then.

* **A loaded machine** (optional, ``stall_every``): the bench's workers share two cores
  with Redis, the downstream and whatever else runs; a worker stalls at random (its
  processes and its releaser run nothing for ``stall_s``), so its outcomes come back in
  bursts. With a stall every 0.15 s of 50 ms the model meets the loaded bench closer
  (``--quick``: 1.78x against 1.68x without stalls and 1.75x on the bench).

Not modelled: the CPU cost of a task growing with the load (only its jitter), reopenings
(nothing in this model fails but by refusal, and refusals open nothing: the count of cuts
and of refusals stands for them), the probes before the close (time 0 is the close).

    python bench/simulate_release.py                     # the grid: C x N x limiter x seeds
    python bench/simulate_release.py --capacity 60 --tasks 600 --limiter bench --seeds 8 --trace
    python bench/simulate_release.py --quick             # a small grid
    python bench/simulate_release.py --stall-every 0.15  # workers stalled 50 ms every 0.15 s (a loaded machine)
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from celery_breaker.core.pacing import AdaptivePacer, Outcomes, PacingLaw
from celery_breaker.testing import FakeClock

__all__ = ["LIMITERS", "Result", "Scenario", "grid", "simulate"]

#: The releaser's pass period (``integration/deferral/release.py``'s ``TICK``).
TICK = 0.2
#: The bench downstream's answer time, its slow zone's most, and where that zone begins.
BASE_S = 0.003
SLOW_S = 0.4
SLOW_FROM = 0.85
#: The bench policy's ``slow_call_duration``: a call this long or longer is a slow one.
SLOW_CALL = 0.1
LIMITERS = ("bench", "sliding", "fixed", "bucket", "none")
#: Events of a worker's processes (held while it is stalled), and those of them that are
#: outcomes (their ``who`` is twice the worker, plus 1 for a released task).
OUTCOMES = frozenset({"ok", "slow", "refused", "failed"})
WORKS = OUTCOMES | {"pass", "call", "free"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """One release: N parked tasks, the downstream, the pool, the law."""

    capacity: float | None
    tasks: int
    limiter: str = "bench"
    seed: int = 0
    workers: int = 2
    slots: int = 6
    overhead: float = 0.024
    """Seconds a task costs its slot besides its call (half before it, half after)."""
    jitter: float = 0.35
    """The overhead's spread: each task's is ``overhead`` x a lognormal of this sigma."""
    fetch_lag: float = 0.003
    """Seconds between a task reaching the broker (or a slot freeing) and a slot starting it."""
    publish_each: float = 0.0006
    """Seconds the releaser takes to publish one task (its pass publishes them in turn)."""
    pass_cost: float = 0.004
    """Seconds a releaser pass costs besides publishing (the release script, the listing)."""
    outcome_lag: float = 0.004
    """Seconds between a call's answer and the breaker counting it (``record.lua``)."""
    retry_after: float = 1.0
    burst: float = 0.5
    """A token bucket's size, in seconds of its rate."""
    stall_every: float = 0.0
    """Mean seconds between two stalls of a worker (0: none): the bench's machine runs the
    workers, Redis and the downstream on two cores, and other jobs beside them; a stalled
    worker's processes run nothing, so its outcomes come back together when it resumes."""
    stall_s: float = 0.05
    """Mean seconds a stall lasts."""
    fresh: float = 0.0
    """Fresh tasks per second published beside the release (not parked)."""
    law: PacingLaw = field(default_factory=PacingLaw)
    change_at: float | None = None
    """When the downstream's capacity changes (``None``: never), to ``changed_to``."""
    changed_to: float = 0.0
    limit_s: float = 600.0
    """Simulated seconds after which a release that has not drained is given up."""


@dataclass(frozen=True, slots=True)
class Result:
    scenario: Scenario
    drain_s: float | None
    """Seconds from the close until the last parked task succeeded (``None``: not within ``limit_s``)."""
    release_calls: int
    refused: int
    cuts: int
    holds: int
    """Retry-After waits begun (a refusal while none lasted)."""
    slow: int
    peak_rate: float
    most_queued: int

    @property
    def bound_s(self) -> float | None:
        c = self.scenario.capacity
        if c is None or self.scenario.limiter == "none":
            return None
        return self.scenario.tasks / max(1e-9, c - self.scenario.fresh)

    @property
    def ratio(self) -> float | None:
        bound = self.bound_s
        return None if bound is None or self.drain_s is None else self.drain_s / bound

    @property
    def ramp_least(self) -> float | None:
        """The least ``ratio`` the law's ramp allows: released from ``start``, growing by
        ``slow_start`` per judgement until C, then at C (the ramp's floor, not the model's)."""
        bound = self.bound_s
        if bound is None:
            return None
        law, c = self.scenario.law, self.scenario.capacity or 0.0
        k = math.log(law.slow_start) / law.judge_every
        climb = math.log(max(1.0, c / law.start)) / k  # (seconds from start to C)
        sent = law.start * (math.exp(k * climb) - 1) / k
        if sent >= self.scenario.tasks:
            climb, sent = math.log(1 + self.scenario.tasks * k / law.start) / k, self.scenario.tasks
        return (climb + (self.scenario.tasks - sent) / c) / bound

    @property
    def refused_share(self) -> float:
        return self.refused / max(1, self.release_calls)


# -- the downstreams --------------------------------------------------------------------


class Limiter:
    """A downstream's answer to a call at ``now``: refused (429), and the call's seconds."""

    def answer(self, now: float) -> tuple[bool, float]:
        return False, BASE_S

    def change(self, capacity: float) -> None:
        """The capacity from now on (a token bucket keeps its size; no limit stays none)."""
        if isinstance(self, SlidingWindow | FixedWindow | TokenBucket):
            self.capacity = capacity


class SlidingWindow(Limiter):
    """``http_downstream.LimitedDownstream``: calls answered in the last second; at C, 429."""

    def __init__(self, capacity: float, slow_from: float) -> None:
        self.capacity, self.slow_from = capacity, slow_from
        self.window: deque[float] = deque()

    def answer(self, now: float) -> tuple[bool, float]:
        window = self.window
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self.capacity:
            return True, 0.0
        window.append(now)
        load = len(window) / self.capacity
        zone = 1.0 - self.slow_from
        queueing = max(0.0, (load - self.slow_from) / zone) if zone > 0 else 0.0
        return False, BASE_S + SLOW_S * min(1.0, queueing)


class FixedWindow(Limiter):
    """C calls per wall second (its seconds begin at ``phase``), then 429 until the next."""

    def __init__(self, capacity: float, phase: float) -> None:
        self.capacity, self.phase = capacity, phase
        self.second, self.count = -1, 0

    def answer(self, now: float) -> tuple[bool, float]:
        second = math.floor(now + self.phase)
        if second != self.second:
            self.second, self.count = second, 0
        if self.count >= self.capacity:
            return True, 0.0
        self.count += 1
        return False, BASE_S


class TokenBucket(Limiter):
    """A bucket of ``burst`` seconds of C, refilled at C a second; a call takes a token, or is refused."""

    def __init__(self, capacity: float, burst: float) -> None:
        self.capacity, self.size = capacity, max(1.0, capacity * burst)
        self.tokens, self.at = self.size, 0.0

    def answer(self, now: float) -> tuple[bool, float]:
        self.tokens = min(self.size, self.tokens + self.capacity * (now - self.at))
        self.at = now
        if self.tokens < 1.0:
            return True, 0.0
        self.tokens -= 1.0
        return False, BASE_S


def limiter_of(s: Scenario, rng: random.Random) -> Limiter:
    if s.capacity is None or s.limiter == "none":
        return Limiter()
    if s.limiter == "bench":
        return SlidingWindow(s.capacity, SLOW_FROM)
    if s.limiter == "sliding":
        return SlidingWindow(s.capacity, 1.0)
    if s.limiter == "fixed":
        return FixedWindow(s.capacity, rng.random())
    if s.limiter == "bucket":
        return TokenBucket(s.capacity, s.burst)
    raise ValueError(f"limiter {s.limiter!r}: one of {', '.join(LIMITERS)}")


# -- the release --------------------------------------------------------------------------


@dataclass(slots=True)
class Worker:
    """One worker's pool (prefetch 1: it takes a task only for a free slot) and its releaser's view of it."""

    slots: int
    active: int = 0
    stalled_until: float = 0.0
    accepted: int = 0
    accepted_at_pass: int = 0

    def room(self) -> int | None:
        """``WorkerBacklog.room`` with ``worker_prefetch_multiplier = 1`` (nothing waits in the worker)."""
        started, self.accepted_at_pass = self.accepted - self.accepted_at_pass, self.accepted
        if 2 * self.active >= self.slots:
            return max(0, self.slots - self.active) + (started // 2 if self.active > 2 * started else started)
        return None


@dataclass(slots=True)
class Counts:
    """The breaker's counts (its state hash's ok, ko, sl, rf, rh)."""

    successes: int = 0
    failures: int = 0
    slow: int = 0
    refused: int = 0
    held_until: float | None = None

    def outcomes(self) -> Outcomes:
        return Outcomes(generation=1, successes=self.successes, failures=self.failures, slow=self.slow,
                        refused=self.refused, held_until=self.held_until)  # fmt: skip


def simulate(s: Scenario, trace: Callable[[float, str], None] | None = None) -> Result:
    """Run one release to its end (every parked task succeeded) or to ``s.limit_s``."""
    rng = random.Random(s.seed)
    downstream = limiter_of(s, rng)
    clock = FakeClock(0.0)
    pacer = AdaptivePacer(s.law, clock)
    counts = Counts()
    workers = [Worker(s.slots) for _ in range(s.workers)]
    events: list[tuple[float, int, str, int]] = []
    order = itertools.count()

    def at(when: float, kind: str, who: int = 0) -> None:
        heapq.heappush(events, (when, next(order), kind, who))

    # (the broker holds True for a released task, False for a fresh one)
    parked, broker, done, target = s.tasks, deque[bool](), 0, s.tasks
    release_calls = refused = cuts = holds = slow = most_queued = 0
    calls_at: list[float] = []
    last_cut: float | None = None
    drained: float | None = None
    for i in range(s.workers):
        at(rng.uniform(0.0, TICK), "pass", i)
        if s.stall_every > 0:
            at(rng.expovariate(1 / s.stall_every), "stall", i)
    if s.fresh > 0:
        at(rng.expovariate(s.fresh), "fresh")

    def cost() -> float:
        return s.overhead * math.exp(rng.gauss(-(s.jitter**2) / 2, s.jitter))

    def dispatch(now: float) -> None:
        nonlocal most_queued
        most_queued = max(most_queued, len(broker))
        while broker:
            free = [i for i, w in enumerate(workers) if w.active < w.slots]
            if not free:
                return
            i = rng.choice(free)
            released = broker.popleft()
            workers[i].active += 1
            workers[i].accepted += 1
            at(now + s.fetch_lag + cost() / 2, "call" if released else "fresh-call", i)

    while events:
        now, _, kind, who = heapq.heappop(events)
        if now > s.limit_s:
            break
        clock.set(now)
        if s.change_at is not None and now >= s.change_at:
            downstream.change(s.changed_to)
        worker = who // 2 if kind in OUTCOMES else who
        if kind in WORKS and workers[worker].stalled_until > now:
            at(workers[worker].stalled_until, kind, who)  # (its process runs again then)
            continue
        if kind == "stall":
            workers[who].stalled_until = now + rng.expovariate(1 / s.stall_s)
            at(now + rng.expovariate(1 / s.stall_every), "stall", who)
        elif kind == "pass":
            room = workers[who].room()
            waiting = parked if room is None else min(parked, room)
            count = pacer.release(counts.outcomes(), waiting)
            pace = pacer.pace
            if pace is not None and pace.cut_at is not None and pace.cut_at != last_cut:
                last_cut = pace.cut_at
                cuts += 1
                if trace:
                    trace(now, f"cut to {pace.rate:.1f}/s, limit {pace.limit}")
            parked -= count
            for k in range(count):
                at(now + s.pass_cost + (k + 1) * s.publish_each, "publish")
            at(now + TICK + s.pass_cost + count * s.publish_each, "pass", who)
        elif kind in {"publish", "fresh"}:
            broker.append(kind == "publish")
            if kind == "fresh":
                at(now + rng.expovariate(s.fresh), "fresh")
            dispatch(now)
        elif kind in ("call", "fresh-call"):
            released = kind == "call"
            if released:
                release_calls += 1
            calls_at.append(now)
            refusal, seconds = downstream.answer(now)
            answered = now + seconds
            if refusal and (released or parked > 0):
                at(answered + s.outcome_lag, "refused", 2 * who + released)
            elif refusal:
                at(answered + s.outcome_lag, "failed", 2 * who)
            else:
                at(answered + s.outcome_lag, "slow" if seconds + 0.001 >= SLOW_CALL else "ok", 2 * who + released)
            at(answered + cost() / 2, "free", who)
        elif kind == "free":
            workers[who].active -= 1
            dispatch(now)
        elif kind == "refused":
            refused += 1
            counts.failures += 1
            counts.refused += 1
            if counts.held_until is None or now >= counts.held_until:
                holds += 1
            counts.held_until = max(counts.held_until or now, now + s.retry_after)
            parked += 1  # (parked again: the release takes it later)
            target += who % 2 == 0  # (a fresh task parked: one more for the release to run)
        elif kind == "failed":
            counts.failures += 1
        else:
            counts.successes += 1
            counts.slow += kind == "slow"
            slow += kind == "slow"
            done += who % 2
            if done == target and drained is None:
                drained = now
                if s.fresh <= 0:
                    break
            if drained is not None and parked == 0 and not broker:
                break
    peak = _peak_rate(calls_at)
    return Result(s, drained, release_calls, refused, cuts, holds, slow, peak, most_queued)


def _peak_rate(calls_at: list[float]) -> float:
    """The most calls the downstream saw in a second (at 0.1 s steps)."""
    if not calls_at:
        return 0.0
    bins: dict[int, int] = {}
    for t in calls_at:
        bins[int(t * 10)] = bins.get(int(t * 10), 0) + 1
    top = max(bins)
    return float(max(sum(bins.get(b - k, 0) for k in range(10)) for b in range(top + 1)))


# -- the grid -----------------------------------------------------------------------------

CAPACITIES = (30.0, 60.0, 150.0, 300.0)
TASKS = (600, 1500, 3000)
SEEDS = (1, 2, 3)


def grid(
    capacities: Iterable[float | None] = CAPACITIES,
    tasks: Iterable[int] = TASKS,
    limiters: Iterable[str] = ("bench", "sliding", "fixed", "bucket"),
    seeds: Iterable[int] = SEEDS,
    **options: object,
) -> list[Scenario]:
    base = Scenario(capacity=None, tasks=1)
    return [replace(base, capacity=c, tasks=n, limiter=kind, seed=seed, **options)  # type: ignore[arg-type]
            for kind in limiters for c in capacities for n in tasks for seed in seeds]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Row:
    """The runs of one case (its seeds): medians and worsts."""

    limiter: str
    capacity: float | None
    tasks: int
    ratios: list[float]
    least: float | None
    """The ramp's floor (``Result.ramp_least``)."""
    drains: list[float]
    refused: list[float]
    cuts: list[int]
    holds: list[int]


def summarise(results: list[Result]) -> list[Row]:
    rows: dict[tuple[str, float | None, int], list[Result]] = {}
    for r in results:
        rows.setdefault((r.scenario.limiter, r.scenario.capacity, r.scenario.tasks), []).append(r)
    return [
        Row(kind, c, n, [r.ratio for r in rs if r.ratio is not None], rs[0].ramp_least,
            [r.drain_s or math.inf for r in rs],
            [r.refused_share for r in rs], [r.cuts for r in rs], [r.holds for r in rs])
        for (kind, c, n), rs in rows.items()
    ]  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = [
        "| limiter | C | N | drain / (N / C): median (worst) | ramp's least | drain s | refused: median (worst) "
        "| cuts | holds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "—" if not row.ratios else f"{statistics.median(row.ratios):.2f}x ({max(row.ratios):.2f}x)"
        least = "—" if row.least is None else f"{row.least:.2f}x"
        lines.append(
            f"| {row.limiter} | {'—' if row.capacity is None else f'{row.capacity:g}'} | {row.tasks} | {ratio} "
            f"| {least} "
            f"| {statistics.median(row.drains):.1f} | {statistics.median(row.refused):.1%} ({max(row.refused):.1%}) "
            f"| {statistics.median(row.cuts):g} | {statistics.median(row.holds):g} |"
        )
    return "\n".join(lines)


def verdict(rows: list[Row], bound: float = 1.5, refused: float = 0.05) -> str:
    limited = [row for row in rows if row.ratios]
    over = [row for row in limited if statistics.median(row.ratios) > bound]
    refusing = [row for row in limited if statistics.median(row.refused) >= refused]
    worst = max((statistics.median(row.ratios) for row in limited), default=math.nan)
    return (f"{len(limited) - len(over)} of {len(limited)} limited cases within {bound}x N / C (median of seeds; "
            f"worst median {worst:.2f}x), {len(limited) - len(refusing)} under {refused:.0%} refused")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=float, action="append", help="C (repeatable); 0: no limit")
    parser.add_argument("--tasks", type=int, action="append", help="N (repeatable)")
    parser.add_argument("--limiter", action="append", choices=LIMITERS, help="(repeatable)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per case")
    parser.add_argument("--fresh", type=float, default=0.0, help="fresh tasks/s beside the release")
    parser.add_argument("--overhead", type=float, default=None, help="a task's own seconds in its slot")
    parser.add_argument("--outcome-lag", type=float, default=None, help="seconds from an answer to its count")
    parser.add_argument("--stall-every", type=float, default=0.0, help="mean seconds between a worker's stalls")
    parser.add_argument("--stall", type=float, default=0.05, help="mean seconds a stall lasts")
    parser.add_argument("--quick", action="store_true", help="C 60, 150; N 600; bench and fixed; 2 seeds")
    parser.add_argument("--trace", action="store_true", help="print each cut of each run")
    options = parser.parse_args()
    capacities: list[float | None] = list(CAPACITIES)
    tasks, limiters, seeds = list(TASKS), ["bench", "sliding", "fixed", "bucket"], range(1, options.seeds + 1)
    if options.quick:
        capacities, tasks, limiters, seeds = [60.0, 150.0], [600], ["bench", "fixed"], range(1, 3)
    if options.capacity:
        capacities = [c or None for c in options.capacity]
    if options.tasks:
        tasks = options.tasks
    if options.limiter:
        limiters = options.limiter
    extra: dict[str, object] = {"fresh": options.fresh, "stall_every": options.stall_every, "stall_s": options.stall}
    if options.overhead is not None:
        extra["overhead"] = options.overhead
    if options.outcome_lag is not None:
        extra["outcome_lag"] = options.outcome_lag
    scenarios = grid(capacities, tasks, limiters, seeds, **extra)
    began = time.perf_counter()
    results = []
    for scenario in scenarios:
        log = (lambda t, what, s=scenario: print(f"  {s.limiter} C={s.capacity} seed {s.seed} {t:6.2f} s {what}")) \
            if options.trace else None  # fmt: skip
        results.append(simulate(scenario, log))
    rows = summarise(results)
    print(table(rows))
    print(verdict(rows))
    print(f"{len(scenarios)} runs in {time.perf_counter() - began:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
