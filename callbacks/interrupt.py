"""SIGTERM and SIGINT end a fit with a checkpoint of the current step, and an exit status that says so.

SLURM and Kubernetes send SIGTERM some seconds before they kill a job; a user presses Ctrl+C. Lightning alone
exits 0 on SIGTERM and 1 on SIGINT and saves nothing. :class:`SaveOnInterrupt` (added to every ``calmwild fit``)
instead notes the signal, lets the current training step finish, saves ``last.ckpt`` at that step exactly where
``ModelCheckpoint`` would (so the resumed run continues bitwise as an uninterrupted one would), lets the step's
metrics reach the loggers, and then raises :class:`RunInterrupted` before the next step starts: the process exits
with 128 + the signal number (143 for SIGTERM, what cluster schedulers treat as a preempted job; 130 for SIGINT).
A second Ctrl+C stops at once. Under DDP the ranks agree on the step (an all-reduce of the flag), so every rank
saves and stops together. Lightning's SLURM auto-requeue (SIGUSR1) is left as it is.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint


class RunInterrupted(SystemExit):
    """Raised after the interrupt checkpoint is saved; its code is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def interrupt_pending(trainer: Trainer) -> bool:
    """Whether a signal asked this fit to stop (other callbacks skip long work, e.g. end-of-training evaluations)."""
    return any(isinstance(cb, SaveOnInterrupt) and cb.pending is not None for cb in trainer.callbacks)


class SaveOnInterrupt(Checkpoint):
    """Saves ``last.ckpt`` at the step during which SIGTERM or SIGINT arrived, then ends the fit with status 128 + n.

    A ``Checkpoint`` subclass, so Lightning runs it after the other callbacks of a hook (evaluations of that step
    finish first) and after ``ModelCheckpoint`` (whose save of the same step is reused, not repeated).
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal received, as soon as it arrives
        self.pending: int | None = None  # the signal acted on: checkpoint saved, the fit stops before the next step
        self._previous: dict[int, Any] = {}
        self._trainer: Trainer | None = None

    @property
    def state_key(self) -> str:
        return "SaveOnInterrupt"

    # ------------------------------------------------------------------ handlers
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            self._restore()
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        previous = self._previous.get(signum)
        if signum == signal.SIGTERM and callable(previous):
            previous(signum, frame)  # Lightning's own: forwards the signal to DDP child processes
        connector = getattr(self._trainer, "_signal_connector", None)
        if connector is not None:  # Lightning would stop the fit itself (exit 0, no checkpoint); this callback does
            connector.received_sigterm = False
        self.signum = signum
        print(f"calmwild: {signal.Signals(signum).name} received: saving a checkpoint when this training step ends"
              + (" (Ctrl+C again stops at once)" if signum == signal.SIGINT else ""), flush=True)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    # ------------------------------------------------------------------ acting on a signal
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        requested = self.signum is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested or self.pending is not None:
            return
        path = self._save(trainer)
        self.pending = self.signum or signal.SIGTERM  # a rank that did not see the signal follows the others
        if trainer.is_global_zero:
            print(f"calmwild: checkpoint of step {trainer.global_step} saved to {path}; resume with "
                  "`calmwild fit --config <the same config> --ckpt_path last`", flush=True)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        if self.pending is not None:
            raise RunInterrupted(self.pending)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pending is not None:  # the signal came during the last step: the fit is over, but say so
            raise RunInterrupted(self.pending)

    @staticmethod
    def _save(trainer: Trainer) -> Path:
        """``last.ckpt`` of this step: ModelCheckpoint's own when it keeps one (reused if it saved this step
        already), else ``<run dir>/checkpoints/last.ckpt``. A collective call under DDP."""
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "save_last", None) is True and getattr(callback, "dirpath", None):
                if callback._last_global_step_saved != trainer.global_step or not callback.last_model_path:
                    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
                return Path(callback.last_model_path)
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        return path
