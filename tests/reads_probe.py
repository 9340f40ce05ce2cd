"""Counts tensor values read into Python per training step: on a GPU each such read waits for the
device to finish everything queued before it, so the host cannot prepare the next step meanwhile.

Reads that ``clip_pl.distributed.DeferredSum.read`` makes are not counted: they read pinned host
memory after an event the device has already passed.
"""

from __future__ import annotations

import sys

import lightning as L
from torch.overrides import TorchFunctionMode

READS = frozenset(
    ["item", "tolist", "numpy", "cpu", "nonzero", "equal", "allclose"]
    + ["__bool__", "__float__", "__int__", "__index__", "__format__"]
)


def _from_deferred_sum() -> bool:
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_name == "read" and frame.f_code.co_filename.endswith("clip_pl/distributed.py"):
            return True
        frame = frame.f_back
    return False


class TensorReads(TorchFunctionMode):
    """Counts the tensor reads into Python made while it is entered."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS and not _from_deferred_sum():
            self.count += 1
        return func(*args, **(kwargs or {}))


class ReadsPerStep(L.Callback):
    """Tensor reads from one ``on_train_batch_start`` to the next (all of Lightning's loop for a
    step), in ``reads`` keyed by the global step at the window's end."""

    def __init__(self):
        self.reads: dict[int, int] = {}
        self._mode: TensorReads | None = None

    def _close(self, step: int | None) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            if step is not None:
                self.reads[step] = self._mode.count
            self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close(trainer.global_step)
        self._mode = TensorReads()
        self._mode.__enter__()

    def on_train_end(self, trainer, pl_module):
        self._close(None)

    def on_exception(self, trainer, pl_module, exception):
        self._close(None)
