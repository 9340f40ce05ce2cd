"""Lightning callbacks: what a researcher watches, when the run checkpoints, and how it stops when signalled."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clip_pl.distributed import DeferredSum
from clip_pl.flops import dense_peak_flops, model_flops_per_sample
from clip_pl.model import CLIPConfig
from clip_pl.model_files.checkpoint import wait_for_write
from clip_pl.training.run_dir import last_checkpoint_path

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
                    "peak with callbacks.speed_monitor.peak_tflops",
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
    ``.item()``: a wait for the device in every step of every such run
    (github.com/Lightning-AI/pytorch-lightning/issues/21487). When one rank alone is signalled, the handler's broadcast and the loop's pair up wrongly and
    training hangs (reproduced with two gloo processes; ``benchmarks/RESULTS.md``, B).

    For the training of a multi-process run this replaces both: the handler only sets a flag (and,
    as Lightning's does, passes the signal on to the processes Lightning launched), and before
    every batch the ranks' flags are summed with a :class:`~clip_pl.distributed.DeferredSum`
    whose previous sum is read; when it is positive, every rank raises Lightning's
    ``SIGTERMException`` at that same batch, the second after the signal. A single process keeps
    Lightning's handling, which involves no collective. Nothing is saved (``RequeueOnSignal``
    saves on SLURM's earlier warning signal); outside SLURM, :class:`SaveOnInterrupt` replaces this.
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


# A rank's vote in SaveOnInterrupt: SIGTERMs count in the high 32 bits, Ctrl-Cs in the low ones, so
# the sum over ranks says which signals arrived.
_VOTES = {signal.SIGTERM: 1 << 32, signal.SIGINT: 1}


class SaveOnInterrupt(L.Callback):
    """On SIGTERM or a first Ctrl-C (SIGINT), every rank stops at the same step, after saving ``checkpoint_path``.

    For runs outside SLURM, where nothing warns before a preemption: SIGTERM (``kill``, ``docker
    stop``, Kubernetes, a spot instance's reclaim, torchrun passing one on) or Ctrl-C would
    otherwise lose everything since the last checkpoint. Under SLURM,
    :class:`~clip_pl.training.slurm.RequeueOnSignal` saves on SLURM's earlier warning signal instead.

    The handlers only set a flag (a handler that saves or talks to other ranks deadlocks when it
    interrupts a collective); the first Ctrl-C also gives SIGINT back its default action, so a
    second one ends the process at once, even inside a collective or a checkpoint write (the
    previous ``last.ckpt`` stays). At the end of every optimizer step the ranks sum their flags
    with a :class:`~clip_pl.distributed.DeferredSum`, read one step later, as ``RequeueOnSignal``
    does. When any rank was signalled, every rank at that same step calls
    ``trainer.save_checkpoint`` (and waits until the checkpoint is on disk: ``wait_for_write``), then
    raises Lightning's ``SIGTERMException``: Lightning ends the fit as after its own SIGTERM
    handling (``on_exception``, teardown, loggers finalized), without the validation run that
    stopping with ``trainer.should_stop`` would start. A signal during the last two steps lets the
    run finish. Signals the process ignored when the fit started stay ignored (a script's
    background job ignores SIGINT).

    DataLoader workers, forked during the fit, inherit handlers that do nothing, so a Ctrl-C, which
    reaches the whole process group, leaves them running. A SIGTERM to the group (torchrun,
    systemd, ``kill -- -PGID``) would not: PyTorch's handler in a worker exits on a SIGTERM that
    its parent did not send, and the run would fail before it could save. Workers inherit the
    signal mask of the thread that forks them, so the main thread blocks SIGTERM wherever
    Lightning may fork them: until training starts, and from the end of each batch until training
    or validation goes on. This process receives the signal all the same, in another thread or
    once the main thread unblocks it.

    Lightning's own SIGTERM handling is off during the fit: its handler broadcasts from inside the
    signal handler (a hang when one rank alone is signalled, see :class:`StopOnSigterm`; a
    collective from a forked DataLoader worker), and in runs of several processes its loop
    broadcasts a flag and reads it before every batch. Not for ``ddp_spawn``/``ddp_fork``: their
    parent waits for a result that a rank stopped by an exception never sends.

    Args:
        checkpoint_path: Where to save; the path a rerun resumes from.

    Attributes:
        interrupted_by: The signal that stopped training, the same on every rank (SIGTERM when any
            rank received one, else SIGINT), once the checkpoint is saved; None otherwise.
    """

    def __init__(self, checkpoint_path: str) -> None:
        self.checkpoint_path = checkpoint_path
        self.interrupted_by: signal.Signals | None = None
        self._flags = 0
        self._pid: int | None = None
        self._trainer: L.Trainer | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._last_step = -1
        self._vote = DeferredSum()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two Python bytecodes of whatever this process was doing: set the flag, nothing else.
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: its main process decides
        self._flags |= _VOTES[signum]
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._pid, self._flags, self.interrupted_by, self._vote = os.getpid(), 0, None, DeferredSum()
        self._trainer = trainer
        # Lightning's handling off (see above). This hook runs before the fit registers Lightning's
        # handlers and forks the DataLoader workers, which inherit the handlers and mask present then.
        trainer._signal_connector.register_signal_handlers = lambda: None
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
        for signum in _VOTES:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous_handlers[signum] = signal.signal(signum, self._handle)
        self._block_sigterm(True)

    def _block_sigterm(self, block: bool) -> None:
        if self._trainer is not None and signal.SIGTERM in self._previous_handlers:
            signal.pthread_sigmask(signal.SIG_BLOCK if block else signal.SIG_UNBLOCK, [signal.SIGTERM])

    def _undo(self) -> None:
        if self._trainer is None:
            return
        self._block_sigterm(False)
        del self._trainer._signal_connector.register_signal_handlers
        del self._trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._trainer, self._pid, self._previous_handlers = None, None, {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._undo()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._undo()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            log.info("training from step %d; SIGTERM or Ctrl-C saves %s and stops", trainer.global_step,
                     self.checkpoint_path)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._block_sigterm(False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # the train loader's workers are forked after the sanity check
            self._block_sigterm(False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._block_sigterm(True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._block_sigterm(True)  # the next epoch's or validation's workers may be forked before the next batch
        # Every rank takes the same branches here, so the collectives below are entered by all or none.
        if trainer.global_step == self._last_step:
            return  # inside a gradient accumulation: a checkpoint must fall on an optimizer step
        self._last_step = trainer.global_step
        if 0 <= trainer.max_steps <= trainer.global_step:
            return  # the last step: the run ends now and saves its end
        votes = self._vote.read()
        if not votes:
            self._vote.start(self._flags, trainer.strategy.root_device)
            return
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
        wait_for_write(trainer.strategy.checkpoint_io)
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher):
            # Lightning's watchdog thread, which watches this list, SIGKILLs this process (the one that
            # started the other local ranks) when one of them exits with a nonzero status, as they
            # may now, having been interrupted.
            launcher.procs.clear()
        # No rank exits before the checkpoint is on disk and the watchdog is off.
        trainer.strategy.barrier("SaveOnInterrupt")
        self.interrupted_by = signal.SIGTERM if votes >> 32 else signal.SIGINT
        raise SIGTERMException()


def interrupted_by(trainer: L.Trainer) -> signal.Signals | None:
    """The signal that made a :class:`SaveOnInterrupt` of ``trainer`` save and stop training, or None."""
    return next((c.interrupted_by for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` keeping one file, the run's ``last.ckpt``, rewritten every ``every_n_train_steps``.

    The folder is the run directory's ``checkpoints/`` (Lightning's default would be the first
    logger's version folder). No version counter: ``last.ckpt`` is always the newest, also when
    another writer (``LastCheckpointSchedule``, ``RequeueOnSignal``) saved it last; with the counter, a
    resumed run would write ``last-v1.ckpt`` and resume stale.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        super().__init__(
            save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps, enable_version_counter=False
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # train.py makes the run directory the trainer's root.
        self.dirpath = os.path.dirname(last_checkpoint_path(trainer.default_root_dir))
        super().setup(trainer, pl_module, stage)


class LastCheckpointSchedule(Checkpoint):
    """Saves ``checkpoint_path`` every ``every_n_minutes`` and at the end of training, besides ModelCheckpoint.

    ``ModelCheckpoint`` saves either every n steps or every n minutes (``train_time_interval``),
    not both, and its time check broadcasts a Python object from rank 0 after every step, which
    waits for the device in every step of a multi-GPU run. Here, after every optimizer step, rank 0
    compares the time since the last save (by any writer: ``on_save_checkpoint`` sees them all)
    with ``every_n_minutes``, and every rank learns its decision one step later through a
    :class:`~clip_pl.distributed.DeferredSum`; all then save at that step.

    ``ModelCheckpoint(save_last=True)`` saves the end of training only when it has never saved
    before: with a step interval that does not divide ``max_steps``, ``last.ckpt`` would miss the
    final steps. This saves the end when no save caught the final step.

    It is a ``Checkpoint``, which Lightning runs after the other callbacks, in list order: listed
    after the ``ModelCheckpoint`` that writes the same file, it does not save a step twice.

    Args:
        checkpoint_path: The file to write: ModelCheckpoint's ``last.ckpt``, so that it stays the
            single newest checkpoint; None: the run's (``last_checkpoint_path`` of the trainer's root).
        every_n_minutes: Minutes of training between saves; None: no saves by time.

    Raises:
        ValueError: ``every_n_minutes`` is negative.
    """

    def __init__(self, checkpoint_path: str | None = None, every_n_minutes: float | None = None) -> None:
        if every_n_minutes is not None and every_n_minutes < 0:
            raise ValueError(
                f"checkpoint.every_n_minutes={every_n_minutes}: give a number of minutes >= 0, or null to save by "
                "steps only"
            )
        self.checkpoint_path = checkpoint_path
        self.every_n_minutes = every_n_minutes
        self._last_save = 0.0
        self._saved_step = -1
        self._last_step = -1
        self._vote = DeferredSum()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.checkpoint_path = self.checkpoint_path or last_checkpoint_path(trainer.default_root_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run starts from a checkpoint of this step; a new one has nothing to save yet.
        self._last_save, self._saved_step, self._last_step = time.monotonic(), trainer.global_step, trainer.global_step
        self._vote = DeferredSum()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._last_save, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_minutes is None or trainer.global_step == self._last_step:
            return  # no saves by time, or inside a gradient accumulation
        self._last_step = trainer.global_step
        if self._vote.read() and self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
            return
        due = trainer.is_global_zero and time.monotonic() - self._last_save >= 60 * self.every_n_minutes
        self._vote.start(int(due), trainer.strategy.root_device)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)


class SkippedSamplesMonitor(L.Callback):
    """Logs, each epoch, how many broken samples the input pipeline skipped in it, summed over ranks.

    ``trainer.datamodule.skipped_counts()`` counts this rank's skips (all its workers) since the
    process started; the difference from the previous epoch's end is this epoch's (for an epoch
    resumed mid-way, the part trained in this process).
    """

    def __init__(self) -> None:
        self._previous: dict[str, int] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "skipped_counts"):
            return
        counts = datamodule.skipped_counts()
        epoch = {n: counts[n] - self._previous.get(n, 0) for n in sorted(counts)}
        self._previous = dict(counts)
        # Every rank logs its own counts; Lightning sums them across ranks.
        pl_module.log_dict({f"data/skipped_{n}": float(c) for n, c in epoch.items()}, sync_dist=True, reduce_fx="sum")
