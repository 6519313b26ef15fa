"""DDP on CPU (gloo, 2 processes): the same training as one process with the same global batch, files written by
rank 0 only, and a failure on one rank ending every rank within a bounded time.

Each test runs ``calmwild fit --trainer.strategy=ddp --trainer.devices=2`` in a subprocess (Lightning's launcher then
starts rank 1 by re-running the command). The test hooks are callbacks named by class path (``test_ddp.X``, this
folder on PYTHONPATH); they write only into the test's own folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tiny import calmwild, load_checkpoint, only_run_dir, read_metrics, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 6  # two epochs of 3 global batches of 32 (96 training images)
GLOBAL_BATCH = 32


# ----- test hooks -----------------------------------------------------------------------------------------------------


class RecordBatches(Callback):
    """Saves the training batches this rank saw, and its pid, into ``folder/rank<r>.pt`` at the end of training."""

    def __init__(self, folder: str):
        self.folder = folder
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].detach().clone())

    def on_train_end(self, trainer, pl_module):
        torch.save({"batches": self.batches, "pid": os.getpid()}, Path(self.folder) / f"rank{trainer.global_rank}.pt")


class FailOnRank(Callback):
    """Records this rank's pid in ``folder/pid<r>``; raises on rank ``rank`` at global step ``step``."""

    def __init__(self, rank: int, step: int, folder: str):
        self.rank, self.step, self.folder = rank, step, folder

    def on_train_start(self, trainer, pl_module):
        (Path(self.folder) / f"pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"test hook: rank {self.rank} fails at step {self.step}")


# ----- helpers --------------------------------------------------------------------------------------------------------


def ddp_config(path: Path, devices: int, callbacks: list[dict], **changes) -> Path:
    per_rank = GLOBAL_BATCH // devices
    return write_config(
        path,
        **{
            "trainer.max_steps": STEPS,
            "trainer.devices": devices,
            "trainer.strategy": "ddp" if devices > 1 else "auto",
            "trainer.callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_last": True, "every_n_train_steps": 3, "save_top_k": -1}},
                *callbacks,
            ],
            "model.backbone.init_args.dropout": 0.0,  # dropout masks are per rank by design (see test below)
            "data.init_args.batch_size": per_rank,
            **changes,
        },
    )


def live_network(path: Path) -> torch.nn.Module:
    """The live (not EMA) EDMPrecond(UNet) of a calmwild checkpoint, in eval mode."""
    from calmwild.precond import EDMPrecond
    from calmwild.unet import UNet

    checkpoint = load_checkpoint(path)
    net = EDMPrecond(UNet(**checkpoint["calmwild"]["unet"]), checkpoint["calmwild"]["sigma_data"])
    net.load_state_dict({k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    return net.eval()


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory):
    """The same training as 1 process x batch 32 and as 2 processes x batch 16."""
    work = tmp_path_factory.mktemp("ddp")
    runs, timings = {}, {}
    for devices in (1, 2):
        record = work / f"record{devices}"
        record.mkdir()
        hook = {"class_path": "test_ddp.RecordBatches", "init_args": {"folder": str(record)}}
        config = ddp_config(work / f"devices{devices}.yaml", devices, [hook])
        start = time.perf_counter()
        done = calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(work / f"root{devices}")],
                        cwd=work, timeout=300)
        timings[devices] = time.perf_counter() - start
        runs[devices] = {
            "root": work / f"root{devices}",
            "run_dir": only_run_dir(work / f"root{devices}"),
            "record": {r: torch.load(record / f"rank{r}.pt") for r in range(devices)},
            "output": done.stdout,
        }
    print(f"DDP timings (s): 1 process {timings[1]:.1f}, 2 processes {timings[2]:.1f}")
    return runs[1], runs[2], work


