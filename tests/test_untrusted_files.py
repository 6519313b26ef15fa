"""Every entry point that reads a file someone else may have made refuses a payload in one line, never running it.

The payload: a real calmwild checkpoint with one extra object whose ``__reduce__`` runs ``touch MARKER``, and a
CIFAR-10 batch file whose unpickling would do the same. Each command must exit with status 2 and one line naming the
file and the offending global, create no marker, and leave no output directory behind."""

import os
import pickle
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from tiny import write_config

from calmwild.cli import main


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def payload(tmp_path, tiny_checkpoint):
    marker = tmp_path / "payload-ran"
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["extra"] = Payload(marker)
    path = tmp_path / "shared" / "model.ckpt"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path, marker


def refused(args: list[str], capsys) -> str:
    """Runs ``calmwild args`` in process; asserts exit status 2 and one error line; returns that line."""
    with mock.patch.object(sys, "argv", ["calmwild"]), pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("calmwild: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def tiny_data(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml")


@pytest.mark.parametrize("role", ["sample", "evaluate", "swap-base", "swap-other"])
def test_commands_refuse_a_payload_checkpoint(tmp_path, capsys, payload, tiny_checkpoint, role):
    path, marker = payload
    out = tmp_path / "out"
    common = ["--out", str(out), "--num", "2", "--sampling.steps", "1"]
    args = {
        "sample": ["sample", "--ckpt", str(path), *common],
        "evaluate": ["evaluate", "--ckpt", str(path), "--data", str(tiny_data(tmp_path)), "--out", str(out)],
        "swap-base": ["swap", "--base", str(path), "--other", str(tiny_checkpoint), *common],
        "swap-other": ["swap", "--base", str(tiny_checkpoint), "--other", str(path), *common],
    }[role]
    line = refused(args, capsys)
    assert str(path) in line and "posix.system" in line
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["file", "last", "weights_only"])
def test_fit_refuses_to_resume_from_a_payload_checkpoint(tmp_path, capsys, payload, how):
    path, marker = payload
    root = tmp_path / "runs"
    config = write_config(tmp_path / "cfg.yaml")
    args = ["fit", "--config", str(config), f"--trainer.default_root_dir={root}"]
    if how == "last":
        run_checkpoints = root / "run-20260101-000000-abcdef" / "checkpoints"
        run_checkpoints.mkdir(parents=True)
        shutil.copy(path, run_checkpoints / "last.ckpt")
        path = run_checkpoints / "last.ckpt"
        args += ["--ckpt_path", "last"]
    else:
        args += ["--ckpt_path", str(path)] + (["--weights_only", "true"] if how == "weights_only" else [])
    line = refused(args, capsys)
    assert str(path) in line and "posix.system" in line
    assert not marker.exists()
    assert not list(root.glob("**/*.yaml")) and not list(root.glob("**/metrics.csv"))


def test_fit_refuses_weights_only_false(tmp_path, capsys, tiny_checkpoint):
    config = write_config(tmp_path / "cfg.yaml")
    line = refused(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'runs'}",
                    "--ckpt_path", str(tiny_checkpoint), "--weights_only", "false"], capsys)
    assert "weights_only=True only" in line


def test_a_tampered_cifar10_batch_is_refused_by_its_checksum(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}))
    data = tmp_path / "cifar.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "calmwild.data.CIFAR10DataModule",
                                             "init_args": {"root": str(tmp_path / "cifar"), "num_train": 1,
                                                           "num_heldout": 1, "batch_size": 1}}}))
    out = tmp_path / "out"
    line = refused(["sample", "--ckpt", "empirical", "--data", str(data), "--out", str(out), "--num", "1"], capsys)
    assert "is not the published CIFAR-10 file: MD5" in line and str(folder) in line
    assert not marker.exists() and not out.exists()
