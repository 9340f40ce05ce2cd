"""The training progress bar: Lightning's, with the epoch and its length on a resumed run too."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class ProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that shows ``Epoch N: n/total`` from the first batch of a resumed run.

    Lightning sets the bar's description and total in ``on_train_epoch_start``, which it skips when
    a run resumes in the middle of an epoch
    (github.com/Lightning-AI/pytorch-lightning/issues/20603): the bar then reads ``Training: n/?``.
    Its total is also the steps left to ``max_steps`` while the bar counts the epoch's batches from
    the epoch's start, so a run resumed after batch ``k`` overruns it (tqdm shows ``n/?`` again).
    Both are set here at the first batch of the run, whose index says how many batches came before.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._first_batch = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if self._first_batch and batch_idx > 0 and not bar.disable:
            bar.set_description(f"Epoch {trainer.current_epoch}", refresh=False)
            bar.reset(total=convert_inf(min(trainer.num_training_batches, batch_idx + self.total_train_batches)))
            # From batch_idx on, and tqdm's rate counts only the batches of this run.
            bar.initial = bar.n = batch_idx
            bar.refresh()
        self._first_batch = False
