"""How long training stops to save a checkpoint: written in the training thread or in the background.

A training-sized checkpoint (a named model's weights and AdamW's two moments, as Lightning saves
them) goes through ``clip_pl.model_files.checkpoint.AtomicCheckpointIO`` with ``async_save`` off and on,
alternating. "stop" is the time ``save_checkpoint`` takes, i.e. how long training waits; "on disk"
is the time until the file is complete (``wait`` returns). On a GPU the tensors are on the device,
so the background variant's stop is the copy to host memory.

    python benchmarks/checkpoint_save.py --model vit_b16 --rounds 3
    python benchmarks/checkpoint_save.py --model vit_b16 --device cuda --dir /local/scratch
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from clip_pl.model import create_model
from clip_pl.model_files.checkpoint import AtomicCheckpointIO


def training_checkpoint(model_name: str, device: str) -> dict:
    """The model's state and AdamW's after one step, laid out as in a Lightning checkpoint."""
    model = create_model(model_name).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1}


def time_save(io: AtomicCheckpointIO, checkpoint: dict, path: str) -> tuple[float, float]:
    """Seconds until ``save_checkpoint`` returns, and until the file is complete."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    io.save_checkpoint(checkpoint, path)
    stop = time.perf_counter() - start
    io.wait()
    return stop, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    checkpoint = training_checkpoint(args.model, args.device)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = os.path.join(directory, "last.ckpt")
        variants = {"in the training thread": AtomicCheckpointIO(), "in the background": AtomicCheckpointIO(True)}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                times[name].append(time_save(variants[name], checkpoint, path))
        size = os.path.getsize(path) / 2**30
    print(f"{args.model} checkpoint, {size:.2f} GiB, {args.device}, {args.rounds} rounds (medians; min-max)")
    print(f"{'written':24s} {'training stops s':>22s} {'on disk after s':>22s}")
    for name, pairs in times.items():
        stops, totals = zip(*pairs)
        cells = [f"{statistics.median(v):6.2f} ({min(v):.2f}-{max(v):.2f})" for v in (stops, totals)]
        print(f"{name:24s} {cells[0]:>22s} {cells[1]:>22s}")


if __name__ == "__main__":
    main()
