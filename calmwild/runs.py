"""Run directories: where a fit writes, which checkpoint continues which run, and who may write a run now.

A run directory ``<root>/run-<time>-<id>/`` holds ``checkpoints/``, ``logs/metrics.csv``, ``config.yaml`` and
``eval/``. The rules that keep what a user saved:

- a fit without ``--ckpt_path`` gets a new directory (never a reused one);
- resuming from a checkpoint continues its run *in place* only when the checkpoint lies in that run's
  ``checkpoints/`` and is its newest (its step is the step of the run's ``last.ckpt``); the history after the
  checkpoint's step is then the part the crash lost, which the resumed run recomputes;
- resuming from an earlier checkpoint, or from a checkpoint outside any run, starts a *branch*: a new directory
  beside the parent (or under the config's root) with ``branch.json`` naming the parent run, checkpoint and step,
  and the parent's history up to that step copied in. The parent directory is never written;
- a run directory is written by one process at a time (:class:`RunLock`); a lock dies with its process.

Under ``torchrun`` or SLURM every rank runs the command; the run directory is then named after the job
(:func:`launcher_run_name`), rank 0 creates it and the other ranks wait for it, so one job writes one directory.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from calmwild.io import remove_stale_temporaries, write_json

RUN_PREFIX = "run-"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOG_DIR = "logs"
METRICS_FILE = "metrics.csv"
EVAL_DIR = "eval"
BRANCH_FILE = "branch.json"
LOCK_FILE = ".calmwild.lock"
_STEP_IN_NAME = re.compile(r"step=(\d+)")
_EVAL_STEP_FILE = re.compile(r"^step_(\d+)\.")


class RunInUseError(OSError):
    """Another live process holds the run directory."""


# ---------------------------------------------------------------------------------------------- naming and finding
def evaluation_name(callback_class: str) -> str:
    """The default name of an evaluation callback's outputs (``eval/<name>/`` and its logged images): the class name
    in snake case, ``PerSigmaMemorization`` -> ``per_sigma_memorization``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", callback_class).lower()


def new_run_dir(root: Path, name: str | None = None) -> Path:
    """A fresh run directory under ``root`` (created here, never reused): ``run-<time>-<id>``, or ``name``."""
    run_dir = root / (name or f"{RUN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def find_latest_run(root: Path) -> Path:
    """The newest run directory under ``root`` that holds ``checkpoints/last.ckpt``."""
    candidates = sorted(root.glob(f"{RUN_PREFIX}*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no run under {root} has {CHECKPOINT_DIR}/{LAST_CHECKPOINT}; pass the checkpoint file "
            "explicitly"
        )
    return candidates[-1].parent.parent


def run_checkpoint(directory: Path) -> Path:
    """The ``last.ckpt`` of a run directory, or of the newest run under a directory of runs (a config's root)."""
    own = directory / CHECKPOINT_DIR / LAST_CHECKPOINT
    if own.is_file():
        return own
    try:
        return find_latest_run(directory) / CHECKPOINT_DIR / LAST_CHECKPOINT
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} holds no calmwild run: no {CHECKPOINT_DIR}/{LAST_CHECKPOINT} in it or in "
                                f"a {RUN_PREFIX}* folder under it") from None


