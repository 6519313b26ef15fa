"""Bad input is refused before any work, in one line naming the value and what was expected, leaving no directory
behind: configurations, data files, checkpoints of another network, damaged checkpoint files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from tiny import (
    fit_error,
    in_process_fit,
    load_checkpoint,
    run_command,
    sampler,
    write_config,
)

from calmwild.data import InMemoryImageDataModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ===== 3. bad configuration is refused before training ================================================================


LOGNORMAL = sampler("LogNormal")
DDPM = sampler("DDPMUniform")


@pytest.mark.parametrize(
    ("key", "class_path"),
    [("model.sigma_sampler", "calmwild.sigma.NoSuchSampler"), ("data", "calmwild.data.NoSuchDataModule"),
     ("model.backbone", "calmwild.unet.NoSuchNet")],
)
def test_unknown_class_paths_are_refused_at_parse_time_naming_the_key(tmp_path, key, class_path):
    error, said = fit_error(tmp_path, **{key: {"class_path": class_path}})
    assert isinstance(error, SystemExit) and error.code == 2
    assert f'Parser key "{key}"' in said and class_path.rsplit(".", 1)[1] in said
    assert not (tmp_path / "runs").exists()  # refused while parsing: not even a run directory


@pytest.mark.parametrize(
    ("sigma_sampler", "expected"),
    [
        (sampler("Gap", base=LOGNORMAL, bands=[[2.0, 1.0]]), r"band \[2.0, 1.0\] is inverted: low 2.0 > high 1.0"),
        (sampler("Gap", base=LOGNORMAL, bands=[[-1.0, 1.0]]), r"band \[-1.0, 1.0\] has a negative edge"),
        (sampler("Gap", base=DDPM, bands=[[100, 2000]], unit="timestep"), r"band \[100.0, 2000.0\] must lie within "
                                                                            r"\[1, 1000\]"),
        (sampler("Gap", base=DDPM, bands=[[500.0, 900.0]]), r"\[500.0, 900.0\].*holds no mass of the base DDPMUniform"),
        (sampler("Gap", base=LOGNORMAL, bands=[[0.0, 1e30]]), r"remove all the mass of LogNormal"),
        (sampler("Reweighted", base=LOGNORMAL, bands=[[0.1, 1.0]], factors=1.5), r"factor 1.5 is outside \[0, 1\]"),
        (sampler("Reweighted", base=LOGNORMAL, bands=[[0.1, 1.0]], factors=-0.1), r"factor -0.1 is outside \[0, 1\]"),
        (sampler("LogNormal", p_std=0.0), r"p_std must be positive, got 0.0"),
    ],
    ids=["inverted", "negative", "timestep-beyond-T", "outside-support", "all-mass", "factor>1", "factor<0",
         "p_std=0"],
)
def test_bad_sigma_samplers_are_refused_naming_value_and_rule(tmp_path, sigma_sampler, expected):
    import re

    _, said = fit_error(tmp_path, **{"model.sigma_sampler": sigma_sampler})
    assert re.search(expected, said), said[-2000:]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model.backbone.init_args.img_resolution": 12, "model.backbone.init_args.channel_mult": [1, 1, 1, 1]},
         "img_resolution=12 must be divisible by 2**3=8"),
        ({"data.init_args.num_train": 1700, "data.init_args.num_heldout": 500},
         "num_train + num_heldout = 1700 + 500 = 2200 exceeds the 1797 images available"),
        ({"data.init_args.num_heldout": 0}, "num_heldout must be an integer >= 1, got 0"),
        ({"model.sampler_steps": 0}, "sampler_steps must be an integer >= 1, got 0"),
        ({"model.lr": -1.0}, "lr must be positive, got -1.0"),
        ({"data.init_args.batch_size": 500}, "batch_size=500 exceeds the 96 training images served"),
        ({"model.nan_policy": "ignore"}, "nan_policy"),
    ],
    ids=["unet-downsampling", "subset-too-large", "empty-heldout", "sampler-steps", "lr", "batch-size", "nan-policy"],
)
def test_bad_model_and_data_settings_are_refused_before_training(tmp_path, changes, expected):
    _, said = fit_error(tmp_path, **changes)
    assert expected in said, said[-2000:]


@pytest.mark.slow
def test_different_seeds_for_model_and_data_are_accepted(tmp_path):
    """Both classes have a ``seed``; Lightning stops a run when the module's and the datamodule's logged hparams
    share a key with different values, so the datamodule keeps its hparams out of the loggers."""
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 1, "model.seed": 1, "data.init_args.seed": 2})
    assert cli.trainer.global_step == 1


def test_data_and_backbone_image_shapes_must_agree_before_training(tmp_path):
    _, said = fit_error(tmp_path, **{"data.init_args.resolution": 16})
    assert "(1, 16, 16)" in said and "(1, 8, 8)" in said and "img_resolution" in said


@pytest.mark.parametrize(
    ("option", "expected"),
    [(["--sampling.steps", "0"], "steps must be an integer >= 1, got 0"),
     (["--num", "0"], "num must be an integer >= 1, got 0"),
     (["--sampling.batch_size", "0"], "batch_size must be an integer >= 1, got 0")],
)
def test_sample_command_refuses_bad_sampler_settings_before_sampling(tmp_path, option, expected):
    out = tmp_path / "out"
    error, said = run_command(["sample", "--out", str(out), "--data", "calmwild.data.DigitsDataModule", "--num", "4",
                               "--sampling.steps", "2", *option])
    assert error is not None and expected in said, said
    assert not list(out.glob("*"))


@pytest.mark.parametrize("threshold", ["1.5", "0", "-0.2"])
def test_sample_command_refuses_a_ratio_threshold_outside_0_1_before_sampling(tmp_path, threshold):
    out = tmp_path / "out"
    error, said = run_command(["sample", "--out", str(out), "--data", "calmwild.data.DigitsDataModule", "--num", "4",
                               "--sampling.steps", "2", "--threshold", threshold])
    assert error is not None and f"threshold must lie in (0, 1), got {float(threshold)}" in said, said
    assert not list(out.glob("*")), "samples were generated before the bad threshold was refused"

# ===== 4. bad data is refused, naming the file ========================================================================


def _pngs(folder: Path, count: int, size: int = 8, start: int = 0) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def folder_data(root: Path, **init_args) -> dict:
    args = {"root": str(root), "num_train": 4, "num_heldout": 2, "grayscale": True, "batch_size": 2, **init_args}
    return {"class_path": "calmwild.data.ImageFolderDataModule", "init_args": args}


@pytest.mark.slow
def test_image_folder_trains_when_the_files_are_good(tmp_path):
    _pngs(tmp_path / "imgs", 6)
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 1, "data": folder_data(tmp_path / "imgs")})
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty-file"])
def test_corrupt_or_truncated_image_is_refused_naming_the_file(tmp_path, damage):
    paths = _pngs(tmp_path / "imgs", 6)
    bad = paths[3]
    content = bad.read_bytes()
    bad.write_bytes({"garbage": os.urandom(200), "truncated": content[: len(content) // 2], "empty-file": b""}[damage])
    _, said = fit_error(tmp_path, data=folder_data(tmp_path / "imgs"))
    assert f"cannot read image {bad}" in said, said[-2000:]


def test_mixed_image_sizes_without_resolution_are_refused_naming_both_files(tmp_path):
    first = _pngs(tmp_path / "imgs", 5)[0]
    odd = _pngs(tmp_path / "imgs", 1, size=10, start=5)[0]
    _, said = fit_error(tmp_path, data=folder_data(tmp_path / "imgs"))
    assert str(first) in said and str(odd) in said and "8x8" in said and "10x10" in said and "resolution" in said


def test_empty_image_folders_are_refused_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    _, said = fit_error(tmp_path, data=folder_data(tmp_path / "empty"))
    assert f"found under {tmp_path / 'empty'}" in said
    _pngs(tmp_path / "imgs", 6)
    (tmp_path / "heldout").mkdir()
    _, said = fit_error(tmp_path, data=folder_data(tmp_path / "imgs", heldout_root=str(tmp_path / "heldout"),
                                                   num_heldout=None))
    assert f"found under {tmp_path / 'heldout'}" in said


class TensorFileDataModule(InMemoryImageDataModule):
    """Test datamodule: training and held-out images from a ``torch.save``d dict of tensors."""

    def __init__(self, path: str, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def origin(self) -> str:
        return self.path

    def load(self):
        saved = torch.load(self.path, weights_only=True)
        return saved["train"], saved["heldout"], None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_pixels_are_refused_naming_the_source_and_the_image(tmp_path, value):
    train = torch.rand(8, 1, 8, 8) * 2 - 1
    train[5, 0, 3, 3] = value
    path = tmp_path / "images.pt"
    torch.save({"train": train, "heldout": torch.zeros(2, 1, 8, 8)}, path)
    data = {"class_path": "test_bad_input.TensorFileDataModule", "init_args": {"path": str(path), "batch_size": 4}}
    _, said = fit_error(tmp_path, data=data)
    assert f"1 NaN/inf pixel values in the training images (first in image 5) from {path}" in said, said[-2000:]

# ===== 6. checkpoint mismatches =======================================================================================
OTHER_ARCH = {  # another architecture and image size: 16x16 images, 8 channels, one level
    "model.backbone.init_args": {"img_resolution": 16, "in_channels": 1, "model_channels": 8, "channel_mult": [1],
                                 "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "data.init_args.resolution": 16,
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """last.ckpt of a 2-step tiny run (8x8) and of a 2-step run of another architecture (16x16)."""
    work = tmp_path_factory.mktemp("ckpts")
    tiny = in_process_fit(work / "tiny", **{"trainer.max_steps": 2})
    other = in_process_fit(work / "other", **{"trainer.max_steps": 2, **OTHER_ARCH})
    return {name: Path(cli.trainer.checkpoint_callback.last_model_path) for name, cli in
            (("tiny", tiny), ("other", other))}


@pytest.mark.slow
def test_sample_with_a_checkpoint_for_another_image_size_than_the_data_fails_clearly(tmp_path, two_checkpoints):
    data = write_config(tmp_path / "data.yaml")  # its data section: 8x8 digits
    error, said = run_command(["sample", "--out", str(tmp_path / "o"), "--ckpt", str(two_checkpoints["other"]),
                               "--data", str(data), "--num", "2", "--sampling.steps", "1"])
    assert isinstance(error, ValueError)
    assert "images of shape (1, 16, 16) but the data has shape (1, 8, 8)" in said


@pytest.mark.slow
def test_swap_of_checkpoints_for_different_image_sizes_fails_clearly(tmp_path, two_checkpoints):
    error, said = run_command(["swap", "--out", str(tmp_path / "o"), "--base", str(two_checkpoints["tiny"]),
                               "--other", str(two_checkpoints["other"]), "--num", "2", "--sampling.steps", "1"])
    assert isinstance(error, ValueError) and "(1, 8, 8)" in said and "(1, 16, 16)" in said


def _damaged_checkpoints(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message fragment)."""
    files = {}
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(4096))
    files["random-bytes"] = (junk, "is not a torch checkpoint")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (truncated, "is not a torch checkpoint")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, plain)
    files["not-calmwild"] = (plain, "not a calmwild checkpoint")
    tampered = tmp_path / "tampered.ckpt"
    checkpoint = load_checkpoint(good)
    checkpoint["calmwild"]["unet"]["model_channels"] = 32
    torch.save(checkpoint, tampered)
    files["weights-vs-metadata"] = (tampered, "do not match the architecture in its metadata")
    return files


