"""The analysis sub-commands of ``calmwild``: ``sample``, ``swap``, ``early-detect``, ``evaluate``, ``analyze``, and the
file commands ``import-edm`` and ``convert``.

Each is a typed function; jsonargparse turns its signature and docstring into the command line (``--config``
and ``--print_config`` included). Each writes into a fresh output directory: the tensors, PNG grids, and one JSON
file with the settings and results (stable keys).

Denoiser specs (``--ckpt``, ``--base``, ``--other``): a calmwild checkpoint path (its EMA weights are used),
``empirical`` (the empirical optimal denoiser of the training set, eqs. 2-3) or ``gaussian`` (the Gaussian-linear
denoiser fitted to the training set, eq. 7); the last two need ``--data``.

Data specs (``--data``): a fit config (its ``data:`` section is used), a YAML file holding ``class_path`` and
``init_args``, or a bare class path such as ``calmwild.data.DigitsDataModule`` (default arguments).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import ArgumentParser

from calmwild.denoisers import (
    SWAP_PRESETS,
    Denoiser,
    EmpiricalDenoiser,
    GaussianDenoiser,
    SwapDenoiser,
    check_compatible,
    load_denoiser,
)
from calmwild.checks import check_count, check_threshold
from calmwild.io import (atomic_write, check_output_dir, prepare_output_dir, read_json, save_figure,
                         save_png, write_json)
from calmwild.memorization.ratio import RATIO_THRESHOLD, trajectory_memorization
from calmwild.memorization.report import nearest_pairs_grid
from calmwild.settings import (EarlyRejectionSettings, FIDSettings, GeometrySettings, PerSigmaSettings,
                               SamplingSettings)
from calmwild.sampling import generate
from calmwild.stats import wilson_interval

CLOSED_FORM_DENOISERS = ("empirical", "gaussian")
DEFAULT_DETECTION_SEEDS = (0, 100_000, 200_000)

# A calmwild.data.InMemoryImageDataModule. Not imported here: the datamodules load Lightning (seconds), which only
# the commands that read data need, and jsonargparse would import a TYPE_CHECKING block to resolve annotations.
DataModule = Any


def load_datamodule(spec: str) -> DataModule:
    """Builds and sets up the datamodule named by ``spec`` (see the module docstring)."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"--data {spec}: no such file")
        content = yaml.safe_load(path.read_text()) or {}
        section = content.get("data", content) if isinstance(content, dict) else None
        if isinstance(section, str):  # a fit config that includes its data section by path
            section = yaml.safe_load((path.parent / section).read_text())
        if not isinstance(section, dict) or "class_path" not in section:
            raise ValueError(f"--data {spec}: expected a fit config with a data section, or class_path/init_args")
    else:
        section = {"class_path": spec}
    from calmwild.data import InMemoryImageDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(InMemoryImageDataModule, "data", required=True)
    cfg = parser.parse_object({"data": section})
    datamodule = parser.instantiate(cfg).data
    datamodule.setup("fit")
    return datamodule


def resolve_denoiser(spec: str, datamodule: DataModule | None, device: str,
                     precision: str = "fp32") -> Denoiser:
    """A checkpoint path (its network run in ``precision``; a run directory, or a directory of runs, stands for its
    newest run's ``last.ckpt``), or ``empirical`` / ``gaussian`` built from the datamodule's training set."""
    if spec in CLOSED_FORM_DENOISERS:
        if datamodule is None:
            raise ValueError(f"the {spec!r} denoiser is built from a training set: pass --data")
        if precision != "fp32":
            raise ValueError(f"--sampling.precision {precision} applies to network checkpoints; the {spec!r} denoiser "
                             "computes in float32 / float64")
        train = datamodule.train_images.to(device)
        return EmpiricalDenoiser(train) if spec == "empirical" else GaussianDenoiser.fit(train)
    if Path(spec).is_dir():
        from calmwild.runs import run_checkpoint

        spec = str(run_checkpoint(Path(spec)))
    return load_denoiser(spec, device=device, precision=precision)


