"""``calmwild compare``: the table of final and best metrics of three runs and the FID-memorization Pareto front
(paper Fig. 9), checked against values written into the runs and a brute-force dominance check."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from calmwild.cli import run
from calmwild.compare import pareto_front, run_labels

# (sampler config, [(step, traj_mem/rate, fid/value)]) of three runs; memorization over 50 samples
RUNS = {
    "baseline": ({"class_path": "calmwild.sigma.LogNormal"}, [(100, 0.40, 30.0), (200, 0.80, 12.0)]),
    "gap": ({"class_path": "calmwild.sigma.Gap", "init_args": {"bands": [[0.5, 2.0]]}},
            [(100, 0.10, 40.0), (200, 0.20, 14.0)]),
    "dominated": ({"class_path": "calmwild.sigma.DangerZoneGap"}, [(100, 0.50, 50.0), (200, 0.30, 20.0)]),
}
SAMPLES = 50


def _write_run(root: Path, name: str, sampler: dict, evaluations: list) -> Path:
    run_dir = root / f"run-{name}"
    config = {"data": {"class_path": "calmwild.data.DigitsDataModule", "init_args": {"num_train": 300}},
              "model": {"sigma_sampler": sampler}}
    (run_dir / "eval" / "trajectory_memorization").mkdir(parents=True)
    (run_dir / "eval" / "fid").mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    traj = [{"step": s, "phase": "train_batch_end", "traj_mem/rate": r, "traj_mem/num_samples": SAMPLES}
            for s, r, _ in evaluations]
    fid = [{"step": s, "phase": "train_batch_end", "fid/value": f, "fid/num_samples": SAMPLES}
           for s, _, f in evaluations]
    (run_dir / "eval" / "trajectory_memorization" / "history.json").write_text(json.dumps({"history": traj}))
    (run_dir / "eval" / "fid" / "history.json").write_text(json.dumps({"history": fid}))
    return run_dir


def test_compare_three_runs_writes_the_table_and_the_pareto_front(tmp_path, capsys):
    dirs = [_write_run(tmp_path / "runs", name, *spec) for name, spec in RUNS.items()]
    comparison = run(["compare", *map(str, dirs), "--out", str(tmp_path / "cmp")])
    rows = {Path(row["run"]).name: row for row in comparison["rows"]}
    for name, (_, evaluations) in RUNS.items():
        row = rows[f"run-{name}"]
        assert row["final traj_mem/rate"] == evaluations[-1][1] and row["final fid/value"] == evaluations[-1][2]
        best = min(evaluations, key=lambda e: e[2])
        assert (row["best fid/value"], row["best fid/value step"]) == (best[2], best[0])
        assert row["traj_mem samples"] == SAMPLES
        low, high = row["final traj_mem/rate 95% interval"]
        assert low < row["final traj_mem/rate"] < high
    # brute force: a run is on the front unless another is no worse in both final metrics and better in one
    finals = {name: (ev[-1][1], ev[-1][2]) for name, (_, ev) in RUNS.items()}
    expected = {name for name, (m, q) in finals.items()
                if not any(m2 <= m and q2 <= q and (m2, q2) != (m, q) for m2, q2 in finals.values())}
    assert {Path(p).name for p in comparison["pareto_front"]} == {f"run-{n}" for n in expected} == {
        "run-baseline", "run-gap"}
    out = tmp_path / "cmp"
    assert {p.name for p in out.iterdir()} == {"compare.json", "compare.csv", "compare.md", "pareto.png"}
    with open(out / "compare.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["pareto"] for r in table] == ["True", "True", "False"]
    markdown = (out / "compare.md").read_text()
    assert "Gap [0.5, 2], N=300" in markdown and "DangerZoneGap, N=300" in markdown
    assert "80.0% [" in markdown and "(n=50)" in markdown
    assert "Pareto front 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an existing output folder is refused (nothing overwritten)
        from calmwild.cli import main

        main(["compare", *map(str, dirs), "--out", str(out)])


def test_pareto_front_matches_brute_force_on_random_points():
    import random

    rng = random.Random(0)
    for _ in range(50):
        points = [(rng.randint(0, 5), rng.randint(0, 5)) for _ in range(rng.randint(1, 8))]
        front = set(pareto_front(points))
        for i, (x, y) in enumerate(points):
            dominated = any(a <= x and b <= y and (a, b) != (x, y) for a, b in points)
            assert (i in front) == (not dominated)


def test_run_labels_name_the_experiment_family():
    config = {"data": {"class_path": "calmwild.data.CIFAR10DataModule",
                       "init_args": {"num_train": 2000, "classes": ["automobile"]}},
              "model": {"sigma_sampler": {"class_path": "calmwild.sigma.DangerZoneGap"}}}
    labels = run_labels(config)
    assert labels.group == "cifar10-automobile-N2000"
    assert labels.tags == ["cifar10", "N=2000", "DangerZoneGap", "band=danger-zone"]
    assert run_labels({}).tags == ["data", "N=all", "LogNormal", "band=none"]


def test_the_closing_summary_states_rate_interval_counts_and_peak(tmp_path):
    from calmwild.compare import read_run, summary_lines

    run_dir = _write_run(tmp_path, "baseline", *RUNS["baseline"])

    def history(callback: str, entries: list[dict]) -> None:
        (run_dir / "eval" / callback).mkdir(exist_ok=True)
        (run_dir / "eval" / callback / "history.json").write_text(json.dumps({"history": entries}))

    history("per_sigma_memorization", [{"step": 200, "phase": "train_end", "mem/peak_rate": 0.25,
                                        "mem/peak_sigma": 0.8}])
    lines = summary_lines(read_run(run_dir))
    assert lines[0] == "trajectory memorization 80.0% [95% 67.0, 88.8] of 50 samples at step 200"
    assert lines[1] == "per-sigma memorization peak 25.0% at sigma 0.8"
    assert lines[2] == "FID 12 of 50 samples at step 200"

    history("danger_zone", [{"step": 0, "phase": "fit_start", "zone/sigma_low": 0.5, "zone/sigma_high": 1.9}])
    lines = summary_lines(read_run(run_dir))
    assert lines[1] == "per-sigma memorization peak 25.0% at sigma 0.8, inside the danger zone"
    assert lines[2] == "danger zone sigma 0.5-1.9 (from the training data alone, before training)"
    history("danger_zone", [{"step": 0, "phase": "fit_start", "zone/sigma_low": 0.9, "zone/sigma_high": 1.9}])
    assert summary_lines(read_run(run_dir))[1].endswith("at sigma 0.8, below the danger zone")
