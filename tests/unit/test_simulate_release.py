"""bench/simulate_release.py, the release's model, on a tiny grid: it runs, it is deterministic, it drains."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def model() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("simulate_release")
    finally:
        sys.path.remove(str(BENCH))


def test_a_tiny_grid_drains_every_case_within_reason(model: ModuleType) -> None:
    """Every limiter at C = 60/s, 300 tasks: each drains, after N / C and within 3x of it,
    with some refusals from the limiters that have no slow zone."""
    results = [model.simulate(s) for s in model.grid([60.0], [300], model.LIMITERS[:-1], [1])]
    for r in results:
        assert r.drain_s is not None, r
        assert 1.0 < r.ratio < 3.0, r
        assert r.release_calls >= r.scenario.tasks
        assert r.refused_share < 0.2, r
    assert sum(r.refused for r in results if r.scenario.limiter != "bench") > 0
    assert "| bench | 60 | 300 |" in model.table(model.summarise(results))


def test_the_same_seed_gives_the_same_run_and_another_seed_another(model: ModuleType) -> None:
    scenario = model.Scenario(capacity=60.0, tasks=300, limiter="sliding", seed=7)
    one, two = model.simulate(scenario), model.simulate(scenario)
    assert one == two
    other = model.simulate(model.Scenario(capacity=60.0, tasks=300, limiter="sliding", seed=8))
    assert (other.drain_s, other.refused) != (one.drain_s, one.refused)


def test_stalled_workers_drain_later_and_alike_for_one_seed(model: ModuleType) -> None:
    """Workers stalled at random (a loaded machine): their outcomes come back in bursts,
    the release drains later, and one seed still gives one run."""
    smooth = model.simulate(model.Scenario(capacity=60.0, tasks=300, limiter="bench", seed=3))
    stalled = model.Scenario(capacity=60.0, tasks=300, limiter="bench", seed=3, stall_every=0.1, stall_s=0.1)
    one, two = model.simulate(stalled), model.simulate(stalled)
    assert one == two
    assert one.drain_s is not None
    assert smooth.drain_s is not None
    assert one.drain_s > smooth.drain_s


def test_no_limit_drains_at_the_pools_speed_after_the_ramp(model: ModuleType) -> None:
    """12 slots of ~27 ms: ~440 tasks/s once the pace has grown past it, so 1,500 tasks in
    under 10 s (the ramp from 10/s takes ~5 s of it), with nothing refused."""
    r = model.simulate(model.Scenario(capacity=None, tasks=1500, limiter="none", seed=1))
    assert r.drain_s is not None
    assert 5.0 < r.drain_s < 10.0, r
    assert r.refused == 0
    assert r.peak_rate > 300
