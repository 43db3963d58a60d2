"""celery-breaker's Redis store beside pybreaker + CircuitRedisStorage: Redis traffic, µs per call, Celery throughput.

Run ``python bench/redis_store.py`` (about 4 minutes), ``--quick`` for a CI smoke run
(under 30 s), ``--no-celery`` to skip the worker section, ``--json PATH`` to also write
every figure. This is a benchmark, not a timed test: it reports, it never fails on a figure.

The bench starts its own ``redis-server`` on a free loopback port (no persistence) and
stops it at the end. Three sections, in one run:

1. **Redis traffic per call** (``redis_traffic.py``, meters in ``redis_meter.py``).
   redis-py is instrumented: commands sent and round trips made are counted per
   thread, so the thread that calls the breaker ("sync") is told apart from any
   background thread of the library ("bg"). ``INFO commandstats`` and ``INFO cpu``
   are read before and after each measured span: every command the server ran,
   including those run inside Lua scripts, and the server's CPU time. Scenarios:
   closed success, open reject, failure that does not trip, the tripping failure.
   A span ends once background threads have been quiet for ``--settle`` seconds,
   so work a call hands to a background thread is counted too.
2. **µs per call** (here). Closed success (wrapping a no-op) and open reject, timed
   round-robin as in ``bench/overhead.py`` with its loops: median over ``--rounds``
   rounds; every variant sampled once per round, the first variant moving each round.
   The instrumentation is off here.
3. **Celery throughput** (``celery_throughput.py``, app in ``celery_app.py``). Real
   ``celery worker -P prefork -c 2`` processes on a Redis broker, no result backend.
   Each run publishes all ``--tasks`` tasks first, then starts a worker and polls a
   done-counter every task increments; tasks/s and CPU per task (worker processes +
   redis-server) are measured from the first 2 % done to the last, leaving start-up
   out. Variants alternate, the first moving each round.

Figures come from one run on a shared machine: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pybreaker
from celery_throughput import CELERY_VARIANTS, CeleryResults, measure_celery, median_cpu, median_rate, paired_ratios
from overhead import Runner, call_loop, plain_loop, reject_call_loop
from redis_meter import RedisServer
from redis_traffic import SCENARIOS, THRESHOLD, fail_times, libraries, measure_traffic, noop, raises

from celery_breaker import CircuitOpenError

# -- section 2: µs per call -------------------------------------------------------


@dataclass
class Timed:
    key: str
    label: str
    path: str  # "bare", "closed" or "open"
    run: Runner
    n: int = 0
    samples: list[float] = field(default_factory=list)  # µs per call, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def calibrate(run: Runner, target_ns: int) -> int:
    """Calls per sample so that one sample takes about ``target_ns`` (also warms up)."""
    n = 10
    while True:
        elapsed = run(n)
        if elapsed >= target_ns // 4:
            return max(10, round(n * target_ns / elapsed))
        n *= 4 if elapsed < target_ns // 16 else 2


def measure_timing(url: str, rounds: int, target_ms: float, prefix: str) -> list[Timed]:
    cb, pb = libraries(url, prefix)
    cb_closed, pb_closed = cb.build("timing-closed"), pb.build("timing-closed")
    cb_open, pb_open = cb.build("timing-open"), pb.build("timing-open")
    for lib, breaker in ((cb, cb_open), (pb, pb_open)):
        fail_times(breaker, THRESHOLD, lib.rejected)
    checks = [
        ("celery-breaker closed passes", lambda: cb_closed(noop) is None),
        ("pybreaker closed passes", lambda: pb_closed(noop) is None),
        ("celery-breaker open rejects", lambda: raises(lambda: cb_open(noop), CircuitOpenError)),
        ("pybreaker open rejects", lambda: raises(lambda: pb_open(noop), pybreaker.CircuitBreakerError)),
    ]
    variants = [
        Timed("bare", "bare call noop()", "bare", plain_loop(noop)),
        Timed("cb_closed", "celery-breaker closed: b.call(noop)", "closed", call_loop(cb_closed, noop)),
        Timed("pb_closed", "pybreaker+Redis closed: cb.call(noop)", "closed", call_loop(pb_closed, noop)),
        Timed("cb_open", "celery-breaker open reject", "open", reject_call_loop(cb_open, noop, CircuitOpenError)),
        Timed(
            "pb_open",
            "pybreaker+Redis open reject",
            "open",
            reject_call_loop(pb_open, noop, pybreaker.CircuitBreakerError),
        ),
    ]
    _verify(checks, "before timing")
    target_ns = int(target_ms * 1e6)
    for variant in variants:
        variant.n = calibrate(variant.run, target_ns)
    for round_ in range(rounds):
        gc.collect()
        gc.disable()
        try:
            for i in range(len(variants)):
                variant = variants[(round_ + i) % len(variants)]
                variant.samples.append(variant.run(variant.n) / variant.n / 1000)
        finally:
            gc.enable()
    _verify(checks, "after timing")
    return variants


def _verify(checks: list[tuple[str, Callable[[], bool]]], when: str) -> None:
    failed = [what for what, holds in checks if not holds()]
    if failed:
        raise SystemExit(f"bench/redis_store.py: {when}, these no longer hold: " + "; ".join(failed))


# -- reporting -------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def environment(server: RedisServer) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "redis_server": server.version(),
        **{dist: _version(dist) for dist in ("celery-breaker", "pybreaker", "redis", "hiredis", "celery", "kombu")},
    }


@dataclass
class Results:
    env: dict[str, Any]
    settings: dict[str, Any]
    traffic: dict[str, Any]
    timing: list[Timed]
    celery: CeleryResults | None


def _goal(label: str, goal: str, ours: float, theirs: float, met: bool) -> dict[str, Any]:
    return {"label": label, "goal": goal, "celery_breaker": ours, "pybreaker": theirs, "met": met}


def goals(res: Results) -> dict[str, Any]:
    """The issue's goals, against this run's figures (reported, never asserted)."""
    rows = res.traffic["rows"]
    timed = {t.key: t for t in res.timing}
    bare = timed["bare"].median
    sync = {lib: {s: rows[lib][s]["sync_round_trips"] for s in ("success", "reject")} for lib in ("cb", "pb")}
    over = {key: timed[key].median - bare for key in ("cb_closed", "pb_closed", "cb_open", "pb_open")}
    out = {
        "sync_round_trips_per_closed_success": _goal(
            "sync round trips per closed success", "<= 0.1", sync["cb"]["success"], sync["pb"]["success"],
            sync["cb"]["success"] <= 0.1,
        ),
        "sync_round_trips_per_open_reject": _goal(
            "sync round trips per open reject", "== 0", sync["cb"]["reject"], sync["pb"]["reject"],
            sync["cb"]["reject"] == 0,
        ),
        "overhead_us_closed_success": _goal(
            "overhead µs per closed success", "<= 10", over["cb_closed"], over["pb_closed"], over["cb_closed"] <= 10
        ),
        "overhead_us_open_reject": _goal(
            "overhead µs per open reject", "<= 10", over["cb_open"], over["pb_open"], over["cb_open"] <= 10
        ),
    }  # fmt: skip
    if res.celery:
        runs = res.celery.runs
        plain = median_rate(runs, "plain")
        ratio = median_rate(runs, "breaker") / plain
        out["celery_throughput_breaker_over_plain"] = _goal(
            "Celery tasks/s, breaker / plain", ">= 0.97", ratio, median_rate(runs, "pybreaker") / plain, ratio >= 0.97
        )
        cpu = {key: median_cpu(runs, key) for key in CELERY_VARIANTS}
        if cpu["plain"] is not None and cpu["breaker"] is not None and cpu["pybreaker"] is not None:
            # Throughput as CPU per task predicts it on a saturated machine: plain CPU / breaker CPU.
            ratio = cpu["plain"] / cpu["breaker"]
            out["celery_cpu_plain_over_breaker"] = _goal(
                "Celery CPU/task, plain / breaker", ">= 0.97", ratio, cpu["plain"] / cpu["pybreaker"], ratio >= 0.97
            )
    return out


def _print_traffic(traffic: dict[str, Any]) -> None:
    rows, labels = traffic["rows"], {"cb": "celery-breaker", "pb": "pybreaker+Redis"}
    calls, cycles = traffic["calls"], -(-traffic["calls"] // (THRESHOLD - 1))
    print(
        f"1. Redis traffic per call: {calls:,} calls per scenario; the failures are made on {cycles:,} fresh\n"
        f"   breakers ({THRESHOLD - 1} that do not trip, then the one that trips; threshold {THRESHOLD}).\n"
        "   RT = round trips; sync = made by the calling thread; bg = made by the library's other threads\n"
        f"   (counted until they were quiet for {traffic['settle_s']:g} s); pushes = pub/sub messages read;\n"
        "   server cmds = INFO commandstats: every command run, those inside scripts included; scripts = script\n"
        "   calls (EVALSHA); in scripts = server cmds - cmds sent; server µs = redis-server CPU (INFO cpu)\n"
        f"   less an empty span's ({traffic['empty_span_server_cpu_us']:.0f} µs: our INFO calls); approximate.\n"
    )
    head = (
        f"{'scenario':<22} {'library':<16} {'sync RT':>7} {'sync cmds':>9} {'bg RT':>6} {'bg cmds':>7} "
        f"{'pushes':>6} {'server cmds':>11} {'scripts':>7} {'in scripts':>10} {'server µs':>9}"
    )
    print(head)
    print("-" * len(head))
    for scenario, title in SCENARIOS.items():
        for i, lib in enumerate(("cb", "pb")):
            r = rows[lib][scenario]
            print(
                f"{title if i == 0 else '':<22} {labels[lib]:<16} {r['sync_round_trips']:>7.2f} "
                f"{r['sync_commands']:>9.2f} {r['background_round_trips']:>6.2f} {r['background_commands']:>7.2f} "
                f"{r['pushes']:>6.2f} {r['server_commands']:>11.2f} {r['server_script_calls']:>7.2f} "
                f"{r['server_commands_inside_scripts']:>10.2f} {r['server_cpu_us']:>9.1f}"
            )
    print("\n   Server commands per call, by name:")
    for scenario, title in SCENARIOS.items():
        for lib in ("cb", "pb"):
            by_name = rows[lib][scenario]["server_by_command"]
            text = ", ".join(f"{name} {count:.2f}" for name, count in list(by_name.items())[:8]) or "none"
            print(f"   {title:<22} {labels[lib]:<16} {text}")
    idle = traffic["idle_background"]
    threads = sorted({t for lib in ("cb", "pb") for s in SCENARIOS for t in rows[lib][s]["background_threads"]})
    recorded = traffic["celery_breaker_successes_in_redis"]
    print(
        f"\n   Idle, celery-breaker's store open: {idle['round_trips_per_s']:.1f} background round trips/s "
        f"over {idle['seconds']:g} s. Background threads seen: {', '.join(threads) or 'none'}.\n"
        f"   celery-breaker's snapshot() after the closed-success scenario: {recorded['snapshot']:,} successes "
        f"({recorded['expected']:,} calls made)."
    )


def _print_timing(res: Results) -> None:
    timed = {t.key: t for t in res.timing}
    bare = timed["bare"].median
    pb_over = {"closed": timed["pb_closed"].median - bare, "open": timed["pb_open"].median - bare}
    s = res.settings
    print(
        f"\n2. µs per call: {s['rounds']} rounds round-robin, ~{s['target_ms']:g} ms of calls per sample; "
        "overhead = median - bare median.\n"
    )
    width = max(len(t.label) for t in res.timing)
    head = f"{'variant':<{width}}  {'median':>8}  {'min-max':>17}  {'overhead':>8}  {'vs pybreaker':>12}  {'calls':>9}"
    print(head)
    print("-" * len(head))
    for t in res.timing:
        over = t.median - bare
        ratio = f"x{over / pb_over[t.path]:.3f}" if t.path in pb_over and t.key.startswith("cb") else "-"
        span = f"{min(t.samples):,.2f}-{max(t.samples):,.2f}"
        print(
            f"{t.label:<{width}}  {t.median:>8,.2f}  {span:>17}  {'-' if t.path == 'bare' else f'{over:,.2f}':>8}  "
            f"{ratio:>12}  {t.n:>9,}"
        )


def _print_celery(res: Results) -> None:
    if res.celery is None:
        print("\n3. Celery throughput: skipped (--no-celery)")
        return
    runs = res.celery.runs
    s = res.settings
    plain = median_rate(runs, "plain")
    print(
        f"\n3. Celery no-op throughput: prefork -c 2, Redis broker, no result backend, {s['tasks']:,} tasks per "
        f"run,\n   {s['celery_rounds']} round(s); tasks/s from the first 2 % done to the last; CPU ms/task = "
        "worker processes +\n   redis-server CPU over the same tasks (steadier than tasks/s on a shared machine).\n"
    )
    plain_cpu = median_cpu(runs, "plain")
    head = (
        f"{'variant':<28}  {'tasks/s':>7}  {'vs plain':>8}  {'CPU ms/task':>11}  {'vs plain':>8}  "
        f"{'start-up s':>10}  runs, tasks/s"
    )
    print(head)
    print("-" * len(head))
    for key, (label, _) in CELERY_VARIANTS.items():
        mine = [r for r in runs if r.variant == key]
        rates = ", ".join(f"{r.tasks_per_s:,.0f}" for r in mine)
        startup = statistics.median(r.startup_s for r in mine)
        median = median_rate(runs, key)
        cpu = median_cpu(runs, key)
        cpu_text = "-" if cpu is None else f"{cpu:.3f}"
        cpu_ratio = "-" if cpu is None or plain_cpu is None else f"x{cpu / plain_cpu:.3f}"
        print(
            f"{label:<28}  {median:>7,.0f}  {f'x{median / plain:.3f}':>8}  {cpu_text:>11}  {cpu_ratio:>8}  "
            f"{startup:>10.2f}  {rates}"
        )
    for key in ("breaker", "pybreaker"):
        lead = f"   {key} / plain, round by round:"
        rates = ", ".join(f"x{r:.3f}" for r in paired_ratios(runs, key, "tasks_per_s"))
        print(f"{lead} tasks/s  {rates}")
        if plain_cpu is not None:
            cpus = ", ".join(f"x{r:.3f}" for r in paired_ratios(runs, key, "cpu_ms_per_task"))
            print(f"{' ' * len(lead)} CPU/task {cpus}")
    publish = statistics.median(r.tasks / r.publish_s for r in runs)
    print(
        f"   publishing (before each run, worker stopped): {publish:,.0f} tasks/s\n"
        f"   BreakerTask's breaker, snapshot() after every run: {res.celery.breaker_successes:,} successes "
        f"({res.celery.breaker_tasks:,} tasks run under it)"
    )


def print_report(res: Results) -> None:
    env = res.env
    print(
        f"Python {env['python']} on {env['platform']}, {env['cpus']} CPUs; redis-server {env['redis_server']}\n"
        f"celery-breaker {env['celery-breaker']}, pybreaker {env['pybreaker']}, redis-py {env['redis']}, "
        f"hiredis {env['hiredis']}, celery {env['celery']}\n"
        "Figures are from one run on a shared, noisy machine: compare ratios within this run.\n"
    )
    _print_traffic(res.traffic)
    _print_timing(res)
    _print_celery(res)
    print("\nGoals (from the issue), this run:")
    for g in goals(res).values():
        verdict = "MET" if g["met"] else "NOT MET"
        print(
            f"  {g['label']:<36} {g['goal']:>7}  celery-breaker {g['celery_breaker']:>8.2f}  "
            f"{verdict:<7}  (pybreaker {g['pybreaker']:.2f})"
        )


def to_json(res: Results) -> dict[str, Any]:
    return {
        "environment": res.env,
        "settings": res.settings,
        "note": "one run on a shared machine; compare ratios within a run",
        "traffic_per_call": res.traffic,
        "timing_us_per_call": [
            {
                "key": t.key,
                "label": t.label,
                "path": t.path,
                "calls_per_sample": t.n,
                "median_us": t.median,
                "samples_us": t.samples,
            }
            for t in res.timing
        ],
        "celery": None
        if res.celery is None
        else {
            "runs": [
                {**asdict(r), "tasks_per_s": r.tasks_per_s, "cpu_ms_per_task": r.cpu_ms_per_task}
                for r in res.celery.runs
            ],
            "breaker_successes_in_redis": res.celery.breaker_successes,
            "breaker_tasks": res.celery.breaker_tasks,
        },
        "goals": goals(res),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny counts (CI smoke run, < 30 s)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    parser.add_argument("--calls", type=int, help="calls per traffic scenario (default 1000; 100 with --quick)")
    parser.add_argument("--settle", type=float, help="seconds of background quiet ending a span (default 1; 0.3)")
    parser.add_argument("--rounds", type=int, help="timing rounds (default 9; 3 with --quick)")
    parser.add_argument("--target-ms", type=float, help="duration of one timing sample (default 80; 15)")
    parser.add_argument("--tasks", type=int, help="tasks per Celery run (default 5000; 150 with --quick)")
    parser.add_argument("--celery-rounds", type=int, help="runs of each Celery variant (default 5; 1)")
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery throughput section")
    args = parser.parse_args(argv)
    quick = args.quick
    settings: dict[str, Any] = {
        "calls": args.calls or (100 if quick else 1000),
        "settle": args.settle if args.settle is not None else (0.3 if quick else 1.0),
        "rounds": args.rounds or (3 if quick else 9),
        "target_ms": args.target_ms or (15.0 if quick else 80.0),
        "tasks": args.tasks or (150 if quick else 5000),
        "celery_rounds": args.celery_rounds or (1 if quick else 5),
        "celery": not args.no_celery,
    }
    if min(settings["calls"], settings["rounds"], settings["tasks"], settings["celery_rounds"]) < 1:
        parser.error("--calls, --rounds, --tasks and --celery-rounds must be positive")

    # Transitions log at WARNING; keep them off stderr without touching levels.
    logging.getLogger("celery_breaker").addHandler(logging.NullHandler())
    prefix = f"bench-{os.getpid()}"
    with RedisServer() as server:
        env = environment(server)
        url = server.url(0)
        traffic = measure_traffic(url, settings["calls"], settings["settle"], prefix)
        timing = measure_timing(url, settings["rounds"], settings["target_ms"], prefix)
        celery = None
        if settings["celery"]:
            celery = measure_celery(server, settings["tasks"], settings["celery_rounds"], prefix)
    results = Results(env, settings, traffic, timing, celery)
    print_report(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(to_json(results), out, indent=2)
            out.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
