"""DiffusionModule: the LightningModule that trains an EDM-preconditioned backbone with a pluggable SigmaSampler.

Loss (paper eq. 1, EDM eq. 8): L = E_sigma E_x0 E_n [ r(sigma) lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 ],
sigma ~ the SigmaSampler, r(sigma) its extra per-sample factor (1 except for ``Reweighted``), lambda the EDM weight.

Randomness is a pure function of (seed, global step): each step draws the sigmas and noises of the whole global
batch from its own generator and every DDP rank keeps its slice, so 2 ranks x 16 images train exactly like 1 process
x 32. The global RNG (dropout) is seeded from (seed, step, rank). A resumed run therefore draws exactly what an
uninterrupted run would have drawn, with no RNG state to save.

The exponential moving average of the weights lives inside the module (``net_ema``) with EDM's half-life in images
and ramp-up (Karras et al. 2022, App. F.3): half-life = min(ema_halflife_images, ema_rampup_ratio * images seen),
beta = 0.5 ** (global_batch / half-life). Checkpoints therefore carry both the live (``net.*``) and the EMA
(``net_ema.*``) weights, and evaluation reads ``net_ema`` directly, never a swapped copy.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from calmwild.checkpoints import DEFAULT_BACKBONE, FORMAT_VERSION, LIVE_PREFIX, backbone_config, ema_weights
from calmwild.denoisers import NetworkDenoiser
from calmwild.io import to_jsonable
from calmwild.precond import EDMPrecond, edm_loss_weight
from calmwild.checks import check_count
from calmwild.sampling import generate, sample_indices
from calmwild.settings import SamplingSettings
from calmwild.sigma import LogNormal, SigmaDraw, SigmaSampler

# The EMA copy is in eval mode on purpose (no dropout); Lightning would warn about it at every fit.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
_STEP_SEED_STRIDE = 1_000_003  # a prime, so (seed, step, rank) keys do not collide for realistic ranks


def check_backbone(backbone: object) -> None:
    """The config protocol a backbone must follow to be trained, checkpointed and rebuilt (see DiffusionModule)."""
    if not isinstance(backbone, torch.nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
    config = getattr(backbone, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"backbone {type(backbone).__name__} must expose a `config` dict of its constructor's keyword "
                        "arguments (calmwild's backbone protocol), so checkpoints can rebuild it")
    missing = [key for key in ("img_resolution", "in_channels") if key not in config]
    if missing:
        raise TypeError(f"backbone {type(backbone).__name__}: its `config` lacks {missing} (the image shape)")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The 63-bit seed of training step ``step`` on DDP rank ``rank``."""
    return (seed * 2_147_483_647 + step * _STEP_SEED_STRIDE + rank) % (2**63 - 1)


