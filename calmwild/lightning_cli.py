"""``calmwild fit`` (and Lightning's other subcommands): LightningCLI with run directories that never lose work.

(One of calmwild's Lightning-facing modules; :mod:`calmwild.cli` imports it only for these subcommands.)

Every fit writes into one run directory (:mod:`calmwild.runs`): a new ``<root>/run-<time>-<id>`` (``<root>`` is
``trainer.default_root_dir`` or ``runs/<name of the last --config file>``), the checkpoint's own run when resuming
from its newest checkpoint, or a new branch directory when resuming from an earlier one or from a file outside any
run. A run directory is locked while a fit writes it. Checkpoints are saved atomically and loaded weights-only
(:class:`~calmwild.checkpoint_io.AtomicCheckpointIO`); SIGTERM and SIGINT save the current step and exit with
128 + the signal number (:class:`callbacks.interrupt.SaveOnInterrupt`); a fit that fails before its first step
leaves no directory behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jsonargparse import Namespace
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from calmwild.checkpoint_io import AtomicCheckpointIO
from calmwild.compare import read_run, run_labels, summary_lines
from calmwild.checkpoints import backbone_class, backbone_config, check_metadata, is_safetensors, read_checkpoint
from calmwild import data as calmwild_data
from calmwild.data import InMemoryImageDataModule
from calmwild.module import DiffusionModule
from calmwild.runs import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    LOG_DIR,
    METRICS_FILE,
    RUN_PREFIX,
    RunLock,
    find_latest_run,
    intact_checkpoints,
    launcher_rank,
    launcher_run_name,
    metric_rows_before,
    new_run_dir,
    plan_resume,
    remove_unused_run_dir,
    start_branch,
    wait_for_run_dir,
    write_metric_rows,
)
from callbacks.interrupt import SaveOnInterrupt
from callbacks.predict import GRID_FILE, SAMPLES_FILE, SUMMARY_FILE, SampleWriter

# lightning 2.6 with torch 2.14 and jsonargparse 4.5x warns about their internal deprecations on every fit (LeafSpec,
# all_gather; the jsonargparse API Lightning's CLI calls); they say nothing to users.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r".*torch.distributed.nn.functional.all_gather is deprecated")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli")
# max_steps runs span many epochs of a small training set; logging follows the global step, so nothing is lost
warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval")


class _WithoutAdvertisements(logging.Filter):
    """Drops Lightning's "Tip: ... try installing litlogger" line from every fit's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_WithoutAdvertisements())
# every calmwild datamodule imported, so that jsonargparse finds each by its short name (``--data DigitsDataModule``)
DATAMODULES = [getattr(calmwild_data, name) for name in calmwild_data.__all__ if name.endswith("DataModule")]
WANDB_ID_FILE = "wandb_run_id.txt"
RUN_DIR_ENV = "CALMWILD_RUN_DIR"
EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")
DEFAULT_PREDICT_SAMPLES = 64
SAMPLES_FILE_NAMES = f"{SAMPLES_FILE}, {GRID_FILE}, {SUMMARY_FILE}"


def _as_list(value: Any) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _is_ddp_child() -> bool:
    """A process Lightning's subprocess launcher started for DDP rank > 0: it re-runs the command in the directory
    its parent chose (inherited through ``RUN_DIR_ENV``)."""
    return bool(os.environ.get(RUN_DIR_ENV)) and os.environ.get("LOCAL_RANK", "0") != "0"


_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)")


def metric_column_key(name: str) -> tuple:
    """Sort key of a metric name with its numbers compared as numbers: ``mem/sigma_3.26`` before ``mem/sigma_12.9``."""
    return tuple((1, float(part)) if index % 2 else (0, part) for index, part in enumerate(_NUMBER.split(name)))


