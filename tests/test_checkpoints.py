"""The checkpoint format: torch files and .safetensors hold the same weights and metadata, read without code."""

import json

import pytest
import torch

from calmwild.checkpoints import (
    backbone_config,
    convert_checkpoint,
    load_network,
    network_state,
    read_checkpoint,
    write_checkpoint,
)
from calmwild.denoisers import load_denoiser
from calmwild.precond import EDMPrecond


def test_safetensors_round_trip_keeps_every_tensor_and_the_metadata(tmp_path, tiny_checkpoint):
    original = read_checkpoint(tiny_checkpoint)
    converted = convert_checkpoint(tiny_checkpoint, tmp_path / "model.safetensors")
    back = convert_checkpoint(converted, tmp_path / "back.ckpt")
    for path in (converted, back):
        loaded = read_checkpoint(path)
        assert loaded["calmwild"] == json.loads(json.dumps(original["calmwild"]))
        assert loaded["state_dict"].keys() == original["state_dict"].keys()
        for key, value in original["state_dict"].items():
            assert torch.equal(loaded["state_dict"][key], value), key
    assert b"pickle" not in converted.read_bytes()[:200] and converted.read_bytes()[8:9] == b"{"  # a JSON header
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 0.5, 5.0])
    torch.testing.assert_close(load_denoiser(converted)(x, sigma), load_denoiser(tiny_checkpoint)(x, sigma),
                               rtol=0, atol=0)


def test_safetensors_without_calmwild_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"net_ema.w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match=r"foreign\.safetensors is not a calmwild checkpoint"):
        read_checkpoint(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a readable safetensors file"):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_written_checkpoints_are_atomic_and_leave_no_temporary_files(tmp_path, tiny_checkpoint, monkeypatch):
    checkpoint = read_checkpoint(tiny_checkpoint)
    path = write_checkpoint(tmp_path / "copy.ckpt", checkpoint["state_dict"], checkpoint["calmwild"])
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(path, checkpoint["state_dict"], checkpoint["calmwild"])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["copy.ckpt"]


def test_a_config_recorded_before_a_key_existed_means_the_default(tiny_checkpoint):
    meta = read_checkpoint(tiny_checkpoint)["calmwild"]
    old = {**meta, "unet": {k: v for k, v in meta["unet"].items() if k != "variant"}}
    assert backbone_config(old, "old.ckpt") == backbone_config(meta, "new.ckpt")
    assert backbone_config(old, "old.ckpt")["variant"] == "calmwild"


def test_only_calmwilds_own_backbones_are_built_from_a_files_say_so(tmp_path, tiny_checkpoint):
    checkpoint = read_checkpoint(tiny_checkpoint)
    meta = {**checkpoint["calmwild"], "backbone": "subprocess.Popen"}
    write_checkpoint(tmp_path / "odd.ckpt", checkpoint["state_dict"], meta)
    with pytest.raises(ValueError, match=r"backbone subprocess\.Popen;.*calmwild\.unet\.UNet or a module you trust"):
        load_network(tmp_path / "odd.ckpt")


def test_a_backbone_of_a_module_the_user_trusts_is_rebuilt(tmp_path, monkeypatch):
    from tiny import ConvBackbone

    backbone = ConvBackbone(channels=4)
    net = EDMPrecond(backbone, 0.5)
    meta = {"format_version": 1, "backbone": "tiny.ConvBackbone", "unet": backbone.config, "sigma_data": 0.5,
            "image_shape": [1, 8, 8], "num_classes": 0, "sample_class": None}
    write_checkpoint(tmp_path / "conv.ckpt", network_state(net), meta)
    with pytest.raises(ValueError, match="set CALMWILD_BACKBONE_MODULES=tiny"):
        load_network(tmp_path / "conv.ckpt")
    monkeypatch.setenv("CALMWILD_BACKBONE_MODULES", "elsewhere, tiny")
    loaded, _ = load_network(tmp_path / "conv.ckpt")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    torch.testing.assert_close(loaded(x, sigma), net(x, sigma), rtol=0, atol=0)
    monkeypatch.setenv("CALMWILD_BACKBONE_MODULES", "subprocess")
    odd = {**meta, "backbone": "subprocess.Popen"}
    write_checkpoint(tmp_path / "odd.ckpt", network_state(net), odd)
    with pytest.raises(ValueError, match="not a torch.nn.Module class"):
        load_network(tmp_path / "odd.ckpt")
