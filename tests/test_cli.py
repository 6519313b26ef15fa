"""The `calmwild` command end to end on the embedded default data (slow: real fits)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calmwild.cli import run
from calmwild.runs import find_latest_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
SMALL = [
    "--data.init_args.num_train=96", "--data.init_args.num_heldout=64", "--data.init_args.batch_size=32",
    "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
    # only the checkpoint callback (evaluation callbacks have their own tests)
    '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
    '"init_args": {"save_last": true, "every_n_train_steps": 6}}]',
]


def fit(root: Path, *extra: str):
    return run(["fit", "--config", DIGITS, f"--trainer.default_root_dir={root}", *SMALL, *extra])


def ema_state(ckpt: Path) -> dict:
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net_ema.")}


@pytest.mark.slow
def test_fit_writes_run_directory_and_resume_continues_exactly(tmp_path):
    cli = fit(tmp_path / "a", "--trainer.max_steps=12")
    run_dir = Path(cli.trainer.default_root_dir)
    assert run_dir.parent == tmp_path / "a" and run_dir.name.startswith("run-")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "logs" / "metrics.csv").is_file() and (run_dir / "config.yaml").is_file()
    assert cli.trainer.global_step == 12

    resumed = fit(tmp_path / "a", "--trainer.max_steps=24", "--ckpt_path=last")
    assert Path(resumed.trainer.default_root_dir) == run_dir  # same run directory
    assert resumed.trainer.global_step == 24

    straight = fit(tmp_path / "b", "--trainer.max_steps=24")
    a = ema_state(run_dir / "checkpoints" / "last.ckpt")
    b = ema_state(Path(straight.trainer.default_root_dir) / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key

    with open(run_dir / "logs" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert sorted(steps) == list(range(24))  # every training step exactly once across the resume


@pytest.mark.slow
def test_each_fit_gets_a_new_directory_and_latest_run_is_found(tmp_path):
    first = Path(fit(tmp_path, "--trainer.max_steps=2").trainer.default_root_dir)
    second = Path(fit(tmp_path, "--trainer.max_steps=2").trainer.default_root_dir)
    assert first != second and first.is_dir() and second.is_dir()
    assert find_latest_run(tmp_path) == second
    with pytest.raises(FileNotFoundError, match="no run under"):
        find_latest_run(tmp_path / "empty")


@pytest.mark.slow
def test_command_line_overrides_reach_the_sampler(tmp_path):
    cli = fit(tmp_path, "--trainer.max_steps=1", "--model.sigma_sampler.init_args.p_mean=-0.5")
    assert cli.model.sigma_sampler.p_mean == -0.5


@pytest.mark.slow
def test_help_and_print_config_work():
    script = [sys.executable, "-m", "calmwild.cli"]
    out = subprocess.run(script + ["fit", "--config", DIGITS, "--print_config"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "calmwild.sigma.LogNormal" in out.stdout and "DigitsDataModule" in out.stdout
    help_out = subprocess.run(script + ["fit", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert help_out.returncode == 0 and "--model.sigma_sampler" in help_out.stdout
    analyze_help = subprocess.run(script + ["analyze", "--help"], capture_output=True, text=True, cwd=ROOT,
                                  timeout=120)
    assert analyze_help.returncode == 0 and "--geometry.weight_level" in analyze_help.stdout


def test_unknown_command_is_refused():
    with pytest.raises(SystemExit, match="unknown command 'frobnicate'"):
        run(["frobnicate"])


def test_a_config_that_fails_to_instantiate_leaves_no_run_directory(tmp_path):
    with pytest.raises(ValueError, match="lr must be positive"):
        fit(tmp_path, "--model.lr=-1", "--trainer.max_steps=1")
    assert not list(tmp_path.glob("run-*"))


def test_a_failed_instantiation_never_removes_a_directory_with_user_files(tmp_path, monkeypatch):
    """Only a directory this run made and left empty is removed; anything else in it keeps it."""
    from calmwild import lightning_cli as cli_module

    original, made = cli_module.new_run_dir, []

    def new_run_dir_with_a_user_file(root, name=None):
        run_dir = original(root, name)
        (run_dir / "notes.txt").write_text("mine")
        made.append(run_dir)
        return run_dir

    monkeypatch.setattr(cli_module, "new_run_dir", new_run_dir_with_a_user_file)
    with pytest.raises(ValueError, match="lr must be positive"):
        fit(tmp_path, "--model.lr=-1", "--trainer.max_steps=1")
    assert made and (made[0] / "notes.txt").read_text() == "mine"


def test_top_level_help_lists_every_command_with_one_line():
    from calmwild.cli import LIGHTNING_COMMANDS, command_summaries
    from calmwild.commands import COMMANDS

    script = [sys.executable, "-m", "calmwild.cli"]
    done = subprocess.run(script + ["--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0
    listed = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert set(listed) == set(LIGHTNING_COMMANDS) | set(COMMANDS)
    for name, summary in command_summaries().items():
        assert summary in listed[name] and summary.endswith("."), name
        if name in COMMANDS:
            assert COMMANDS[name].__doc__.splitlines()[0].replace("``", "") == summary


def test_analysis_command_help_and_argument_errors_load_no_heavy_framework():
    """`calmwild sample --help` and a bad argument stay as fast as importing torch: Lightning, W&B, torchvision and
    matplotlib are imported only by the code that needs them."""
    probe = ("import sys\nfrom calmwild.cli import run\nfor args in (['sample', '--help'], ['sample', '--num', 'x']):\n"
             "    try:\n        run(args)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('lightning', 'wandb', 'torchvision', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