class _NumericOrder(list):
    """The CSV writer's column list: it sorts itself in place after every new key, here by :func:`metric_column_key`."""

    def sort(self, *, key: Any = None, reverse: bool = False) -> None:
        super().sort(key=metric_column_key, reverse=reverse)


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that keeps a resumed run's history instead of deleting it.

    Columns are in :func:`metric_column_key` order (numbers inside names compared as numbers, so the sigma columns
    run from small to large). Lightning's CSV writer deletes an existing ``metrics.csv``. Here the rows that belong
    to the history of a run resumed at ``resume_step`` (:func:`calmwild.runs.metric_rows_before`: earlier steps, and
    the evaluation rows of that step) are written back; rows from after the checkpoint, which the resumed run logs
    again, are dropped, so the history holds every step exactly once.

    Args:
        resume_step: global step of the checkpoint being resumed (set by ``calmwild fit --ckpt_path``).
    """

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment  # other DDP ranks get a no-op experiment and never touch metrics.csv
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        if self.resume_step is None:
            experiment = super().experiment
            experiment.metrics_keys = _NumericOrder(experiment.metrics_keys)
            return experiment
        header, kept = metric_rows_before(Path(self.log_dir) / METRICS_FILE, self.resume_step)
        with warnings.catch_warnings():  # its "previous log files will be deleted" is untrue here: rows are kept
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            experiment = super().experiment  # Lightning's writer removes the old file here
        if kept:
            write_metric_rows(Path(self.log_dir) / METRICS_FILE, header, kept)
            experiment.metrics_keys = header
        experiment.metrics_keys = _NumericOrder(experiment.metrics_keys)
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
    """Saves the full resolved config at the run directory's root (``config.yaml``; a resumed run's as
    ``config-resume-step<N>-<time>.yaml`` beside it) and pushes it to W&B, if in use."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        self.parser.save(self.config, str(path), skip_unset=False, overwrite=False, multifile=self.multifile)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                config = self.parser.dump(self.config, skip_unset=False, format="json")
                logger.experiment.config.update({"cli": json.loads(config)}, allow_val_change=True)


_EXPECTED_TYPE = re.compile(
    r"Parser key \"(?P<key>[^\"]+)\":\s*Expected a <class '(?P<type>\w+)'>\. Got value: (?P<value>.*)", re.DOTALL)
_TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}


def plain_parse_error(message: str) -> str:
    """jsonargparse's "Parser key "model.lr": Expected a <class 'float'>. Got value: nan" as "model.lr: expected a
    number, got 'nan'"; other messages unchanged."""
    match = _EXPECTED_TYPE.search(message)
    if match is None:
        return message
    kind = _TYPE_WORDS.get(match["type"], f"a {match['type']}")
    return f"{match['key']}: expected {kind}, got {match['value'].strip()!r}"


class CalmwildArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, with errors a user can read: the message in plain words and no page-long usage (the
    "tip" line that follows names ``--help``)."""

    def print_usage(self, file: Any = None) -> None:
        return None

    def error(self, message: str, ex: Exception | None = None) -> Any:
        return super().error(plain_parse_error(message), ex)


class CalmwildCLI(LightningCLI):
    """LightningCLI with calmwild's run directories, safe checkpoint input/output, interrupt saves and a closing
    summary (see the module docstring)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--wandb_offline_fallback", type=bool, default=False,
            help="If W&B is configured online but its server cannot be reached, log offline instead of failing.",
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning's own _parse_ckpt_path is not called: it would overwrite the parsed model settings with the
        checkpoint's hyperparameters. Here the config and command line decide the settings (as for
        ``--ckpt_path last``) and the checkpoint only the state. The checkpoint itself is read (safely) and checked
        against the config in :meth:`before_instantiate_classes`."""

    # ------------------------------------------------------------------ before anything is built
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        self._check_devices(cfg.trainer.get("devices"))
        if self.subcommand not in ("fit", *EVALUATION_SUBCOMMANDS):
            return
        self._check_wandb(cfg)
        config_files = _as_list(cfg.get("config"))
        self.config_file = Path(str(config_files[-1])) if config_files else None
        self.run_name = self.config_file.stem if self.config_file else "default"
        root = Path(cfg.trainer.default_root_dir or f"runs/{self.run_name}")
        if self.subcommand in EVALUATION_SUBCOMMANDS:
            self._prepare_evaluation(cfg, root)
            return
        if cfg.trainer.get("limit_val_batches") is None:  # evaluations run through the callbacks, on their schedule
            cfg.trainer.limit_val_batches = 0
        resume_step = None
        if cfg.get("ckpt_path"):
            if cfg.ckpt_path == "last":
                cfg.ckpt_path = str(find_latest_run(root) / CHECKPOINT_DIR / LAST_CHECKPOINT)
            checkpoint = self._read_resume_checkpoint(cfg)
            self._resume_meta = checkpoint["calmwild"]
            resume_step = int(checkpoint.get("global_step", 0))
        run_dir = self._choose_run_dir(cfg, root, resume_step)
        os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by DDP child processes launched by this one
        self.run_dir = run_dir
        cfg.trainer.default_root_dir = str(run_dir)
        if resume_step is not None:  # the run's first config.yaml stays; the resumed run's is saved beside it
            self.save_config_kwargs["config_filename"] = (
                f"config-resume-step{resume_step}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
            )
        self._place_loggers(cfg, run_dir, self.run_name, resume_step)
        self._place_checkpoints(cfg, run_dir)

    def _prepare_evaluation(self, cfg: Namespace, root: Path) -> None:
        """``validate`` / ``test`` / ``predict``: the checkpoint is read safely and decides the network (backbone
        class and config, sigma_data, sampling class; the config decides data, callbacks and loggers); the results go
        to a new directory ``<root>/<subcommand>-<time>-<id>``; ``predict`` gets a :class:`callbacks.SampleWriter`
        unless one is configured. The weights are loaded by :meth:`DiffusionModule.load_network_weights` in
        :meth:`validate` / :meth:`test` / :meth:`predict`, not by Lightning's loop (which expects a training state)."""
        subcommand = self.subcommand
        if not cfg.get("ckpt_path"):
            raise ValueError(f"calmwild {subcommand} needs --ckpt_path: the checkpoint to evaluate (a fit's .ckpt, a "
                             ".safetensors file, or a network imported with `calmwild import-edm`)")
        path = Path(cfg.ckpt_path)
        checkpoint = self._evaluated_checkpoint = self._read_ckpt_path(path, f"{subcommand} with")
        self._adopt_network(cfg, checkpoint.get("calmwild"), path)
        for key in ("limit_val_batches", "limit_test_batches"):  # a fit's `limit_val_batches: 0` would skip the run
            if cfg.trainer.get(key) == 0:
                cfg.trainer[key] = None
        run_dir = self._evaluation_dir(root, subcommand)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        cfg.trainer.default_root_dir = str(run_dir)
        self._place_loggers(cfg, run_dir, f"{self.run_name}-{subcommand}", None)
        callbacks = _as_list(cfg.trainer.callbacks)
        if subcommand == "predict" and not any(
                isinstance(cb, Namespace) and cb.class_path.endswith("SampleWriter") for cb in callbacks):
            cfg.trainer.callbacks = [*callbacks, Namespace(class_path="callbacks.SampleWriter",
                                                           init_args=Namespace(num_samples=DEFAULT_PREDICT_SAMPLES))]

    @staticmethod
    def _adopt_network(cfg: Namespace, meta: Any, path: Path) -> None:
        """The model config takes the checkpoint's network: its backbone (a class the user's config names or trusts,
        :func:`calmwild.checkpoints.backbone_class`), backbone config, sigma_data and sampling class."""
        meta = check_metadata(meta, path)
        configured = cfg.model.get("backbone")
        trusted = (configured.class_path,) if isinstance(configured, Namespace) and "class_path" in configured else ()
        backbone = backbone_class(meta, path, trusted)
        config = backbone_config(meta, path, trusted)
        cfg.model.backbone = Namespace(class_path=f"{backbone.__module__}.{backbone.__qualname__}",
                                       init_args=Namespace(**config))
        cfg.model.sigma_data = float(meta["sigma_data"])
        if meta.get("sample_class") is not None or int(config.get("num_classes", 0)) > 0:
            cfg.model.sample_class = meta.get("sample_class") if meta.get("sample_class") is not None else 0

    def _evaluation_dir(self, root: Path, subcommand: str) -> Path:
        """A new directory for one evaluation subcommand; one per launcher job (rank 0 makes it, the others wait)."""
        self._new_run_dir = None
        if _is_ddp_child():
            return Path(os.environ[RUN_DIR_ENV])
        rank, job_name = launcher_rank(), launcher_run_name()
        name = (job_name.replace(RUN_PREFIX, f"{subcommand}-", 1) if job_name else
                f"{subcommand}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        if rank not in (None, 0):
            return wait_for_run_dir(root / name)
        self._new_run_dir = new_run_dir(root, name)
        return self._new_run_dir

    @staticmethod
    def _check_devices(devices: Any) -> None:
        """Lightning's own refusal of ``devices=0`` does not say what it would accept."""
        count = devices if isinstance(devices, int) else int(devices) if str(devices).lstrip("-").isdigit() else None
        if count is not None and (count == 0 or count < -1):
            raise ValueError(f"trainer.devices={devices}: expected a positive number of devices, -1 (all of them), "
                             "'auto', or a list of device indices such as [0, 1]")

    def _choose_run_dir(self, cfg: Namespace, root: Path, resume_step: int | None) -> Path:
        """The run directory of this fit (:mod:`calmwild.runs`), created or locked as needed: DDP children reuse
        their parent's; under torchrun or SLURM rank 0 creates the job's directory and the other ranks wait for it."""
        self._new_run_dir = None
        if _is_ddp_child():
            return Path(os.environ[RUN_DIR_ENV])
        rank, job_name = launcher_rank(), launcher_run_name()
        if resume_step is not None:
            plan = plan_resume(Path(cfg.ckpt_path), root, resume_step)
            if plan.in_place:
                run_dir = plan.directory
            elif rank not in (None, 0):
                return wait_for_run_dir(plan.directory / job_name)
            else:
                run_dir = self._new_run_dir = start_branch(plan, Path(cfg.ckpt_path), job_name)
        elif rank not in (None, 0):
            return wait_for_run_dir(root / job_name)
        elif job_name is not None and (root / job_name).is_dir():
            run_dir = root / job_name  # the same SLURM job after a requeue: Lightning resumes its hpc checkpoint
        else:
            run_dir = self._new_run_dir = new_run_dir(root, job_name)
        self._lock = RunLock(run_dir).acquire()
        return run_dir

    @staticmethod
    def _read_resume_checkpoint(cfg: Namespace) -> dict:
        """The checkpoint to resume from, read without running code from it (tensors and plain types only; a file
        that needs anything else is refused, naming the offending type) and checked to be calmwild's. Lightning
        reads it again with ``weights_only=True``: calmwild never loads a checkpoint any other way. A damaged file
        is reported with the newest intact checkpoint beside it."""
        if cfg.get("weights_only") is False:
            raise ValueError("--weights_only false: calmwild loads checkpoints with weights_only=True only (a file "
                             "that needs more than tensors and plain types could run code); drop the option")
        cfg.weights_only = True
        path = Path(cfg.ckpt_path)
        if is_safetensors(path):
            raise ValueError(f"--ckpt_path {path}: a .safetensors file holds weights only (no optimizer or "
                             "training-loop state), so training cannot resume from it; evaluate it with `calmwild "
                             "validate`, `evaluate` or `sample`, or resume from a .ckpt")
        return CalmwildCLI._read_ckpt_path(path, "resume with")

    @staticmethod
    def _read_ckpt_path(path: Path, advised_use: str) -> dict:
        """The checkpoint ``--ckpt_path`` names, read safely (:func:`calmwild.checkpoints.read_checkpoint`); a missing
        file is one line, a damaged one names the newest intact checkpoint beside it ("``advised_use`` --ckpt_path
        that one")."""
        try:
            return read_checkpoint(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file") from None
        except ValueError as err:
            others = [(step, p) for step, p in intact_checkpoints(path.parent) if p.resolve() != path.resolve()]
            advice = (f"; the newest intact checkpoint beside it is {others[0][1]} (step {others[0][0]}): "
                      f"{advised_use} --ckpt_path {others[0][1]}") if others else ""
            raise ValueError(f"--ckpt_path {path} is not a usable calmwild checkpoint: {err}{advice}") from None

    @staticmethod
    def _place_loggers(cfg: Namespace, run_dir: Path, run_name: str, resume_step: int | None) -> None:
        """Every logger writes into the run directory; the CSV logger keeps a resumed run's history; a WandbLogger
        continues the run's W&B run when resuming in place, and gets the run's experiment family as its ``group``
        and dataset, N, sampler and band as ``tags`` (:func:`calmwild.compare.run_labels`) unless configured."""
        labels = run_labels(cfg.as_dict())
        for logger in _as_list(cfg.trainer.logger):
            if not isinstance(logger, Namespace) or "init_args" not in logger:
                continue
            args = logger.init_args
            name = logger.class_path.rsplit(".", 1)[-1]
            args.save_dir = str(run_dir)
            if name in ("CSVLogger", "TensorBoardLogger", "ResumableCSVLogger"):
                args.name = LOG_DIR
                args.version = ""
            if name in ("CSVLogger", "ResumableCSVLogger"):
                logger.class_path = "calmwild.lightning_cli.ResumableCSVLogger"
                args.resume_step = resume_step
            elif name == "WandbLogger":
                id_file = run_dir / WANDB_ID_FILE
                if id_file.exists():  # resuming in place: continue the same W&B run (a branch gets its own)
                    args.id = id_file.read_text().strip()
                else:
                    args.id = args.get("id") or uuid.uuid4().hex[:12]
                    if not _is_ddp_child() and launcher_rank() in (None, 0):
                        id_file.write_text(args.id)
                if not args.get("name"):
                    args.name = run_name
                if not args.get("group"):
                    args.group = labels.group
                if not args.get("tags"):
                    args.tags = labels.tags

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
                    callback.init_args.dirpath = str(run_dir / CHECKPOINT_DIR)

    # ------------------------------------------------------------------ building and running
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, with atomic weights-only checkpoint input/output and, for fits, the interrupt
        saver (ordered with the checkpoint callbacks, after them)."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.subcommand == "fit":
            trainer.callbacks.append(SaveOnInterrupt())
        return trainer

    def instantiate_classes(self) -> None:
        """Instantiates model, data and trainer; a failure (a bad init arg) removes the run directory made for
        this fit again (:func:`calmwild.runs.remove_unused_run_dir`), so failed configs leave no litter."""
        try:
            super().instantiate_classes()
        except BaseException:
            self._discard_new_run_dir()
            raise

    def _run_subcommand(self, subcommand: str) -> None:
        """Runs the subcommand; when a fit fails before it trained a single step (missing or bad data, a refused
        setting), the run directory made for it is removed again."""
        start = None
        try:
            start = self.trainer.global_step
            super()._run_subcommand(subcommand)
        except BaseException:
            if start is not None and self.trainer.global_step == start:
                self._discard_new_run_dir()
            raise
        finally:
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.release()

    def _discard_new_run_dir(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
        run_dir = getattr(self, "_new_run_dir", None)
        if run_dir is not None:
            remove_unused_run_dir(run_dir, extra=(WANDB_ID_FILE,))

    # ------------------------------------------------------------------ validate, test, predict
    def _load_evaluated_weights(self) -> int:
        where = f"checkpoint {self.config_init[self.subcommand].ckpt_path}"
        return self.model.load_network_weights(self._evaluated_checkpoint, where)

    def validate(self, model: DiffusionModule, datamodule: Any = None, **_: Any) -> Any:
        """Runs the configured evaluation callbacks (and the held-out loss) once on the checkpoint's weights."""
        return self._evaluate(self.trainer.validate, model, datamodule)

    def test(self, model: DiffusionModule, datamodule: Any = None, **_: Any) -> Any:
        """As :meth:`validate`, scored against the held-out set where that differs (FID's reference)."""
        return self._evaluate(self.trainer.test, model, datamodule)

    def _evaluate(self, loop: Any, model: DiffusionModule, datamodule: Any) -> Any:
        """One run of Lightning's validate or test loop on the checkpoint's weights, its results printed."""
        self._load_evaluated_weights()
        self.results = loop(model, datamodule=datamodule, verbose=False)
        self._print_results(self.subcommand)
        return self.results

    def predict(self, model: DiffusionModule, datamodule: Any = None, **_: Any) -> Any:
        """Writes the checkpoint's samples (:class:`callbacks.SampleWriter`)."""
        self._load_evaluated_weights()
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, SampleWriter))
        self.trainer.predict(model, dataloaders=writer.dataloader(), return_predictions=False)
        if self.trainer.is_global_zero:
            written = writer.written
            print(f"calmwild: {written['num_samples']} samples of step {written['step']} in {written['directory']}: "
                  f"{SAMPLES_FILE_NAMES}", flush=True)
        return writer.written

    def _print_results(self, subcommand: str) -> None:
        """The metrics of the evaluation (rank 0), one per line, and where its results are."""
        if not self.trainer.is_global_zero:
            return
        # the evaluation callbacks log with logger=False (they send their metrics to the loggers themselves), so their
        # values are in callback_metrics, not in the loop's returned results
        metrics = {key: float(value) for key, value in self.trainer.callback_metrics.items()}
        lines = [f"calmwild {subcommand}: step {self.model.evaluated_step} of {self.config_init[subcommand].ckpt_path}"]
        lines += [f"  {key} = {value:.6g}" for key, value in sorted(metrics.items())]
        lines.append(f"  results: {self.trainer.default_root_dir}")
        print("\n".join(lines), flush=True)

    def before_fit(self) -> None:
        """A checkpoint of another network is refused here, before the loggers, the config file or the checkpoint
        load write anything (the run directory made for the fit is then removed again)."""
        meta = getattr(self, "_resume_meta", None)
        if meta is not None:
            self.model.check_checkpoint(meta, f"checkpoint {self.config['fit'].ckpt_path}")

    def _save_final_last_checkpoint(self) -> None:
        """Writes ``last.ckpt`` at the final step when the checkpoint interval did not end on it (e.g. every 4 steps,
        max_steps 7), so that the weights of the last steps are never only in memory. Runs on every rank (the save
        is a collective call; Lightning writes on rank 0)."""
        for callback in self.trainer.checkpoint_callbacks:
            # save_last="link" would only link the stale top-k file, so only a real last.ckpt is written here
            if getattr(callback, "save_last", None) is not True:
                continue
            if callback._last_global_step_saved == self.trainer.global_step:
                continue
            callback._save_last_checkpoint(self.trainer, callback._monitor_candidates(self.trainer))

    def after_fit(self) -> None:
        self._save_final_last_checkpoint()
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
        config_file = run_dir / self.save_config_kwargs.get("config_filename", "config.yaml")
        if config_file.exists():
            lines.append(f"  config: {config_file}")
        try:
            lines += [f"  {line}" for line in summary_lines(read_run(run_dir))]
        except ValueError:  # no evaluation callbacks configured
            pass
        suggestion = next_command(getattr(self, "config_file", None), run_dir)
        if suggestion:
            lines.append(f"next: {suggestion}")
        print("\n".join(lines), flush=True)


GAP_SUFFIX = "_gap"  # configs/<name>_gap.yaml: <name>.yaml with its danger zone removed from training


def next_command(config_file: Path | None, run_dir: Path) -> str | None:
    """The one command worth running after a fit of ``config_file``: the gap run shipped beside it
    (``<name>_gap.yaml``); for such a gap run, the comparison with the newest run of its baseline (or that baseline's
    fit, when it has none yet); otherwise the danger zone of the data (``calmwild analyze``)."""
    if config_file is None:
        return None
    gap = config_file.with_name(config_file.stem + GAP_SUFFIX + config_file.suffix)
    if gap.is_file():
        return (f"calmwild fit --config {gap}   (the same run with the danger zone removed from training; then "
                f"calmwild compare {run_dir} <its run> --out <folder>)")
    baseline = config_file.with_name(config_file.stem.removesuffix(GAP_SUFFIX) + config_file.suffix)
    if config_file.stem.endswith(GAP_SUFFIX) and baseline.is_file():
        try:
            other = find_latest_run(run_dir.parent.parent / baseline.stem)
        except FileNotFoundError:
            return f"calmwild fit --config {baseline}   (the baseline this run removes the danger zone from)"
        return (f"calmwild compare {other} {run_dir} --out {run_dir.parent / 'compare'}   (baseline against gap: "
                "memorization and quality side by side)")
    return f"calmwild analyze --data {config_file} --out {run_dir / 'analysis'}   (the danger zone of this data)"


def lightning_main(args: list[str] | None, run: bool = True) -> CalmwildCLI:
    """LightningCLI over DiffusionModule and any calmwild datamodule; ``run=False`` only instantiates."""
    return CalmwildCLI(
        DiffusionModule,
        InMemoryImageDataModule,
        subclass_mode_data=True,
        save_config_callback=CalmwildSaveConfig,
        save_config_kwargs={"overwrite": False, "save_to_log_dir": False},
        parser_class=CalmwildArgumentParser,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )
