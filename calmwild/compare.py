"""Results across runs: a table of each run's final and best evaluation metrics, and the quality-memorization
Pareto front (paper App. E.5, Fig. 9: FID against memorization over gap configurations, non-dominated runs joined).

A run is a ``calmwild fit`` directory; its evaluations are read from ``eval/<callback>/history.json`` (written by the
callbacks at every evaluation) and its settings from its ``config.yaml``. Lower is better for every metric compared
here (memorization rates, FID, KID), so "best" is the minimum over a run's evaluations.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from matplotlib.figure import Figure

from calmwild.stats import Interval, wilson_interval

RATE_KEY = "traj_mem/rate"
QUALITY_KEYS = ("fid/value", "kid/value")
COMPARED = ("traj_mem/rate", "mem/peak_rate", "fid/value", "kid/value")
ZONE_KEYS = ("zone/sigma_low", "zone/sigma_high")  # the danger zone, logged by callbacks.DangerZone
SUMMARISED = (*COMPARED, "mem/peak_sigma", *ZONE_KEYS)  # read from the histories: the compared metrics, where the
# per-sigma peak is and the danger zone


@dataclass
class RunResults:
    """One run's evaluations: per metric the (step, value) series, and what the run was."""

    path: Path
    label: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    def final(self, key: str) -> tuple[int, float] | None:
        return self.series[key][-1] if self.series.get(key) else None

    def best(self, key: str) -> tuple[int, float] | None:
        return min(self.series[key], key=lambda item: item[1]) if self.series.get(key) else None

    def final_rate_interval(self) -> Interval | None:
        """The 95% Wilson interval of the final trajectory memorization rate over its sample count (None without
        either)."""
        final, count = self.final(RATE_KEY), self.samples.get("traj_mem")
        return wilson_interval(round(final[1] * count), count) if final and count else None


def _config(run_dir: Path) -> dict:
    for path in (run_dir / "config.yaml", run_dir / "logs" / "config.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


class RunLabels(NamedTuple):
    """What a run is, from its config: the experiment family (``group``: dataset and training-set size, the runs one
    compares), W&B tags (dataset, N, sigma sampler, band) and a short label for tables and plots."""

    group: str
    tags: list[str]
    label: str


def _short(class_path: Any, default: str) -> str:
    return str(class_path or default).rsplit(".", 1)[-1]


def run_labels(config: dict) -> RunLabels:
    """The labels of a run config (the ``fit`` config as a dict: ``data`` and ``model.sigma_sampler`` with
    ``class_path`` / ``init_args``)."""
    data = config.get("data") or {}
    data_args = data.get("init_args") or {}
    dataset = _short(data.get("class_path"), "data").removesuffix("DataModule").lower() or "data"
    size = data_args.get("num_train")
    classes = data_args.get("classes")
    sampler = (config.get("model") or {}).get("sigma_sampler") or {}
    sampler_name = _short(sampler.get("class_path"), "LogNormal")
    bands = (sampler.get("init_args") or {}).get("bands")
    band = ("danger-zone" if sampler_name == "DangerZoneGap" else
            ",".join(f"[{a:g}, {b:g}]" for a, b in bands) if bands else "none")
    family = dataset + (f"-{'-'.join(map(str, classes))}" if classes else "")
    group = f"{family}-N{size}" if size else family
    tags = [dataset, f"N={size}" if size else "N=all", sampler_name, f"band={band}"]
    label = sampler_name + (f" {band}" if band not in ("none", "danger-zone") else "") + (f", N={size}" if size else "")
    return RunLabels(group, [tag[:64] for tag in tags], label)  # W&B limits a tag to 64 characters


def describe_run(run_dir: Path) -> str:
    """A short label: the sigma sampler (and its bands) the run was trained with, and its training-set size."""
    return run_labels(_config(run_dir)).label


def read_run(run_dir: str | Path) -> RunResults:
    """The evaluation histories of a run directory (ValueError when it holds none)."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("eval/*/history.json"))
    if not files:
        raise ValueError(f"{run_dir} holds no evaluation history (eval/*/history.json): is it a calmwild run "
                         "directory with evaluation callbacks?")
    result = RunResults(run_dir, describe_run(run_dir))
    for path in files:
        for entry in json.loads(path.read_text()).get("history", []):
            step = int(entry["step"])
            for key, value in entry.items():
                if key in SUMMARISED and isinstance(value, (int, float)) and math.isfinite(value):
                    result.series.setdefault(key, []).append((step, float(value)))
                elif key.endswith("/num_samples") and isinstance(value, (int, float)):
                    result.samples[key.split("/")[0]] = int(value)
    for values in result.series.values():
        values.sort()
    return result


def summary_lines(run: RunResults) -> list[str]:
    """The run's final evaluation in a few lines: trajectory memorization with its 95% Wilson interval and sample
    count, the per-sigma memorization peak and where it is, FID and KID with their sample counts."""
    lines = []
    if run.final(RATE_KEY):
        step, rate = run.final(RATE_KEY)
        bounds, interval = run.final_rate_interval(), ""
        if bounds:
            interval = f" [95% {100 * bounds.low:.1f}, {100 * bounds.high:.1f}] of {bounds.count} samples"
        lines.append(f"trajectory memorization {100 * rate:.1f}%{interval} at step {step}")
    zone = [run.final(key) for key in ZONE_KEYS]
    zone = (zone[0][1], zone[1][1]) if all(zone) else None
    if run.final("mem/peak_rate"):
        step, peak = run.final("mem/peak_rate")
        where = run.final("mem/peak_sigma")
        at = f" at sigma {where[1]:.3g}" if where and where[0] == step and peak > 0 else " (nothing memorized)"
        if zone and where and where[0] == step and peak > 0:
            at += (", inside the danger zone" if zone[0] <= where[1] <= zone[1] else
                   ", below the danger zone" if where[1] < zone[0] else ", above the danger zone")
        lines.append(f"per-sigma memorization peak {100 * peak:.1f}%{at}")
    if zone:
        lines.append(f"danger zone sigma {zone[0]:.3g}-{zone[1]:.3g} (from the training data alone, before training)")
    for key, name in (("fid/value", "FID"), ("kid/value", "KID")):
        if run.final(key):
            step, value = run.final(key)
            count = run.samples.get(key.split("/")[0])
            lines.append(f"{name} {value:.4g}" + (f" of {count} samples" if count else "") + f" at step {step}")
    return lines


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are minimised (no other point is at least as
    good in both and better in one), ordered by the first coordinate."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def compare_runs(run_dirs: list[str | Path], quality: str = "fid/value") -> dict[str, Any]:
    """The comparison table (one row per run) and the Pareto front of (final memorization rate, final
    ``quality``)."""
    if quality not in QUALITY_KEYS:
        raise ValueError(f"quality must be one of {QUALITY_KEYS}, got {quality!r}")
    runs = [read_run(d) for d in run_dirs]
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": str(run.path), "label": run.label}
        for key in COMPARED:
            final, best = run.final(key), run.best(key)
            row[f"final {key}"] = None if final is None else final[1]
            row[f"final {key} step"] = None if final is None else final[0]
            row[f"best {key}"] = None if best is None else best[1]
            row[f"best {key} step"] = None if best is None else best[0]
        interval = run.final_rate_interval()
        if interval:
            row["final traj_mem/rate 95% interval"] = [interval.low, interval.high]
            row["traj_mem samples"] = interval.count
        rows.append(row)
    both = [i for i, row in enumerate(rows)
            if row[f"final {RATE_KEY}"] is not None and row[f"final {quality}"] is not None]
    points = [(rows[i][f"final {RATE_KEY}"], rows[i][f"final {quality}"]) for i in both]
    front = [both[k] for k in pareto_front(points)]
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    return {"quality": quality, "rows": rows, "pareto_front": [rows[i]["run"] for i in front]}


def plot_pareto(comparison: dict[str, Any]) -> Figure:
    """Quality against memorization, one point per run (labelled), the non-dominated runs joined by a dashed line."""
    quality = comparison["quality"]
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    rows = [r for r in comparison["rows"] if r[f"final {RATE_KEY}"] is not None and r[f"final {quality}"] is not None]
    for row in rows:
        x, y = 100 * row[f"final {RATE_KEY}"], row[f"final {quality}"]
        ax.scatter([x], [y], color="tab:red" if row["pareto"] else "tab:gray", zorder=3)
        ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if "final traj_mem/rate 95% interval" in row:
            low, high = row["final traj_mem/rate 95% interval"]
            ax.plot([100 * low, 100 * high], [y, y], color="tab:gray", alpha=0.5, lw=1)
    front = sorted((100 * r[f"final {RATE_KEY}"], r[f"final {quality}"]) for r in rows if r["pareto"])
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="tab:red", lw=1, label="Pareto front (non-dominated)")
        ax.legend(fontsize=8)
    ax.set_xlabel("trajectory memorization (%, 95% Wilson interval)")
    ax.set_ylabel(quality.replace("/value", "").upper())
    ax.set_title(f"{quality.split('/')[0].upper()} against memorization, final evaluation of each run")
    ax.grid(True, alpha=0.3)
    return fig


def write_comparison(comparison: dict[str, Any], out: Path) -> dict[str, str]:
    """compare.json, compare.csv, compare.md and pareto.png in ``out``; returns the file names."""
    from calmwild.io import save_figure
    from calmwild.io import write_json

    rows = comparison["rows"]
    write_json(comparison, out / "compare.json")
    columns = ["run", "label", "pareto"] + [k for k in rows[0] if k not in ("run", "label", "pareto")]
    with open(out / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
    quality = comparison["quality"]

    def fmt(value: Any, pct: bool = False) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if pct else f"{value:.4g}"

    lines = [f"| run | label | final memorization | final {quality} | best memorization (step) | best {quality} (step) "
             "| Pareto |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        interval = row.get("final traj_mem/rate 95% interval")
        rate = fmt(row[f"final {RATE_KEY}"], pct=True)
        if interval:
            rate += f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}] (n={row['traj_mem samples']})"
        lines.append(
            f"| {Path(row['run']).name} | {row['label']} | {rate} | {fmt(row[f'final {quality}'])} | "
            f"{fmt(row[f'best {RATE_KEY}'], pct=True)} ({row[f'best {RATE_KEY} step']}) | "
            f"{fmt(row[f'best {quality}'])} ({row[f'best {quality} step']}) | {'yes' if row['pareto'] else ''} |"
        )
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    save_figure(plot_pareto(comparison), out / "pareto.png")
    return {"json": "compare.json", "csv": "compare.csv", "markdown": "compare.md", "plot": "pareto.png"}
