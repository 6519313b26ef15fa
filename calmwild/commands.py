"""The analysis sub-commands of ``calmwild``: ``sample``, ``swap``, ``evaluate``, ``analyze``, and the file
commands ``import-edm`` and ``convert``.

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

from calmwild.data import InMemoryImageDataModule
from calmwild.denoisers import (
    SWAP_PRESETS,
    Denoiser,
    EmpiricalDenoiser,
    GaussianDenoiser,
    SwapDenoiser,
    check_compatible,
    load_denoiser,
)
from calmwild.images import image_grid, pair_grid, save_png
from calmwild.memorization import check_threshold, trajectory_memorization
from calmwild.outputs import check_output_dir, prepare_output_dir, write_json
from calmwild.sampling import generate

CLOSED_FORM_DENOISERS = ("empirical", "gaussian")


def load_datamodule(spec: str) -> InMemoryImageDataModule:
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
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(InMemoryImageDataModule, "data", required=True)
    cfg = parser.parse_object({"data": section})
    datamodule = parser.instantiate(cfg).data
    datamodule.setup("fit")
    return datamodule


def resolve_denoiser(spec: str, datamodule: InMemoryImageDataModule | None, device: str,
                     precision: str = "fp32") -> Denoiser:
    """A checkpoint path (its network run in ``precision``), or ``empirical`` / ``gaussian`` built from the
    datamodule's training set."""
    if spec in CLOSED_FORM_DENOISERS:
        if datamodule is None:
            raise ValueError(f"the {spec!r} denoiser is built from a training set: pass --data")
        if precision != "fp32":
            raise ValueError(f"--precision {precision} applies to network checkpoints; the {spec!r} denoiser "
                             "computes in float32 / float64")
        train = datamodule.train_images.to(device)
        return EmpiricalDenoiser(train) if spec == "empirical" else GaussianDenoiser.fit(train)
    return load_denoiser(spec, device=device, precision=precision)


def _image_shape(denoiser: Denoiser, datamodule: InMemoryImageDataModule | None) -> tuple[int, int, int]:
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


def _sample_and_report(
    denoiser: Denoiser,
    shape: tuple[int, int, int],
    datamodule: InMemoryImageDataModule | None,
    out: Path,
    settings: dict,
    num: int,
    batch_size: int,
    seed: int,
    steps: int,
    solver: str,
    s_churn: float,
    device: str,
    threshold: float,
) -> dict:
    """Generates, writes samples (tensor + grid) and, with data, the trajectory memorization (ratio test)."""
    start = time.perf_counter()
    samples = generate(
        denoiser, num, shape, seed=seed, batch_size=batch_size, device=device, num_steps=steps, solver=solver,
        s_churn=s_churn,
    )
    report: dict[str, Any] = {**settings, "num_samples": num, "image_shape": list(shape),
                              "sampling_seconds": time.perf_counter() - start}
    torch.save(samples, out / "samples.pt")
    save_png(image_grid(samples[:256]), out / "samples.png")
    report["files"] = {"samples": "samples.pt", "grid": "samples.png"}
    if datamodule is not None:
        train = datamodule.train_images
        traj = trajectory_memorization(samples, train, threshold=threshold)
        result = traj.result
        report["memorization"] = {
            "threshold": threshold,
            "rate": traj.rate,
            "stderr": traj.stderr,
            "num_memorized": int(result.memorized.sum()),
            "train_size": int(train.shape[0]),
        }
        shown = slice(0, min(num, 64))
        save_png(pair_grid(samples[shown], train[result.nearest_index[shown]], result.memorized[shown]),
                 out / "nearest_pairs.png")
        report["files"]["nearest_pairs"] = "nearest_pairs.png"
        write_json({"ratio": result.ratio, "nearest_index": result.nearest_index, "memorized": result.memorized},
                   out / "per_sample.json")
        report["files"]["per_sample"] = "per_sample.json"
    return report


