"""A speed monitor that also sends a signal at given steps: a preemption or a Ctrl-C at a known step.

It takes the speed monitor's place in ``python train.py`` (tests/ on ``PYTHONPATH``)::

    callbacks.speed_monitor._target_=signal_probe.SignalAtSteps +callbacks.speed_monitor.signal_name=SIGTERM "+callbacks.speed_monitor.at_steps=[3]"

sends SIGTERM to rank 0's process when it starts the batch after step 3 (the 4th optimizer step);
``+callbacks.speed_monitor.rank=1`` signals rank 1's process instead, ``+callbacks.speed_monitor.group=true`` the whole
process group, DataLoader workers included, as a terminal's Ctrl-C or ``kill -- -PGID`` does.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L

from clip_pl.training.callbacks import TrainingSpeedMonitor


class SignalAtSteps(TrainingSpeedMonitor):
    """Sends ``signal_name`` to its process (or group) on ``rank`` when a batch starts at a step of ``at_steps``."""

    def __init__(self, signal_name: str, at_steps: list[int], rank: int = 0, group: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.signum = signal.Signals[signal_name]
        self.at_steps = set(at_steps)
        self.rank = rank
        self.group = group

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.global_rank == self.rank and trainer.global_step in self.at_steps:
            if self.group:
                os.killpg(os.getpgrp(), self.signum)
            else:
                os.kill(os.getpid(), self.signum)