def _image_shape(denoiser: Denoiser, datamodule: DataModule | None) -> tuple[int, int, int]:
    shape = getattr(denoiser, "image_shape", None)
    if shape is None and datamodule is not None:
        shape = datamodule.image_shape
    if shape is None:
        raise ValueError("cannot tell the image shape: give a checkpoint or --data")
    if datamodule is not None and tuple(datamodule.image_shape) != tuple(shape):
        raise ValueError(
            f"the denoiser works on images of shape {tuple(shape)} but the data has shape "
            f"{tuple(datamodule.image_shape)}"
        )
    return tuple(int(s) for s in shape)


def _check_rejection(reject_memorized_early: bool, data: str | None) -> None:
    if reject_memorized_early and not data:
        raise ValueError("--reject_memorized_early needs --data: the training set scores and labels trajectories")


def _draw_samples(denoiser: Denoiser, shape: tuple[int, int, int], num: int, sampling: SamplingSettings,
                  datamodule: DataModule | None, device: str, threshold: float, reject_memorized_early: bool,
                  early_rejection: EarlyRejectionSettings) -> tuple[torch.Tensor, float, dict]:
    """``num`` samples, plainly or with early rejection (calmwild.memorization.early_filter); returns them, the
    seconds taken and the report's extra sections."""
    start = time.perf_counter()
    if not reject_memorized_early:
        samples = generate(denoiser, num, shape, device=device, **sampling.generate_kwargs())
        return samples, time.perf_counter() - start, {}
    from calmwild.memorization.early_filter import sample_rejecting_early

    filtered, rejection = sample_rejecting_early(denoiser, datamodule.train_images, num, shape, sampling,
                                                 early_rejection, threshold, device)
    extra = {"early_rejection": {**rejection, "accepted_indices": filtered.accepted}}
    return filtered.samples, time.perf_counter() - start, extra


def _report_samples(drawn: tuple[torch.Tensor, float, dict], shape: tuple[int, int, int],
                    datamodule: DataModule | None, out: Path, settings: dict, threshold: float) -> dict:
    """Writes the samples of :func:`_draw_samples` (tensor + grid) and, with data, their trajectory memorization
    (ratio test) with its Wilson interval."""
    from calmwild.grids import render, samples_figure

    samples, seconds, extra = drawn
    num = int(samples.shape[0])
    report: dict[str, Any] = {**settings, "num_samples": num, "image_shape": list(shape), "sampling_seconds": seconds,
                              **extra}
    atomic_write(out / "samples.pt", lambda handle: torch.save(samples, handle))
    save_png(render(samples_figure(samples, f"calmwild {settings['command']}: samples (seed {settings['seed']})")),
             out / "samples.png")
    report["files"] = {"samples": "samples.pt", "grid": "samples.png"}
    if datamodule is not None and num > 0:
        train = datamodule.train_images
        traj = trajectory_memorization(samples, train, threshold=threshold)
        result = traj.result
        memorized = int(result.memorized.sum())
        report["memorization"] = {
            "threshold": threshold,
            "rate": traj.rate,
            "stderr": traj.stderr,
            "interval": wilson_interval(memorized, num).as_dict(),
            "num_memorized": memorized,
            "train_size": int(train.shape[0]),
        }
        save_png(nearest_pairs_grid(samples, train, result, f"calmwild {settings['command']}: samples against the "
                                    f"{train.shape[0]} training images"), out / "nearest_pairs.png")
        report["files"]["nearest_pairs"] = "nearest_pairs.png"
        write_json({"ratio": result.ratio, "nearest_index": result.nearest_index, "memorized": result.memorized},
                   out / "per_sample.json")
        report["files"]["per_sample"] = "per_sample.json"
    return report


def _rate_text(memorized: int, num: int) -> str:
    interval = wilson_interval(memorized, num)
    return (f"trajectory memorization {100 * interval.estimate:.1f}% [95% {100 * interval.low:.1f}, "
            f"{100 * interval.high:.1f}] of {num} samples")