@pytest.mark.slow
def test_sample_refuses_damaged_or_foreign_checkpoint_files_naming_the_file(tmp_path, two_checkpoints):
    for name, (path, expected) in _damaged_checkpoints(tmp_path, two_checkpoints["tiny"]).items():
        error, said = run_command(["sample", "--out", str(tmp_path / name), "--ckpt", str(path), "--num", "2",
                                   "--sampling.steps", "1"])
        assert isinstance(error, ValueError) and str(path) in said and expected in said, (name, said)


@pytest.mark.slow
def test_fit_resume_from_a_checkpoint_of_another_architecture_fails_before_training(tmp_path, two_checkpoints):
    error, said = fit_error(tmp_path, "--ckpt_path", str(two_checkpoints["other"]))
    assert isinstance(error, ValueError)
    assert "checkpoint does not match the configured model: unet is" in said and "'model_channels': 8" in said


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random-bytes", "truncated", "not-calmwild"])
def test_fit_resume_from_a_foreign_or_damaged_file_fails_clearly(tmp_path, two_checkpoints, name):
    path, _ = _damaged_checkpoints(tmp_path, two_checkpoints["tiny"])[name]
    error, said = fit_error(tmp_path, "--ckpt_path", str(path))
    assert isinstance(error, ValueError) and str(path) in said and "calmwild checkpoint" in said, said[-1500:]

