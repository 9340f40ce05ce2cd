"""A real (tiny) Lightning fit with ``RequeueOnSignal`` and ``StopOnSigterm`` that signals itself,
for tests/test_slurm_requeue.py.

Run in a subprocess so that a deadlock becomes a timeout instead of a hung test session::

    python tests/slurm/tiny_fit.py OUT --devices 2 --signal-rank 1 --signal-batch 5

Rank ``--signal-rank`` sends ``--signal`` (SIGUSR1 by default) to itself inside ``training_step`` of
batch ``--signal-batch`` (the other ranks are not signalled); with ``--worker-signal-index I`` the
DataLoader worker that loads sample I sends SIGUSR1 to itself; with ``--async-save-delay S`` checkpoints
are written in the background, each S seconds late. Each rank writes ``OUT/rank<r>.json``
with the global steps its ``training_step`` saw, its final global step, whether it stopped for a
requeue, the exception that ended it if any, the SIGUSR1 disposition after fit and the tensor reads
of each step (``tests/reads_probe.py``); a single-process run then signals itself once more and, if
it survives, writes ``OUT/exited_normally``. ``scontrol`` is whatever is first on PATH (the test puts a
recording fake there) and ``SLURM_JOB_ID`` comes from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "..")]
from reads_probe import ReadsPerStep  # noqa: E402

import clip_pl.model_files.checkpoint  # noqa: E402
from clip_pl.model_files.checkpoint import AtomicCheckpointIO  # noqa: E402
from clip_pl.training.callbacks import StopOnSigterm  # noqa: E402
from clip_pl.training.slurm import RequeueOnSignal  # noqa: E402


class Samples(Dataset):
    """Random regression samples; the worker loading ``signal_index`` signals itself."""

    def __init__(self, n: int, signal_index: int):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
        self.signal_index = signal_index

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.signal_index and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.x[i]


class Tiny(L.LightningModule):
    def __init__(self, signum: int, signal_rank: int, signal_batch: int):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.signum = signum
        self.signal_rank = signal_rank
        self.signal_batch = signal_batch
        self.steps: list[int] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.steps.append(self.global_step)
        if self.global_rank == self.signal_rank and batch_idx == self.signal_batch:
            os.kill(os.getpid(), self.signum)
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Report(L.Callback):
    """Writes this rank's results after ``RequeueOnSignal`` (earlier in the list) has torn down, or
    when an exception ends the fit."""

    def __init__(self, out: str, requeue: RequeueOnSignal, reads: ReadsPerStep):
        self.out = out
        self.requeue = requeue
        self.reads = reads

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: str | None) -> None:
        result = {
            "steps": pl_module.steps,
            "global_step": trainer.global_step,
            "stopped_for_requeue": self.requeue.stopped_for_requeue,
            "exception": exception,
            "handler_after_fit": getattr(signal.getsignal(signal.SIGUSR1), "name", "a Python function"),
            "reads": self.reads.reads,
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(result, f)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._write(trainer, pl_module, None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._write(trainer, pl_module, type(exception).__name__)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--strategy", default="ddp_fork", help="with --devices 2 or more")
    parser.add_argument("--signal", default="SIGUSR1", choices=["SIGUSR1", "SIGTERM"])
    parser.add_argument("--signal-rank", type=int, default=0)
    parser.add_argument("--signal-batch", type=int, default=-1)
    parser.add_argument("--worker-signal-index", type=int, default=-1)
    parser.add_argument("--async-save-delay", type=float, help="save in the background, each write this much slower")
    args = parser.parse_args()
    if args.async_save_delay is not None:
        write = clip_pl.model_files.checkpoint.atomic_torch_save

        def slow_write(obj, path):
            time.sleep(args.async_save_delay)
            write(obj, path)

        clip_pl.model_files.checkpoint.atomic_torch_save = slow_write
    torch.set_num_threads(1)
    requeue, reads = RequeueOnSignal(os.path.join(args.out, "last.ckpt")), ReadsPerStep()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        callbacks=[requeue, StopOnSigterm(), reads, Report(args.out, requeue, reads)],
        plugins=[AtomicCheckpointIO(async_save=args.async_save_delay is not None)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Tiny(getattr(signal, args.signal), args.signal_rank, args.signal_batch)
    data = DataLoader(Samples(64 * args.devices, args.worker_signal_index), batch_size=2, num_workers=args.num_workers)
    trainer.fit(module, data)
    if args.devices == 1:  # with ddp_fork this is the parent, which never trained
        # A signal after training (SLURM's comes at a fixed time before the limit) must not kill the process.
        os.kill(os.getpid(), signal.SIGUSR1)
        with open(os.path.join(args.out, "exited_normally"), "w"):
            pass


if __name__ == "__main__":
    main()
