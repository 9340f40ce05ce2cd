"""Memory and time of the contrastive losses against world size, with real gloo processes.

Memory is what the loss keeps for backward (autograd's saved tensors, counted exactly through
``torch.autograd.graph.saved_tensors_hooks``): the part that grows with the global batch. For each
world size W, every rank holds B features; ours scores B rows against N = W * B columns, so it
should keep O(B * N) bytes per rank. The "full" reference is what a loss that materialises the whole
N x N matrix on every rank keeps (OpenCLIP without --local-loss).

    python benchmarks/loss_scaling.py --world-sizes 1 2 4 --batch 256 --dim 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clip_pl.distributed import free_port
from clip_pl.loss import ClipLoss, SigLipLoss


def saved_bytes_and_time(loss_fn, batch: int, dim: int, repeats: int) -> tuple[int, float]:
    """Bytes saved for backward by one forward of ``loss_fn`` and the median fwd+bwd seconds."""
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # The inputs themselves are the caller's memory, not the loss's.
        if t.data_ptr() not in (image.data_ptr(), text.data_ptr()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(image, text, scale, bias).backward()
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        loss_fn(image, text, scale, bias).backward()
        times.append(time.perf_counter() - start)
    return sum(seen.values()), statistics.median(times)


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for name, loss in (("clip", ClipLoss()), ("siglip", SigLipLoss())):
            saved, seconds = saved_bytes_and_time(loss, args.batch, args.dim, args.repeats)
            if rank == 0:
                queue.put((name, world_size, saved, seconds))
    finally:
        dist.destroy_process_group()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=256, help="features per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    ctx = torch.multiprocessing.get_context("spawn")
    rows = []
    for world_size in args.world_sizes:
        queue = ctx.Queue()
        torch.multiprocessing.spawn(_rank_main, args=(world_size, free_port(), args, queue), nprocs=world_size)
        rows += [queue.get() for _ in range(2)]

    print(f"per-rank batch B={args.batch}, dim={args.dim}, CPU gloo, {os.cpu_count()} cores")
    print(f"{'loss':7s} {'W':>3s} {'N':>6s} {'saved MiB':>10s} {'/ (B*N*4 bytes)':>16s} {'full NxN MiB':>13s} {'fwd+bwd ms':>11s}")
    per_pair = {}
    for name, world_size, saved, seconds in sorted(rows):
        n = world_size * args.batch
        ratio = saved / (args.batch * n * 4)
        per_pair[name] = ratio
        full = ratio * n * n * 4 / 2**20
        print(f"{name:7s} {world_size:3d} {n:6d} {saved / 2**20:10.2f} {ratio:16.2f} {full:13.1f} {1000 * seconds:11.1f}")

    print("\nArithmetic at 256 per GPU (bytes = measured ratio x B x N x 4; full = ratio x N x N x 4):")
    print(f"{'GPUs':>5s} {'N':>7s} " + " ".join(f"{n + ' GiB':>12s} {n + ' full GiB':>14s}" for n in sorted(per_pair)))
    for gpus in (64, 128, 256, 512, 1024):
        n = 256 * gpus
        cells = [f"{per_pair[k] * 256 * n * 4 / 2**30:12.3f} {per_pair[k] * n * n * 4 / 2**30:14.1f}" for k in sorted(per_pair)]
        print(f"{gpus:5d} {n:7d} " + " ".join(cells))


if __name__ == "__main__":
    main()