class DiffusionModule(pl.LightningModule):
    """Trains ``D = EDMPrecond(backbone)`` with sigma drawn from ``sigma_sampler``.

    Args:
        backbone: the raw network F(x_in, c_noise, class_labels), e.g. ``calmwild.unet.UNet``: any ``nn.Module`` with
            calmwild's small config protocol -- a ``config`` dict of its constructor's keyword arguments holding at
            least ``img_resolution`` and ``in_channels`` (and ``num_classes`` when class-conditional), and
            ``forward(x, c_noise, class_labels=None)``.
        sigma_sampler: distribution of training noise levels; default ``LogNormal(-1.2, 1.2)`` (EDM).
        sigma_data: EDM's data standard deviation (0.5 for images in [-1, 1]).
        loss_weighting: ``edm`` (lambda(sigma) of EDM eq. 8), ``eps`` (1/sigma^2: DDPM's epsilon-prediction loss in
            data space) or ``unit`` (plain x0 MSE).
        lr: Adam learning rate; betas, eps, weight_decay: Adam's.
        lr_warmup_steps: linear learning-rate ramp-up over this many optimizer steps (0 disables).
        ema_halflife_images: EMA half-life in images (EDM: 500k).
        ema_rampup_ratio: EDM's EMA ramp-up; half-life grows as ratio * images seen until ema_halflife_images.
            ``None`` disables the ramp-up.
        nan_policy: on a non-finite loss, ``raise`` stops the run with a clear error at that step (the last good
            checkpoint is untouched) or ``skip`` drops the step's update and counts it.
        nan_max_consecutive, nan_max_fraction: ``skip`` gives up (the same error as ``raise``) after more than this
            many non-finite steps in a row, or more than this fraction of all steps (judged from step 100 on).
        sample_class: class label used when sampling from a class-conditional backbone (dummy-class baseline: 0).
        sampler_steps, sampler_solver: defaults for :meth:`sample` (EDM Heun, 18 steps).
        seed: base seed for sigma, noise and dropout (combined with step and rank).
        channels_last: keep weights and activations in channels-last memory format (faster convolutions on GPUs).
        compile: run the training network through ``torch.compile`` (the EMA copy stays eager).
        Mixed precision is the Trainer's business: ``trainer.precision: bf16-mixed`` autocasts the forward pass.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        sigma_sampler: SigmaSampler | None = None,
        sigma_data: float = 0.5,
        loss_weighting: Literal["edm", "eps", "unit"] = "edm",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lr_warmup_steps: int = 0,
        ema_halflife_images: float = 500_000.0,
        ema_rampup_ratio: float | None = 0.05,
        nan_policy: Literal["raise", "skip"] = "raise",
        nan_max_consecutive: int = 10,
        nan_max_fraction: float = 0.1,
        sample_class: int | None = None,
        sampler_steps: int = SamplingSettings.steps,
        sampler_solver: Literal["heun", "euler"] = SamplingSettings.solver,
        seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "sigma_sampler"])
        check_backbone(backbone)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be positive, got {lr}")
        if nan_max_consecutive < 0 or not 0.0 <= nan_max_fraction <= 1.0:
            raise ValueError(f"nan_max_consecutive must be >= 0 and nan_max_fraction in [0, 1], got "
                             f"{nan_max_consecutive} and {nan_max_fraction}")
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {lr_warmup_steps}")
        if ema_halflife_images <= 0:
            raise ValueError(f"ema_halflife_images must be positive, got {ema_halflife_images}")
        if ema_rampup_ratio is not None and ema_rampup_ratio <= 0:
            raise ValueError(f"ema_rampup_ratio must be positive or null, got {ema_rampup_ratio}")
        check_count(sampler_steps, "sampler_steps")
        num_classes = int(backbone.config.get("num_classes", 0))
        if sample_class is not None and not 0 <= sample_class < max(num_classes, 1):
            raise ValueError(
                f"sample_class {sample_class} is not a class of a backbone with num_classes={num_classes}"
            )
        if num_classes > 0 and sample_class is None:
            raise ValueError(
                f"a class-conditional backbone (num_classes={num_classes}) needs sample_class for sampling")
        self.net = EDMPrecond(backbone, sigma_data)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.net_ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        # Kept out of the module registry (plain attribute) so the state dict has no duplicate keys.
        self.__dict__["_train_forward"] = torch.compile(self.net) if compile else self.net
        self.sigma_sampler = sigma_sampler if sigma_sampler is not None else LogNormal()
        self.skipped_steps = 0
        self.consecutive_skips = 0
        cfg = backbone.config
        self.image_shape = (int(cfg["in_channels"]), int(cfg["img_resolution"]), int(cfg["img_resolution"]))

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        """Checks the data's image shape against the backbone's, then prepares data-dependent samplers
        (e.g. ``DangerZoneGap``) once on rank 0 and broadcasts them."""
        datamodule = self.trainer.datamodule
        data_shape = tuple(getattr(datamodule, "image_shape", None) or ()) if datamodule is not None else ()
        if data_shape and data_shape != tuple(self.image_shape):
            raise ValueError(
                f"the data has images of shape {data_shape} but the backbone is built for {tuple(self.image_shape)}"
                " (model.backbone.init_args.in_channels / img_resolution)"
            )
        if stage != "fit" or type(self.sigma_sampler).prepare is SigmaSampler.prepare:
            return
        record = None
        if self.global_rank == 0:
            device = self.trainer.strategy.root_device  # the geometry runs where training will
            record = self.sigma_sampler.prepare(datamodule.train_images.to(device),
                                                datamodule.heldout_images.to(device))
            record = {"record": record, "state": self.sigma_sampler.state_dict()}
        record = self.trainer.strategy.broadcast(record, src=0)
        self.sigma_sampler.load_state_dict(record["state"])
        self.sigma_sampler_record = record["record"]
        if self.global_rank == 0:
            print(f"calmwild: sigma sampler prepared from the data: {self.sigma_sampler.describe()}", flush=True)

    def on_fit_start(self) -> None:
        record = getattr(self, "sigma_sampler_record", None)
        if record is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({"sigma_sampler": self.sigma_sampler.describe()})

    def _per_sample_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss_weighting == "edm":
            return edm_loss_weight(sigma, self.hparams.sigma_data)
        if self.hparams.loss_weighting == "eps":
            return 1.0 / sigma**2
        return torch.ones_like(sigma)

    def _split_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, (list, tuple)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank))

    def _draw_noise(self, images: torch.Tensor) -> tuple[SigmaDraw, torch.Tensor, torch.Tensor]:
        """This rank's slice of the sigmas and unit noises drawn for the whole global batch of this step, and the
        sigmas of the whole global batch (every rank draws them all: logging them needs no communication). They are
        drawn where the batch lives, from a generator of that device seeded with (seed, step) only: a resumed run
        draws what the uninterrupted one drew, and W ranks draw what one process with the global batch draws."""
        local = images.shape[0]
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        gen = torch.Generator(images.device).manual_seed(step_seed(self.hparams.seed + 1, self.global_step, 0))
        draw = self.sigma_sampler.sample(local * world, gen)
        noise = torch.randn((local * world, *images.shape[1:]), generator=gen, device=images.device)
        mine = slice(rank * local, (rank + 1) * local)
        return SigmaDraw(draw.sigma[mine], draw.weight[mine]), noise[mine], draw.sigma

    def _objective(self, denoised: torch.Tensor, images: torch.Tensor, sigma: torch.Tensor,
                   draw: SigmaDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """The training objective (eq. 1) of one batch: mean over images of lambda(sigma) * w * ||D - x||^2 / d, with
        this module's loss weighting lambda and the sampler's weight w; also the per-image MSE ||D - x||^2 / d."""
        per_sample = ((denoised - images) ** 2).mean(dim=(1, 2, 3))
        weights = self._per_sample_weight(sigma) * draw.weight.to(images)
        return (weights * per_sample).mean(), per_sample

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        images, labels = self._split_batch(batch)
        self._batch_size, self._step_was_skipped = images.shape[0], False
        draw, noise, global_sigma = self._draw_noise(images)
        sigma = draw.sigma.to(images)
        noisy = images + noise.to(images) * sigma.reshape(-1, 1, 1, 1)
        if self.hparams.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        denoised = self._train_forward(noisy, sigma, labels)
        loss, per_sample = self._objective(denoised, images, sigma, draw)
        # the step's verdict stays on the device until backward is queued (on_before_optimizer_step reads it)
        self._finite = self._all_ranks(torch.isfinite(loss.detach()))
        self._loss = loss.detach()
        # logged for skipped steps too, so that their row shows their own (non-finite) loss, not the previous one
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        self.log("train/unweighted_mse", per_sample.detach().mean(), on_step=True, on_epoch=False, sync_dist=True)
        self._log_sigma_histogram(global_sigma)
        return loss

    def _all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (a 0-d bool tensor) and-ed over the DDP ranks, still on the device (an all-reduce, no host wait)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return self.trainer.strategy.reduce(flag.float(), reduce_op="sum") >= self.trainer.world_size

    def _check_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        """The non-finite policy, applied once the step's backward is queued (the only host wait of a step, and it
        waits for the forward alone): ``raise`` stops the run before the optimizer touches the weights; ``skip``
        drops every gradient, so the optimizer leaves the weights and its own state as they were, and the EMA is
        not updated. Returns whether the step goes ahead."""
        if bool(self._finite):
            self.consecutive_skips = 0
            return True
        if self.hparams.nan_policy == "raise":
            raise FloatingPointError(
                f"non-finite training loss ({float(self._loss)}) at global step {self.global_step}; "
                "the run is stopped and earlier checkpoints are left untouched. Lower the learning rate, check "
                "the data for NaN/inf, or set model.nan_policy=skip to drop such steps."
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._skip_step()
        return False

    def _skip_step(self) -> None:
        """Counts a step dropped under ``nan_policy: skip`` and stops the run once the skips say it diverged: more
        than ``nan_max_consecutive`` steps in a row, or more than ``nan_max_fraction`` of all steps so far (judged
        from step 100 on, so early accidents do not end a run)."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self._step_was_skipped = True
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        hp, steps = self.hparams, self.global_step + 1
        too_many_in_a_row = self.consecutive_skips > hp.nan_max_consecutive
        too_many_overall = steps >= 100 and self.skipped_steps > hp.nan_max_fraction * steps
        if too_many_in_a_row or too_many_overall:
            first = self.global_step - self.consecutive_skips + 1
            raise FloatingPointError(
                f"nan_policy=skip gives up at global step {self.global_step}: {self.consecutive_skips} consecutive "
                f"non-finite steps (from step {first}; limit model.nan_max_consecutive={hp.nan_max_consecutive}) and "
                f"{self.skipped_steps} of {steps} steps skipped (limit model.nan_max_fraction={hp.nan_max_fraction}); "
                "the run has diverged, earlier checkpoints are left untouched. Lower the learning rate or check the "
                "data for NaN/inf."
            )

    def _log_sigma_histogram(self, sigma: torch.Tensor) -> None:
        """Quantiles of the sigmas of the whole global batch (identical on every rank, hence no sync) as scalars for
        every logger, and a histogram for W&B / TensorBoard."""
        if self._trainer is None or not self.trainer.loggers:
            return
        if (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) != 0:
            return
        log_sigma = sigma.double().log()
        for q in (0.1, 0.5, 0.9):
            self.log(f"train/log_sigma_q{int(q * 100)}", float(torch.quantile(log_sigma, q)), on_step=True)
        if self.global_rank != 0:
            return
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):  # TensorBoard
                experiment.add_histogram("train/log_sigma", log_sigma, self.global_step)
            elif type(logger).__name__ == "WandbLogger":
                import wandb

                logger.log_metrics(
                    {"train/log_sigma_hist": wandb.Histogram(log_sigma.numpy())}, step=self.global_step
                )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The non-finite policy (:meth:`_check_finite`); then, as EDM, gradients pass through nan_to_num so one bad
        element cannot poison the weights."""
        if not self._check_finite(optimizer):
            return
        for p in self.net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update, so callbacks and checkpoints of this step see a current EMA."""
        super().optimizer_step(*args, **kwargs)
        if self._step_was_skipped:
            return
        self.update_ema(global_batch=self._batch_size * self.trainer.world_size)

    @torch.no_grad()
    def update_ema(self, global_batch: int, images_seen: int | None = None) -> None:
        """EDM's EMA update after an optimizer step (Karras et al. 2022, training loop of App. F): with
        ``images_seen`` counting the batch just trained on (default (global_step + 1) * global_batch),
        half-life = min(ema_halflife_images, ema_rampup_ratio * images_seen),
        beta = 0.5 ** (global_batch / half-life)."""
        if images_seen is None:
            images_seen = (self.global_step + 1) * global_batch
        halflife = self.hparams.ema_halflife_images
        if self.hparams.ema_rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.hparams.ema_rampup_ratio)
        beta = 0.5 ** (global_batch / max(halflife, 1e-8))
        torch._foreach_lerp_(list(self.net_ema.parameters()), [p.detach() for p in self.net.parameters()], 1.0 - beta)
        for b_ema, b in zip(self.net_ema.buffers(), self.net.buffers()):
            b_ema.copy_(b)

    def warmup_factor(self, step: int) -> float:
        """The learning-rate multiplier at optimizer step ``step``: min(1, (step + 1) / lr_warmup_steps)."""
        warmup = self.hparams.lr_warmup_steps
        return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # one kernel per step on a GPU; on a CPU the multi-tensor path (torch's default is a loop over the tensors
        # there), which makes the same updates bit for bit at half the cost
        implementation = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        optimizer = torch.optim.Adam(
            self.net.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay,
            **implementation,
        )
        if hp.lr_warmup_steps <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.warmup_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run restores the optimizer's state, hyperparameters included; the config decides those instead
        (``--model.lr`` on resume takes effect), while Adam's moments and the warm-up position are kept."""
        hp = self.hparams
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        for scheduler in schedulers:
            scheduler.base_lrs = [hp.lr] * len(scheduler.optimizer.param_groups)
        factor = self.warmup_factor(schedulers[0].last_epoch) if schedulers else 1.0
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group.update(lr=hp.lr * factor, initial_lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                             weight_decay=hp.weight_decay)

    def train(self, mode: bool = True) -> DiffusionModule:
        super().train(mode)
        self.net_ema.eval()  # the EMA copy never runs dropout
        return self

    # ------------------------------------------------------------------ validate, test, predict
    def _heldout_loss(self, batch: Any, batch_idx: int, stage: str) -> torch.Tensor:
        """The training objective (eq. 1 with this module's sampler and loss weighting) of the EMA network on a batch
        of images it did not train on, logged as ``<stage>/loss`` and ``<stage>/unweighted_mse`` (epoch means).
        Sigmas and noises come from a generator seeded with (seed, batch index): every call gives the same numbers."""
        images, _ = self._split_batch(batch)
        gen = torch.Generator().manual_seed(step_seed(self.hparams.seed + 2, batch_idx, 0))
        draw = self.sigma_sampler.sample(images.shape[0], gen)
        noise = torch.randn(images.shape, generator=gen).to(images)
        sigma = draw.sigma.to(images)
        denoised = self.ema_denoiser()(images + noise * sigma.reshape(-1, 1, 1, 1), sigma)
        loss, per_sample = self._objective(denoised, images, sigma, draw)
        size = images.shape[0]
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}/unweighted_mse", per_sample.mean(), on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._heldout_loss(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._heldout_loss(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Samples of the EMA network for a batch of sample numbers (``calmwild predict``): sample i starts from
        seed + i noise (:func:`calmwild.sampling.sample_indices`), ``predict_sampling`` gives seed and sampler."""
        indices = batch[0] if isinstance(batch, (list, tuple)) else batch
        sampling = getattr(self, "predict_sampling", None) or SamplingSettings()
        kwargs = {k: v for k, v in sampling.generate_kwargs().items() if k not in ("seed", "batch_size")}
        out = sample_indices(self.ema_denoiser(sampling.precision), indices.tolist(), self.image_shape,
                             seed=sampling.seed, device=self.device, **kwargs)
        return {"index": indices.cpu(), "samples": out.samples.to("cpu", torch.float32)}

    def load_network_weights(self, checkpoint: dict, where: str = "the checkpoint") -> int:
        """Loads the network weights of a calmwild checkpoint (a fit's ``.ckpt``, a ``.safetensors`` file, an
        imported network) into this module -- the live weights (``net.``; the EMA ones when a file holds only those)
        and the EMA weights (``net_ema.``) -- after :meth:`check_checkpoint`, and the sigma sampler's prepared state.
        Returns the training step the weights are from (0 when the file does not say)."""
        self.check_checkpoint(checkpoint.get("calmwild"), where)
        ema = ema_weights(checkpoint, where)
        live = {key[len(LIVE_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
                if key.startswith(LIVE_PREFIX)}
        for target, weights in ((self.net_ema, ema), (self.net, live or ema)):
            try:
                target.load_state_dict(weights, strict=True)
            except RuntimeError as err:
                raise ValueError(f"{where}: its weights do not fit the network its metadata describes: "
                                 f"{str(err).splitlines()[0]}") from None
        sampler_state = checkpoint.get("calmwild_sigma_sampler_state")
        if sampler_state:
            self.sigma_sampler.load_state_dict(sampler_state)
        self.evaluated_step = int(checkpoint.get("global_step", 0))
        return self.evaluated_step

    # ------------------------------------------------------------------ evaluation and checkpoints
    def ema_denoiser(self, precision: str = "fp32") -> NetworkDenoiser:
        """The EMA network as a data-space denoiser (eval mode, no grad, sampling class applied)."""
        return NetworkDenoiser(self.net_ema, class_label=self.hparams.sample_class, precision=precision)

    def sample(self, num: int, seed: int = 0, batch_size: int = 256, progress: bool | str = False,
               precision: str = "fp32", **sampler_kwargs: Any):
        """``num`` images in [-1, 1] from the EMA network with EDM's sampler (per-image seeded noise); ``progress``
        as :func:`calmwild.sampling.generate`'s (a string labels the bar)."""
        sampler_kwargs.setdefault("num_steps", self.hparams.sampler_steps)
        sampler_kwargs.setdefault("solver", self.hparams.sampler_solver)
        return generate(
            self.ema_denoiser(precision), num, self.image_shape, seed=seed, batch_size=batch_size, device=self.device,
            progress=progress, **sampler_kwargs,
        )

    def checkpoint_metadata(self) -> dict:
        backbone = self.net.backbone
        cfg = backbone.config
        return {
            "format_version": FORMAT_VERSION,
            "backbone": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
            "unet": to_jsonable(dict(cfg)),
            "sigma_data": float(self.hparams.sigma_data),
            "image_shape": list(self.image_shape),
            "num_classes": int(cfg.get("num_classes", 0)),
            "sample_class": self.hparams.sample_class,
            "sigma_sampler": self.sigma_sampler.describe(),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["calmwild"] = self.checkpoint_metadata()
        checkpoint["calmwild_skipped_steps"] = self.skipped_steps
        checkpoint["calmwild_consecutive_skips"] = self.consecutive_skips
        checkpoint["calmwild_sigma_sampler_state"] = self.sigma_sampler.state_dict()

    def check_checkpoint(self, meta: dict | None, where: str = "the checkpoint") -> None:
        """Refuses a checkpoint whose network differs from this module's: backbone class and config (defaults
        filled in for keys an older checkpoint does not record), image shape, sigma_data. Only the differing
        config keys are named."""
        if meta is None:
            raise ValueError(f"{where} was not written by calmwild's DiffusionModule (no 'calmwild' entry)")
        mine = self.checkpoint_metadata()
        mismatch = "checkpoint does not match the configured model:"
        recorded = meta.get("backbone", DEFAULT_BACKBONE)
        if recorded != mine["backbone"]:
            raise ValueError(f"{mismatch} the backbone is {recorded} in {where} but {mine['backbone']} in the config")
        theirs = backbone_config(meta, where, trusted=(mine["backbone"],))
        differ = sorted(k for k in set(theirs) | set(mine["unet"]) if theirs.get(k) != mine["unet"].get(k))
        if differ:
            raise ValueError(f"{mismatch} unet is {({k: theirs.get(k) for k in differ})} in {where} but "
                             f"{({k: mine['unet'].get(k) for k in differ})} in the config")
        for key in ("image_shape", "sigma_data"):
            if meta.get(key) != mine[key]:
                raise ValueError(f"{mismatch} {key} is {meta.get(key)} in {where} but {mine[key]} in the config")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint.get("calmwild"))
        self.skipped_steps = int(checkpoint.get("calmwild_skipped_steps", 0))
        self.consecutive_skips = int(checkpoint.get("calmwild_consecutive_skips", 0))
        sampler_state = checkpoint.get("calmwild_sigma_sampler_state")
        if sampler_state:
            self.sigma_sampler.load_state_dict(sampler_state)
