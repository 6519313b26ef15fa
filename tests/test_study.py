"""scripts/study.py: settings resolution (fast) and the whole study end to end at toy sizes, resumed (slow)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
study = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(study)

STAGES = ("geometry", "train_small", "train_large", "train_gap", "train_reweighted", "per_sigma", "swap",
          "mitigation", "risk", "report")


def test_presets_and_size_flags():
    quick = study.resolve_settings(study.parse_args(["--quick"]))
    assert quick["mode"] == "quick" and quick["dataset"] == "digits" and quick["small_n"] == 32
    custom = study.resolve_settings(study.parse_args(["--tiny", "--steps", "40", "--eval-every", "20"]))
    assert custom["steps"] == 40 and custom["eval_every"] == 20


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of --eval-every"):
        study.resolve_settings(study.parse_args(["--tiny", "--steps", "50", "--eval-every", "20"]))
    with pytest.raises(ValueError, match="exceeds the small training set"):
        study.resolve_settings(study.parse_args(["--tiny", "--batch-size", "64"]))
    with pytest.raises(ValueError, match="--reweight-factor"):
        study.resolve_settings(study.parse_args(["--tiny", "--reweight-factor", "2"]))


def test_cifar10_falls_back_to_digits_with_a_message(tmp_path, capsys):
    settings = study.resolve_settings(study.parse_args(["--dataset", "cifar10", "--data-root", str(tmp_path)]))
    assert settings["dataset"] == "digits" and settings["mode"] == "full"
    assert "CIFAR-10 not found" in capsys.readouterr().out
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in study.CIFAR10_FILES:
        (folder / name).write_bytes(b"")
    settings = study.resolve_settings(study.parse_args(["--dataset", "cifar10", "--data-root", str(tmp_path)]))
    assert settings["dataset"] == "cifar10" and settings["small_n"] == 1000 and settings["large_n"] == 50_000
    quick = study.resolve_settings(study.parse_args(["--quick", "--dataset", "cifar10", "--data-root", str(tmp_path)]))
    assert quick["dataset"] == "digits" and "uses the embedded digits" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    first = study.main(["--tiny", "--out", str(out)])
    assert first["status"] == {name: "ran" for name in STAGES}

    report = json.loads((out / "report.json").read_text())
    assert [c["id"] for c in report["claims"]] == ["medium_sigma", "swap", "gap", "danger_zone", "risk"]
    assert all(c["status"] in ("reproduced", "partly", "not reproduced") for c in report["claims"])
    assert set(report["timings"]) == set(STAGES[:-1])
    text = (out / "report.md").read_text()
    for needle in ("## Claims", "Frechet distance", "RandomConvFeatures", "| seeded random score", "## Timings",
                   "calmwild fit --config"):
        assert needle in text
    for image in ("geometry/geometry.png", "figures/per_sigma.png", "figures/memorization_vs_steps.png",
                  "figures/mitigation.png", "figures/risk.png", "geometry/risk.png"):
        assert (out / image).stat().st_size > 0 and f"]({image})" in text
    history = report["results"]["train"]["small"]["history"]
    assert [h["step"] for h in history] == [100, 200, 300]
    swap = report["results"]["swap"]["table"]
    assert set(swap) == {"small_with_large", "large_with_small"}
    assert set(swap["small_with_large"]) == {"none", "large", "medium", "small"}
    random = report["results"]["risk"]["final"]["random"]
    assert random["auroc_expected"] == 0.5 and random["num"] == 8

    # A second invocation finds every stage done and skips it.
    second = study.main(["--tiny", "--out", str(out)])
    assert second["status"] == {name: "skipped (done earlier)" for name in STAGES}
    assert second["seconds"] == first["seconds"]

    # Without its marker, a training stage resumes its run from last.ckpt (no new run directory), and the stages
    # that depend on it run again; the others stay skipped.
    run_dir = report["results"]["train"]["small"]["run_dir"]
    (out / "stages" / "train_small.json").unlink()
    third = study.main(["--tiny", "--out", str(out)])
    assert {name for name, status in third["status"].items() if status == "ran"} == {
        "train_small", "per_sigma", "swap", "mitigation", "risk", "report"}
    assert [p.name for p in (out / "train" / "small").glob("run-*")] == [Path(run_dir).name]
    again = json.loads((out / "stages" / "train_small.json").read_text())["result"]
    assert again["run_dir"] == run_dir and again["history"] == history

    # Other settings into the same directory are refused.
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["--tiny", "--out", str(out), "--steps", "200"])
