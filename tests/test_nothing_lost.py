"""Nothing a user saved is ever lost: one test per finding of the fault-injection trial, then a kill-anywhere run.

1. checkpoints are saved atomically, also with $TMPDIR on another filesystem and on a full disk;
2. a damaged last.ckpt is named with the way forward;
3. SIGTERM / SIGINT save the current step and exit 143 / 130; the resumed run continues exactly;
4. a checkpoint outside a run's checkpoints/ never adopts its folder;
5. resuming from an earlier checkpoint starts a branch and never rewrites the parent's history;
6. one process at a time writes a run directory, and a killed holder does not block it;
7. nan_policy=skip gives up on a diverged run;
8. the logged sigma quantiles are those of the global batch under DDP;
9. user errors end in one line and leave no directory behind.
"""

from __future__ import annotations

import json
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
    CALMWILD,
    calmwild,
    fit_error,
    in_process_fit,
    only_run_dir,
    read_metrics,
    subprocess_env,
    wait_for_file,
    write_config,
)

from calmwild.checkpoint_io import AtomicCheckpointIO
from calmwild.runs import RunLock


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def other_filesystem(path: Path) -> Path | None:
    """A writable directory on another filesystem than ``path`` (a tmpfs), or None."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(path).st_dev:
        return shm
    return None


def steps_logged(run_dir: Path) -> list[int]:
    return sorted(int(row["step"]) for row in read_metrics(run_dir) if row.get("train/loss"))


# ===== 1. atomic saves ================================================================================================
WRITER = """
import sys, torch
path, mode = sys.argv[1], sys.argv[2]
if mode == "calmwild":  # what AtomicCheckpointIO.save_checkpoint does, without importing Lightning (start-up)
    from calmwild.outputs import atomic_write
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
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode], env=subprocess_env(TMPDIR=str(tmpdir)))
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
    import calmwild.outputs as outputs

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


# ===== 3. signals =====================================================================================================
MAX_STEPS = 12
CHECKPOINTS = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
               "init_args": {"save_last": True, "every_n_train_steps": 4, "save_top_k": -1}}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of the interrupted runs' config (12 steps, checkpoints every 4): (config, run dir)."""
    work = tmp_path_factory.mktemp("reference")
    config = write_config(work / "cfg.yaml", **{"trainer.max_steps": MAX_STEPS, "trainer.callbacks": [CHECKPOINTS]})
    calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(work / "straight")], cwd=work)
    return config, only_run_dir(work / "straight")


def assert_same_run(reference: Path, run_dir: Path) -> None:
    """Bitwise the same final live and EMA weights, optimizer state and metric history."""
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for key in a["state_dict"]:  # live (net.) and EMA (net_ema.) weights
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert read_metrics(reference) == read_metrics(run_dir)
    assert steps_logged(run_dir) == list(range(MAX_STEPS))


def start_fit(config: Path, root: Path, hook: dict, *extra: str) -> subprocess.Popen:
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--trainer.callbacks",
            json.dumps([CHECKPOINTS, hook]), *extra]
    return subprocess.Popen(CALMWILD + args, cwd=root.parent, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def resume(config: Path, root: Path) -> None:
    calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--ckpt_path", "last"],
             cwd=root.parent)


@pytest.fixture(scope="module")
def signal_runs(reference_run, tmp_path_factory):
    """Runs that get SIGTERM / SIGINT after step 6 (between the checkpoints at 4 and 8), then resume to the end."""
    config, _ = reference_run
    work = tmp_path_factory.mktemp("signals")
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(sig).name
        marker = work / f"{name}.step"
        process = start_fit(config, work / name, {"class_path": "tiny.MarkSteps", "init_args": {"marker": str(marker)}})
        while int(wait_for_file(marker, process)) < 6:
            time.sleep(0.05)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=120)
        run_dir = only_run_dir(work / name)
        runs[name] = run_dir
        runs[f"{name}.returncode"], runs[f"{name}.output"] = process.returncode, output
        runs[f"{name}.step"] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        resume(config, work / name)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_the_current_step_and_exits_with_its_status(signal_runs, name, code):
    step = signal_runs[f"{name}.step"]
    assert signal_runs[f"{name}.returncode"] == code
    assert step not in (4, 8) and 6 <= step < 12  # a checkpoint of the step the signal came in, not an interval's
    assert f"checkpoint of step {step} saved to" in signal_runs[f"{name}.output"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_the_run_resumed_after_a_signal_continues_exactly(reference_run, signal_runs, name):
    assert_same_run(reference_run[1], signal_runs[name])


# ===== 4. and 5. resume never rewrites history ========================================================================
@pytest.mark.slow
def test_a_checkpoint_outside_a_run_never_adopts_its_folder(tmp_path, tiny_checkpoint):
    elsewhere = tmp_path / "downloads"
    (elsewhere / "logs").mkdir(parents=True)
    (elsewhere / "model.ckpt").write_bytes(tiny_checkpoint.read_bytes())
    (elsewhere / "logs" / "metrics.csv").write_text("step,note\n1,mine\n9,mine\n")
    before = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    cli = in_process_fit(tmp_path, "--ckpt_path", str(elsewhere / "model.ckpt"), **{"trainer.max_steps": 4})
    run_dir = Path(cli.trainer.default_root_dir)
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("run-")
    branch = json.loads((run_dir / "branch.json").read_text())
    assert branch["parent_run"] is None and branch["step"] == 2
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_starts_a_branch_and_keeps_the_parent(tmp_path):
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 12})
    parent = Path(cli.trainer.default_root_dir)
    files_before = {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()}
    early = parent / "checkpoints" / "epoch=1-step=4.ckpt"
    branch_cli = in_process_fit(tmp_path, "--ckpt_path", str(early), **{"trainer.max_steps": 10})
    branch = Path(branch_cli.trainer.default_root_dir)
    assert branch != parent and branch.parent == parent.parent
    assert {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()} == files_before  # untouched, no last-v1
    record = json.loads((branch / "branch.json").read_text())
    assert record["parent_run"] == str(parent) and record["step"] == 4 and record["parent_checkpoint"] == str(early)
    assert steps_logged(branch) == list(range(10)) and steps_logged(parent) == list(range(12))
    assert branch_cli.trainer.global_step == 10


