"""Losses against plain reference formulas, and exactness across real gloo processes with DDP."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo import gloo_group

from clip_pl.distributed import free_port
from clip_pl.loss import ClipLoss, SigLipLoss
from clip_pl.model import create_model
from clip_pl.training.module import forward_in_micro_batches


def reference_clip_loss(img, txt, scale):
    """CLIP's loss written out row by row: mean of image->text and text->image cross-entropies."""
    n = img.shape[0]
    sims = scale * img @ txt.T
    i2t = sum(-torch.log(torch.exp(sims[i, i]) / torch.exp(sims[i]).sum()) for i in range(n)) / n
    t2i = sum(-torch.log(torch.exp(sims[i, i]) / torch.exp(sims[:, i]).sum()) for i in range(n)) / n
    return (i2t + t2i) / 2


def reference_siglip_loss(img, txt, scale, bias):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * img[i] @ txt[j] + bias)))
    return total / n


def _features(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_clip_loss_matches_reference():
    img, txt = _features()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    assert ClipLoss()(img, txt, scale).item() == pytest.approx(reference_clip_loss(img, txt, scale).item(), rel=1e-10)


def test_siglip_loss_matches_reference():
    img, txt = _features()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    got = SigLipLoss()(img, txt, scale, bias).item()
    assert got == pytest.approx(reference_siglip_loss(img, txt, scale, bias).item(), rel=1e-10)


def test_perfect_alignment_has_low_clip_loss():
    img = torch.eye(4)
    assert ClipLoss()(img, img, torch.tensor(100.0)).item() < 1e-10
    assert ClipLoss()(img, img.roll(1, 0), torch.tensor(100.0)).item() > 50


def test_siglip_requires_bias():
    img, txt = _features()
    with pytest.raises(ValueError, match="init_logit_bias"):
        SigLipLoss()(img, txt, torch.tensor(10.0))


# --- distributed equivalence -------------------------------------------------------------------

GLOBAL_BATCH = 8
LOSSES = {"clip": (ClipLoss, {}), "siglip": (SigLipLoss, {"init_logit_bias": -10.0, "init_logit_scale": math.log(10)})}


def _build(loss_name: str):
    torch.manual_seed(0)
    model = create_model("tiny", image={"image_size": 32}, text={"context_length": 16}, **LOSSES[loss_name][1])
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    tokens = torch.randint(4, 1000, (GLOBAL_BATCH, 16), generator=g)
    tokens[:, 10] = 3
    return model, images, tokens


class _PieceWise(torch.nn.Module):
    """The arrangement under Lightning: DDP wraps a module whose forward encodes in pieces."""

    def __init__(self, model, piece):
        super().__init__()
        self.model, self.piece = model, piece

    def forward(self, images, tokens):
        return forward_in_micro_batches(self.model, images, tokens, self.piece)


def _step(model, loss_name, images, tokens):
    loss = LOSSES[loss_name][0]()(*model(images, tokens))
    loss.backward()
    return loss.detach()


# Each rank's batch whole, and in pieces of one sample recomputed in backward (micro_batch_size=1).
PIECES = (None, 1)


def _rank_main(rank, world_size, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    with gloo_group(rank, world_size, port):
        for loss_name in LOSSES:
            for piece in PIECES:
                model, images, tokens = _build(loss_name)
                ddp = DDP(_PieceWise(model, piece))
                per_rank = GLOBAL_BATCH // world_size
                part = slice(rank * per_rank, (rank + 1) * per_rank)
                loss = _step(ddp, loss_name, images[part], tokens[part])
                dist.all_reduce(loss)
                if rank == 0:
                    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                    out = os.path.join(out_dir, f"{loss_name}-{piece}.pt")
                    torch.save({"loss": loss / world_size, "grads": grads}, out)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_gradients_equal_single_process_global_batch(world_size, tmp_path):
    torch.multiprocessing.spawn(_rank_main, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size)
    for loss_name in LOSSES:
        model, images, tokens = _build(loss_name)
        expected_loss = _step(model, loss_name, images, tokens)
        for piece in PIECES:
            got = torch.load(tmp_path / f"{loss_name}-{piece}.pt")
            assert got["loss"].item() == pytest.approx(expected_loss.item(), abs=1e-5)
            for name, param in model.named_parameters():
                assert param.grad is not None, name
                msg = f"{loss_name}, pieces of {piece}: {name}"
                torch.testing.assert_close(got["grads"][name], param.grad, atol=1e-5, rtol=1e-4, msg=msg)
        # The check must be able to fail: the gradient of the temperature is not negligible.
        assert model.logit_scale.grad.abs().item() > 1e-4
