"""Test-wide settings: no network services, a non-interactive plotting backend, CPU threads kept modest."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), ".torch_home_unused"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """``last.ckpt`` of a real 2-step ``calmwild fit`` of the tiny config (see ``tiny.py``); treat it as read-only."""
    from tiny import in_process_fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = in_process_fit(tmp_path_factory.mktemp("tiny_checkpoint"), **{"trainer.max_steps": 2})
    finally:
        torch.set_num_threads(threads)
    return Path(cli.trainer.checkpoint_callback.last_model_path)


TINY_UNET = dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(4,), dropout=0.0)


@pytest.fixture(scope="session")
def train_4x4() -> torch.Tensor:
    """40 random 1x4x4 images in [-1, 1] (seed 0): a training set for the closed-form denoisers."""
    return torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1


class RowCounter:
    """A denoiser wrapper that counts the rows the sampler sends through it (one evaluation per row)."""

    def __init__(self, inner):
        self.inner, self.rows = inner, 0

    def __call__(self, x, sigma):
        self.rows += x.shape[0]
        return self.inner(x, sigma)


@pytest.fixture
def count_rows():
    """``count_rows(denoiser)``: the denoiser wrapped in a :class:`RowCounter`."""
    return RowCounter


@pytest.fixture
def gen():
    """A seeded CPU generator: ``gen(seed)``."""
    return lambda seed: torch.Generator().manual_seed(seed)


@pytest.fixture
def tiny_unet():
    """A tiny calmwild U-Net, ``tiny_unet(**overrides)``: 8x8 grayscale, 16 channels, two levels, no dropout."""
    from calmwild.unet import UNet

    return lambda **overrides: UNet(**{**TINY_UNET, **overrides})


@pytest.fixture
def tiny_net(tiny_unet):
    """``tiny_net(seed, **overrides)``: EDMPrecond around :func:`tiny_unet` with every weight perturbed by seeded noise,
    so that the zero-initialised output layers hide no mistake."""
    from calmwild.precond import EDMPrecond

    def make(seed: int, **overrides):
        torch.manual_seed(seed)
        net = EDMPrecond(tiny_unet(**overrides), sigma_data=0.5)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return net

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process runs use one intra-op thread, like the subprocesses (OMP_NUM_THREADS=1): on 2 shared cores two
    spinning threads per process slow tiny models down several-fold (and the reduction order matches)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
