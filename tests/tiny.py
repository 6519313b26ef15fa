"""The tiny training configuration the end-to-end tests share, and ways to run ``calmwild`` on it.

The tiny config: the embedded digits at 8x8, 96 training images, batch 32 (an epoch is 3 steps), a 16-channel
two-level U-Net, CSV logs, a checkpoint every 4 steps. ``in_process_fit`` runs ``calmwild fit`` in this process,
``calmwild`` in a subprocess (with this folder on PYTHONPATH, so configs can name test callbacks by class path).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

TESTS = Path(__file__).resolve().parent
CALMWILD_SCRIPT = Path(sys.executable).with_name("calmwild")
CALMWILD = [str(CALMWILD_SCRIPT)] if CALMWILD_SCRIPT.exists() else [sys.executable, "-m", "calmwild.cli"]


def random_images(n: int, seed: int, channels: int = 3, size: int = 8) -> torch.Tensor:
    """``n`` images [n, channels, size, size] uniform in [-1, 1] from a generator seeded with ``seed``."""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_config(**changes) -> dict:
    """The tiny digits fit config; ``changes`` maps dotted keys (``model.lr``) to values."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 30,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}],
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "every_n_train_steps": 4, "save_top_k": -1},
                }
            ],
        },
        "model": {
            "backbone": {
                "class_path": "calmwild.unet.UNet",
                "init_args": {
                    "img_resolution": 8,
                    "in_channels": 1,
                    "model_channels": 16,
                    "channel_mult": [1, 2],
                    "num_blocks": 1,
                    "attn_resolutions": [4],
                    "dropout": 0.1,
                },
            },
            "sigma_sampler": {"class_path": "calmwild.sigma.LogNormal", "init_args": {"p_mean": -1.2, "p_std": 1.2}},
            "lr": 2e-3,
            "lr_warmup_steps": 5,
            "ema_halflife_images": 2000,
            "ema_rampup_ratio": 0.05,
            "seed": 3,
        },
        "data": {
            "class_path": "calmwild.data.DigitsDataModule",
            "init_args": {"num_train": 96, "num_heldout": 32, "resolution": 8, "batch_size": 32, "seed": 7},
        },
    }
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(**changes), sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # several engineers share 2 cores; also fixes the reduction order across runs
    env.setdefault("WANDB_MODE", "offline")
    env.update(extra)
    return env


def calmwild(args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None, check: bool = True):
    """Runs ``calmwild <args>`` in a subprocess; returns the CompletedProcess (stdout and stderr merged)."""
    done = subprocess.run(
        CALMWILD + args, cwd=cwd, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"calmwild {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}")
    return done


def only_run_dir(root: Path) -> Path:
    runs = sorted(root.glob("run-*"))
    assert len(runs) == 1, f"expected one run directory under {root}, found {[r.name for r in runs]}"
    return runs[0]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def in_process_fit(tmp_path: Path, *args: str, **changes):
    """``calmwild fit`` in this process on the tiny config (``changes`` as in :func:`tiny_config`); returns the CLI."""
    from unittest import mock

    from calmwild.cli import run

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path / f"cfg-{time.monotonic_ns()}.yaml", **changes)
    with mock.patch.object(sys, "argv", ["calmwild"]):  # LightningCLI warns when given args beside pytest's argv
        return run(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "runs"), *args])


def _training_files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for pattern in ("**/*.ckpt", "**/metrics.csv") for p in root.glob(pattern)}


def fit_error(tmp_path: Path, *args: str, **changes) -> tuple[BaseException, str]:
    """Runs an in-process fit that must fail; returns the exception and everything it said (message + stderr).
    Checks that no training happened: no checkpoint or metrics file written or changed (earlier runs' files under
    the root stay as they were), no ``training_step`` in the traceback."""
    import contextlib
    import io
    import traceback

    root = tmp_path / "runs"
    before = _training_files(root)
    stderr = io.StringIO()
    with pytest.raises((ValueError, TypeError, OSError, SystemExit)) as info:
        with contextlib.redirect_stderr(stderr):
            in_process_fit(tmp_path, *args, **{"trainer.max_steps": 2, **changes})
    assert _training_files(root) == before, "training started"
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "training_step" not in frames, f"refused only inside training_step: {frames[-6:]}"
    return info.value, f"{info.value}\n{stderr.getvalue()}"