def _samples_summary(report: dict, out: Path, name: str) -> str:
    """What ``sample`` / ``swap`` did, in a few lines: the samples, their memorization, the early rejections."""
    files = ", ".join([*report["files"].values(), name])
    lines = [f"calmwild {report['command']}: {report['num_samples']} samples in {out} ({files})"]
    if "memorization" in report:
        lines.append(f"  {_rate_text(report['memorization']['num_memorized'], report['num_samples'])}")
    if "early_rejection" in report:
        rejection = report["early_rejection"]
        cost = rejection["evaluations"]
        lines.append(f"  rejected early: {rejection['num_rejected']} of {rejection['num_attempted']} trajectories at "
                     f"step {rejection['rule']['step']} ({rejection['rule']['score']}); {cost['filtered_generation']} "
                     f"denoiser evaluations (+{cost['calibration']} to calibrate) against "
                     f"{cost['plain_generation_of_attempted']} for running them all to the end")
    return "\n".join(lines)


def resolve_swap(base: str, other: str, band: str | None, sigma_bands: list[tuple[float, float]] | None,
                 datamodule: DataModule | None, device: str, precision: str = "fp32") -> SwapDenoiser:
    """``other`` inside the sigma bands (or the named preset), ``base`` elsewhere; each side resolved by
    :func:`resolve_denoiser` (``precision`` applies to checkpoint sides)."""
    if sigma_bands is None and band is None:
        raise ValueError(f"give --band (one of {sorted(SWAP_PRESETS)}) or --sigma_bands")
    base_d, other_d = (resolve_denoiser(spec, datamodule, device, "fp32" if spec in CLOSED_FORM_DENOISERS else
                                        precision) for spec in (base, other))
    check_compatible(base_d, other_d)
    return SwapDenoiser(base_d, other_d, sigma_bands if sigma_bands is not None else band)


