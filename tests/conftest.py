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
