"""Lightning callbacks and plugins: what a researcher watches, and crash-safe checkpoint files."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning_utilities.core.apply_func import apply_to_collection

from clip_pl.checkpoint import atomic_torch_save
from clip_pl.distributed import DeferredSum
from clip_pl.flops import dense_peak_flops, model_flops_per_sample
from clip_pl.model import CLIPConfig

log = logging.getLogger(__name__)


class TrainingSpeedMonitor(L.Callback):
    """Logs samples/s (global and per device), the time each step waited for data, and MFU.

    Step time runs from one ``on_train_batch_start`` to the next; data wait from the end of one
    batch to the start of the next, when the loader is being drained. Both are averaged over the
    last ``window`` steps so a single slow step does not dominate the curve.

    Model FLOPs utilization: the model's training FLOPs per sample (``clip_pl.flops``, counted once
    at the start) times samples/s per device, logged as ``train/model_tflops_per_device`` and, over
    the device's dense peak, as ``train/mfu``. The peak is ``peak_tflops`` when given, else
    ``clip_pl.flops.dense_peak_flops`` (known GPUs at 16-bit precision); without one there is no
    ``train/mfu``.

    The values go straight to the loggers at the trainer's logging steps (every
    ``log_every_n_steps``), as Python floats. Through ``LightningModule.log`` every step, each float
    would first be copied to the GPU, and that copy waits for the GPU to finish its queued work: a
    synchronization per step that keeps the CPU from preparing the next step while the GPU runs.

    Args:
        window: Number of steps per rolling average.
        peak_tflops: The device's dense peak in TFLOP/s at the training precision, for MFU.
    """

    def __init__(self, window: int = 20, peak_tflops: float | None = None):
        self.window = window
        self.peak_tflops = peak_tflops
        self._reset()

    def _reset(self) -> None:
        self._last_start: float | None = None
        self._last_end: float | None = None
        self._steps: deque[float] = deque(maxlen=self.window)
        self._waits: deque[float] = deque(maxlen=self.window)
        self._flops_per_sample: float | None = None
        self._peak_flops: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        config = getattr(getattr(pl_module, "model", None), "config", None)
        if not (trainer.is_global_zero and trainer.loggers and isinstance(config, CLIPConfig)):
            return
        self._flops_per_sample = model_flops_per_sample(config)
        device = trainer.strategy.root_device
        if self.peak_tflops:
            self._peak_flops = self.peak_tflops * 1e12
        else:
            self._peak_flops = dense_peak_flops(device, str(trainer.precision))
            if self._peak_flops is None and device.type == "cuda":
                log.info(
                    "train/mfu is not logged: the peak of %s at precision %s is not known; set its dense "
                    "peak with speed_monitor.peak_tflops",
                    torch.cuda.get_device_name(device),
                    trainer.precision,
                )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._waits.append(now - self._last_end)
        if self._last_start is not None:
            self._steps.append(now - self._last_start)
        self._last_start = now
        # global_step counts the steps done; Lightning logs after step n where n % log_every_n_steps == 0.
        if not (
            self._steps and self._waits and trainer.loggers and trainer.global_step % trainer.log_every_n_steps == 0
        ):
            return
        per_device = len(batch[0]) * len(self._steps) / sum(self._steps)
        metrics = {
            "train/samples_per_sec": per_device * trainer.world_size,
            "train/samples_per_sec_per_device": per_device,
            "train/data_wait_ms": 1000 * sum(self._waits) / len(self._waits),
            "train/data_wait_fraction": sum(self._waits) / sum(self._steps),
        }
        if self._flops_per_sample:
            flops = self._flops_per_sample * per_device
            metrics["train/model_tflops_per_device"] = flops / 1e12
            if self._peak_flops:
                metrics["train/mfu"] = flops / self._peak_flops
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._last_end = time.perf_counter()


class StopOnSigterm(L.Callback):
    """On SIGTERM, every rank of a multi-process run stops at the same step, and no step waits for it.

    Lightning 2.6 handles SIGTERM in runs of several processes by broadcasting from inside the
    signal handler, and by broadcasting rank 0's flag before every batch and reading it with
    ``.item()``: a wait for the device in every step of every such run (Lightning issue #21487).
    When one rank alone is signalled, the handler's broadcast and the loop's pair up wrongly and
    training hangs (reproduced with two gloo processes; ``benchmarks/RESULTS.md``, B).

    For the training of a multi-process run this replaces both: the handler only sets a flag (and,
    as Lightning's does, passes the signal on to the processes Lightning launched), and before
    every batch the ranks' flags are summed with a :class:`~clip_pl.distributed.DeferredSum`
    whose previous sum is read; when it is positive, every rank raises Lightning's
    ``SIGTERMException`` at that same batch, the second after the signal. A single process keeps
    Lightning's handling, which involves no collective. Nothing is saved (``RequeueOnSignal``
    saves on SLURM's earlier warning signal).
    """

    def __init__(self) -> None:
        self._loop: Any = None  # the patched loop while training runs
        self._trainer: L.Trainer | None = None
        self._pid = -1
        self._signalled = False
        self._flags = DeferredSum()
        self._previous_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        # Lightning runs its per-batch SIGTERM broadcast only with several processes.
        if trainer.world_size < 2 or not hasattr(loop, "_broadcast_sigterm_tensor"):
            return
        self._trainer, self._pid, self._signalled, self._flags = trainer, os.getpid(), False, DeferredSum()
        self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
        self._loop = loop
        loop._broadcast_sigterm_tensor = self._check

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process ends it
        launcher = self._trainer.strategy.launcher
        if not self._signalled and launcher is not None:
            launcher.kill(signum)
        self._signalled = True

    def _check(self) -> None:
        if self._flags.read():
            raise SIGTERMException()
        self._flags.start(int(self._signalled), self._trainer.strategy.root_device)

    def _undo(self) -> None:
        if self._loop is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            del self._loop._broadcast_sigterm_tensor
            self._loop = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._undo()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._undo()


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
        # Every rank logs its own counts; Lightning sums them across ranks.
        totals = {f"data/skipped_{n}": float(counts[n]) for n in sorted(counts)}
        pl_module.log_dict(totals, sync_dist=True, reduce_fx="sum")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO writing local files with ``atomic_torch_save``, optionally in the background.

    Lightning's own writer goes through a temporary file in ``$TMPDIR``; when that is another
    filesystem (node-local scratch) the final move is a copy, and a kill mid-copy leaves a
    truncated ``last.ckpt``. Remote URLs (``s3://`` ...) keep Lightning's behaviour.

    With ``async_save``, training waits only while the checkpoint's tensors are copied to host
    memory, a snapshot of that step; a thread then writes it. For ViT-B/16's 1.67 GiB checkpoint
    on the CPU machine training stopped 0.14 s instead of 2.2 s (``benchmarks/checkpoint_save.py``,
    ``benchmarks/RESULTS.md``, B). The host buffers stay allocated between saves (the checkpoint's
    size, pinned when the tensors are on a GPU). One write is in flight at a time: the next save,
    a load, a removal, ``wait`` and the end of training (``teardown``) wait for it and raise its
    error, if it had one. Lightning's ``AsyncCheckpointIO`` would keep its snapshot on the GPU.

    Args:
        async_save: Write in a background thread.
    """

    def __init__(self, async_save: bool = False) -> None:
        super().__init__()
        self.async_save = async_save
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._buffers: list[torch.Tensor] = []

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the trainer into the processes it starts; a thread pool cannot go along.
        return {**self.__dict__, "_executor": None, "_pending": None, "_buffers": []}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.wait()
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if not self.async_save:
            return atomic_torch_save(checkpoint, path)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._executor.submit(atomic_torch_save, self._snapshot(checkpoint), path)

    def _snapshot(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint with its tensors copied to host memory, into the last save's buffers.

        Every save has the same tensors, so the buffers are allocated (pinned, for copies from the
        GPU) once; fresh memory for each save would cost its page faults again.
        """
        old, new = iter(self._buffers), []

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            buffer = next(old, None)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            new.append(buffer.copy_(tensor.detach(), non_blocking=True))
            return buffer

        snapshot = apply_to_collection(checkpoint, torch.Tensor, copy)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the copies from the GPU are done before the thread reads them
        self._buffers = new
        return snapshot

    def wait(self) -> None:
        """Returns when the checkpoint being written, if any, is on disk; raises the write's error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        self.wait()