def sample(
    *,
    out: Path,
    ckpt: str = "empirical",
    data: str | None = None,
    num: int = 64,
    sampling: SamplingSettings = SamplingSettings(),
    threshold: float = RATIO_THRESHOLD,
    reject_memorized_early: bool = False,
    early_rejection: EarlyRejectionSettings = EarlyRejectionSettings(),
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Generate samples with EDM's sampler from a checkpoint or a closed-form denoiser.

    Writes samples.pt, samples.png and sample.json into ``out``; with ``--data``, also the trajectory
    memorization rate (d1/d2 < threshold against the training set) and a grid of samples beside their nearest
    training images. With ``--reject_memorized_early true`` (needs ``--data``) each trajectory whose early score
    passes a threshold calibrated on held-out trajectories for a stated false-negative rate is stopped at that step
    and replaced by a new seed; sample.json's ``early_rejection`` reports the rule, the calibration, the rejections
    and the evaluations spent (calmwild.memorization.early_filter).

    Args:
        out: output directory (must be new or empty unless --overwrite).
        ckpt: checkpoint path (.ckpt or .safetensors; a run directory: its last.ckpt), or ``empirical`` /
            ``gaussian``.
        data: data spec (fit config, class_path YAML, or class path); needed for closed-form denoisers.
        num: number of samples.
        sampling: the sampler: steps, solver, s_churn, seed (sample i starts from noise seed + i), batch size,
            network precision (fp32, or bf16 autocast; closed-form denoisers compute in fp32/fp64).
        threshold: ratio-test threshold in (0, 1).
        reject_memorized_early: stop and regenerate trajectories whose early score passes the calibrated threshold.
        early_rejection: the score, step, false-negative rate and calibration of that filter.
        device: torch device, e.g. cpu or cuda.
        overwrite: allow writing into a non-empty directory.
    """
    check_count(num, "num")
    check_threshold(threshold)
    _check_rejection(reject_memorized_early, data)
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data) if data else None
    denoiser = resolve_denoiser(ckpt, datamodule, device, sampling.precision)
    shape = _image_shape(denoiser, datamodule)
    out = prepare_output_dir(out, overwrite)
    settings = {"command": "sample", "denoiser": ckpt, "data": data, "device": device, **sampling.to_dict()}
    drawn = _draw_samples(denoiser, shape, num, sampling, datamodule, device, threshold, reject_memorized_early,
                          early_rejection)
    report = _report_samples(drawn, shape, datamodule, out, settings, threshold)
    write_json(report, out / "sample.json")
    print(_samples_summary(report, out, "sample.json"), flush=True)
    return report


def swap(
    *,
    out: Path,
    base: str,
    other: str,
    band: Literal["large", "medium", "small"] | None = "medium",
    sigma_bands: list[tuple[float, float]] | None = None,
    data: str | None = None,
    num: int = 64,
    sampling: SamplingSettings = SamplingSettings(),
    threshold: float = RATIO_THRESHOLD,
    reject_memorized_early: bool = False,
    early_rejection: EarlyRejectionSettings = EarlyRejectionSettings(),
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Sample with a hybrid denoiser: ``other`` inside the band(s), ``base`` elsewhere (paper Table 1).

    ``band`` names one of the paper's regions of EDM's 18-step schedule (1-based steps: large 1-6, medium 7-13,
    small 14-18); ``sigma_bands`` gives explicit [low, high] sigma bands instead. With ``--data`` the trajectory
    memorization rate is reported. Writes samples.pt, samples.png, swap.json.

    Args:
        out: output directory (must be new or empty unless --overwrite).
        base: denoiser used outside the bands (checkpoint path, empirical or gaussian).
        other: denoiser used inside the bands.
        band: preset region (ignored when sigma_bands is given).
        sigma_bands: explicit sigma bands [[low, high], ...].
        data: data spec (see calmwild.commands); enables the memorization rate.
        num: number of samples.
        sampling: the sampler (see ``sample``); its precision applies to the checkpoint side(s), a closed-form side
            always computes in float32 / float64.
        threshold: ratio-test threshold in (0, 1).
        reject_memorized_early: stop and regenerate trajectories whose early score passes the calibrated threshold
            (see ``sample``).
        early_rejection: the score, step, false-negative rate and calibration of that filter.
        device: torch device.
        overwrite: allow writing into a non-empty directory.
    """
    check_count(num, "num")
    check_threshold(threshold)
    _check_rejection(reject_memorized_early, data)
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data) if data else None
    hybrid = resolve_swap(base, other, band, sigma_bands, datamodule, device, sampling.precision)
    shape = _image_shape(hybrid, datamodule)
    out = prepare_output_dir(out, overwrite)
    settings = {"command": "swap", "base": base, "other": other, "band": None if sigma_bands else band,
                "sigma_bands": hybrid.bands, "data": data, "device": device, **sampling.to_dict()}
    drawn = _draw_samples(hybrid, shape, num, sampling, datamodule, device, threshold, reject_memorized_early,
                          early_rejection)
    report = _report_samples(drawn, shape, datamodule, out, settings, threshold)
    write_json(report, out / "swap.json")
    print(_samples_summary(report, out, "swap.json"), flush=True)
    return report


