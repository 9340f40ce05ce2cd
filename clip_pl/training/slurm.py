"""Training under SLURM: the task layout check, and checkpoint-and-requeue before the time limit.

``sbatch --signal=USR1@<seconds>`` makes SLURM send SIGUSR1 to every process of the job step,
DataLoader workers included, that many seconds before the time limit. Exactly one component reacts
to it: :class:`RequeueOnSignal`. Lightning's own reaction (``SLURMEnvironment(auto_requeue=True)``)
must stay off: it saves and synchronises ranks inside the signal handler, which deadlocked when
another rank was blocked in a collective, and ran in forked DataLoader workers too.

Ranks, world size and the main address come from Lightning's ``SLURMEnvironment`` (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NTASKS``; ``MASTER_ADDR`` or the first node of
``SLURM_NODELIST``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Any, Sequence

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from clip_pl.distributed import DeferredSum
from clip_pl.model_files.checkpoint import wait_for_write

log = logging.getLogger(__name__)


def is_slurm_task() -> bool:
    """Whether this process is a task that ``srun`` started for training.

    Lightning's own rule, so that both agree: ``SLURM_NTASKS`` is set and the job is not an
    interactive shell (job name ``bash`` or ``interactive``), in which the user starts processes
    some other way (e.g. ``torchrun``).
    """
    return SLURMEnvironment.detect()


def check_task_layout(devices: int | str | Sequence[int], num_nodes: int) -> None:
    """Checks that SLURM starts one task per device on each of ``num_nodes`` nodes.

    Lightning runs one process per device and takes the processes from SLURM, so
    ``--ntasks-per-node`` must equal the trainer's devices and ``--nodes`` its ``num_nodes``.
    ``devices="auto"`` (or -1) is resolved by Lightning later, which then makes the same check.

    Args:
        devices: The trainer's ``devices``: a count, a list of device indices, or ``"auto"``.
        num_nodes: The trainer's ``num_nodes``.

    Raises:
        ValueError: The job's layout and the trainer's disagree; the message says what to set.
    """
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    if per_node is None:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise ValueError(
                f"the SLURM job has {os.environ['SLURM_NTASKS']} tasks but no --ntasks-per-node; "
                "submit with --nodes=N --ntasks-per-node=<devices per node> instead of --ntasks"
            )
        per_node = "1"
    tasks = int(per_node)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    count = len(devices) if isinstance(devices, Sequence) and not isinstance(devices, str) else devices
    if isinstance(count, int) and count > 0 and count != tasks:
        raise ValueError(
            f"SLURM starts {tasks} task(s) per node but trainer.devices={count}; Lightning needs one task per "
            f"device: set trainer.devices={tasks}, or submit with --ntasks-per-node={count} (one per GPU)"
        )
    if int(num_nodes) != nodes:
        raise ValueError(
            f"the SLURM job has {nodes} node(s) but trainer.num_nodes={num_nodes}; set trainer.num_nodes={nodes}, "
            f"or submit with --nodes={num_nodes}"
        )


class RequeueOnSignal(L.Callback):
    """Saves ``checkpoint_path`` and requeues the SLURM job when SLURM sends ``signum``.

    The signal handler only sets a flag: a handler that saves or talks to other ranks runs at an
    arbitrary point, possibly while this rank waits inside a collective whose peers are in the
    handler, and that deadlocks. Handlers inherited by forked DataLoader workers do nothing (they
    compare the process id), so a worker that receives the signal neither dies nor acts.

    At the end of every optimizer step all ranks combine their flags with one all-reduce of a
    single number, and read the result one step later: the count is copied back to the host behind
    the all-reduce without waiting, so the vote makes no step wait for the GPU to drain (reading it
    at once would, in every SLURM run of several GPUs; Lightning 2.6's own per-step SIGTERM
    broadcast still does, see ``benchmarks/RESULTS.md``, B). When any rank was signalled, every rank, at the same
    step, calls ``trainer.save_checkpoint``
    (through the trainer's checkpoint IO, atomically: a file by rank 0, or every rank's shards),
    rank 0 runs ``scontrol requeue`` for this job (for this task, in a job array), and the trainer
    stops. SLURM then terminates this run (SIGTERM, SIGKILL after ``KillWait``), usually before
    ``fit`` returns, and starts the same job again later; the same command finds
    ``checkpoint_path`` and resumes. The flags are only read between training steps, so the signal
    must come early enough for two steps, a validation run and the checkpoint write. After ``fit``
    the signal is ignored (unless a handler was set before): arriving while the process finishes
    up, it would otherwise kill it.

    Args:
        checkpoint_path: Where to save; the path the restarted job resumes from.
        signum: The signal given to ``sbatch --signal``.

    Attributes:
        stopped_for_requeue: True (on every rank) once the checkpoint is saved and training
            stops for the requeue: this run is unfinished and the restarted job continues it. A
            failed ``scontrol requeue`` is logged as an error; the run stops all the same.
    """

    def __init__(self, checkpoint_path: str, signum: int = signal.SIGUSR1):
        self.checkpoint_path = checkpoint_path
        self.signum = signum
        self.stopped_for_requeue = False
        self._signalled = False
        self._pid: int | None = None
        self._previous_handler: Any = None
        self._last_step = -1
        self._vote = DeferredSum()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two Python bytecodes of whatever this process was doing: set the flag, nothing else.
        if os.getpid() == self._pid:
            self._signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._pid = os.getpid()
        self._signalled = False
        self._vote = DeferredSum()
        self._previous_handler = signal.signal(self.signum, self._handle)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._pid == os.getpid():
            # After training there is nothing left to save: a signal arriving while the process
            # finishes up must not kill it (the default action), which would mark the job FAILED.
            default = self._previous_handler in (signal.SIG_DFL, None)
            signal.signal(self.signum, signal.SIG_IGN if default else self._previous_handler)
            self._pid = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        # One line per rank: in a multi-node log it shows that every rank started, and from where.
        log.info(
            "rank %d of %d: training from step %d; on %s: checkpoint and requeue",
            trainer.global_rank,
            trainer.world_size,
            trainer.global_step,
            signal.Signals(self.signum).name,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        how = "stopped for requeue" if self.stopped_for_requeue else "finished"
        log.info(
            "rank %d of %d: training %s at step %d", trainer.global_rank, trainer.world_size, how, trainer.global_step
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Every rank takes the same branches here (global_step and max_steps are equal on all), so
        # the all-reduce below is entered by all ranks or by none.
        if trainer.global_step == self._last_step:
            return  # inside a gradient accumulation: a checkpoint must fall on an optimizer step
        self._last_step = trainer.global_step
        if 0 <= trainer.max_steps <= trainer.global_step:
            return  # this was the last step: the run ends now and needs no restart
        if not self._vote.read():
            self._vote.start(int(self._signalled), trainer.strategy.root_device)
            return
        log.info(
            "rank %d: SLURM signal %s: saving %s at step %d and requeueing",
            trainer.global_rank,
            signal.Signals(self.signum).name,
            self.checkpoint_path,
            trainer.global_step,
        )
        trainer.save_checkpoint(self.checkpoint_path)
        wait_for_write(trainer.strategy.checkpoint_io)  # on disk before SLURM ends the job for the requeue
        # Set before requeueing: SLURM terminates this run right after, at any point from here on.
        self.stopped_for_requeue = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            _requeue(_this_job(), self.checkpoint_path)


def _this_job() -> str:
    """This job's id for ``scontrol``: ``<array job>_<task>`` inside a job array.

    A task's own ``SLURM_JOB_ID`` is no good there: one task's equals the array's id, and
    ``scontrol requeue <array id>`` requeues every task of the array.
    """
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]


def _requeue(job_id: str, checkpoint_path: str) -> None:
    """``scontrol requeue job_id``; a failure is logged, not raised: the checkpoint is already safe."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        error = result.stderr.strip() if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        error = str(e)
    if error:
        log.error(
            "scontrol requeue %s failed (%s); training stops, resubmit the same command to resume from %s",
            job_id,
            error,
            checkpoint_path,
        )
    else:
        log.info("requeued SLURM job %s", job_id)


def stopped_for_requeue(trainer: L.Trainer) -> bool:
    """Whether ``trainer`` stopped because a :class:`RequeueOnSignal` requeued the job."""
    return any(isinstance(c, RequeueOnSignal) and c.stopped_for_requeue for c in trainer.callbacks)
