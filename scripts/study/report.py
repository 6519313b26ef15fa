"""``report.md`` and ``report.json``: the verdicts (each with its criterion, fixed in :mod:`study.criteria`, and its
numbers), then every table behind them, the figures, the timings and the commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calmwild import stats
from calmwild.io import save_figure, write_json
from study import criteria, figures
from study.criteria import interval_text, pct
from study.stages import STEP_BANDS, ZONE_BANDS, Study, arm_rates

CLAIMS = {
    "gap_mitigates": "Under-training the danger zone (gap) mitigates memorization (Section 5)",
    "gap_beats_placebo": "It is the danger zone that matters: the gap beats placebo gaps of the same mass",
    "gap_quality": "The gap keeps sample quality (Section 5)",
    "zone_concentration": "Per-sigma memorization concentrates in the danger zone found from the data (Sections 3-4)",
    "swap_steps": "Swapping the medium band moves memorization most (Table 1, the paper's step bands)",
    "swap_zone": "Swapping the danger zone moves memorization most (bands placed by the data)",
    "risk": "Isolated training images are the ones memorized (seed 002)",
    "remark_4_3": "Theorem 4.2's thresholds compare well with the max-weight curve (Remark 4.3)",
}


def _swap_directions(table: dict, scheme: str, bands: tuple[str, ...]) -> dict:
    out = {}
    for base, rises in (("memorizing", False), ("generalizing", True)):
        row = table[base]
        out[f"{base} base"] = {"rises": rises, "memorized": {"none": row["none"]["memorized"],
                                                             **{b: row[f"{scheme}_{b}"]["memorized"] for b in bands}}}
    return out


def verdicts(results: dict) -> list[criteria.Verdict]:
    """Every claim judged by its criterion (:mod:`study.criteria`)."""
    arms, geometry, swap, risk = (results[k] for k in ("arms", "geometry", "swap", "risk"))
    baseline, gap = arm_rates(arms["baseline"]), arm_rates(arms["gap"])
    placebos = {arm: arm_rates(entry) for arm, entry in arms.items() if arm.startswith("placebo_")}
    capped = {f"placebo_{side}": p["capped"] for side, p in geometry["placebos"].items()}
    fd = {arm: [m["quality"]["fid"] for m in arms[arm]["models"]] for arm in ("baseline", "gap")}
    curves = [m["per_sigma"]["rate"] for m in arms["baseline"]["models"]]
    sigmas = arms["baseline"]["models"][0]["per_sigma"]["sigmas"]
    primary = risk["scores"][risk["primary"]]["auroc"]
    return [
        criteria.gap_mitigates(baseline, gap),
        criteria.gap_beats_placebo(gap, placebos, capped) if placebos else criteria.Verdict(
            "gap_beats_placebo", criteria.INCONCLUSIVE, "no side of the gap holds any training mass: no placebo"),
        criteria.gap_quality(fd["baseline"], fd["gap"]),
        criteria.zone_concentration(sigmas, curves, tuple(geometry["zone"])),
        criteria.swap_verdict("swap_steps", "medium", _swap_directions(swap["table"], "steps", STEP_BANDS)),
        criteria.swap_verdict("swap_zone", "zone", _swap_directions(swap["table"], "zone", ZONE_BANDS)),
        criteria.risk_verdict(None if primary is None else stats.Interval(**primary), risk["over_reproduced"],
                              risk["num_train"], risk["primary"]),
        criteria.remark_verdict(geometry["remark_4_3"]),
    ]


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}" if len(values) > 1 else f"{values[0]:.4g}"


def _sampler_text(sampler: dict | None, arm: str) -> str:
    if arm == "dummy":
        return "full schedule; as many pure-noise images as a second class (Yoon et al.)"
    if sampler is None:
        return "full schedule"
    init = sampler["init_args"]
    (low, high), = init["bands"]
    if sampler["class_path"].endswith("Reweighted"):
        return f"loss x {init['factors']} on σ {low:.3g}-{high:.3g}"
    return f"σ {low:.3g}-{high:.3g} removed"


def _figures(study: Study, results: dict) -> dict[str, str]:
    folder = study.out / "figures"
    geometry = results["geometry"]
    base = study.base_sampler()
    grid = np.exp(np.linspace(np.log(min(geometry["sigmas"])), np.log(max(geometry["sigmas"])), 400))
    cdf = base.cdf(torch.tensor(grid)).numpy()
    density = np.gradient(cdf, np.log(grid))  # density in log sigma
    scores = json.loads((Path(geometry["dir"]) / "risk.json").read_text())["per_image"]
    made = {"regime": figures.regime_figure(results["regime"]),
            "bands": figures.bands_figure(geometry, (grid, density)),
            "arms": figures.arms_figure(results["arms"], geometry["zone"]),
            "arms_training": figures.arms_training_figure(results["arms"]),
            "swap": figures.swap_figure(results["swap"]),
            "risk": figures.risk_figure(results["risk"], scores)}
    files = {}
    for name, fig in made.items():
        save_figure(fig, folder / f"{name}.png")
        files[name] = f"figures/{name}.png"
    return files


def _relative(study: Study, path: str | Path) -> str:
    return os.path.relpath(path, study.out)


def write_report(study: Study, results: dict, invocations: list[dict]) -> dict[str, str]:
    """Writes report.md, report.json and the figures; returns each claim's status. ``invocations``: every run of the
    study into this directory (command, wall seconds, load average at its end)."""
    s, out = study.s, study.out
    judged = verdicts(results)
    files = _figures(study, results)
    regime, geometry, arms, swap, risk = (results[k] for k in ("regime", "geometry", "arms", "swap", "risk"))
    n_star = regime["n_star"]
    lines = [
        "# calmwild study: does under-training the danger zone stop memorization?",
        "",
        f"Mode **{s['mode']}**, data **{s['dataset']}** ({geometry['dataset']['dim']} dimensions), "
        f"{s['steps']} training steps of batch {s['batch_size']} for every model, "
        f"{_channels(s['model_channels'])}, "
        f"training seeds {s['seeds']}; memorization: d1/d2 < 1/3 against the training set; {s['samples']} samples "
        f"per model (sampling seed {s['sampling_seed']}, the same noises for every model).",
        "",
        "| invocation | finished | wall clock | load average at its end (1 / 5 / 15 min) |",
        "|---|---|---|---|",
        *[f"| `{i['command']}` | {i['finished']} | {i['seconds']:.0f} s | "
          f"{' / '.join(f'{x:.2f}' for x in i['load_average'])} |" for i in invocations],
        "",
        "## Verdicts",
        "",
        "| claim | verdict | numbers |",
        "|---|---|---|",
        *[f"| {CLAIMS[v.claim]} | **{v.status}** | {v.evidence} |" for v in judged],
        "",
        "Criteria, fixed in `scripts/study/criteria.py` before any number of the study was seen:",
        "",
        *[f"- *{v.claim}*: {criteria.CRITERIA[v.claim]}" for v in judged],
        "",
        "## 1. The regime: memorization against training-set size",
        "",
        f"The baseline (full EDM schedule) at every size, seed {s['seeds'][0]}, the same step budget. N* is the size "
        f"whose rate lies in [{regime['band'][0]:.0%}, {regime['band'][1]:.0%}] nearest {regime['target']:.0%} "
        "(`study.criteria.choose_regime`; sizes between two grid points are tried by bisection in log N when the "
        "grid misses the band).",
        "",
        "| N | trajectory memorization [95% Wilson] | samples | peak per-sigma memorization |",
        "|---|---|---|---|",
        *[f"| {n} | {interval_text(stats.Interval(**r['trajectory']['interval']))} | "
          f"{r['trajectory']['num_samples']} | {pct(max(r['per_sigma']['rate']))} |"
          for n, r in regime["sizes"].items()],
        "",
        f"**N\\* = {n_star}**" + ("" if regime["in_band"] else " (no size reached the band: the nearest rate)")
        + (f"; bisection tried {', '.join(str(r['size']) for r in regime['refinements'])}"
           if regime["refinements"] else "") + ".",
        "",
        f"![regime]({files['regime']})",
        "",
        "## 2. Geometry of the N* training set (before any training)",
        "",
        f"Danger zone σ {geometry['zone'][0]:.3g}-{geometry['zone'][1]:.3g}"
        + (" (empty at the levels: the band around the curves' crossing)" if geometry["zone_empty"] else "")
        + f". Gap band = the zone widened by the paper's buffer, a factor {geometry['margin']:.3f} in σ "
        f"(`calmwild.geometry.zone.paper_buffer_margin`: CelebA's gap [100, 350] around its zone [125, 325] in DDPM "
        f"timesteps): σ {geometry['gap_band'][0]:.3g}-{geometry['gap_band'][1]:.3g}, removing "
        f"{geometry['gap_mass']:.1%} of the training noise distribution ({geometry['base']['class']}).",
        "",
        "| placebo | σ band | mass removed | of the gap's mass |",
        "|---|---|---|---|",
        *[f"| {side} | {p['sigma'][0]:.3g}-{p['sigma'][1]:.3g} | {p['mass']:.1%} | "
          f"{p['mass'] / p['target_mass']:.0%}{' (capped: all the mass on that side)' if p['capped'] else ''} |"
          for side, p in geometry["placebos"].items()],
        "",
        "Remark 4.3, Theorem 4.2's thresholds against the max-weight curve:",
        "",
        "| level | max weight crosses it at σ | median threshold σ | ratio |",
        "|---|---|---|---|",
        *[f"| w = {geometry['remark_4_3']['levels'][k]:g} | {_num(geometry['remark_4_3']['curve_sigma'][k])} | "
          f"{_num(geometry['remark_4_3']['threshold_sigma'][k])} | {_num(geometry['remark_4_3']['ratio'][k])} |"
          for k in ("high_weight", "low_weight")],
        "",
        f"![bands]({files['bands']}) ![geometry]({_relative(study, Path(geometry['dir']) / 'geometry.png')})",
        "",
        "## 3. The arms at N* (the paper's Section 5 table, with a placebo)",
        "",
        f"Every arm trained with seeds {s['seeds']}; memorized rate per model with its 95% Wilson interval over "
        f"{s['samples']} samples, per arm the mean with its 95% t interval over seeds. Frechet distance "
        f"({arms['baseline']['models'][0]['quality']['feature_extractor']} features, {s['samples']} samples against "
        f"{arms['baseline']['models'][0]['quality']['num_reference']} held-out images)"
        + (": a consistency check between rows, not FID." if s["fid_feature"] == "random" else "."),
        "",
        "| arm | training noise levels | memorized, mean [95% CI over seeds] | per seed | Frechet distance | KID |",
        "|---|---|---|---|---|---|",
        *[_arm_row(arm, entry) for arm, entry in arms.items()],
        "",
        f"![arms]({files['arms']})",
        "",
        f"![arms during training]({files['arms_training']})",
        "",
        f"Samples of the N* baseline (seed {s['seeds'][0]}) beside their nearest training images: "
        f"![nearest]({_relative(study, Path(arms['baseline']['models'][0]['evaluation_dir']) / 'nearest_pairs.png')})",
        "",
        "## 4. Denoiser swaps (paper Table 1), both directions",
        "",
        f"{swap['memorizing']} (memorizing) and {swap['generalizing']} (generalizing); inside a band the other model "
        f"denoises. {len(swap['blocks'])} blocks of {swap['samples_per_block']} noises (seeds {swap['blocks']}), the "
        f"same noises in every cell; memorization against {swap['memorized_against']}. Rates with 95% Wilson "
        "intervals over all noises; per block in brackets.",
        "",
        "| base | no swap | " + " | ".join(f"steps {b}" for b in STEP_BANDS) + " | "
        + " | ".join(f"data {b}" for b in ZONE_BANDS) + " |",
        "|---|---|" + "---|" * (len(STEP_BANDS) + len(ZONE_BANDS)),
        *[f"| {base} | " + " | ".join(_swap_cell(swap["table"][base][cell]) for cell in swap["table"][base]) + " |"
          for base in swap["table"]],
        "",
        "Bands (σ): " + "; ".join(f"steps {b} {_bands_text(v)}" for b, v in swap["bands"]["steps"].items()) + "; "
        + "; ".join(f"data {b} {_bands_text(v)}" for b, v in swap["bands"]["zone"].items()) + ".",
        "",
        f"![swap]({files['swap']})",
        "",
        "## 5. Which images are memorized (seed 002)",
        "",
        f"Reproduction counts pooled over the {risk['num_models']} N* baseline models: {risk['memorized_samples']} "
        f"memorized samples over {risk['num_train']} images, {risk['reproduced_at_all']} reproduced at all, "
        f"{risk['over_reproduced']} more often than the uniform share. Scores from `calmwild analyze` (data only).",
        "",
        "| score | AUROC for over-reproduced [DeLong 95%] | Spearman with the count |",
        "|---|---|---|",
        *[f"| {name}{' (primary)' if name == risk['primary'] else ''} | "
          f"{'n/a' if v['auroc'] is None else interval_text(stats.Interval(**v['auroc']), False)} | "
          f"{_num(v['spearman'])} |" for name, v in risk["scores"].items()],
        "",
        f"Null standard deviation of Spearman's rho: {risk['spearman_null_std']:.3g}.",
        "",
        f"![risk]({files['risk']}) ![at risk]({_relative(study, risk['risk_figure'])})",
        "",
        "## Timings",
        "",
        "| unit | seconds | this invocation |",
        "|---|---|---|",
        *[f"| {name} | {sec:.1f} | {study.ledger.status[name]} |" for name, sec in study.ledger.seconds.items()],
        "",
        "## Commands",
        "",
        "Every calmwild command of the study, by unit (the fit configs are in `configs/`):",
        "",
        "```",
        *[line for name, cmds in study.ledger.commands.items() for line in (f"# {name}", *cmds)],
        "```",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    write_json({"settings": s, "invocations": invocations, "verdicts": [v.to_dict() for v in judged],
                "results": results, "figures": files,
                "timings": {name: {"seconds": sec, "status": study.ledger.status[name]}
                            for name, sec in study.ledger.seconds.items()}}, out / "report.json")
    return {v.claim: v.status for v in judged}


def _channels(channels: int | None) -> str:
    return "the template's network" if channels is None else f"a U-Net of {channels} base channels"


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _bands_text(bands: list[list[float]]) -> str:
    return ", ".join(f"{lo:.3g}-{'∞' if hi >= 1e8 else f'{hi:.3g}'}" for lo, hi in bands)


def _swap_cell(cell: dict) -> str:
    flags = cell["memorized"]
    iv = stats.wilson_interval(sum(flags), len(flags))
    return f"{interval_text(iv)} ({', '.join(pct(r) for r in cell['per_block'])})"


def _arm_row(arm: str, entry: dict) -> str:
    rates = arm_rates(entry)
    per_seed = ", ".join(f"{pct(m['trajectory']['rate'])}" for m in entry["models"])
    fds = [m["quality"]["fid"] for m in entry["models"]]
    kids = [m["quality"]["kid"] for m in entry["models"] if m["quality"]["kid"] is not None]
    return (f"| {arm} | {_sampler_text(entry['sampler'], arm)} | {interval_text(stats.rate_mean_interval(rates))} | "
            f"{per_seed} | {_mean_sd(fds)} | {_mean_sd(kids) if kids else 'n/a'} |")
