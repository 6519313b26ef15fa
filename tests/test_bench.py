"""Smoke test of scripts/bench.py: the quick mode at tiny sizes runs every benchmark through the real entry point and
emits one JSON object (stdout and --out) whose calmwild figures agree with their naive / float64 counterparts."""

import json
import logging
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
TINY = ["--quick", "--device", "cpu", "--threads", "1", "--batch-size", "8", "--warmup-steps", "1",
        "--timed-steps", "2", "--train-repeats", "1", "--repeats", "1", "--num-samples", "4",
        "--sample-batch-size", "4", "--sampling-steps", "3", "--knn-queries", "40", "--num-references", "300",
        "--num-queries", "40", "--num-sigmas", "4", "--base-points", "5", "--noises", "4", "--precision-steps", "2",
        "--precision-heldout", "8", "--precision-noises", "1", "--kid-samples", "40", "--kid-reference", "50",
        "--kid-dim", "8", "--kid-subsets", "5", "--kid-subset-size", "30", "--budget-batch", "1"]


def run_script(monkeypatch, capsys, args: list[str]) -> tuple[dict, str]:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    threads = torch.get_num_threads()
    loggers = {name: logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric")}
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:  # the script sets process-wide state that other tests in this session must not inherit
        torch.set_num_threads(threads)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_mode_runs_every_benchmark_and_writes_one_json_object(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    record, progress = run_script(monkeypatch, capsys, [*TINY, "--out", str(out)])
    assert json.loads(out.read_text()) == record
    assert "[bench]" in progress  # progress lines go to stderr, stdout is the JSON alone
    assert record["config"] == "quick" and record["device"] == "cpu" and record["torch"]
    assert record["reference"]["edm_h100"]["training_img_per_s_batch128"]["fp32"] == 334.0
    results = record["results"]
    assert set(results) == {"training", "network", "sampling", "knn", "empirical", "geometry", "precision", "kid",
                            "budget"}
    network = results["network"]
    assert positive(network["calmwild_unet_edm"]["img_per_s"]) and network["peer"].startswith("NVlabs/edm peer skipped")

    # configs/digits.yaml, counted by hand: every 250 of 2000 steps PerSigmaMSE denoises 64 training + 256 held-out
    # items at EDM's 18 levels and PerSigmaMemorization the same 256 held-out items (one pass for both);
    # TrajectoryMemorization (every 250), FID and SampleGrid (every 1000) share 256 samples of 35 Heun evaluations
    # each; training is 2000 x 32 x 3.
    digits = results["budget"]["configs"]["digits.yaml"]
    assert digits["evaluations_total"] == 8 * ((64 + 256) * 18 + 256 * 35)
    assert digits["heaviest_round_evaluations"] == (64 + 256) * 18 + 256 * 35
    assert digits["held_out_evaluations_shared"] == 8 * 256 * 18
    assert digits["evaluation_share_of_training"] == pytest.approx(digits["evaluations_total"] / (2000 * 32 * 3))
    assert positive(digits["heaviest_round_in_training_steps"])
    assert {"cifar10_cars2k_gap.yaml", "celeba_gap100_350.yaml"} <= set(results["budget"]["configs"])
    kid = results["kid"]
    assert kid["sizes"]["subset_size"] == 30 and kid["kid"]["relative_difference"] < 1e-9
    assert positive(kid["speed_ratio_vs_torchmetrics"])

    fp32 = results["training"]["variants"]["fp32"]
    assert positive(fp32["calmwild_lightning_fit"]["img_per_s"]) and positive(fp32["plain_pytorch_loop"]["img_per_s"])
    assert positive(fp32["ratio_lightning_to_plain"])
    assert fp32["settings"]["precision"] == "32-true"

    paths = results["sampling"]["paths"]
    assert len(paths) == 2
    fast = paths["float32-state fp32-network"]
    assert positive(fast["samples_per_s"]) and fast["max_abs_diff_to_reference"] < 1e-3

    knn = results["knn"]
    assert positive(knn["calmwild_knn"]["tflops"]) and positive(knn["naive_cdist_topk"]["tflops"])
    # on the near-copy queries calmwild's kNN is exact to float32 rounding; the dense identity is not
    calmwild = knn["calmwild_knn"]
    assert calmwild["index_agreement"] == 1.0 and calmwild["ratio_test_flips"] == 0
    assert calmwild["max_relative_error_d1"] < 1e-6 < knn["naive_cdist_topk"]["max_relative_error_d1"]
    assert calmwild["max_abs_distance_error"] < 1e-5
    assert positive(knn["speed_ratio_calmwild_to_naive_cdist_topk"])

    empirical = results["empirical"]
    assert empirical["calmwild_empirical_denoiser"]["max_abs_error_vs_float64"] < 1e-3
    assert positive(empirical["ratio_calmwild_to_naive"])

    geometry = results["geometry"]
    assert positive(geometry["calmwild_total_seconds"])
    assert positive(geometry["speed_ratio_calmwild_to_naive_float64"]) and positive(
        geometry["speed_ratio_calmwild_to_naive_float32"])
    assert len(geometry["calmwild"]) == 2

    precision = results["precision"]
    table = precision["per_sigma_mse"]
    assert set(table) == {f"train {t} / eval {e}" for t in ("fp32", "bf16") for e in ("fp32", "bf16")}
    assert table[precision["reference"]]["max_abs_relative_change"] == 0.0
    for row in table.values():
        assert len(row["mse_per_pixel"]) == len(precision["sigmas"]) and all(m > 0 for m in row["mse_per_pixel"])
    # bf16 evaluation of the same network changes the MSE, but by a few percent at most (bf16 keeps 8 bits)
    assert 0 < table["train fp32 / eval bf16"]["max_abs_relative_change"] < 0.2
    assert positive(precision["ratio_train_bf16_to_fp32_speed"])
    assert positive(precision["ratio_eval_bf16_to_fp32_speed"])

    # the comparison with the EDM H100 figures only runs on CUDA: exercise it on this record
    from bench.reference import compare

    ratios = compare(results, "NVIDIA H100 80GB HBM3")
    assert ratios["training fp32"]["vs_edm_fp32"] == pytest.approx(fp32["calmwild_lightning_fit"]["img_per_s"] / 334.0)
    assert ratios["knn"]["fraction_of_datasheet_fp32_peak"] == pytest.approx(knn["calmwild_knn"]["tflops"] / 67.0)
    assert positive(ratios["geometry"]["target_seconds_over_measured"])


def test_only_selects_benchmarks_and_skips_a_naive_path_that_does_not_fit(monkeypatch, capsys):
    record, _ = run_script(monkeypatch, capsys, [*TINY, "--only", "knn", "--memory-fraction", "1e-12"])
    assert set(record["results"]) == {"knn"}
    knn = record["results"]["knn"]
    assert "naive_cdist_topk" not in knn and knn["note"].startswith("naive skipped")
    assert knn["calmwild_knn"]["index_agreement"] == 1.0


def test_unknown_benchmark_is_rejected(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_script(monkeypatch, capsys, ["--quick", "--only", "knn,speed"])
    assert "speed" in capsys.readouterr().err