# ===== 6. one writer per run ==========================================================================================
@pytest.mark.slow
def test_a_second_process_on_a_run_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 4})
    run_dir = Path(cli.trainer.default_root_dir)
    lock = RunLock(run_dir).acquire()  # this test process plays a fit that is still running
    try:
        error, said = fit_error(tmp_path, "--ckpt_path", "last", **{"trainer.max_steps": 8})
        assert f"run directory {run_dir} is in use by process {os.getpid()}" in said
    finally:
        lock.release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom calmwild.runs import RunLock\n"
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    resumed = in_process_fit(tmp_path, "--ckpt_path", "last", **{"trainer.max_steps": 8})
    assert Path(resumed.trainer.default_root_dir) == run_dir and resumed.trainer.global_step == 8


# ===== 7. a diverged run under nan_policy=skip ========================================================================
@pytest.mark.slow
def test_skip_policy_gives_up_after_too_many_consecutive_non_finite_steps(tmp_path):
    poison = {"class_path": "tiny.PoisonFrom", "init_args": {"step": 3}}
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 2}}
    with pytest.raises(FloatingPointError) as info:
        in_process_fit(tmp_path, "--model.nan_policy", "skip", "--model.nan_max_consecutive", "4",
                       **{"trainer.max_steps": 30, "trainer.callbacks": [checkpoint, poison]})
    message = str(info.value)
    assert "gives up at global step 7: 5 consecutive non-finite steps (from step 3" in message
    last = torch.load(next((tmp_path / "runs").glob("run-*/checkpoints/last.ckpt")), weights_only=True)
    assert last["global_step"] <= 7 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


# ===== 8. sigma quantiles under DDP ===================================================================================
def test_logged_sigma_quantiles_are_those_of_the_global_batch(monkeypatch):
    """Every rank draws the whole global batch (then keeps its slice); what training_step hands to the sigma logging
    is the global batch's sigmas, on every rank (the trial saw rank 0's slice logged)."""
    from types import SimpleNamespace

    from calmwild.module import DiffusionModule
    from calmwild.unet import UNet

    module = DiffusionModule(UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=[1],
                                  attn_resolutions=[], dropout=0.0))
    logged = []
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "_log_sigma_histogram", lambda sigma: logged.append(sigma))

    def step(world: int, rank: int, local: int):
        strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
        module._trainer = SimpleNamespace(world_size=world, global_rank=rank, global_step=0, strategy=strategy)
        local_draw, _, _ = module._draw_noise(torch.zeros(local, 1, 8, 8))
        module.training_step([torch.zeros(local, 1, 8, 8)], 0)
        return local_draw.sigma

    single = step(1, 0, 4)
    halves = [step(2, 0, 2), step(2, 1, 2)]
    module._trainer = None
    assert torch.equal(torch.cat(halves), single)  # the ranks' slices make up the single process's batch
    assert len(logged) == 3 and all(torch.equal(sigma, logged[0]) for sigma in logged) and logged[0].numel() == 4


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


# ===== all together: kills at random moments ==========================================================================
@pytest.mark.slow
def test_kills_at_random_moments_one_during_a_save_change_nothing(reference_run, tmp_path):
    """SIGKILL after a random step, during a checkpoint save, and after another random step, each followed by
    ``--ckpt_path last``: the final live and EMA weights, optimizer state and metric history are bitwise those of an
    uninterrupted run; the file the kill during the save was writing is whole (the previous one)."""
    config, reference = reference_run
    rng = random.Random(2026)
    root = tmp_path / "killed"
    for kind, at in (("step", rng.randint(5, 7)), ("save", None), ("step", rng.randint(9, 11))):
        marker = tmp_path / f"{kind}-{at}.marker"
        hook = ({"class_path": "tiny.MarkSteps", "init_args": {"marker": str(marker)}} if kind == "step" else
                {"class_path": "tiny.SlowSaves", "init_args": {"marker": str(marker)}})
        process = start_fit(config, root, hook, *(["--ckpt_path", "last"] if root.exists() else []))
        while at is not None and int(wait_for_file(marker, process)) < at:
            time.sleep(0.02)
        if at is None:
            wait_for_file(marker, process)  # half of a checkpoint is on disk now
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        last = only_run_dir(root) / "checkpoints" / "last.ckpt"  # whole, whatever the moment of the kill
        assert torch.load(last, weights_only=True)["global_step"] in (4, 8)
    resume(config, root)
    assert_same_run(reference, only_run_dir(root))
    assert not [p.name for p in (only_run_dir(root) / "checkpoints").iterdir() if p.suffix == ".tmp"]
