"""scripts/study/: settings, configs and the ledger (fast); the whole tiny study killed mid-way with SIGKILL and
resumed, then read back (slow)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from calmwild.commands import load_datamodule
from study import main as study_main
from study.configs import ARMS, Configs, Model, band_sampler
from study.lanes import Ledger
from study.settings import paper_buffer_margin, parse_args, resolve_settings
from study.stages import Study

ROOT = Path(__file__).resolve().parents[1]


def settings(*argv: str) -> dict:
    return resolve_settings(parse_args(list(argv)))


def test_modes_and_flags():
    quick = settings("--quick")
    assert quick["mode"] == "quick" and quick["sizes"] == [16, 32, 64, 128] and len(quick["seeds"]) >= 3
    assert quick["gap_margin"] == pytest.approx(paper_buffer_margin()) and quick["fid_feature"] == "random"
    standard = settings()
    assert standard["mode"] == "standard" and len(standard["seeds"]) >= 3 and standard["steps"] > quick["steps"]
    custom = settings("--tiny", "--steps", "40", "--eval-every", "20", "--sizes", "8", "24", "--seeds", "3", "4")
    assert (custom["steps"], custom["sizes"], custom["seeds"]) == (40, [8, 24], [3, 4])


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--steps", "50", "--eval-every", "20"], "multiple of --eval-every"),
    (["--tiny", "--seeds", "1"], "at least two distinct"),
    (["--tiny", "--sizes", "32", "16"], "increasing sizes"),
    (["--tiny", "--gap-margin", "0.5"], "--gap-margin"),
    (["--tiny", "--reweight-factor", "2"], "--reweight-factor"),
    (["--dataset", "cifar10"], "needs --data-root"),
    (["--quick", "--dataset", "celeba", "--data-root", "."], "drop --quick"),
])
def test_bad_settings_are_refused_in_one_line(argv, message):
    with pytest.raises(ValueError, match=message):
        settings(*argv)


def test_paper_data_must_be_on_disk(tmp_path):
    with pytest.raises(ValueError, match="cifar-10-batches-py is missing"):
        settings("--dataset", "cifar10", "--data-root", str(tmp_path))
    with pytest.raises(ValueError, match="no celeba/ folder"):
        settings("--dataset", "celeba", "--data-root", str(tmp_path))
    (tmp_path / "celeba").mkdir()
    celeba = settings("--dataset", "celeba", "--data-root", str(tmp_path))
    assert celeba["sizes"][0] <= 1024 <= celeba["sizes"][-1] and celeba["fid_feature"] == "inception"


def test_configs_carry_the_arm_size_seed_and_budget(tmp_path):
    s = settings("--tiny")
    configs = Configs(tmp_path, s)
    gap = band_sampler(configs.base_sampler(), "Gap", [0.5, 2.0])
    path = configs.write(Model("gap", 16, 1), gap)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["seed_everything"] == 1 and cfg["trainer"]["max_steps"] == s["steps"]
    assert cfg["data"]["init_args"]["num_train"] == 16 and cfg["data"]["init_args"]["batch_size"] == s["batch_size"]
    assert cfg["model"]["sigma_sampler"]["init_args"]["bands"] == [[0.5, 2.0]]
    assert cfg["model"]["backbone"]["init_args"]["model_channels"] == s["model_channels"]
    dummy = yaml.safe_load(configs.write(Model("dummy", 8, 0)).read_text())
    assert dummy["data"]["class_path"] == "calmwild.data.DummyClassDataModule"
    assert dummy["model"]["backbone"]["init_args"]["num_classes"] == 2 and dummy["model"]["sample_class"] == 0
    datamodule = load_datamodule(str(configs.path(Model("dummy", 8, 0))))
    assert datamodule.train_images.shape[0] == 8 and datamodule.served_images.shape[0] == 16
    assert set(ARMS) == {"baseline", "gap", "reweighted", "dummy", "placebo_below", "placebo_above"}


def test_a_fit_resumes_from_its_run_and_a_finished_run_is_not_refit(tmp_path):
    s = settings("--tiny")
    study = Study(tmp_path, s, "cpu", lanes=None)
    model = Model("baseline", 8, 0)
    config = study.configs.write(model)
    assert study._fit_command(model, config) == ["fit", "--config", str(config)]
    checkpoints = study.configs.root(model) / "run-20260101-000000-abcdef" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"global_step": s["steps"] // 2}, checkpoints / "last.ckpt")
    assert study._fit_command(model, config) == ["fit", "--config", str(config), "--ckpt_path",
                                                 str(checkpoints / "last.ckpt")]
    torch.save({"global_step": s["steps"]}, checkpoints / "last.ckpt")
    assert study._fit_command(model, config) is None


def test_the_ledger_reads_back_finished_units_unless_a_dependency_ran(tmp_path):
    ledger = Ledger(tmp_path)
    calls = []
    first = ledger.step("a", (), lambda: calls.append("a") or {"value": float("inf"), "list": (1, 2)})
    assert first == {"value": None, "list": [1, 2]}  # as a later invocation reads it back
    again = Ledger(tmp_path)
    assert again.step("a", (), lambda: calls.append("a again") or {}) == first and calls == ["a"]
    assert again.status["a"] == "done earlier"
    again.step("b", (), lambda: {"b": 1})
    assert again.cached("a", deps=("b",)) is None  # b ran in this invocation: a must run again


def test_configs_only_writes_the_fits_a_stage_needs_and_stops(tmp_path, capsys):
    out = tmp_path / "study"
    result = study_main.main(["--tiny", "--out", str(out), "--configs-only"])
    expected = [out / "configs" / f"baseline_N{n}_s0.yaml" for n in settings("--tiny")["sizes"]]
    assert result["to_train"] == [str(p) for p in expected] and all(p.is_file() for p in expected)
    said = capsys.readouterr().out
    assert all(f"calmwild fit --config {p}" in said for p in expected)
    assert not (out / "train").exists() and not (out / "report.md").exists()


def _markers(out: Path) -> set[str]:
    return {p.stem for p in (out / "stages").glob("*.json")}


@pytest.mark.slow
def test_tiny_study_killed_mid_way_resumes_and_reports(tmp_path):
    out = tmp_path / "study"
    argv = ["--tiny", "--out", str(out), "--jobs", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "study.py"), *argv], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any(name.startswith("gap_") for name in _markers(out)) and time.monotonic() < deadline:
        assert process.poll() is None, "the study ended before it could be interrupted"
        time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)  # the study's process only: its workers must die with it
    process.wait(timeout=30)
    before = _markers(out)
    assert "regime" in before and not any(name.startswith("risk") for name in before)

    result = study_main.main(argv)
    assert all(status == "done earlier" for name, status in result["status"].items() if name in before)
    ran = {name for name, status in result["status"].items() if status == "ran"}
    assert ran and not ran & before and any(name.startswith(("gap_", "dummy_", "placebo_")) for name in ran)

    report = json.loads((out / "report.json").read_text())
    claims = [v["id"] for v in report["verdicts"]]
    assert claims == ["gap_mitigates", "gap_beats_placebo", "gap_quality", "zone_concentration", "swap_steps",
                      "swap_zone", "risk", "remark_4_3"]
    assert all(v["status"] in ("reproduced", "not reproduced", "inconclusive") and v["criterion"]
               for v in report["verdicts"])
    results = report["results"]
    n_star = results["regime"]["n_star"]
    assert n_star in [int(n) for n in results["regime"]["sizes"]]
    assert set(results["arms"]) >= {"baseline", "gap", "reweighted", "dummy", "placebo_below"}
    for arm in results["arms"].values():
        assert [m["model"]["seed"] for m in arm["models"]] == [0, 1]
        assert all(m["model"]["num_train"] == n_star for m in arm["models"])
    geometry = results["geometry"]
    assert geometry["gap_band"][0] == pytest.approx(geometry["zone"][0] / geometry["margin"])
    assert geometry["placebos"]["below"]["mass"] == pytest.approx(geometry["gap_mass"], rel=1e-6)
    swap = results["swap"]["table"]
    assert set(swap["memorizing"]) == {"none", "steps_large", "steps_medium", "steps_small", "zone_below",
                                       "zone_zone", "zone_above"}
    assert all(len(cell["memorized"]) == 2 * 16 for cell in swap["memorizing"].values())
    text = (out / "report.md").read_text()
    for figure in report["figures"].values():
        assert (out / figure).stat().st_size > 0 and f"]({figure})" in text
    assert "calmwild fit --config" in text and "calmwild swap --base" in text and "## Verdicts" in text
    assert len(json.loads((out / "invocations.json").read_text())) == 1  # the killed one never reached its report

    third = study_main.main(argv)  # everything done: read back, the same verdicts
    assert set(third["status"].values()) == {"done earlier"}
    assert third["verdicts"] == result["verdicts"]
    with pytest.raises(SystemExit, match="other settings"):
        study_main.main([*argv, "--steps", "60"])
