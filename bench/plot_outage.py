"""Draws bench/outage_timeline.py's JSON as stacked panels sharing the time axis (docs/img/outage-recovery.png).

Panels: downstream calls per second (200s apart from 503s and timeouts), tasks per second
(published, completed, deferred), tasks parked, and the breaker's state as polled from
the store, with the moments it half-opened. The outage is shaded in every panel.

    python bench/plot_outage.py out.json                       # writes docs/img/outage-recovery.png
    python bench/plot_outage.py out.json --out x.png --svg     # and x.svg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.axes import Axes
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "img" / "outage-recovery.png"
STATE_LEVELS = {"closed": 0, "half_open": 1, "open": 2, "forced_open": 2}
OUTAGE_COLOUR = "#f4cccc"
OK_COLOUR = "#5b8db8"
FAILED_COLOUR = "#c0392b"


def shade(ax: Axes, data: dict[str, Any]) -> None:
    """The outage, and the moments the breaker closed and the backlog drained."""
    phases = data["phases"]
    ax.axvspan(phases["outage_start"], phases["outage_end"], color=OUTAGE_COLOUR, zorder=0, lw=0)
    for key, style in (("closed", ":"), ("drained", "--")):
        if phases.get(key) is not None:
            ax.axvline(phases[key], color="0.35", ls=style, lw=1, zorder=1)
    ax.grid(axis="y", color="0.9", lw=0.8)
    ax.set_axisbelow(True)


def calls_panel(ax: Axes, data: dict[str, Any]) -> None:
    series, summary = data["series"], data["summary"]
    t = [x + series["bin_s"] / 2 for x in series["t"]]
    width = series["bin_s"] * 0.9
    ax.bar(t, series["downstream_ok"], width=width, color=OK_COLOUR, label="200")
    ax.bar(
        t,
        series["downstream_failed"],
        width=width,
        bottom=series["downstream_ok"],
        color=FAILED_COLOUR,
        label="503 or timeout",
    )
    ax.set_ylabel("downstream\ncalls/s")
    ax.set_ylim(0, max(series["downstream_ok"] + series["downstream_failed"] + [1]) * 1.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncols=2)
    phases = data["phases"]
    note = (
        f"{summary['downstream_calls_during_outage']} calls during the outage\n"
        f"(bound {summary['downstream_calls_bound']}; {summary['published_during_outage']:,} tasks published)"
    )
    ax.text(
        (phases["outage_start"] + phases["outage_end"]) / 2,
        0.5,
        note,
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="center",
        fontsize=8,
    )


def tasks_panel(ax: Axes, data: dict[str, Any]) -> None:
    series = data["series"]
    t = [x + series["bin_s"] / 2 for x in series["t"]]
    ax.plot(t, series["published"], color="0.55", ls="--", lw=1, ds="steps-mid", label="published")
    ax.plot(t, series["completions"], color=OK_COLOUR, lw=1.6, ds="steps-mid", label="completed")
    ax.plot(t, series["deferrals"], color="#e67e22", lw=1.6, ds="steps-mid", label="deferred (parked)")
    ax.set_ylabel("tasks/s")
    ax.set_ylim(0, max(series["completions"] + series["deferrals"] + [1]) * 1.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncols=3)


def parked_panel(ax: Axes, data: dict[str, Any]) -> None:
    samples = data["samples"]
    ax.plot(samples["t"], samples["parked"], color="#e67e22", lw=1.6)
    ax.fill_between(samples["t"], samples["parked"], color="#e67e22", alpha=0.15, lw=0)
    ax.set_ylabel("tasks\nparked")
    ax.set_ylim(bottom=0)


def state_panel(ax: Axes, data: dict[str, Any]) -> None:
    samples = data["samples"]
    levels = [STATE_LEVELS.get(state, 2) for state in samples["state"]]
    ax.step(samples["t"], levels, where="post", color="0.15", lw=1.6, label="state (store, polled every 100 ms)")
    probes = [t["at"] for t in data["transitions"] if t["state"] == "half_open"]
    ax.plot(probes, [1] * len(probes), "^", color=OK_COLOUR, ms=6, label="half-opened (a probe admitted)")
    ax.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    ax.set_ylim(-0.4, 2.4)
    ax.set_ylabel("breaker")
    ax.legend(loc="center right", fontsize=8, frameon=False)


def title(data: dict[str, Any]) -> str:
    scenario, summary, meta = data["scenario"], data["summary"], data["meta"]
    return (
        f"One outage, end to end: {scenario['rate']:g} tasks/s, {summary['outage_s']:.0f} s outage, "
        f"workers {meta['workers']}\n"
        f"failure_threshold {scenario['failure_threshold']}, reset_timeout {scenario['reset_timeout']:g} s "
        f"(backoff \N{MULTIPLICATION SIGN}2), half_open_max_calls {scenario['half_open_max_calls']}; release "
        f"{scenario['release_rate']:g}/s, ramp {scenario['release_ramp']:g} s"
    )


def plot(data: dict[str, Any]) -> Figure:
    figure = Figure(figsize=(8, 7.2), layout="constrained")
    axes = figure.subplots(4, 1, sharex=True, height_ratios=[1.1, 1.1, 0.8, 0.7])
    for ax, draw in zip(axes, (calls_panel, tasks_panel, parked_panel, state_panel), strict=True):
        shade(ax, data)
        draw(ax, data)
    phases = data["phases"]
    axes[-1].set_xlim(0, phases["end"])
    axes[-1].set_xlabel(
        "seconds since the first task was published\n"
        "shaded: the outage;  dotted line: the breaker closed;  dashed line: the backlog drained",
        fontsize=9,
    )
    figure.suptitle(title(data), fontsize=10)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="the file bench/outage_timeline.py --json wrote")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--svg", action="store_true", help="also write an SVG beside the PNG")
    options = parser.parse_args()
    figure = plot(json.loads(options.json.read_text()))
    options.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(options.out, dpi=110)
    if options.svg:
        figure.savefig(options.out.with_suffix(".svg"))
    print(f"wrote {options.out} ({options.out.stat().st_size / 1000:.0f} KB)")


if __name__ == "__main__":
    main()
