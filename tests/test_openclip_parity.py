"""clip_pl trains exactly as OpenCLIP does: same weights, same batches, same losses and weights step for step.

The clip_pl side is the real training path (``CLIPModule`` under a Lightning ``Trainer``, with the
optimizer, schedule and gradient clipping of the composed default config); the OpenCLIP side is
open_clip_train's training step (its parameter groups, ``cosine_lr``, ``ClipLoss`` and the logit-scale
clamp after each step). Where the two differ by design, the test makes both sides equal and says so:

* Gradient clipping: clip_pl clips the gradient norm at 1.0 by default, OpenCLIP does not; the
  OpenCLIP side gets the same clipping here.
* Init: both follow the same scheme (checked by distribution below), but draw different random
  numbers, so OpenCLIP's weights are copied into clip_pl.
* Weight decay: OpenCLIP decays the token and position embeddings; clip_pl does not (as timm and
  nanoGPT do not). OpenCLIP's groups get clip_pl's rule here.
* Logit-scale cap at 100: OpenCLIP clamps the parameter after each step, clip_pl clamps the value in
  the forward pass. The scale stays far below the cap in these steps, where both are the identity.
* Text pooling: OpenCLIP pools at the highest token id (its EOS), clip_pl at ``eos_id``; the tokens
  here put the highest id at EOS.
* AdamW: clip_pl runs the fused kernel, OpenCLIP the foreach one; the same update up to rounding.

Tolerance: the two sides compute attention (SDPA against ``nn.MultiheadAttention``), the patch
embedding (a matrix product against a convolution) and the AdamW update with different fp32 kernels,
whose results differ by float rounding, about 1e-7 relative per operation. Over the steps here the
weights drift apart by about 1e-6 while each moves by about 1e-2 (12 steps at lr up to 1e-3), and a
real difference (gradient clipping below) moves them apart by more than 1e-3. One exception: the
biases of the attention keys get a gradient of exactly zero in exact arithmetic (a constant added to
every key's score of a query cancels in the softmax), so theirs is rounding noise of about 1e-9,
which AdamW scales up towards ``lr * g / eps`` per step on either side; they are compared at 1e-3.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from test_config import compose_train

from clip_pl.loss import ClipLoss
from clip_pl.model import create_model
from clip_pl.model_files.convert import convert_openclip_image_tower, convert_openclip_text_tower, load_openclip_model
from clip_pl.training.module import CLIPModule
from clip_pl.training.optim import OptimizerConfig

open_clip = pytest.importorskip("open_clip")
cosine_lr = pytest.importorskip("open_clip_train.scheduler").cosine_lr

VOCAB, CONTEXT, EOS, PAD = 100, 16, 99, 0
VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
TEXT = {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 64, "heads": 2, "layers": 2}
EMBED_DIM, BATCH, STEPS = 32, 16, 12
# Short enough for a few-second test, long enough for a warmup and most of a cosine.
SCHEDULE = {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 4}
WEIGHT_TOLERANCE = 1e-5
KEY_BIAS_TOLERANCE = 1e-3


def openclip_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(EMBED_DIM, VISION, TEXT)


def clip_pl_model(reference: torch.nn.Module | None) -> torch.nn.Module:
    """The clip_pl model of the same architecture, with ``reference``'s weights unless it is None."""
    model = create_model(
        "tiny",
        embed_dim=EMBED_DIM,
        image={
            "name": "vit_base_patch16_clip_224",
            "image_size": 32,
            "model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
        },
        text={"vocab_size": VOCAB, "context_length": CONTEXT, "width": 64, "heads": 2, "layers": 2,
              "pad_id": PAD, "eos_id": EOS},
    )
    if reference is not None:
        load_openclip_model(model, reference.state_dict())
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        images = torch.randn(BATCH, 3, 32, 32, generator=generator)
        tokens = torch.randint(1, EOS, (BATCH, CONTEXT), generator=generator)
        lengths = torch.randint(2, CONTEXT, (BATCH,), generator=generator)
        for row, length in enumerate(lengths.tolist()):
            tokens[row, length] = EOS
            tokens[row, length + 1 :] = PAD
        out.append((images, tokens))
    return out


def decays(name: str, param: torch.Tensor) -> bool:
    """OpenCLIP's rule (open_clip_train.main), less the embeddings, which clip_pl does not decay."""
    excluded = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
    embedding = name in ("token_embedding.weight", "positional_embedding", "visual.positional_embedding")
    return not (excluded or embedding)


def train_openclip(model, optim: OptimizerConfig, clip_norm: float | None) -> tuple[list[float], list[float]]:
    """open_clip_train's step: lr set before the step, loss, backward, clipping, AdamW, clamp."""
    params = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in params if decays(n, p)], "weight_decay": optim.weight_decay},
        ],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
    )
    scheduler = cosine_lr(optimizer, optim.lr, optim.warmup_steps, STEPS)
    loss_fn = open_clip.ClipLoss()
    losses, lrs = [], []
    model.train()
    for step, (images, tokens) in enumerate(batches()):
        lrs.append(scheduler(step))
        optimizer.zero_grad()
        loss = loss_fn(*model(images, tokens))
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    return losses, lrs


