"""Resuming never changes a run: kill -9, SIGTERM or SIGINT at any moment (one kill during a save) and
`--ckpt_path last` give bitwise the weights, EMA, optimizer state and metric history of an uninterrupted run;
resuming from an earlier checkpoint or from a file outside any run starts a branch that keeps the parent
untouched; one process at a time writes a run directory.

End-to-end runs are subprocesses of `calmwild` on the tiny config (tiny.py), marked slow."""

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
from lightning.pytorch.callbacks import Callback
from tiny import (
    CALMWILD,
    assert_same_tensors,
    calmwild,
    fit_error,
    in_process_fit,
    load_checkpoint,
    only_run_dir,
    read_metrics,
    steps_logged,
    subprocess_env,
    tiny_config,
    wait_for_file,
    write_config,
)

from calmwild.runs import RunLock

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ===== 1. crash and resume ============================================================================================
CRASH_STEP = 10  # the crashed run has done steps 0..9 (checkpoints at 4 and 8) when it is killed
MAX_STEPS = 32  # a multiple of the checkpoint interval, as long runs use


@pytest.fixture(scope="module")
def crash_and_resume(tmp_path_factory):
    """An uninterrupted 32-step run, and a run SIGKILLed before step 10 then resumed with ``--ckpt_path last``."""
    work = tmp_path_factory.mktemp("crash")
    config = write_config(work / "tiny.yaml", **{"trainer.max_steps": MAX_STEPS})
    timings = {}
    start = time.perf_counter()
    calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(work / "reference")], cwd=work)
    timings["reference"] = time.perf_counter() - start

    marker = work / "hung.txt"
    hang = {"class_path": "tiny.HangAtStep", "init_args": {"step": CRASH_STEP, "marker": str(marker)}}
    crash_config = write_config(
        work / "crash.yaml",
        **{"trainer.max_steps": MAX_STEPS, "trainer.callbacks": tiny_config()["trainer"]["callbacks"] + [hang]},
    )
    start = time.perf_counter()
    log = open(work / "crashed.log", "w")  # a file, not a pipe: a full pipe would block the run
    process = subprocess.Popen(
        CALMWILD + ["fit", "--config", str(crash_config), "--trainer.default_root_dir", str(work / "crashed")],
        cwd=work, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            ended = process.poll() is not None
            assert not ended, f"the run ended before the crash point:\n{(work / 'crashed.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the run did not reach the crash point within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    timings["crashed"] = time.perf_counter() - start
    crashed_dir = only_run_dir(work / "crashed")
    last = load_checkpoint(crashed_dir / "checkpoints" / "last.ckpt")
    pre_resume_rows = read_metrics(crashed_dir)

    start = time.perf_counter()
    resumed = calmwild(
        ["fit", "--config", str(config), "--trainer.default_root_dir", str(work / "crashed"), "--ckpt_path", "last"],
        cwd=work,
    )
    timings["resumed"] = time.perf_counter() - start
    print(f"crash/resume timings (s): {timings}")
    return {
        "reference": only_run_dir(work / "reference"),
        "resumed": only_run_dir(work / "crashed"),  # resuming reuses the crashed run's directory
        "resume_step": last["global_step"],
        "pre_resume_rows": pre_resume_rows,
        "resume_output": resumed.stdout,
    }


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_bitwise_the_same_live_weights(crash_and_resume):
    """Data order (resumable loader), sigma/noise/dropout (seeded by step), Adam and LR-schedule state: the live
    weights after a SIGKILL and a mid-epoch resume are bitwise those of the uninterrupted run."""
    runs = crash_and_resume
    # killed before step 10: the last checkpoint is step 8, inside epoch 2 (an epoch is 3 steps): a mid-epoch resume
    assert runs["resume_step"] == 8 and runs["resume_step"] % 3 != 0
    assert "not resumable" not in runs["resume_output"]  # Lightning's mid-epoch warning: the loader is resumable
    ref = load_checkpoint(runs["reference"] / "checkpoints" / "last.ckpt")
    res = load_checkpoint(runs["resumed"] / "checkpoints" / "last.ckpt")
    assert ref["global_step"] == res["global_step"] == MAX_STEPS
    assert assert_same_tensors(ref["state_dict"], res["state_dict"], "net.") > 10
    for a, b in zip(ref["optimizer_states"][0]["state"].values(), res["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert ref["lr_schedulers"][0]["last_epoch"] == res["lr_schedulers"][0]["last_epoch"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_bitwise_the_same_ema_weights(crash_and_resume):
    """The EMA is updated in ``optimizer_step``, before ModelCheckpoint saves the step (an update in the module's
    ``on_train_batch_end`` would come after the callbacks' hooks, leaving checkpoints one EMA update behind)."""
    ref = load_checkpoint(crash_and_resume["reference"] / "checkpoints" / "last.ckpt")
    res = load_checkpoint(crash_and_resume["resumed"] / "checkpoints" / "last.ckpt")
    assert assert_same_tensors(ref["state_dict"], res["state_dict"], "net_ema.") > 10


@pytest.mark.slow
def test_resumed_run_logs_the_same_metric_values_as_the_uninterrupted_run(crash_and_resume):
    """Every step the resumed run logged after the resume has exactly the uninterrupted run's values."""
    ref = {row["step"]: row for row in read_metrics(crash_and_resume["reference"])}
    resumed_rows = [r for r in read_metrics(crash_and_resume["resumed"]) if int(r["step"]) >= 8]
    assert [int(r["step"]) for r in resumed_rows] == list(range(8, MAX_STEPS))
    for row in resumed_rows:
        assert row == ref[row["step"]], f"step {row['step']}: {row} != {ref[row['step']]}"


@pytest.mark.slow
def test_resumed_metrics_csv_holds_every_step_exactly_once(crash_and_resume):
    """The crashed run had logged steps 0..9; the resumed one re-runs 8 and 9. The run's metrics.csv must hold the
    uninterrupted run's history: each step once, with the same values."""
    assert [int(r["step"]) for r in crash_and_resume["pre_resume_rows"]] == list(range(CRASH_STEP))
    rows = read_metrics(crash_and_resume["resumed"])
    assert [int(r["step"]) for r in rows] == list(range(MAX_STEPS))
    assert rows == read_metrics(crash_and_resume["reference"])


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_and_resumes(tmp_path):
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 7})
    last = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 7
    live = cli.trainer.lightning_module.net.state_dict()
    assert all(torch.equal(checkpoint["state_dict"][f"net.{k}"], v) for k, v in live.items())
    resumed = in_process_fit(tmp_path, "--ckpt_path", "last", **{"trainer.max_steps": 9})  # a finished run extended
    assert resumed.trainer.global_step == 9 and load_checkpoint(last)["global_step"] == 9


@pytest.mark.slow
def test_ema_ramp_up_counts_the_current_batch_like_edm(tmp_path):
    """EDM (App. F training loop): after each step cur_nimg += batch, then half-life = min(H, ratio * cur_nimg),
    beta = 0.5 ** (batch / half-life). With ratio 1 and a huge H, step k (0-based) has beta_k = 0.5 ** (1 / (k + 1)).
    The EMA is recomputed from the live weights recorded after every step."""

    class LiveWeights(Callback):
        def __init__(self):
            self.after_step = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after_step.append([p.detach().clone() for p in pl_module.net.parameters()])

    import lightning.pytorch as pl

    from calmwild.data import DigitsDataModule
    from calmwild.module import DiffusionModule
    from calmwild.unet import UNet

    init = tiny_config()["model"]["backbone"]["init_args"]
    module = DiffusionModule(UNet(**{**init, "dropout": 0.0}), ema_halflife_images=1e12, ema_rampup_ratio=1.0)
    ema = [p.detach().clone() for p in module.net_ema.parameters()]
    recorder = LiveWeights()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=DigitsDataModule(num_train=96, num_heldout=8, resolution=8, batch_size=32))
    for k, live in enumerate(recorder.after_step):
        beta = 0.5 ** (1.0 / (k + 1))
        ema = [beta * e + (1 - beta) * w for e, w in zip(ema, live)]
    for expected, got in zip(ema, module.net_ema.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_from_an_explicit_checkpoint_path_keeps_the_command_line_settings(tmp_path):
    """``--ckpt_path last`` and ``--ckpt_path <its file>`` must resume the same way: the config and command line
    decide the module's settings (here nan_policy and sampler_steps), the checkpoint only its state."""

    first = in_process_fit(tmp_path, **{"trainer.max_steps": 2})
    path = tmp_path / "copy" / "checkpoints" / "step2.ckpt"  # the resume below overwrites last.ckpt
    path.parent.mkdir(parents=True)
    shutil.copy(first.trainer.checkpoint_callback.last_model_path, path)
    by_last = in_process_fit(tmp_path, "--ckpt_path", "last", "--model.nan_policy", "skip", "--model.sampler_steps",
                             "5", **{"trainer.max_steps": 3})
    assert (by_last.model.hparams.nan_policy, by_last.model.hparams.sampler_steps) == ("skip", 5)
    by_path = in_process_fit(tmp_path, "--ckpt_path", str(path), "--model.nan_policy", "skip",
                             "--model.sampler_steps", "5", **{"trainer.max_steps": 3})
    assert (by_path.model.hparams.nan_policy, by_path.model.hparams.sampler_steps) == ("skip", 5)


@pytest.mark.slow
def test_a_learning_rate_given_on_resume_takes_effect_and_the_warm_up_continues(tmp_path):
    """Lightning restores the optimizer's hyperparameters from the checkpoint; ``--model.lr`` on resume must win,
    with the warm-up multiplier of the step reached: min(1, (step + 1) / lr_warmup_steps) with 5 warm-up steps."""
    in_process_fit(tmp_path, **{"trainer.max_steps": 2})
    resumed = in_process_fit(tmp_path, "--ckpt_path", "last", "--model.lr", "5e-4", **{"trainer.max_steps": 3})
    assert resumed.trainer.global_step == 3
    group = resumed.trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(5e-4 * min(1.0, (3 + 1) / 5))
    adam_state = next(iter(resumed.trainer.optimizers[0].state.values()))
    assert float(adam_state["step"]) == 3  # Adam's moments and step count came from the checkpoint (2 + 1)

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
