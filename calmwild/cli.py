"""The ``calmwild`` command.

``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (model: DiffusionModule, data: any calmwild
datamodule by class path). The analysis commands (``analyze``, ``sample``, ``swap``, ``evaluate``) are typed
functions in :mod:`calmwild.commands`, turned into sub-commands by jsonargparse (``--config`` and
``--print_config`` included).

Every fit gets its own run directory ``<root>/run-<timestamp>-<id>``, where ``<root>`` is ``trainer.default_root_dir``
or, when that is unset, ``runs/<name of the last --config file>``. It holds ``checkpoints/``,
the loggers' files and ``config.yaml``, so no run ever overwrites another's files. Resuming (``--ckpt_path``) reuses
the directory of the checkpoint; ``--ckpt_path last`` picks the newest run under the root that has a
``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import csv
import os
import socket
import sys
import time
import uuid
import warnings
from urllib.parse import urlparse
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from calmwild.data import InMemoryImageDataModule
from calmwild.module import DiffusionModule

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# lightning 2.6 with torch 2.14 warns about a torch-internal deprecation on every fit; it says nothing to users.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
WANDB_ID_FILE = "wandb_run_id.txt"
RUN_DIR_ENV = "CALMWILD_RUN_DIR"


def _as_list(value: Any) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def find_latest_run(root: Path) -> Path:
    """The newest run directory under ``root`` that holds ``checkpoints/last.ckpt``."""
    candidates = sorted(root.glob("run-*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no run under {root} has checkpoints/last.ckpt; pass the checkpoint file explicitly"
        )
    return candidates[-1].parent.parent


def new_run_dir(root: Path) -> Path:
    """A fresh, uniquely named run directory under ``root`` (created, never reused)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"run-{stamp}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that, when a run is resumed in its own directory, keeps the earlier rows instead of deleting them.

    Lightning's CSV writer deletes an existing ``metrics.csv``. Here the rows logged before the checkpoint's step
    ``resume_step`` are kept, plus the evaluation rows logged AT that step (they ran before the checkpoint was
    written); rows from after the checkpoint, which the resumed run logs again, are dropped. The history therefore
    holds every step exactly once.

    Args:
        resume_step: global step of the checkpoint being resumed (set by ``calmwild fit --ckpt_path``).
    """

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment  # other DDP ranks get a no-op experiment and never touch metrics.csv
    def experiment(self):
        if self._experiment is not None or self.resume_step is None:
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
        kept, header = [], []
        if path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                for row in reader:
                    step = int(float(row.get("step") or 0))
                    is_train_row = any(row.get(k) for k in header if k.startswith("train/"))
                    if step < self.resume_step or (step == self.resume_step and not is_train_row):
                        kept.append(row)
        with warnings.catch_warnings():  # its "previous log files will be deleted" is untrue here: rows are kept
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            experiment = super().experiment  # Lightning's writer removes the old file here
        if kept:
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
            experiment.metrics_keys = header
        return experiment


def wandb_reachable(timeout: float = 5.0) -> bool:
    """Whether the W&B server (``WANDB_BASE_URL``, default api.wandb.ai) accepts a TCP connection within
    ``timeout`` seconds. Online W&B without a network otherwise stalls for minutes before failing."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


