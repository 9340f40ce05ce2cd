"""The LightningModule that trains a CLIP model: loss, micro-batches, validation metrics, checkpoint extras."""

from __future__ import annotations

import dataclasses
import functools
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.checkpoint import checkpoint

from clip_pl.distributed import all_gather_uneven
from clip_pl.model import CLIP, CLIPOutput
from clip_pl.model_files.checkpoint import CHECKPOINT_KEY
from clip_pl.training.lit import eval_frozen_modules, lock_image_tower, lock_text_tower
from clip_pl.training.optim import WARMUP_FRACTION, OptimizerConfig, build_optimizer, lr_factor
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.transforms import NormalizeImages


def forward_in_micro_batches(
    model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, micro_batch_size: int | None
) -> CLIPOutput:
    """``model(images, tokens)``, encoded ``micro_batch_size`` samples at a time with activation checkpointing.

    Each micro-batch keeps only its features through the forward pass; its activations are
    recomputed in backward, one micro-batch at a time. The loss over the concatenated features, and
    so every gradient, is that of the whole batch (see ``CLIPModule``'s ``micro_batch_size``).
    """
    if micro_batch_size is None or len(images) <= micro_batch_size:
        return model(images, tokens)
    outs = [
        checkpoint(model, i, t, use_reentrant=False)
        for i, t in zip(images.split(micro_batch_size), tokens.split(micro_batch_size))
    ]
    # The micro-batches share one temperature and bias; the last one's carry their gradients.
    return CLIPOutput(
        torch.cat([o.image_features for o in outs]),
        torch.cat([o.text_features for o in outs]),
        outs[-1].logit_scale,
        outs[-1].logit_bias,
    )


def _has_conv_trunk(model: CLIP) -> bool:
    return sum(isinstance(m, nn.Conv2d) for m in model.image_tower.trunk.modules()) > 1


