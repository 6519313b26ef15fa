"""``python scripts/study.py``: the paper's claims as an experiment, on the embedded digits (CPU) or the paper's data
(GPU), with calmwild's commands only.

    python scripts/study.py --quick --out DIR     # 10-12 minutes on 2 idle CPU cores
    python scripts/study.py --out DIR             # the standard run, under an hour on 2 CPU cores
    python scripts/study.py --tiny --out DIR      # every stage at toy sizes (the test suite)
    python scripts/study.py --dataset cifar10 --data-root PATH --out DIR    # the paper's setup, on a GPU

Every unit of work (a model trained and evaluated, the geometry, a block of swaps) is kept under ``DIR/stages/`` when
it finishes: after a kill at any point the same command continues where the study stood (a half-trained model
resumes from its newest checkpoint). ``--configs-only`` writes the fit configs a stage needs and stops while any of
them is untrained, so the fits can run elsewhere (``calmwild fit --config DIR/configs/<model>.yaml``, any number of
GPUs); the next invocation finds the finished runs under ``DIR/train/``.

Output: ``report.md`` and ``report.json`` (verdicts with their criteria and numbers, every table), ``figures/``,
``configs/``, ``train/<model>/run-*``, ``models/<model>/`` (each evaluation), ``geometry_N*/``, ``swap/``,
``logs/`` (one log per unit), ``stages/`` and ``study.json`` (the settings: another invocation with other settings
into the same directory is refused).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from calmwild.io import write_json
from study.lanes import Lanes
from study.report import write_report
from study.settings import check_same_settings, default_jobs, parse_args, resolve_settings
from study.stages import Study, TrainingNeeded


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        settings = resolve_settings(args)
    except ValueError as err:
        raise SystemExit(f"[study] {err}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    jobs = args.jobs or default_jobs(device)
    if jobs < 1:
        raise SystemExit(f"[study] --jobs must be >= 1, got {jobs}")
    threads = max(1, (torch.get_num_threads() if jobs == 1 else (torch.get_num_threads() // jobs)))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_same_settings(out, settings)
    invocation = shlex.join(["python", "scripts/study.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"[study] mode {settings['mode']}, data {settings['dataset']}, {jobs} lane(s) x {threads} thread(s) on "
          f"{device}; output {out}", flush=True)
    start = time.perf_counter()
    with Lanes(jobs, threads, out / "logs") as lanes:
        study = Study(out, settings, device, lanes, configs_only=args.configs_only)
        try:
            results = run_stages(study)
        except TrainingNeeded as need:
            print(f"[study] --configs-only: train these {len(need.configs)} models, then run the study again:",
                  flush=True)
            for config in need.configs:
                print(f"  calmwild fit --config {config}", flush=True)
            return {"out": str(out), "status": dict(study.ledger.status), "to_train": [str(c) for c in need.configs]}
        invocations = log_invocation(out, invocation, time.perf_counter() - start)
        verdicts = write_report(study, results, invocations)
    print("[study] verdicts: " + ", ".join(f"{k} {v}" for k, v in verdicts.items()), flush=True)
    print(f"[study] report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s in this invocation)", flush=True)
    return {"out": str(out), "status": dict(study.ledger.status), "seconds": dict(study.ledger.seconds),
            "verdicts": verdicts}


def log_invocation(out: Path, command: str, seconds: float) -> list[dict]:
    """Appends this invocation (command, wall seconds up to the report, load average) to ``invocations.json``; returns
    every invocation of the study so far."""
    path = out / "invocations.json"
    invocations = json.loads(path.read_text()) if path.is_file() else []
    invocations.append({"command": command, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": seconds,
                        "load_average": list(os.getloadavg())})
    write_json(invocations, path)
    return invocations


def run_stages(study: Study) -> dict:
    """The stages in order; each reads back what an earlier invocation finished."""
    results: dict = {}
    results["regime"] = regime = study.ledger.step("regime", (), study.regime)
    n_star = regime["n_star"]
    results["geometry"] = geometry = study.geometry(n_star)
    sizes = [int(n) for n in regime["sizes"]]
    arm_models = study.arm_models(n_star, geometry)
    swap_units = study.swap_units(n_star, sizes, geometry)
    # the short swap units last: they fill the lanes the last models leave idle
    done = study.lanes.run(study.ledger, study.model_units([m for ms in arm_models.values() for m in ms]) + swap_units)
    results["arms"] = arms = study.arms_result(arm_models, done)
    results["swap"] = study.swap_result(n_star, sizes, geometry, done)
    results["risk"] = study.ledger.step(f"risk_N{n_star}", (), lambda: study.risk(geometry, arms["baseline"]["models"]))
    return results


if __name__ == "__main__":
    main()
