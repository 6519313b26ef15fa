"""Reference figures from the issue "Performance" and the targets it sets, and the ratios of a run against them.

EDM's own code (NVlabs/edm) on one H100, DDPM++ CIFAR-10 (55.7M parameters): training at batch 128 and Heun-18
sampling at batch 512, in fp32, TF32 and fp16. Matmul peaks are NVIDIA's datasheet numbers (dense, no sparsity).
Ratios are computed only for a CUDA run of the ``cifar`` configuration, where the sizes match.
"""

from __future__ import annotations

from .common import ratio

REFERENCE = {
    "edm_h100": {
        "source": "issue 'Performance': NVlabs/edm on one H100, DDPM++ CIFAR-10, 55.7M parameters",
        "training_img_per_s_batch128": {"fp32": 334.0, "tf32": 843.0, "fp16": 1036.0},
        "sampling_img_per_s_heun18_batch512": {"fp32": 15.0, "tf32": 62.0, "fp16": 86.0},
    },
    "targets": {
        "training_img_per_s_through_calmwild_fit": 2500.0,
        "lightning_overhead_percent_max": 5.0,
        "sampling_samples_per_s": 250.0,
        "knn_and_empirical_fraction_of_matmul_peak": 0.5,
        "geometry_figure3_50k_seconds_max": 10.0,
    },
    "matmul_peak_tflops_datasheet": {
        "H100 SXM": {"fp32": 67.0, "tf32": 494.7},
        "H100 PCIe": {"fp32": 51.0, "tf32": 378.0},
        "H200": {"fp32": 67.0, "tf32": 494.7},
    },
}

# Which EDM column a calmwild setting is compared with (EDM's mixed precision is fp16; calmwild's is bf16).
_TRAINING_COLUMN = {"fp32": "fp32", "tf32": "tf32"}
_SAMPLING_COLUMN = {"float64-state fp32-network (default)": "fp32", "float32-state tf32-network": "tf32",
                    "float32-state bf16-autocast": "fp16"}


def _datasheet_peak(device_name: str) -> dict | None:
    name = device_name.upper()
    if "H200" in name:
        return REFERENCE["matmul_peak_tflops_datasheet"]["H200"]
    if "H100" in name:
        return REFERENCE["matmul_peak_tflops_datasheet"]["H100 PCIe" if "PCIE" in name else "H100 SXM"]
    return None


def compare(results: dict, device_name: str) -> dict:
    """Ratios of this run's figures to the reference figures and targets (measured / reference; >= 1 meets it,
    except for the seconds target, where reference / measured is given so that >= 1 again means met)."""
    edm, targets = REFERENCE["edm_h100"], REFERENCE["targets"]
    out: dict = {}
    training = results.get("training")
    if training:
        for name, entry in training["variants"].items():
            column = _TRAINING_COLUMN.get(name, "fp16")
            measured = entry["calmwild_lightning_fit"]["img_per_s"]
            overhead = entry["lightning_overhead_percent"]
            out[f"training {name}"] = {
                f"vs_edm_{column}": ratio(measured, edm["training_img_per_s_batch128"][column]),
                "vs_target": ratio(measured, targets["training_img_per_s_through_calmwild_fit"]),
                "overhead_within_target": None if overhead is None
                else overhead <= targets["lightning_overhead_percent_max"],
            }
    sampling = results.get("sampling")
    if sampling:
        for name, entry in sampling["paths"].items():
            column = _SAMPLING_COLUMN.get(name)
            if column is None:  # a CPU-only path: EDM has no counterpart
                continue
            out[f"sampling {name}"] = {
                f"vs_edm_{column}": ratio(entry["samples_per_s"], edm["sampling_img_per_s_heun18_batch512"][column]),
                "vs_target": ratio(entry["samples_per_s"], targets["sampling_samples_per_s"]),
            }
    peak = _datasheet_peak(device_name)
    for key, field in (("knn", "calmwild_knn"), ("empirical", "calmwild_empirical_denoiser")):
        if key in results:
            tflops = results[key][field]["tflops"]
            entry = {"fraction_of_measured_torch_mm_fp32": results[key]["fraction_of_torch_mm_fp32"]}
            if peak is not None:
                entry["fraction_of_datasheet_fp32_peak"] = ratio(tflops, peak["fp32"])
            fraction = entry.get("fraction_of_datasheet_fp32_peak", entry["fraction_of_measured_torch_mm_fp32"])
            entry["meets_half_of_fp32_peak"] = None if fraction is None else fraction >= 0.5
            out[key] = entry
    if "geometry" in results:
        seconds = results["geometry"]["calmwild_total_seconds"]
        out["geometry"] = {"target_seconds_over_measured": ratio(targets["geometry_figure3_50k_seconds_max"],
                                                                 seconds)}
    return out