class _Recorder(L.Callback):
    def __init__(self):
        self.losses, self.lrs = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def train_clip_pl(model, tokenizer, optim: OptimizerConfig, clip_norm: float | None, root) -> _Recorder:
    recorder = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, gradient_clip_val=clip_norm, callbacks=[recorder],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=root,
    )
    trainer.fit(CLIPModule(model, tokenizer, ClipLoss(), optim), torch.utils.data.DataLoader(batches(), batch_size=None))
    return recorder


def weight_differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference over all weights but the attention-key biases, and over those."""
    worst, worst_key_bias = 0.0, 0.0
    for name, value in ours.items():
        diff = (value - theirs[name]).abs()
        if name.endswith("attn.qkv.bias"):
            query, key, v = diff.chunk(3)
            worst_key_bias = max(worst_key_bias, key.max().item())
            diff = torch.cat([query, v])
        worst = max(worst, diff.max().item())
    return worst, worst_key_bias


def as_clip_pl_state(openclip_state: dict[str, torch.Tensor], like: torch.nn.Module) -> dict[str, torch.Tensor]:
    image = convert_openclip_image_tower(openclip_state, like.image_tower)
    text = convert_openclip_text_tower(openclip_state)
    return {
        **{f"image_tower.{k}": v for k, v in image.items()},
        **{f"text_tower.{k}": v for k, v in text.items()},
        "logit_scale": openclip_state["logit_scale"],
    }


@pytest.fixture(scope="module")
def defaults():
    """The optimizer settings and gradient clipping of the default config, with a short schedule."""
    cfg = compose_train([f"optim.{k}={v}" for k, v in SCHEDULE.items()])
    optim = OptimizerConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
    return optim, cfg.trainer.gradient_clip_val


@pytest.fixture(scope="module")
def clip_pl_run(defaults, tiny_tokenizer, tmp_path_factory):
    optim, clip_norm = defaults
    reference = openclip_model()
    model = clip_pl_model(reference)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = train_clip_pl(model, tiny_tokenizer, optim, clip_norm, tmp_path_factory.mktemp("parity"))
    return model, initial, recorder


def test_clip_pl_trains_step_for_step_like_openclip(defaults, clip_pl_run):
    optim, clip_norm = defaults
    model, initial, recorder = clip_pl_run
    reference = openclip_model()
    # Same weights, so the same embeddings before any step.
    images, tokens = batches()[0]
    with torch.no_grad():
        expected = reference.eval().encode_image(images, normalize=True), reference.encode_text(tokens, normalize=True)
        fresh = clip_pl_model(reference).eval()
        got = fresh.encode_image(images), fresh.encode_text(tokens)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)

    losses, lrs = train_openclip(reference, optim, clip_norm)
    assert recorder.lrs == pytest.approx(lrs, rel=1e-12)
    assert lrs[0] > 0 and lrs[optim.warmup_steps - 1] == pytest.approx(optim.lr)
    assert recorder.losses == pytest.approx(losses, rel=1e-5)
    # The loss moved: the steps did something that had to match.
    assert abs(losses[-1] - losses[0]) > 0.05

    final, ours = as_clip_pl_state(reference.state_dict(), model), model.state_dict()
    assert set(final) == set(ours)
    worst, worst_key_bias = weight_differences(ours, final)
    assert worst < WEIGHT_TOLERANCE and worst_key_bias < KEY_BIAS_TOLERANCE, (worst, worst_key_bias)
    moved = max((ours[k] - initial[k]).abs().max().item() for k in final)
    assert moved > 1e-3, moved


def test_fresh_models_are_initialised_like_openclip():
    # The same distribution for every tensor: equal constants, and standard deviations equal up to
    # sampling error (the relative error of a sample's std is about 1 / sqrt(2 n); allowed: 4 / sqrt(n)).
    reference = openclip_model()
    torch.manual_seed(0)
    model = clip_pl_model(None)
    ours, theirs = model.state_dict(), as_clip_pl_state(reference.state_dict(), model)
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        a, b = value.float().flatten(), theirs[name].float().flatten()
        if a.numel() == 1 or a.std() == 0 or b.std() == 0:
            assert torch.equal(a, b), name
        else:
            assert a.std().item() == pytest.approx(b.std().item(), rel=4 / a.numel() ** 0.5), name
            assert abs(a.mean().item() - b.mean().item()) < 4 * b.std().item() / a.numel() ** 0.5, name


def test_parity_detects_a_difference_in_training(defaults, clip_pl_run):
    # Another gradient clipping on the OpenCLIP side alone: the same comparison must fail by far.
    optim, clip_norm = defaults
    model, _, _ = clip_pl_run
    reference = openclip_model()
    train_openclip(reference, optim, clip_norm=0.05 if clip_norm is None else clip_norm / 20)
    final, ours = as_clip_pl_state(reference.state_dict(), model), model.state_dict()
    assert weight_differences(ours, final)[0] > 100 * WEIGHT_TOLERANCE