def owning_run(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to: the parent of its ``checkpoints/`` folder when that is a calmwild
    run directory; None for a checkpoint anywhere else."""
    folder = checkpoint.resolve().parent
    if folder.name == CHECKPOINT_DIR and folder.parent.name.startswith(RUN_PREFIX):
        return folder.parent
    return None


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at, read without loading its tensors (memory-mapped)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint.get("global_step", 0))


def newest_step(run_dir: Path) -> int | None:
    """The step of a run's ``last.ckpt`` (every save rewrites it), else of its highest ``step=N`` checkpoint."""
    folder = run_dir / CHECKPOINT_DIR
    last = folder / LAST_CHECKPOINT
    if last.is_file():
        try:
            return checkpoint_step(last)
        except Exception:  # noqa: BLE001 - a damaged last.ckpt: judge by the other checkpoints
            pass
    steps = [int(m.group(1)) for p in folder.glob("*.ckpt") if (m := _STEP_IN_NAME.search(p.name))]
    return max(steps) if steps else None


def intact_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in ``folder`` that load, newest first."""
    found = []
    for path in folder.glob("*.ckpt"):
        try:
            found.append((checkpoint_step(path), path))
        except Exception:  # noqa: BLE001 - damaged files are what this is looking past
            continue
    return sorted(found, key=lambda item: (item[0], item[1].name), reverse=True)


@dataclass(frozen=True)
class ResumePlan:
    """Where a resumed fit writes: in place, ``directory`` is the checkpoint's own run; otherwise the folder in which
    the branch is created (beside the parent run, or the config's root)."""

    directory: Path
    in_place: bool
    step: int
    parent_run: Path | None


def plan_resume(checkpoint: Path, root: Path, step: int) -> ResumePlan:
    """In place when ``checkpoint`` is its run's newest checkpoint, else a new branch (see the module docstring);
    the branch goes beside its parent run, or under ``root`` for a checkpoint outside any run."""
    owner = owning_run(checkpoint)
    if owner is not None:
        newest = newest_step(owner)
        if newest is None or step >= newest:
            return ResumePlan(owner, True, step, owner)
        return ResumePlan(owner.parent, False, step, owner)
    return ResumePlan(root, False, step, None)


# ---------------------------------------------------------------------------------------------- history up to a step
def _is_train_row(row: dict, header: list[str]) -> bool:
    return any(row.get(key) for key in header if key.startswith("train/"))


def metric_rows_before(path: Path, resume_step: int) -> tuple[list[str], list[dict]]:
    """(header, rows) of a ``metrics.csv`` that belong to the history of a run resumed at ``resume_step``: rows of
    earlier steps, and the evaluation rows of that step itself (they ran before its checkpoint was written), not
    its training row (the resumed run logs it again)."""
    if not path.is_file():
        return [], []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        kept = []
        for row in reader:
            step = int(float(row.get("step") or 0))
            if step < resume_step or (step == resume_step and not _is_train_row(row, header)):
                kept.append(row)
    return header, kept


def write_metric_rows(path: Path, header: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def start_branch(plan: ResumePlan, checkpoint: Path, name: str | None = None) -> Path:
    """Creates the branch directory of ``plan`` with ``branch.json`` and the parent's history up to the step:
    metrics.csv rows (:func:`metric_rows_before`) and the evaluation files of steps up to it. Reads the parent only."""
    branch = new_run_dir(plan.directory, name)
    write_json({"parent_run": plan.parent_run, "parent_checkpoint": checkpoint.resolve(), "step": plan.step,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}, branch / BRANCH_FILE)
    if plan.parent_run is None:
        return branch
    header, rows = metric_rows_before(plan.parent_run / LOG_DIR / METRICS_FILE, plan.step)
    if header:
        write_metric_rows(branch / LOG_DIR / METRICS_FILE, header, rows)
    for source in (plan.parent_run / EVAL_DIR).glob("*/step_*"):
        match = _EVAL_STEP_FILE.match(source.name)
        if match and int(match.group(1)) <= plan.step:
            target = branch / EVAL_DIR / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return branch


# What a fit itself creates in a run directory before its first step (loggers, config, lock, branch record).
MADE_BY_A_FIT = (LOG_DIR, "wandb", EVAL_DIR, "fid_cache", BRANCH_FILE, LOCK_FILE)


def remove_unused_run_dir(run_dir: Path, extra: tuple[str, ...] = ()) -> bool:
    """Removes a run directory a fit created and then left without a single checkpoint (it failed or was stopped
    before its first save): the entries a fit makes (:data:`MADE_BY_A_FIT`, ``config*.yaml``, ``extra``) and an
    empty ``checkpoints/``. Anything else (a user's file) keeps the directory and everything in it. Returns
    whether the directory is gone."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any((run_dir / CHECKPOINT_DIR).glob("*.ckpt")):
        return False
    ours = set(MADE_BY_A_FIT) | set(extra) | {CHECKPOINT_DIR}
    entries = list(run_dir.iterdir())
    if any(p.name not in ours and not (p.name.startswith("config") and p.suffix == ".yaml") for p in entries):
        return False
    for path in entries:
        if path.is_dir() and path.name == CHECKPOINT_DIR:
            remove_stale_temporaries(path)
            if not any(path.iterdir()):
                path.rmdir()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- one writer at a time
class RunLock:
    """An exclusive lock on a run directory, held by this process until :meth:`release` or its exit (the kernel
    drops a dead process's lock, so a killed run never blocks its resume). The lock file names its holder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> RunLock:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "{}"
            handle.close()
            try:
                who = json.loads(holder)
            except json.JSONDecodeError:
                who = {}
            raise RunInUseError(
                f"run directory {self.path.parent} is in use by process {who.get('pid', '?')} on "
                f"{who.get('host', '?')} (since {who.get('since', '?')}): wait for it to end, or resume another "
                "checkpoint (which starts a branch)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- launchers
def launcher_rank() -> int | None:
    """This process's global rank when a launcher (torchrun, SLURM) started several processes; None otherwise."""
    if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return None


def launcher_run_name() -> str | None:
    """The run directory name every rank of one launcher job agrees on: the SLURM job (array task) id, torchrun's
    rendezvous id, or for a standalone torchrun the agent process on this host; None when not under a launcher."""
    if launcher_rank() is None:
        return None
    if "SLURM_JOB_ID" in os.environ:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
        return f"{RUN_PREFIX}slurm-{job}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    ident = rdzv if rdzv != "none" else f"{socket.gethostname()}-{os.getppid()}"
    return f"{RUN_PREFIX}torchrun-{re.sub(r'[^A-Za-z0-9_.-]', '_', ident)}"


def wait_for_run_dir(path: Path, timeout: float = 300.0) -> Path:
    """Waits (non-zero ranks) until rank 0 has created the run directory ``path``."""
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not create the run directory {path} within {timeout:.0f} s")
        time.sleep(0.2)
    return path