def early_detect(
    *,
    out: Path,
    data: str,
    ckpt: str = "empirical",
    other: str | None = None,
    band: Literal["large", "medium", "small"] | None = "medium",
    sigma_bands: list[tuple[float, float]] | None = None,
    num: int = 128,
    seeds: list[int] | None = None,
    sampling: SamplingSettings = SamplingSettings(),
    threshold: float = RATIO_THRESHOLD,
    level: float = 0.9,
    zone: Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """How early along the sampling trajectory memorization can be predicted (seed 004; calmwild.memorization.early).

    Runs ``num`` trajectories per seed of the denoiser, labels each by the ratio test of its final sample, and
    reports for every step the AUROC (with DeLong's interval) of four early scores -- schedule deviation, the denoised
    estimate's distance and d1/d2 to the training set, the empirical posterior's max weight at the state -- with the
    earliest step at which the AUROC reaches ``level``, the evaluations that stopping there saves, and where that
    step lies relative to the danger zone. Writes early_detection.json and early_detection.png.

    Args:
        out: output directory (must be new or empty unless --overwrite).
        data: data spec (fit config, class_path YAML, or class path): the training set of the labels and scores.
        ckpt: the denoiser: checkpoint path, ``empirical`` or ``gaussian``; with ``other``, the base of a swap.
        other: swap ``other`` into ``ckpt`` inside the band(s) (see ``swap``).
        band: the swap's preset region (with ``other``; ignored when sigma_bands is given).
        sigma_bands: the swap's explicit sigma bands [[low, high], ...].
        num: trajectories per seed.
        seeds: sampling seeds (default 0, 100000, 200000; trajectory i of seed s starts from noise seed s + i, so
            the blocks must not overlap).
        sampling: steps, solver and batch size (the deterministic ODE: s_churn 0; its seed is replaced by ``seeds``).
        threshold: ratio-test threshold in (0, 1) of the final label.
        level: the AUROC a score must reach.
        zone: a ``calmwild analyze`` geometry.json whose danger zone is related to the detector (default: the danger
            zone computed from the data with calmwild.settings.GeometrySettings).
        device: torch device.
        overwrite: allow writing into a non-empty directory.
    """
    from calmwild.memorization.early import (check_deterministic, check_seeds, detection_curves,
                                             plot_detection_curves, score_trajectories)

    check_threshold(threshold)
    check_deterministic(sampling)
    seeds = check_seeds(DEFAULT_DETECTION_SEEDS if seeds is None else seeds, num)
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data)
    denoiser = (resolve_denoiser(ckpt, datamodule, device, sampling.precision) if other is None else
                resolve_swap(ckpt, other, band, sigma_bands, datamodule, device, sampling.precision))
    shape = _image_shape(denoiser, datamodule)
    band_sigma, zone_source = _danger_zone_band(zone, datamodule, device)
    out = prepare_output_dir(out, overwrite)
    start = time.perf_counter()
    runs = [score_trajectories(denoiser, datamodule.train_images, shape, range(num),
                               SamplingSettings(**{**sampling.to_dict(), "seed": seed}), threshold, device, True)
            for seed in seeds]
    scored = type(runs[0])({name: torch.cat([r.scores[name] for r in runs]) for name in runs[0].scores},
                           torch.cat([r.memorized for r in runs]), torch.cat([r.ratio for r in runs]),
                           runs[0].sigmas, torch.cat([r.samples for r in runs]))
    groups = torch.tensor([seed for seed in seeds for _ in range(num)])
    curves = detection_curves(scored, sampling.solver, level, band_sigma, groups)
    denoiser_name = ckpt if other is None else f"swap({ckpt}, {other} on {sigma_bands or band})"
    report = {"command": "early-detect", "denoiser": denoiser_name, "data": data, "device": device, "seeds": seeds,
              "num_per_seed": num, "threshold": threshold, "zone_source": zone_source, **sampling.to_dict(),
              "seconds": time.perf_counter() - start, **curves,
              "files": {"report": "early_detection.json", "plot": "early_detection.png"}}
    save_figure(plot_detection_curves(curves, denoiser_name), out / "early_detection.png")
    write_json(report, out / "early_detection.json")
    print(f"calmwild early-detect: {_detection_summary(curves)}; report in {out}", flush=True)
    return report


def _danger_zone_band(zone: Path | None, datamodule: DataModule,
                      device: str) -> tuple[tuple[float, float] | None, str]:
    """The danger zone's sigma band from a geometry.json, or computed from the data (None when empty)."""
    if zone is not None:
        content = read_json(zone, "--zone")
        entry = content.get("danger_zone") if isinstance(content, dict) else None
        if not isinstance(entry, dict) or "sigma" not in entry:
            raise ValueError(f"--zone {zone}: expected a calmwild analyze geometry.json with a danger_zone section")
        source = str(zone)
    else:
        from calmwild.geometry.report import analyze_geometry

        entry = analyze_geometry(datamodule.train_images, datamodule.heldout_images, GeometrySettings(),
                                 device=device)["danger_zone"]
        source = "computed from the data (GeometrySettings defaults)"
    return (None if entry["sigma"] is None else tuple(entry["sigma"])), source


