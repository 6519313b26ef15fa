"""NVlabs/edm network pickles: read as data, mapped onto calmwild's U-Net, computing SongUNet's function.

The pickles are written here in EDM's record format by ``edm_reference`` (no EDM code involved), whose plain-tensor
forward pass is the independent computation the imported network is compared with."""

import math
import os

import pytest
import torch
from edm_reference import Rec, children, edm_denoise, edm_precond, songunet, write_edm_pickle

from calmwild.checkpoints import read_checkpoint
from calmwild.denoisers import load_denoiser
from calmwild.interop.edm import edm_checkpoint, import_edm_network, read_edm_pickle
from calmwild.interop.safe_pickle import UnsafeFileError

SIGMAS = torch.logspace(math.log10(0.002), math.log10(80.0), 12)


def snapshot(gen_seed=0, **net):
    """What EDM's training loop pickles: the EMA network, the loss, the augmentation pipe and the dataset settings."""
    gen = torch.Generator().manual_seed(gen_seed)
    return {"ema": edm_precond(songunet(gen, **net)), "loss_fn": Rec("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5),
            "augment_pipe": Rec("AugmentPipe", p=0.12, xflip=1e8), "dataset_kwargs": {"path": "cifar10.zip"}}


def max_relative_error(denoiser, precond, shape, labels=None):
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for sigma in SIGMAS:
        x = torch.randn(3, *shape, generator=gen) * (1 + float(sigma))
        s = torch.full((3,), float(sigma))
        expected = edm_denoise(precond, x, s, labels)
        worst = max(worst, float((denoiser(x, s) - expected).norm() / expected.norm()))
    return worst


@pytest.mark.parametrize("label_dim", [0, 4])
def test_the_imported_network_computes_songunets_function(tmp_path, label_dim):
    content = snapshot(label_dim=label_dim, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4, 2))
    write_edm_pickle(tmp_path / "net.pkl", content)
    sample_class = 2 if label_dim else None
    import_edm_network(tmp_path / "net.pkl", tmp_path / "net.ckpt", sample_class=sample_class)
    denoiser = load_denoiser(tmp_path / "net.ckpt")
    labels = torch.eye(label_dim)[[2, 2, 2]] if label_dim else None
    assert max_relative_error(denoiser, content["ema"], (2, 8, 8), labels) <= 1e-5
    if label_dim:  # another class gives another function: the label reaches the network
        other = torch.eye(label_dim)[[0, 0, 0]]
        x, s = torch.randn(3, 2, 8, 8), torch.full((3,), 1.0)
        assert not torch.allclose(denoiser(x, s), edm_denoise(content["ema"], x, s, other), atol=1e-4)


def test_key_mapping_shapes_and_provenance(tmp_path):
    write_edm_pickle(tmp_path / "snap.pkl", snapshot())
    state, meta = edm_checkpoint(tmp_path / "snap.pkl")
    assert meta["unet"] == {"img_resolution": 8, "in_channels": 2, "out_channels": 2, "model_channels": 16,
                            "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.1,
                            "num_classes": 0, "channel_mult_emb": 4, "variant": "edm"}
    from calmwild.precond import EDMPrecond
    from calmwild.unet import UNet

    expected = EDMPrecond(UNet(**meta["unet"])).state_dict()
    ema = {k[len("net_ema."):]: v for k, v in state.items() if k.startswith("net_ema.")}
    assert {k: tuple(v.shape) for k, v in ema.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    provenance = meta["provenance"]
    assert provenance["file"] == "snap.pkl" and len(provenance["sha256"]) == 64 and provenance["network"] == "ema"
    assert provenance["dropped"] == ["map_augment.weight"] and provenance["precond"] == "EDMPrecond"
    assert provenance["model_kwargs"]["channel_mult"] == [1, 2]


def test_the_source_code_inside_the_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    hostile = f"open({str(marker)!r}, 'w').write('ran')\n"
    exec(compile(hostile, "<edm source>", "exec"), {})  # what EDM's own loader does with it: the payload is live
    assert marker.exists()
    marker.unlink()
    write_edm_pickle(tmp_path / "hostile.pkl", snapshot(), module_src=hostile)
    state, meta = edm_checkpoint(tmp_path / "hostile.pkl")
    assert not marker.exists() and state
    assert hostile not in repr(read_edm_pickle(tmp_path / "hostile.pkl"))  # only its hash is kept


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_foreign_global_is_refused_by_name(tmp_path):
    marker = tmp_path / "pwned"
    content = snapshot()
    content["ema"].attrs["sigma_data"] = _Payload(marker)
    write_edm_pickle(tmp_path / "evil.pkl", content)
    with pytest.raises(UnsafeFileError, match=r"evil\.pkl.*posix\.system"):
        edm_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_what_cannot_be_reproduced_is_refused_by_name(tmp_path):
    content = snapshot()
    content["ema"].modules["model"].modules["map_noise"].class_name = "FourierEmbedding"
    write_edm_pickle(tmp_path / "ncsn.pkl", content)
    with pytest.raises(ValueError, match="FourierEmbedding"):
        edm_checkpoint(tmp_path / "ncsn.pkl")
    content = snapshot()
    content["ema"].class_name = "VPPrecond"
    write_edm_pickle(tmp_path / "vp.pkl", content)
    with pytest.raises(ValueError, match="VPPrecond"):
        edm_checkpoint(tmp_path / "vp.pkl")
    block = snapshot()["ema"]
    norm = children(block.modules["model"].modules["enc"])["8x8_block0"].modules["norm0"]
    norm.attrs["eps"] = 1e-5
    write_edm_pickle(tmp_path / "eps.pkl", {"ema": block})
    with pytest.raises(ValueError, match=r"enc\.8x8_block0\.norm0.*eps 1e-05"):
        edm_checkpoint(tmp_path / "eps.pkl")
    with pytest.raises(ValueError, match=r"no network 'ema_v2'.*\['ema'\]"):
        edm_checkpoint(tmp_path / "eps.pkl", network="ema_v2")
    write_edm_pickle(tmp_path / "cond.pkl", snapshot(label_dim=3))
    with pytest.raises(ValueError, match=r"class-conditional \(3 classes\).*sample_class"):
        edm_checkpoint(tmp_path / "cond.pkl")
    with pytest.raises(ValueError, match="sample_class 5 is not a class"):
        edm_checkpoint(tmp_path / "cond.pkl", sample_class=5)


def test_import_writes_safetensors_that_sample_like_the_torch_file(tmp_path):
    write_edm_pickle(tmp_path / "net.pkl", snapshot())
    import_edm_network(tmp_path / "net.pkl", tmp_path / "net.safetensors")
    import_edm_network(tmp_path / "net.pkl", tmp_path / "net.ckpt")
    assert read_checkpoint(tmp_path / "net.safetensors")["calmwild"]["provenance"]["file"] == "net.pkl"
    x, s = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 3.0])
    from_safetensors, from_ckpt = load_denoiser(tmp_path / "net.safetensors"), load_denoiser(tmp_path / "net.ckpt")
    torch.testing.assert_close(from_safetensors(x, s), from_ckpt(x, s), rtol=0, atol=0)