@pytest.mark.slow
def test_each_rank_serves_its_slice_of_the_single_process_global_batch(single_and_ddp):
    """Rank r's batch k is images [16 r, 16 r + 16) of the single process's batch k, epoch after epoch."""
    single, ddp, _ = single_and_ddp
    one = single["record"][0]["batches"]
    rank0, rank1 = ddp["record"][0]["batches"], ddp["record"][1]["batches"]
    assert len(one) == len(rank0) == len(rank1) == STEPS
    for k in range(STEPS):
        assert rank0[k].shape[0] == rank1[k].shape[0] == GLOBAL_BATCH // 2
        assert torch.equal(torch.cat([rank0[k], rank1[k]]), one[k]), f"step {k}"
    assert ddp["record"][0]["pid"] != ddp["record"][1]["pid"]  # two processes indeed


@pytest.mark.slow
def test_two_processes_train_the_same_network_as_one_process_with_the_same_global_batch(single_and_ddp):
    """Same images per step (above) + the global batch's sigmas and noises drawn from (seed, step) and sliced by
    rank + DDP's gradient mean over equal per-rank batches = the single-process gradient, up to the order of float
    additions. Compared: the logged loss of every step (relative 1e-5) and the trained EMA and live denoisers on
    fixed probes at sigma 0.01..80 (absolute 1e-4 on outputs of size ~1; measured ~2e-6).

    Not compared weight by weight: a bias directly followed by a GroupNorm has a true gradient of exactly zero, its
    computed gradient is rounding noise (~1e-12) whose sign depends on the summation order, and Adam divides it by
    its own RMS, so such biases random-walk by about lr per step in either run (measured differences up to 1.6e-4)
    without changing the network's function."""
    from calmwild.denoisers import load_denoiser

    single, ddp, _ = single_and_ddp
    a_path, b_path = (run["run_dir"] / "checkpoints" / "last.ckpt" for run in (single, ddp))
    assert load_checkpoint(a_path)["global_step"] == load_checkpoint(b_path)["global_step"] == STEPS
    a_rows, b_rows = read_metrics(single["run_dir"]), read_metrics(ddp["run_dir"])
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for a, b in zip(a_rows, b_rows):
        assert float(b["train/loss"]) == pytest.approx(float(a["train/loss"]), rel=1e-5), a["step"]
    probe = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    live = [live_network(p) for p in (a_path, b_path)]
    ema = [load_denoiser(p) for p in (a_path, b_path)]
    worst = 0.0
    for sigma in (0.01, 0.1, 1.0, 10.0, 80.0):
        s = torch.full((16,), sigma)
        with torch.no_grad():
            pairs = [(ema[0](probe * sigma, s), ema[1](probe * sigma, s)),
                     (live[0](probe * sigma, s), live[1](probe * sigma, s))]
        worst = max([worst] + [float((x - y).abs().max()) for x, y in pairs])
    print(f"largest |single - ddp| denoiser output difference: {worst:.3g}")
    assert worst < 1e-4


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_directory_logs_and_checkpoints(single_and_ddp):
    single, ddp, work = single_and_ddp
    assert only_run_dir(ddp["root"]).name  # rank 1 made no run directory of its own
    names = files_under(ddp["run_dir"])
    assert names == files_under(single["run_dir"]), (names, files_under(single["run_dir"]))
    assert [int(r["step"]) for r in read_metrics(ddp["run_dir"])] == list(range(STEPS))  # one row per step
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["record1", "record2", "root1", "root2"]
    assert ddp["output"].count("calmwild: run finished at step") == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failure_on_one_rank_ends_every_rank_within_a_minute(tmp_path, failing_rank):
    hook = {"class_path": "test_ddp.FailOnRank", "init_args": {"rank": failing_rank, "step": 2,
                                                                "folder": str(tmp_path)}}
    config = ddp_config(tmp_path / "fail.yaml", 2, [hook])
    start = time.perf_counter()
    done = calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "root")],
                    cwd=tmp_path, timeout=120, check=False)
    elapsed = time.perf_counter() - start
    print(f"rank {failing_rank} failing: all ranks ended after {elapsed:.1f} s (exit code {done.returncode})")
    assert done.returncode != 0
    assert f"test hook: rank {failing_rank} fails at step 2" in done.stdout
    assert elapsed < 60
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "a rank outlived the failed run"