# ===== 9. one-line errors, no litter ==================================================================================


@pytest.mark.parametrize(("option", "expected"),
                         [("--model.lr=nan", "model.lr: expected a number, got 'nan'"),
                          ("--trainer.devices=0", "trainer.devices=0: expected a positive number of devices")])
def test_bad_values_are_named_in_one_line(tmp_path, capsys, option, expected):
    from unittest import mock

    from calmwild.cli import main

    config = write_config(tmp_path / "cfg.yaml")
    with mock.patch.object(sys, "argv", ["calmwild"]), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'r'}", option])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert info.value.code == 2 and len(errors) == 1 and expected in errors[0], err[-2000:]
    assert "Traceback" not in err and "usage:" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing-root", "empty-folder", "corrupt-image"])
def test_a_data_error_leaves_no_run_directory(tmp_path, problem):
    from PIL import Image

    root = tmp_path / "images"
    if problem != "missing-root":
        root.mkdir()
    if problem == "corrupt-image":
        for i in range(4):
            Image.new("L", (8, 8), color=i * 40).save(root / f"{i}.png")
        (root / "4.png").write_bytes(b"not a png")
    data = {"class_path": "calmwild.data.ImageFolderDataModule",
            "init_args": {"root": str(root), "grayscale": True, "resolution": 8, "batch_size": 2}}
    error, said = fit_error(tmp_path, **{"data": data})
    assert str(root) in said
    assert not list((tmp_path / "runs").glob("run-*"))


@pytest.mark.slow
def test_a_mismatched_resume_writes_nothing_next_to_the_checkpoint(tmp_path, tiny_checkpoint):
    folder = tmp_path / "theirs" / "run-x" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(tiny_checkpoint.read_bytes())
    error, said = fit_error(tmp_path, "--ckpt_path", str(folder / "last.ckpt"),
                            **{"model.backbone.init_args.model_channels": 8})
    assert "does not match the configured model: unet is {'model_channels': 16}" in said
    assert sorted(p.name for p in (tmp_path / "theirs").rglob("*")) == ["checkpoints", "last.ckpt", "run-x"]
    assert not list((tmp_path / "runs").glob("run-*"))
