"""Checkpoints are saved so that nothing is ever half-written: atomically beside the target (never via $TMPDIR on
another filesystem), a full disk keeps the previous file and says so, and a damaged last.ckpt is named with the
newest intact checkpoint beside it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import (
    fit_error,
    in_process_fit,
    subprocess_env,
)

from calmwild.checkpoint_io import AtomicCheckpointIO

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def other_filesystem(path: Path) -> Path | None:
    """A writable directory on another filesystem than ``path`` (a tmpfs), or None."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(path).st_dev:
        return shm
    return None

# ===== 1. atomic saves ================================================================================================
WRITER = """
import sys, torch
path, mode = sys.argv[1], sys.argv[2]
if mode == "calmwild":  # what AtomicCheckpointIO.save_checkpoint does, without importing Lightning (start-up)
    from calmwild.io import atomic_write
    save = lambda obj, target: atomic_write(target, lambda handle: torch.save(obj, handle))
else:  # Lightning's own: a temporary file under $TMPDIR, then a move
    from lightning.fabric.utilities.cloud_io import _atomic_save as save
versions = [{"version": v, "weights": torch.full((6_000_000,), float(v))} for v in (1, 2)]
i = 0
while True:
    save(versions[i % 2], path)
    i += 1
"""


def _watch_while_killing(path: Path, mode: str, tmpdir: Path, kills: int, seed: int) -> tuple[int, list[int]]:
    """Starts the writer ``kills`` times, SIGKILLs it at a random moment after its first save; returns the full size
    and every size seen meanwhile."""
    full = path.stat().st_size
    rng, seen = random.Random(seed), []
    for _ in range(kills):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode],
                                  env=subprocess_env(TMPDIR=str(tmpdir)))
        try:
            before = path.stat().st_mtime_ns
            deadline = time.monotonic() + 90
            while path.stat().st_mtime_ns == before:
                assert writer.poll() is None and time.monotonic() < deadline, "the writer never saved"
                time.sleep(0.005)
            stop = time.monotonic() + 0.2 + rng.random()
            while time.monotonic() < stop:
                seen.append(path.stat().st_size)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        seen.append(path.stat().st_size)
    return full, seen


@pytest.mark.slow
def test_saves_are_atomic_with_tmpdir_on_another_filesystem(tmp_path):
    """The trial's finding: Lightning's save copies across filesystems, so a kill leaves a truncated file. calmwild's
    never writes under $TMPDIR and is only ever seen whole; a killed writer's temporary file is cleaned up."""
    elsewhere = other_filesystem(tmp_path) or tmp_path / "tmpdir"
    elsewhere.mkdir(exist_ok=True)
    scratch = Path(elsewhere) / f"calmwild-test-{os.getpid()}"
    scratch.mkdir()
    try:
        path = tmp_path / "run" / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"version": 0, "weights": torch.zeros(6_000_000)}, path)
        full, seen = _watch_while_killing(path, "calmwild", scratch, kills=3, seed=0)
        assert set(seen) == {full}, f"saw a partial checkpoint: sizes {sorted(set(seen))} of {full}"
        state = torch.load(path, weights_only=True)
        assert torch.all(state["weights"] == state["version"])
        assert not list(scratch.iterdir())  # $TMPDIR is never used
        AtomicCheckpointIO().save_checkpoint({"version": 3, "weights": torch.zeros(3)}, path)
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # killed writers' temporaries removed
        if other_filesystem(tmp_path) is not None:  # the hazard is real: Lightning's save is caught half-written
            full, seen = _watch_while_killing(path, "lightning", scratch, kills=1, seed=1)
            torch.save({"version": 1, "weights": torch.full((6_000_000,), 1.0)}, tmp_path / "reference.ckpt")
            assert any(size < (tmp_path / "reference.ckpt").stat().st_size for size in seen), "no partial file seen"
    finally:
        shutil.rmtree(scratch)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(4)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_full_disk(obj, handle, *args, **kwargs):
        handle.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(OSError, match=r"could not save checkpoint .*last\.ckpt \(No space left on device\); the "
                                      r"previous last\.ckpt is intact"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_every_checkpoint_of_a_fit_is_written_beside_its_target_then_renamed(tmp_path, monkeypatch):
    import calmwild.io as outputs

    renames = []
    original = os.replace

    def recording_replace(src, dst):
        renames.append((Path(src), Path(dst), os.stat(src).st_dev == os.stat(Path(dst).parent).st_dev))
        return original(src, dst)

    monkeypatch.setattr(outputs.os, "replace", recording_replace)
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 8})
    written = sorted(Path(cli.trainer.default_root_dir, "checkpoints").glob("*.ckpt"))
    assert [p.name for p in written] == ["epoch=1-step=4.ckpt", "epoch=2-step=8.ckpt", "last.ckpt"]
    ckpt_renames = [r for r in renames if r[1].suffix == ".ckpt"]
    assert {dst for _, dst, _ in ckpt_renames} == set(written)
    assert all(src.parent == dst.parent and same for src, dst, same in ckpt_renames)

# ===== 2. a damaged last.ckpt =========================================================================================


@pytest.mark.slow
def test_a_damaged_last_checkpoint_is_named_with_the_newest_intact_one(tmp_path):
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 8})
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    last.write_bytes(b"")  # what a kill during Lightning's cross-filesystem copy left behind
    error, said = fit_error(tmp_path, "--ckpt_path", "last")
    assert str(last) in said and "not a usable calmwild checkpoint" in said
    assert f"newest intact checkpoint beside it is {last.parent / 'epoch=2-step=8.ckpt'} (step 8)" in said