def sample(
    *,
    out: Path,
    ckpt: str = "empirical",
    data: str | None = None,
    num: int = 64,
    batch_size: int = 256,
    seed: int = 0,
    steps: int = 18,
    solver: Literal["heun", "euler"] = "heun",
    s_churn: float = 0.0,
    device: str = "cpu",
    precision: Literal["fp32", "bf16"] = "fp32",
    threshold: float = 1 / 3,
    overwrite: bool = False,
) -> dict:
    """Generate samples with EDM's sampler from a checkpoint or a closed-form denoiser.

    Writes samples.pt, samples.png and sample.json into ``out``; with ``--data``, also the trajectory
    memorization rate (d1/d2 < threshold against the training set) and a grid of samples beside their nearest
    training images.

    Args:
        out: output directory (must be new or empty unless --overwrite).
        ckpt: checkpoint path, or ``empirical`` / ``gaussian``.
        data: data spec (fit config, class_path YAML, or class path); needed for closed-form denoisers.
        num: number of samples.
        batch_size: samples per sampler batch.
        seed: sample i starts from noise seeded with seed + i.
        steps: sampler steps (EDM default 18).
        solver: heun (2nd order, 2 evaluations per step) or euler.
        s_churn: EDM stochasticity (0 = deterministic ODE).
        device: torch device, e.g. cpu or cuda.
        precision: network arithmetic: fp32, or bf16 autocast (faster on GPUs; see the README's performance
            section for its effect on per-sigma MSE). Closed-form denoisers accept fp32 only.
        threshold: ratio-test threshold in (0, 1).
        overwrite: allow writing into a non-empty directory.
    """
    check_threshold(threshold)
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data) if data else None
    denoiser = resolve_denoiser(ckpt, datamodule, device, precision)
    shape = _image_shape(denoiser, datamodule)
    out = prepare_output_dir(out, overwrite)
    settings = {"command": "sample", "denoiser": ckpt, "data": data, "seed": seed, "steps": steps,
                "solver": solver, "s_churn": s_churn, "device": device, "precision": precision}
    report = _sample_and_report(denoiser, shape, datamodule, out, settings, num, batch_size, seed, steps, solver, s_churn,
                                device, threshold)
    write_json(report, out / "sample.json")
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
    batch_size: int = 256,
    seed: int = 0,
    steps: int = 18,
    solver: Literal["heun", "euler"] = "heun",
    s_churn: float = 0.0,
    device: str = "cpu",
    precision: Literal["fp32", "bf16"] = "fp32",
    threshold: float = 1 / 3,
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
        batch_size: samples per sampler batch.
        seed: sample i starts from noise seeded with seed + i.
        steps: sampler steps.
        solver: heun or euler.
        s_churn: EDM stochasticity.
        device: torch device.
        precision: network arithmetic: fp32, or bf16 autocast (faster on GPUs; see the README's performance
            section for its effect on per-sigma MSE). A closed-form side always runs in float32 / float64.
        threshold: ratio-test threshold in (0, 1).
        overwrite: allow writing into a non-empty directory.
    """
    if sigma_bands is None and band is None:
        raise ValueError(f"give --band (one of {sorted(SWAP_PRESETS)}) or --sigma_bands")
    check_threshold(threshold)
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data) if data else None
    # --precision applies to the checkpoint side(s); a closed-form side computes in float32 / float64 as always
    base_d, other_d = (
        resolve_denoiser(spec, datamodule, device, "fp32" if spec in CLOSED_FORM_DENOISERS else precision)
        for spec in (base, other)
    )
    check_compatible(base_d, other_d)
    hybrid = SwapDenoiser(base_d, other_d, sigma_bands if sigma_bands is not None else band)
    shape = _image_shape(hybrid, datamodule)
    out = prepare_output_dir(out, overwrite)
    settings = {"command": "swap", "base": base, "other": other, "band": None if sigma_bands else band,
                "sigma_bands": hybrid.bands, "data": data, "seed": seed, "steps": steps, "solver": solver,
                "s_churn": s_churn, "device": device, "precision": precision}
    report = _sample_and_report(hybrid, shape, datamodule, out, settings, num, batch_size, seed, steps, solver, s_churn,
                                device, threshold)
    write_json(report, out / "swap.json")
    return report


def analyze(
    *,
    data: str,
    out: Path,
    sigmas: list[float] | None = None,
    num_points: int = 100,
    num_noises: int = 100,
    num_queries: int = 500,
    num_coverage_noises: int = 20,
    num_pairs: int = 10_000,
    num_threshold_points: int = 20,
    t: float = 5.0,
    eps: float = 0.05,
    delta: float = 0.05,
    weight_level: float = 0.5,
    coverage_level: float = 0.5,
    risk: bool = True,
    risk_k: int = 5,
    risk_noises: int = 16,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Geometry of a training set before any training (paper Section 4): posterior-weight and shell-coverage curves,
    Theorem 4.8 bounds, Theorem 4.2 thresholds and the danger zone, in sigma and DDPM timesteps.

    Writes geometry.json and geometry.png (the paper's Figure 3 layout) into ``out``, and with ``risk`` the
    per-training-image memorization risk scores (seed 002, local coverage) as risk.json and risk.png (the most and
    least at-risk training images).

    Args:
        data: data spec (fit config, class_path YAML, or class path).
        out: output directory (must be new or empty unless --overwrite).
        sigmas: sigma grid (default: EDM's 40-level schedule).
        num_points: training base points of the weight curves.
        num_noises: noises per base point.
        num_queries: held-out points of the coverage curve.
        num_coverage_noises: noises per held-out point.
        num_pairs: data pairs for the Theorem 4.8 upper bound.
        num_threshold_points: training points for the Theorem 4.2 thresholds.
        t: Lemma 4.5 shell parameter (5 gives probability >= 0.9865).
        eps: posterior-weight level of Theorem 4.2.
        delta: failure probability of Theorem 4.2.
        weight_level: max-weight level of the danger zone.
        coverage_level: coverage level of the danger zone.
        risk: also score every training image's memorization risk (exact leave-one-out kNN over the training
            set: N^2 distances).
        risk_k: neighbours of the k-NN distance score.
        risk_noises: Monte Carlo noises per image of the expected self-weight score.
        seed: Monte Carlo seed.
        device: torch device.
        overwrite: allow writing into a non-empty directory.
    """
    from calmwild.analysis import analyze_geometry, write_geometry_report, write_risk_report

    for name, value in (("risk_k", risk_k), ("risk_noises", risk_noises)):
        if risk and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data)
    out = prepare_output_dir(out, overwrite)
    report = analyze_geometry(
        datamodule.train_images, datamodule.heldout_images, sigmas=sigmas, num_points=num_points,
        num_noises=num_noises, num_queries=num_queries, num_coverage_noises=num_coverage_noises,
        num_pairs=num_pairs, num_threshold_points=num_threshold_points, t=t, eps=eps, delta=delta,
        weight_level=weight_level, coverage_level=coverage_level, seed=seed, device=device,
    )
    report["data"] = datamodule.describe()
    if risk:
        report["risk"] = write_risk_report(datamodule.train_images, report["danger_zone"], out, k=risk_k,
                                           num_noises=risk_noises, seed=seed, device=device)
    write_geometry_report(report, out, overwrite=True)
    zone = report["danger_zone"]
    band = "empty" if zone["empty"] else (
        f"sigma {zone['sigma'][0]:.3g}..{zone['sigma'][1]:.3g} (DDPM t {zone['timesteps'][0]:.0f}..{zone['timesteps'][1]:.0f})"
    )
    files = "geometry.json, geometry.png" + (", risk.json, risk.png" if risk else "")
    print(f"calmwild analyze: danger zone {band}; report in {out} ({files})", flush=True)
    return report


def evaluate(
    *,
    ckpt: str,
    data: str,
    out: Path,
    sigmas: list[float] | None = None,
    num_images: int = 256,
    num_noises: int = 1,
    num_samples: int = 256,
    threshold: float = 1 / 3,
    fid_feature: Literal["random", "inception"] = "inception",
    fid_weights_path: str | None = None,
    fid_reference: Literal["train", "heldout"] = "train",
    fid_cache_dir: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    steps: int = 18,
    solver: Literal["heun", "euler"] = "heun",
    device: str = "cpu",
    precision: Literal["fp32", "bf16"] = "fp32",
    overwrite: bool = False,
) -> dict:
    """Every metric once for one denoiser: per-sigma MSE (train and held-out, eq. 5), per-sigma memorization,
    trajectory memorization of generated samples and FID (with its sample count and feature extractor).

    Writes evaluation.json and plots into ``out``.

    Args:
        ckpt: checkpoint path, or ``empirical`` / ``gaussian``.
        data: data spec (fit config, class_path YAML, or class path).
        out: output directory (must be new or empty unless --overwrite).
        sigmas: noise levels of the per-sigma curves (default: EDM's 18-step schedule).
        num_images: training / held-out images per sigma.
        num_noises: noises per image.
        num_samples: generated samples for trajectory memorization and FID.
        threshold: ratio-test threshold in (0, 1).
        fid_feature: ``inception`` (InceptionV3, needs its weights file) or ``random`` (random conv features, not
            comparable with published FID).
        fid_weights_path: local InceptionV3 weights file.
        fid_reference: reference set of the FID.
        fid_cache_dir: where reference statistics are cached.
        seed: seed of noises and samples.
        batch_size: batch size of all evaluations.
        steps: sampler steps.
        solver: heun or euler.
        device: torch device.
        precision: network arithmetic: fp32, or bf16 autocast (faster on GPUs; see the README's performance
            section for its effect on per-sigma MSE). Closed-form denoisers accept fp32 only.
        overwrite: allow writing into a non-empty directory.
    """
    from calmwild.evaluation import evaluate_denoiser

    check_threshold(threshold)
    check_output_dir(out, overwrite)
    datamodule = load_datamodule(data)
    denoiser = resolve_denoiser(ckpt, datamodule, device, precision)
    _image_shape(denoiser, datamodule)
    out = prepare_output_dir(out, overwrite)
    report = evaluate_denoiser(
        denoiser, datamodule.train_images, datamodule.heldout_images, out, sigmas=sigmas, num_images=num_images,
        num_noises=num_noises, num_samples=num_samples, threshold=threshold, fid_feature=fid_feature,
        fid_weights_path=fid_weights_path, fid_reference=fid_reference, fid_cache_dir=fid_cache_dir, seed=seed,
        batch_size=batch_size, device=device, steps=steps, solver=solver,
    )
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


COMMANDS = {"sample": sample, "swap": swap, "analyze": analyze, "evaluate": evaluate, "import-edm": import_edm,
            "convert": convert}
