"""The optimizer and its schedule: AdamW with decoupled weight decay on weight matrices, linear warmup, cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from clip_pl.model import CLIP

# The default warmup as a share of the run's steps: between OpenCLIP's long recipes (0.3-1.5%) and the
# short runs of the demo and the quality benchmark (10-12.5%).
WARMUP_FRACTION = 0.05


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup, then cosine decay, both per optimizer step.

    Attributes:
        lr: Peak learning rate, reached after ``warmup_steps``.
        weight_decay: Applied to weight matrices only; biases, norms, embeddings and the
            temperature are not decayed.
        betas: AdamW betas (CLIP uses (0.9, 0.98) for stability at large batch).
        eps: AdamW epsilon.
        warmup_steps: Linear warmup length in optimizer steps; ``None``: ``WARMUP_FRACTION`` of the
            run's steps, so that a run of any length warms up and then decays.
        min_lr: Learning rate at the end of the cosine.
        fused: Use the fused AdamW kernel (CUDA and CPU); other devices use torch's default.

    Raises:
        ValueError: Naming the setting as the training config does (``optim.lr``) when a value is
            out of range.
    """

    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int | None = None
    min_lr: float = 0.0
    fused: bool = True

    def __post_init__(self) -> None:
        # torch's AdamW would reject these only when the trainer builds it, after Lightning's start-up
        # banner, and without the name of the setting.
        checks = (
            ("lr", self.lr >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("eps", self.eps >= 0, ">= 0"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, ">= 0 or null"),
            ("min_lr", 0 <= self.min_lr <= self.lr, "in [0, optim.lr]"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"optim.{name} must be {rule}, got {getattr(self, name)}")


def _no_weight_decay(model: CLIP) -> set[str]:
    """Names of parameters that must not be decayed."""
    timm_skip = {f"image_tower.trunk.{n}" for n in getattr(model.image_tower.trunk, "no_weight_decay", set)()}
    names = set()
    for name, param in model.named_parameters():
        is_embedding = "embedding" in name or "pos_embed" in name or name.endswith(("cls_token", "reg_token"))
        if param.ndim < 2 or is_embedding or name in timm_skip:
            names.add(name)
    return names


def build_optimizer(model: nn.Module, optim: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on weight matrices only (see ``OptimizerConfig``)."""
    skip = _no_weight_decay(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n not in skip], "weight_decay": optim.weight_decay},
        {"params": [p for n, p in params if n in skip], "weight_decay": 0.0},
    ]
    # torch has fused AdamW kernels for CUDA and CPU tensors (on CPU the step is ~3x faster too).
    fused = optim.fused and all(p.device.type in ("cuda", "cpu") for _, p in params)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (from 0) as a fraction of the peak.

    OpenCLIP's schedule: step ``k`` of the warmup takes ``(k + 1) / warmup_steps`` of the peak, so no
    step is wasted at rate 0, then a cosine from the peak at ``warmup_steps`` down to ``min_ratio``
    at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