def _rng_state() -> dict[str, Any]:
    # numpy's state is stored as plain lists so checkpoints load with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class CLIPModule(L.LightningModule):
    """Trains ``model`` with ``loss`` on batches of ``(images, tokens)``.

    Args:
        model: The CLIP model.
        tokenizer: Its tokenizer; stored in checkpoints so they load without the training config.
        loss: ``ClipLoss`` or ``SigLipLoss``.
        optim: Optimizer and schedule settings.
        compile: Compile the model with ``torch.compile`` (about +30% samples/s for ViT-B/16 on an
            H100, see benchmarks/RESULTS.md; the first steps take a minute longer).
        channels_last: Run the image tower in channels-last memory format, which cuDNN's and
            oneDNN's convolutions prefer (RN50: 1.5x on an H100). None: on when the image tower has
            more than one convolution (ResNets, ConvNeXts; not ViTs, whose one conv is the patch
            embedding).
        micro_batch_size: Encode a training batch in micro-batches of this many samples, each
            recomputed in backward (activation checkpointing per micro-batch), so the towers'
            activation memory is that of one micro-batch while the contrastive loss still sees the
            whole batch: the loss and its gradients are exactly those of the whole batch, for one
            extra forward pass. This is how a contrastive batch larger than memory is trained
            (OpenCLIP's ``accum_freq`` caches features for the same purpose). BatchNorm towers see per-micro-batch statistics.
            None: the whole batch at once.
        zero_shot_tasks: Zero-shot classification tasks run at each validation, split across ranks.
        lock_image: Freeze the image tower (LiT), but its projection and its last
            ``lock_image_unlocked_groups`` parameter groups; see ``clip_pl.training.lit``.
        lock_image_unlocked_groups: Groups of a locked image tower, counted from the output, left trainable.
        lock_text: Freeze the text tower likewise.
        lock_text_unlocked_groups: Groups of a locked text tower left trainable.
    """

    def __init__(
        self,
        model: CLIP,
        tokenizer: Tokenizer,
        loss: nn.Module,
        optim: OptimizerConfig | dict[str, Any] | None = None,
        compile: bool = False,
        channels_last: bool | None = None,
        micro_batch_size: int | None = None,
        zero_shot_tasks: list[Any] | tuple[Any, ...] = (),
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_groups: int = 0,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.loss = loss
        self.optim = optim if isinstance(optim, OptimizerConfig) else OptimizerConfig(**(optim or {}))
        self.compile = compile
        self.normalize_images = NormalizeImages(model.preprocess_config)
        # The datamodule leaves on_after_batch_transfer to this module on purpose (it normalizes
        # with the model's statistics); Lightning would warn about the choice at every fit.
        warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")
        self.channels_last = _has_conv_trunk(model) if channels_last is None else channels_last
        if micro_batch_size is not None and micro_batch_size <= 0:
            raise ValueError(f"module.micro_batch_size must be positive or null, got {micro_batch_size}")
        self.micro_batch_size = micro_batch_size
        self.zero_shot_tasks = list(zero_shot_tasks)
        self._val_features: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The global step of the weights the newest metrics describe (None before any validation).
        self.validated_step: int | None = None
        if tokenizer.vocab_size > model.config.text.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the text tower only "
                f"{model.config.text.vocab_size}; set model.text.vocab_size to at least {tokenizer.vocab_size}"
            )
        for tower, locked, unlocked_groups, lock in (
            ("image", lock_image, lock_image_unlocked_groups, lock_image_tower),
            ("text", lock_text, lock_text_unlocked_groups, lock_text_tower),
        ):
            if locked:
                lock(getattr(model, f"{tower}_tower"), unlocked_groups)
            elif unlocked_groups:
                raise ValueError(f"module.lock_{tower}_unlocked_groups is set but module.lock_{tower} is not; set both")

    def configure_model(self) -> None:
        if self.channels_last:
            # Only 4-d weights change layout; names and values, and so checkpoints, stay the same.
            self.model.image_tower.to(memory_format=torch.channels_last)
        if self.compile:
            # Compiles in place: parameter names, and so checkpoints, stay the same.
            self.model.compile()

    def on_train_start(self) -> None:
        # Locked parts are fixed feature extractors: no batch norm statistics updates, no dropout.
        eval_frozen_modules(self.model)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalizes uint8 image batches on the device (``ShardDataModule`` yields them)."""
        images, *rest = batch
        if images.dtype == torch.uint8:
            images = self.normalize_images(images)
        # Batches from ShardDataModule are channels-last (``stack_pixels``); each tower gets its own layout.
        images = images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return (images, *rest)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, tokens = batch
        out = forward_in_micro_batches(self.model, images, tokens, self.micro_batch_size)
        loss = self.loss(*out)
        with torch.no_grad():
            # In-batch (this rank's) image->text top-1: a cheap signal that learning happens.
            sims = out.image_features @ out.text_features.T
            acc = (sims.argmax(dim=1) == torch.arange(len(sims), device=sims.device)).float().mean()
        # Lightning reads every progress-bar value back as a Python number at each step, shown or
        # not: on a GPU a synchronization per step, which stalls the launch of the next step.
        shown = self._trainer is not None and self._trainer.progress_bar_callback is not None
        self.log("train/loss", loss, prog_bar=shown)
        self.log("train/acc_image_to_text", acc)
        self.log("train/logit_scale", out.logit_scale)
        if out.logit_bias is not None:
            self.log("train/logit_bias", out.logit_bias)
        return loss

    def on_validation_epoch_start(self) -> None:
        ddp = self.trainer.strategy.model if self.trainer is not None else None
        if isinstance(ddp, DistributedDataParallel):
            # DDP broadcasts buffers (BatchNorm statistics) from rank 0 at the first forward after
            # a training step, validation forwards included. Ranks run different numbers of
            # validation batches, possibly none, and a rank without any would never join that
            # broadcast: the run would hang. Training forwards broadcast again from the second
            # step after validation on.
            ddp.require_forward_param_sync = False
        self._val_features.clear()
        self._val_loss_sum = torch.zeros(2, device=self.device)  # (sum of sample losses, samples)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, tokens = batch
        out = self.model(images, tokens)
        # Ranks hold different numbers of validation batches (possibly none), so nothing here may
        # be a collective: the loss does not gather, and the reductions happen at epoch end.
        self._val_loss_sum += torch.stack(
            [self.loss(*out, gather=False).detach() * len(images), out[0].new_tensor(len(images))]
        )
        self._val_features.append((out.image_features.float(), out.text_features.float()))

    def on_validation_epoch_end(self) -> None:
        from clip_pl.evaluation.metrics import retrieval_recall

        # Every rank reaches these collectives the same number of times, whatever its data.
        loss_sum, count = self.trainer.strategy.reduce(self._val_loss_sum, reduce_op="sum").tolist()
        empty = torch.empty(0, self.model.config.embed_dim, device=self.device)
        images = all_gather_uneven(torch.cat([f[0] for f in self._val_features]) if self._val_features else empty)
        texts = all_gather_uneven(torch.cat([f[1] for f in self._val_features]) if self._val_features else empty)
        self._val_features.clear()
        metrics = {}
        if count:
            metrics = {"val/loss": loss_sum / count}
            metrics.update({f"val/{k}": v for k, v in retrieval_recall(images, texts).items()})
        for task in self.zero_shot_tasks:
            # Each rank embeds its share of the prompts and images; every rank gets the totals.
            results = task.evaluate(self.model, self.tokenizer, device=self.device, distributed=True)
            metrics.update({f"zero_shot/{task.name}/{k}": v for k, v in results.items()})
        # Every rank holds the same whole-set values, logged on all ranks so that every rank's
        # callbacks see them; syncing by max (of equal numbers) keeps them exact and tells
        # Lightning they need no averaging.
        self.log_dict(metrics, sync_dist=True, reduce_fx="max")
        if not self.trainer.sanity_checking:
            self.validated_step = self.trainer.global_step

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        if o.fused and self.trainer.precision == "16-mixed":
            # fp16's gradient scaler and a fused step would need Lightning's clipping to unscale
            # first, which it refuses to do for fused optimizers.
            o = dataclasses.replace(o, fused=False)
        optimizer = build_optimizer(self.model, o)
        total = int(self.trainer.estimated_stepping_batches)
        if o.warmup_steps is None:
            o = dataclasses.replace(o, warmup_steps=max(1, round(WARMUP_FRACTION * total)))
        elif o.warmup_steps >= total:
            rank_zero_warn(
                f"optim.warmup_steps ({o.warmup_steps}) is not smaller than the number of training steps ({total}): "
                "the cosine decay of the learning rate never starts"
            )
        # timm's CosineLRScheduler would give the first step a rate of 0 and shift the cosine by a step.
        min_ratio = o.min_lr / o.lr if o.lr else 0.0
        factor = functools.partial(lr_factor, warmup_steps=o.warmup_steps, total_steps=total, min_ratio=min_ratio)
        scheduler = LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (its fp16 step
        # unscales internally). Under bf16 nothing is scaled (and fp16 gets no fused optimizer, see
        # configure_optimizers), so the gradients are clipped here, as they are.
        if gradient_clip_val and optimizer.defaults.get("fused"):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "model_config": self.model.config.to_dict(),
            "tokenizer": self.tokenizer.state_dict(),
        }
        checkpoint["rng"] = _rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if any("lr_lambdas" not in state for state in checkpoint.get("lr_schedulers", [])):
            raise ValueError(
                "the checkpoint holds timm's learning-rate scheduler, which clip_pl no longer uses; start a new run "
                "(run_name=...) from its weights with init.from_checkpoint=<its last.ckpt>"
            )
        if "rng" in checkpoint:
            _set_rng_state(checkpoint["rng"])