def run_command(args: list[str]) -> tuple[BaseException | None, str]:
    """``calmwild <command> ...`` in process: (the exception or None, message + stderr)."""
    import contextlib
    import io

    from calmwild.cli import run

    from unittest import mock

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), mock.patch.object(sys, "argv", ["calmwild"]):
            run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, SystemExit) as error:
        return error, f"{error}\n{stderr.getvalue()}"
    return None, stderr.getvalue()


class PoisonFrom(Callback):
    """Test hook (class path ``tiny.PoisonFrom``): from global step ``step`` on, the first image of every batch is
    NaN (in place, after the datamodule's checks), so every later loss is non-finite."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            batch[0][0].fill_(float("nan"))


class MarkSteps(Callback):
    """Test hook (class path ``tiny.MarkSteps``): after each training step writes its global step to ``marker`` and
    sleeps ``seconds``, so that a test can signal the process at a known moment."""

    def __init__(self, marker: str, seconds: float = 0.3):
        self.marker, self.seconds = marker, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        write_marker(self.marker, str(trainer.global_step))
        time.sleep(self.seconds)


def write_marker(path: str | Path, text: str) -> None:
    """Writes a marker file whole or not at all (a reader polling it never sees it empty or half written)."""
    partial = Path(f"{path}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 120) -> str:
    """The content of ``path`` once it exists (the process must not have ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text:
            return text
        if process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) before {path} appeared: "
                                 f"{process.stdout.read()[-3000:] if process.stdout else ''}")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


class SlowSaves(Callback):
    """Test hook (class path ``tiny.SlowSaves``): every checkpoint save of this process writes half of its bytes,
    then ``marker`` (the step), sleeps ``seconds`` and writes the rest, so that a test can kill it mid-save."""

    def __init__(self, marker: str, seconds: float = 1.0):
        self.marker, self.seconds = marker, seconds

    def setup(self, trainer, pl_module, stage):
        import io

        import torch

        real_save, marker, seconds = torch.save, self.marker, self.seconds

        def slow_save(obj, handle, *args, **kwargs):
            if isinstance(handle, (str, Path)):
                return real_save(obj, handle, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            write_marker(marker, str(trainer.global_step))
            time.sleep(seconds)
            handle.write(data[len(data) // 2:])
            return None

        torch.save = slow_save


class HangAtStep(Callback):
    """Before training step ``step`` (0-based global step) writes ``marker`` and sleeps, so that the test can kill the
    process at a known point: steps 0..step-1 are done and logged, later steps are not."""

    def __init__(self, step: int, marker: str, seconds: float = 300.0):
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            write_marker(self.marker, str(trainer.global_step))
            time.sleep(self.seconds)


class PoisonBatch(Callback):
    """Overwrites the first image of the batch of global step ``step`` with ``value`` (NaN by default) in place, after
    the datamodule's checks: the loss of that step is non-finite."""

    def __init__(self, step: int, value: float = float("nan")):
        self.step, self.value = step, value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0][0].fill_(self.value)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict, prefix: str) -> int:
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix))
    for key in keys:
        assert torch.equal(a[key], b[key]), f"{key} differs: max |diff| {float((a[key] - b[key]).abs().max())}"
    return len(keys)


def steps_logged(run_dir: Path) -> list[int]:
    return sorted(int(row["step"]) for row in read_metrics(run_dir) if row.get("train/loss"))


def sampler(class_path: str, **init_args) -> dict:
    """A sigma sampler's config entry: ``calmwild.sigma.<class_path>`` with ``init_args``."""
    return {"class_path": f"calmwild.sigma.{class_path}", "init_args": init_args}


class ConvBackbone(torch.nn.Module):
    """A backbone that is not calmwild's U-Net (class path ``tiny.ConvBackbone``): two convolutions with the noise
    level as a per-channel bias, following the backbone config protocol (``config`` = its constructor arguments)."""

    def __init__(self, img_resolution: int = 8, in_channels: int = 1, channels: int = 8):
        super().__init__()
        self.config = {"img_resolution": img_resolution, "in_channels": in_channels, "channels": channels}
        self.inp = torch.nn.Conv2d(in_channels, channels, 3, padding=1)
        self.noise = torch.nn.Linear(1, channels)
        self.out = torch.nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        h = self.inp(x) + self.noise(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))