def _detection_summary(curves: dict) -> str:
    if "scores" not in curves:
        return curves["undefined"]
    best = curves["best"]
    point = curves["scores"][best]["earliest_reliable"] or curves["scores"][best]["earliest"]
    if point is None:
        return f"no score reaches AUROC {curves['level']} (best: {best})"
    return (f"{best} reaches AUROC {point['auroc']:.3f} at step {point['step']} (sigma {point['sigma']:.3g}, "
            f"{point['zone'] or 'no zone'}), stopping there saves {100 * point['fraction_saved']:.0f}% of a run")


def analyze(
    *,
    data: str,
    out: Path,
    geometry: GeometrySettings = GeometrySettings(),
    sigmas: list[float] | None = None,
    risk: bool = True,
    risk_k: int = 5,
    risk_noises: int = 16,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Geometry of a training set before training (paper Section 4): the danger zone, and which images are at risk.

    Computes the posterior-weight and shell-coverage curves, Theorem 4.8's bounds, Theorem 4.2's thresholds and the
    danger zone (in sigma and DDPM timesteps), and writes geometry.json and geometry.png (the paper's Figure 3
    layout) into ``out``; with ``risk`` also the per-training-image memorization risk scores (seed 002, local
    coverage) as risk.json and risk.png (the most and least at-risk training images).

    Args:
        data: data spec (fit config, class_path YAML, or class path).
        out: output directory (must be new or empty unless --overwrite).
        geometry: Monte Carlo sizes, shell parameter and danger-zone levels (see calmwild.settings.GeometrySettings).
        sigmas: sigma grid (default: EDM's rho schedule with geometry.num_levels levels).
        risk: also score every training image's memorization risk (exact leave-one-out kNN over the training
            set: N^2 distances).
        risk_k: neighbours of the k-NN distance score.
        risk_noises: Monte Carlo noises per image of the expected self-weight score.
        device: torch device.
        overwrite: allow writing into a non-empty directory.
    """
    from calmwild.geometry.report import analyze_geometry, write_geometry_report, write_risk_report

    if risk:
        check_count(risk_k, "risk_k")
        check_count(risk_noises, "risk_noises")
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data)
    out = prepare_output_dir(out, overwrite)
    report = analyze_geometry(datamodule.train_images, datamodule.heldout_images, geometry, sigmas=sigmas,
                              device=device)
    report["data"] = datamodule.describe()
    if risk:
        report["risk"] = write_risk_report(datamodule.train_images, report["danger_zone"], out, k=risk_k,
                                           num_noises=risk_noises, seed=geometry.seed, device=device)
    write_geometry_report(report, out, overwrite=True)
    zone = report["danger_zone"]
    band = "empty" if zone["empty"] else (
        f"sigma {zone['sigma'][0]:.3g}..{zone['sigma'][1]:.3g} "
        f"(DDPM t {zone['timesteps'][0]:.0f}..{zone['timesteps'][1]:.0f})"
    )
    files = "geometry.json, geometry.png" + (", risk.json, risk.png" if risk else "")
    print(f"calmwild analyze: danger zone {band}; report in {out} ({files})", flush=True)
    return report


def evaluate(
    *,
    ckpt: str,
    data: str,
    out: Path,
    per_sigma: PerSigmaSettings = PerSigmaSettings(),
    num_samples: int = 256,
    sampling: SamplingSettings = SamplingSettings(),
    threshold: float = RATIO_THRESHOLD,
    fid: FIDSettings = FIDSettings(),
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Every metric once for one denoiser: per-sigma MSE and memorization, trajectory memorization and FID.

    Per-sigma MSE on training and held-out images (eq. 5), per-sigma memorization of one-step denoised held-out
    images, the trajectory memorization of generated samples, and FID with its sample count and feature extractor.
    Writes evaluation.json and plots into ``out``.

    Args:
        ckpt: checkpoint path (.ckpt or .safetensors; a run directory: its last.ckpt), or ``empirical`` /
            ``gaussian``.
        data: data spec (fit config, class_path YAML, or class path).
        out: output directory (must be new or empty unless --overwrite).
        per_sigma: the items of the per-sigma curves: noise levels (default EDM's 18-step schedule), images per
            set, noises per image, seed, batch size.
        num_samples: generated samples for trajectory memorization and FID.
        sampling: the sampler (see ``sample``); its precision is the network's arithmetic for every part.
        threshold: ratio-test threshold in (0, 1).
        fid: FID feature extractor (inception, or random: not comparable with published FID), its weights file, the
            reference set and the statistics cache (default <out>/fid_cache).
        device: torch device.
        overwrite: allow writing into a non-empty directory.
    """
    from calmwild.evaluation import evaluate_denoiser

    check_threshold(threshold)
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data)
    denoiser = resolve_denoiser(ckpt, datamodule, device, sampling.precision)
    _image_shape(denoiser, datamodule)
    out = prepare_output_dir(out, overwrite)
    report = evaluate_denoiser(denoiser, datamodule.train_images, datamodule.heldout_images, out, per_sigma,
                               sampling, num_samples, threshold, fid, device)
    mem, quality = report["per_sigma_memorization"], report["fid"]
    traj = report["trajectory_memorization"]
    lines = [f"calmwild evaluate: {_rate_text(traj['num_memorized'], traj['num_samples'])}",
             "  per-sigma memorization " + ("0 at every sigma" if mem["peak_sigma"] is None else
                                            f"peaks at {100 * mem['peak_rate']:.1f}% at sigma {mem['peak_sigma']:.3g}")]
    if quality is not None:
        lines.append(f"  Frechet distance {quality['fid']:.4g} ({quality['feature_extractor']}, "
                     f"{quality['num_samples']} samples against {quality['num_reference']} {quality['reference']} "
                     "images)")
    lines.append(f"  report in {out / 'evaluation.json'}, plots beside it")
    print("\n".join(lines), flush=True)
    return report


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite true")