class CalmwildSaveConfig(SaveConfigCallback):
    """Saves ``config.yaml`` into the run directory and pushes the full CLI config to W&B, if in use."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                config = self.parser.dump(self.config, skip_none=False, format="json")
                import json

                logger.experiment.config.update({"cli": json.loads(config)}, allow_val_change=True)


class CalmwildCLI(LightningCLI):
    """LightningCLI with per-run directories, resume into the same directory, and a closing summary."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--wandb_offline_fallback", type=bool, default=False,
            help="If W&B is configured online but its server cannot be reached, log offline instead of failing.",
        )

    def _parse_ckpt_path(self) -> None:
        """Checks that --ckpt_path names a readable calmwild checkpoint before Lightning reads its hyperparameters."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and Path(ckpt_path).is_file():
            try:
                checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            except Exception as err:  # torch raises many types for a damaged file
                raise ValueError(
                    f"--ckpt_path {ckpt_path} is not a readable calmwild checkpoint ({type(err).__name__}: {err})"
                ) from err
            if not isinstance(checkpoint, dict) or "calmwild" not in checkpoint:
                raise ValueError(
                    f"--ckpt_path {ckpt_path} is not a calmwild checkpoint (no 'calmwild' entry): resume only from "
                    "checkpoints written by `calmwild fit`"
                )
        # Lightning's own _parse_ckpt_path is not called: it would overwrite the parsed model settings with the
        # checkpoint's hyperparameters. Here the config and command line decide the settings (as for
        # `--ckpt_path last`) and the checkpoint only the state; on_load_checkpoint refuses a mismatched network.

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        cfg = self.config[self.subcommand]
        self._check_wandb(cfg)
        config_files = _as_list(cfg.get("config"))
        self.run_name = Path(str(config_files[-1])).stem if config_files else "default"
        root = Path(cfg.trainer.default_root_dir or f"runs/{self.run_name}")
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path == "last":
            run_dir = find_latest_run(root)
            cfg.ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
        elif ckpt_path:
            ckpt = Path(ckpt_path)
            if not ckpt.is_file():
                raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        elif os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":
            run_dir = Path(os.environ[RUN_DIR_ENV])  # a DDP child process re-running the command: same directory
        else:
            run_dir = new_run_dir(root)
            self._new_run_dir = run_dir
        os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by DDP child processes launched by this one
        self.run_dir = run_dir
        cfg.trainer.default_root_dir = str(run_dir)
        resume_step = None
        if cfg.get("ckpt_path"):
            resume_step = int(torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False).get("global_step", 0))
            # keep the original config.yaml; the resumed run's config is saved beside it
            self.save_config_kwargs["config_filename"] = f"config-resume-step{resume_step}-{time.strftime('%H%M%S')}.yaml"
        self._place_loggers(cfg, run_dir, self.run_name, resume_step)
        self._place_checkpoints(cfg, run_dir)

    def instantiate_classes(self) -> None:
        """Instantiates model, data and trainer; when that fails (a bad init arg), the run directory made for this
        run is removed again if it holds nothing but calmwild's own W&B id file, so failed configs leave no litter."""
        try:
            super().instantiate_classes()
        except BaseException:
            run_dir = getattr(self, "_new_run_dir", None)
            if run_dir is not None and run_dir.is_dir():
                leftovers = [p for p in run_dir.iterdir() if p.name != WANDB_ID_FILE]
                if not leftovers:
                    (run_dir / WANDB_ID_FILE).unlink(missing_ok=True)
                    run_dir.rmdir()
            raise

    @staticmethod
    def _place_loggers(cfg: Namespace, run_dir: Path, run_name: str, resume_step: int | None) -> None:
        for logger in _as_list(cfg.trainer.logger):
            if not isinstance(logger, Namespace) or "init_args" not in logger:
                continue
            args = logger.init_args
            name = logger.class_path.rsplit(".", 1)[-1]
            args.save_dir = str(run_dir)
            if name in ("CSVLogger", "TensorBoardLogger", "ResumableCSVLogger"):
                args.name = "logs"
                args.version = ""
            if name in ("CSVLogger", "ResumableCSVLogger"):
                logger.class_path = "calmwild.cli.ResumableCSVLogger"
                args.resume_step = resume_step
            elif name == "WandbLogger":
                id_file = run_dir / WANDB_ID_FILE
                if id_file.exists():  # resuming: continue the same W&B run
                    args.id = id_file.read_text().strip()
                else:
                    args.id = args.get("id") or uuid.uuid4().hex[:12]
                    id_file.write_text(args.id)
                if not args.get("name"):
                    args.name = run_name

    @staticmethod
    def _check_wandb(cfg: Namespace) -> None:
        """Fails fast (seconds) when an online WandbLogger cannot reach its server, or falls back to offline."""
        online = [
            lg for lg in _as_list(cfg.trainer.logger)
            if isinstance(lg, Namespace) and lg.class_path.endswith("WandbLogger") and not lg.init_args.get("offline")
        ]
        if not online or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
            return
        if wandb_reachable():
            return
        if cfg.get("wandb_offline_fallback"):
            warnings.warn("W&B server unreachable: logging offline (sync later with `wandb sync`)", stacklevel=2)
            for lg in online:
                lg.init_args.offline = True
            return
        raise SystemExit(
            "calmwild: the config logs to W&B online, but the W&B server cannot be reached. Set WANDB_MODE=offline "
            "(then `wandb sync` later), pass --wandb_offline_fallback=true, or use another logger "
            "(--trainer.logger=lightning.pytorch.loggers.CSVLogger)."
        )

    @staticmethod
    def _place_checkpoints(cfg: Namespace, run_dir: Path) -> None:
        for callback in _as_list(cfg.trainer.callbacks):
            if isinstance(callback, Namespace) and callback.class_path.endswith("ModelCheckpoint"):
                if not callback.init_args.get("dirpath"):
                    callback.init_args.dirpath = str(run_dir / "checkpoints")

    def _save_final_last_checkpoint(self) -> None:
        """Writes ``last.ckpt`` at the final step when the checkpoint interval did not end on it (e.g. every 4 steps,
        max_steps 7), so that the weights of the last steps are never only in memory. Runs on every rank (the save
        is a collective call; Lightning writes on rank 0)."""
        for callback in self.trainer.checkpoint_callbacks:
            # save_last="link" would only link the stale top-k file, so only a real last.ckpt is written here
            if callback.save_last is not True or callback._last_global_step_saved == self.trainer.global_step:
                continue
            callback._save_last_checkpoint(self.trainer, callback._monitor_candidates(self.trainer))

    def after_fit(self) -> None:
        self._save_final_last_checkpoint()
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank must make it
        if self.trainer.global_rank != 0:
            return
        run_dir = Path(self.trainer.default_root_dir)
        lines = [f"calmwild: run finished at step {self.trainer.global_step}; run directory {run_dir}"]
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                lines.append(f"  checkpoints: {cb.dirpath} (last: {cb.last_model_path or 'none'})")
        for logger in self.trainer.loggers:
            where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            lines.append(f"  {type(logger).__name__}: {where}")
        config_file = Path(log_dir or run_dir) / "config.yaml"
        if config_file.exists():
            lines.append(f"  config: {config_file}")
        print("\n".join(lines), flush=True)


def lightning_main(args: list[str] | None, run: bool = True) -> CalmwildCLI:
    """LightningCLI over DiffusionModule and any calmwild datamodule; ``run=False`` only instantiates."""
    return CalmwildCLI(
        DiffusionModule,
        InMemoryImageDataModule,
        subclass_mode_data=True,
        save_config_callback=CalmwildSaveConfig,
        save_config_kwargs={"overwrite": False},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``calmwild`` console script; ``args`` replaces ``sys.argv[1:]`` (for tests).

    A DDP run's process group is destroyed before the interpreter exits: left to interpreter shutdown, gloo's
    worker threads can abort the process ("terminate called without an active exception") after a good run."""
    try:
        run(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args: list[str] | None = None) -> Any:
    """Runs one ``calmwild`` command and returns its result (the LightningCLI object, or the command's report)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        from jsonargparse import auto_cli

        from calmwild.commands import COMMANDS

        if argv[0] not in COMMANDS:
            known = ", ".join(list(LIGHTNING_COMMANDS) + list(COMMANDS))
            raise SystemExit(f"calmwild: unknown command {argv[0]!r}; expected one of {known}")
        return auto_cli(COMMANDS, args=argv)
    return lightning_main(None if args is None else argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
