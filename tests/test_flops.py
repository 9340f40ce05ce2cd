"""Model FLOPs (for MFU) against a hand count and a real step, and the GPU peak table."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clip_pl.flops import dense_peak_flops, flop_counter, model_flops_per_sample
from clip_pl.model import CLIP, get_model_config


def _hand_count(image_tokens: int) -> int:
    """Training FLOPs per sample of the ``tiny`` config, by hand: 2 FLOPs per multiply-add."""
    # Image: 64 px in patches of 8 -> 64 patches of 3*8*8 values, width 128, 4 blocks, embed 64.
    patches = 2 * 64 * (3 * 8 * 8) * 128

    def blocks(tokens: int, width: int, depth: int) -> int:
        # qkv 3w^2 + out w^2 + MLP 8w^2 per token, and the two attention products (QK^T, AV).
        return depth * (2 * tokens * 12 * width**2 + 2 * 2 * tokens**2 * width)

    image = patches + blocks(image_tokens, 128, 4) + 2 * 128 * 64
    text = blocks(32, 128, 4) + 2 * 128 * 64  # projection of the EOS position only
    # Backward is twice the forward, except the patch projection: the images need no gradient.
    return 3 * (image + text) - patches


def test_model_flops_match_a_hand_count():
    assert model_flops_per_sample(get_model_config("tiny")) == _hand_count(image_tokens=64 + 1)


def test_patch_dropout_counts_the_patches_kept():
    config = get_model_config("tiny", image={"patch_dropout": 0.5})
    assert model_flops_per_sample(config) == _hand_count(image_tokens=32 + 1)


def _real_step_flops(config, batch=3) -> float:
    torch.manual_seed(0)
    model = CLIP(config).train()
    images = torch.randn(batch, 3, config.image.image_size, config.image.image_size)
    tokens = torch.randint(4, config.text.vocab_size, (batch, config.text.context_length))
    # The math backend's backward has no recomputation, like the model FLOPs' count.
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as counter:
        out = model(images, tokens)
        (out.image_features.sum() + out.text_features.sum() + out.logit_scale).backward()
    return counter.get_total_flops() / batch


def test_model_flops_equal_a_real_step_without_recomputation():
    config = get_model_config("tiny", image={"image_size": 32})
    assert model_flops_per_sample(config) == _real_step_flops(config)
    # With checkpointing the real step recomputes every block's forward; model FLOPs do not count it.
    ckpt = dataclasses.replace(
        config,
        image=dataclasses.replace(config.image, grad_checkpointing=True),
        text=dataclasses.replace(config.text, grad_checkpointing=True),
    )
    assert _real_step_flops(ckpt) > 1.2 * model_flops_per_sample(ckpt)
    assert model_flops_per_sample(ckpt) == model_flops_per_sample(config)


def test_model_flops_of_vit_b16():
    # ViT-B/16 image tower: 197 tokens of width 768, 12 blocks; text: 77 tokens of width 512, 12 blocks.
    vit = 2 * 196 * 768 * 768 + 12 * (2 * 197 * 12 * 768**2 + 4 * 197**2 * 768) + 2 * 768 * 512
    text = 12 * (2 * 77 * 12 * 512**2 + 4 * 77**2 * 512) + 2 * 512 * 512
    expected = 3 * (vit + text) - 2 * 196 * 768 * 768
    assert model_flops_per_sample(get_model_config("vit_b16")) == expected


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.5e12),
        ("NVIDIA H100 PCIe", "bf16-mixed", 756.0e12),
        ("NVIDIA H100 NVL", "16-mixed", 835.5e12),
        ("NVIDIA H200", "bf16-true", 989.5e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312.0e12),
        ("NVIDIA H100 80GB HBM3", "32-true", None),  # 32-bit: no peak assumed
        ("Tesla T4", "16-mixed", None),  # not in the table
    ],
)
def test_dense_peaks_by_device_name(monkeypatch, name, precision, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert dense_peak_flops(torch.device("cuda", 0), precision) == peak


def test_no_peak_on_cpu():
    assert dense_peak_flops(torch.device("cpu"), "bf16-mixed") is None