def import_edm(source: Path, *, out: Path, network: str = "ema", sample_class: int | None = None,
               overwrite: bool = False) -> dict:
    """Turn an NVlabs/edm network pickle into a calmwild checkpoint without running the code it embeds.

    The pickle is a released edm-*.pkl or a training snapshot network-snapshot-*.pkl (see calmwild.interop.edm). The
    result is used like any calmwild checkpoint: ``calmwild sample --ckpt OUT``, ``swap --other OUT``,
    ``evaluate --ckpt OUT``.

    Args:
        source: the EDM pickle.
        out: the checkpoint to write: .ckpt (torch) or .safetensors.
        network: which network of the pickle ('ema', EDM's own choice for sampling).
        sample_class: class every sample is drawn from, for class-conditional networks (0..label_dim-1).
        overwrite: replace an existing ``out``.
    """
    from calmwild.interop.edm import import_edm_network

    out = Path(out)
    _refuse_existing(out, overwrite)
    meta = import_edm_network(source, out, network=network, sample_class=sample_class)
    config = meta["unet"]
    print(f"calmwild import-edm: {meta['provenance']['model']} ({meta['provenance']['precond']}) "
          f"{meta['image_shape']} with {config['model_channels']} channels x {config['channel_mult']}, "
          f"{config['num_classes']} classes -> {out}", flush=True)
    return meta


def convert(source: Path, *, out: Path, overwrite: bool = False) -> dict:
    """Copy a calmwild checkpoint's weights and metadata into another container: .ckpt <-> .safetensors.

    A .safetensors file holds no pickle at all (weights and JSON metadata), so it can be shared and sampled from; it
    carries no optimizer state, so training cannot resume from it.

    Args:
        source: a calmwild checkpoint (.ckpt or .safetensors).
        out: the file to write (.ckpt or .safetensors).
        overwrite: replace an existing ``out``.
    """
    from calmwild.checkpoints import convert_checkpoint

    out = Path(out)
    _refuse_existing(out, overwrite)
    convert_checkpoint(source, out)
    print(f"calmwild convert: {source} -> {out}", flush=True)
    return {"source": str(source), "out": str(out)}


