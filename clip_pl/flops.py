"""Model FLOPs and accelerator peaks: what model FLOPs utilization (MFU) is computed from.

MFU = model FLOPs per sample x samples/s per device / the device's dense peak. Model FLOPs are
those of one training forward and backward of both towers, counted by ``torch.utils.flop_counter``
on the meta device (no memory, no compute), without what gradient checkpointing or micro-batches
recompute (PaLM's definition, Chowdhery et al. 2022, appendix B) and without the contrastive
loss (a ``B x N`` similarity matrix: under 0.2% of ViT-B/16's FLOPs at N = 32k).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from clip_pl.model import CLIP, CLIPConfig

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks, FLOP/s, by a piece of
# torch.cuda.get_device_name(), the first match deciding. From NVIDIA's datasheets, whose headline
# Hopper and Blackwell figures are with sparsity: halved here. Lightning 2.6's table lists the H200
# and H100 NVL with sparsity (github.com/Lightning-AI/pytorch-lightning/issues/21677) and does not
# know the name "NVIDIA H200".
DENSE_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.5e12),
    ("h200", 989.5e12),
    ("h100 nvl", 835.5e12),
    ("h100 pcie", 756.0e12),
    ("h100", 989.5e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("b200", 2250.0e12),
    ("a100", 312.0e12),
)


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts attention on CPU.

    The counter knows the CUDA attention kernels but not the CPU flash kernel that
    ``scaled_dot_product_attention`` runs on CPU; without these formulas CPU counts would miss attention.
    """
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_backward
    return FlopCounterMode(display=False, custom_mapping=mapping)


def model_flops_per_sample(config: CLIPConfig) -> float:
    """FLOPs of one training forward + backward of both towers, per sample.

    Counted on a copy of the model built on the meta device in training mode, so patch dropout's
    savings count and nothing is allocated; gradient checkpointing is off in the copy, so
    recomputation does not count. Captions are counted at the full ``context_length``, as the
    tokenizer pads them.

    Args:
        config: The model's configuration (``CLIP.config``).
    """
    plain = dataclasses.replace(
        config,
        image=dataclasses.replace(config.image, weights=None, grad_checkpointing=False),
        text=dataclasses.replace(config.text, grad_checkpointing=False),
    )
    batch = 2
    with torch.device("meta"):
        model = CLIP(plain).train()
        images = torch.empty(batch, 3, config.image.image_size, config.image.image_size)
        tokens = torch.zeros(batch, config.text.context_length, dtype=torch.long)
    with flop_counter() as counter:
        out = model(images, tokens)
        (out.image_features.sum() + out.text_features.sum() + out.logit_scale).backward()
    return counter.get_total_flops() / batch


def dense_peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense tensor-core peak in FLOP/s for a Lightning precision, or None if unknown.

    Known for the GPUs in ``DENSE_BF16_PEAKS`` at 16-bit precisions (``bf16-mixed``, ``16-mixed``,
    ``bf16-true``, ...). CPUs, other GPUs and 32-bit training return None: give the peak instead.
    """
    if device.type != "cuda" or not (precision.startswith("bf16") or precision.startswith("16")):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in DENSE_BF16_PEAKS if key in name), None)
