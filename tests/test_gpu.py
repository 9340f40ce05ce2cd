"""CUDA-only paths: bf16 training and the NCCL backward of the feature gather. Skipped without GPUs."""

import os

import pytest
import torch

from clip_pl.distributed import free_port
from clip_pl.loss import ClipLoss
from clip_pl.model import create_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_bf16_autocast_step_matches_fp32_loss():
    torch.manual_seed(0)
    model = create_model("tiny").cuda()
    images = torch.randn(32, 3, 64, 64, device="cuda")
    tokens = torch.randint(4, 1000, (32, 32), device="cuda")
    tokens[:, 20] = 3
    fp32 = ClipLoss()(*model(images, tokens))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = ClipLoss()(*model(images, tokens))
    bf16.backward()
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _nccl_rank(rank, world_size, port, out):
    import torch.distributed as dist

    from clip_pl.distributed import all_gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.cuda.set_device(rank)
    x = torch.full((2, 3), float(rank + 1), device="cuda", requires_grad=True)
    gathered = all_gather_with_grad(x)
    # d/dx of sum_r (rank_weight_r * sum(gathered)) is the sum of all ranks' weights for every element.
    (gathered.sum() * (rank + 1)).backward()
    if rank == 0:
        torch.save({"gathered": gathered.detach().cpu(), "grad": x.grad.cpu()}, out)
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_gather_backward_sums_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_nccl_rank, args=(2, free_port(), str(tmp_path / "r.pt")), nprocs=2)
    result = torch.load(tmp_path / "r.pt")
    assert result["gathered"][:2].eq(1).all() and result["gathered"][2:].eq(2).all()
    assert result["grad"].eq(1 + 2).all()
