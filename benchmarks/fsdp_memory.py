"""Per-rank memory and step time, DDP against FSDP2, on CPU gloo processes.

Each rank builds the same model, wraps it with DDP or shards it with ``clip_pl.training.fsdp.shard_model``,
and trains a few steps of the exact contrastive loss on random batches with AdamW. Reported per
rank: the bytes of weights, gradients and optimizer state it holds (the part FSDP divides by the
number of ranks), its peak resident memory (which also holds activations, buffers, the Python
process and, at start, the whole model, built on every rank before it is sharded), and the median
step time.

    python benchmarks/fsdp_memory.py --model vit_b32 --ranks 2 4 --batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from clip_pl.distributed import free_port
from clip_pl.loss import ClipLoss
from clip_pl.model import create_model
from clip_pl.training.fsdp import held_bytes


def _rank(rank: int, world_size: int, port: int, args: argparse.Namespace, strategy: str, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10))
    torch.manual_seed(0)
    model = create_model(args.model)
    if strategy == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from clip_pl.training.fsdp import shard_model

        wrapped = shard_model(model, init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size, context = model.config.image.image_size, model.config.text.context_length
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(args.steps + 1):  # the first step allocates the optimizer state: not timed
        images = torch.randn(args.batch, 3, size, size, generator=g)
        tokens = torch.randint(3, model.config.text.vocab_size, (args.batch, context), generator=g)
        tokens[:, -1] = model.config.text.eos_id
        dist.barrier()
        start = time.perf_counter()
        ClipLoss()(*wrapped(images, tokens)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between steps of a run
        dist.barrier()
        times.append(time.perf_counter() - start)
    result = torch.tensor([held_bytes(model, optimizer), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"held_bytes": int(result[0]), "peak_rss_bytes": int(result[1]),
                       "step_s": statistics.median(times[1:])}, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b32", help="a clip_pl preset (clip_pl.model.list_models())")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=2, help="samples per rank and step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--output", help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    params = sum(p.numel() for p in create_model(args.model).parameters())
    print(f"{args.model}: {params / 1e6:.1f} M parameters, {16 * params / 2**30:.2f} GiB of weights, gradients and "
          f"AdamW state in float32; batch {args.batch} per rank, median of {args.steps} steps", file=sys.stderr)
    rows = []
    print("| ranks | strategy | weights + grads + AdamW per rank (GiB) | peak RSS per rank (GiB) | step (s) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for world_size in args.ranks:
        for strategy in ("ddp", "fsdp"):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "result.json")
                torch.multiprocessing.spawn(
                    _rank, args=(world_size, free_port(), args, strategy, out), nprocs=world_size
                )
                with open(out) as f:
                    row = {"ranks": world_size, "strategy": strategy, **json.load(f)}
            rows.append(row)
            held, rss = row["held_bytes"] / 2**30, row["peak_rss_bytes"] / 2**30
            print(f"| {world_size} | {strategy} | {held:.2f} | {rss:.2f} | {row['step_s']:.2f} |", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "parameters": params, "batch": args.batch, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