def compare(runs: list[Path], *, out: Path, quality: str = "fid/value", overwrite: bool = False) -> dict:
    """Compare fitted runs: final and best memorization and quality, and the Pareto plot of paper Fig. 9.

    The table lists each run's final and best memorization and sample quality; the plot joins the non-dominated runs.

    Writes compare.md, compare.csv, compare.json and pareto.png into ``out``.

    Args:
        runs: run directories of ``calmwild fit`` (each with eval/*/history.json), at least one.
        out: the folder to write (created; an existing one is refused unless ``overwrite``).
        quality: the quality metric of the Pareto plot: fid/value or kid/value.
        overwrite: write into an existing ``out``.
    """
    from calmwild.compare import compare_runs, write_comparison
    from calmwild.io import prepare_output_dir

    if not runs:
        raise ValueError("compare needs at least one run directory")
    comparison = compare_runs(runs, quality=quality)
    out = prepare_output_dir(out, overwrite)
    files = write_comparison(comparison, out)
    print((out / files["markdown"]).read_text(), end="", flush=True)
    print(f"calmwild compare: {len(runs)} runs, Pareto front {len(comparison['pareto_front'])}: "
          f"{', '.join(str(out / name) for name in files.values())}", flush=True)
    return comparison


def wandb_workspace(fit_config: Path, *, entity: str | None = None, project: str | None = None,
                    name: str | None = None, save: bool = False, out: Path | None = None) -> dict:
    """Build (and with --save true, save) the W&B workspace of a fit config's evaluations.

    Panels: memorization against iterations, per-sigma heatmaps, MSE, FID / KID and sample grids, runs grouped by
    experiment family (calmwild.dashboard).

    Args:
        fit_config: the fit config (e.g. configs/cifar10_cars2k_gap.yaml).
        entity: the W&B entity (default: the logged-in user's, when saving).
        project: the W&B project (default: the config's WandbLogger project).
        name: the workspace name (default: calmwild <config stem>).
        save: save it to W&B (needs network and a login); otherwise only print / write its specification.
        out: write the specification (the JSON saving would send) to this file.
    """
    from calmwild.dashboard import build_workspace, read_fit_config, workspace_specification
    from calmwild.io import write_json

    config = Path(fit_config)
    fit_config = read_fit_config(config)
    loggers = (fit_config.get("trainer") or {}).get("logger") or []
    loggers = loggers if isinstance(loggers, list) else [loggers]
    configured = next((lg.get("init_args", {}).get("project") for lg in loggers
                       if isinstance(lg, dict) and str(lg.get("class_path", "")).endswith("WandbLogger")), None)
    project = project or configured
    if not project:
        raise ValueError(f"{config} logs to no WandbLogger project; pass --project")
    if save and not entity:
        import wandb

        entity = wandb.Api().default_entity
    workspace = build_workspace(fit_config, entity or "<entity>", project, name or f"calmwild {config.stem}")
    specification = workspace_specification(workspace)
    if out is not None:
        write_json(specification, out)
    if save:
        workspace.save()
        print(f"calmwild wandb-workspace: saved {workspace.url}", flush=True)
    else:
        sections = specification["spec"]["section"]["panelBankConfig"]["sections"]
        print(f"calmwild wandb-workspace: {len(sections)} sections for {entity or '<entity>'}/{project} (not saved; "
              f"--save true saves it){f', specification in {out}' if out else ''}", flush=True)
    return specification


COMMANDS = {"sample": sample, "swap": swap, "early-detect": early_detect, "analyze": analyze, "evaluate": evaluate,
            "import-edm": import_edm, "convert": convert, "compare": compare, "wandb-workspace": wandb_workspace}
