"""Lightning callbacks for what a researcher watches during pretraining."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class TrainingSpeedMonitor(L.Callback):
    """Logs samples/s (global and per device) and the time each step waited for data.

    Step time runs from one ``on_train_batch_start`` to the next; data wait from the end of
    one batch to the start of the next, which is when the loader is being drained. Both are
    averaged over ``window`` steps so a single slow step does not dominate the curve.

    Args:
        window: Number of steps per average.
    """

    def __init__(self, window: int = 20):
        self.window = window
        self._reset()

    def _reset(self) -> None:
        self._last_start: float | None = None
        self._last_end: float | None = None
        self._steps: list[float] = []
        self._waits: list[float] = []
        self._samples = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._waits.append(now - self._last_end)
        if self._last_start is not None:
            self._steps.append(now - self._last_start)
        self._last_start = now
        self._samples = len(batch[0])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._last_end = time.perf_counter()
        if len(self._steps) >= self.window:
            step = sum(self._steps) / len(self._steps)
            per_device = self._samples / step
            pl_module.log_dict(
                {
                    "train/samples_per_sec": per_device * trainer.world_size,
                    "train/samples_per_sec_per_device": per_device,
                    "train/data_wait_ms": 1000 * sum(self._waits) / max(len(self._waits), 1),
                    "train/data_wait_fraction": sum(self._waits) / sum(self._steps),
                },
                on_step=True,
                on_epoch=False,
            )
            self._steps.clear()
            self._waits.clear()


class SkippedSamplesMonitor(L.Callback):
    """Logs, each epoch, how many broken samples the input pipeline skipped, summed over ranks.

    Reads ``trainer.datamodule.skipped_counts()`` (this rank, all its workers) and sums across
    ranks, so the numbers are the whole job's.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "skipped_counts"):
            return
        counts = datamodule.skipped_counts()
        if not counts:
            return
        names = sorted(counts)
        totals = torch.tensor([float(counts[n]) for n in names], device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        pl_module.log_dict({f"data/skipped_{n}": v for n, v in zip(names, totals)}, rank_zero_only=True)
