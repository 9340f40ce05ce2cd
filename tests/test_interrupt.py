"""What an interrupted run leaves behind, and how rerunning the same command goes on from it.

Temporary files of writers killed mid-write, SIGTERM and Ctrl-C outside SLURM (``SaveOnInterrupt``;
the signals come from ``signal_probe.SignalAtSteps`` at known steps), and ``last.ckpt`` by wall
time and at the end (``LastCheckpointSchedule``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from signal_probe import SignalAtSteps
from test_train import compose_train, demo_overrides  # noqa: F401 (a fixture)

import train
from clip_pl.model_files.checkpoint import read_checkpoint
from clip_pl.training.callbacks import LastCheckpointSchedule, interrupted_by
from data_pipelines.atomic import atomic_output, remove_stale_temporaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# Writes 1 MiB through atomic_output, prints the temporary file's path and waits inside the block
# until its stdin closes. It loads data_pipelines/atomic.py alone: the package would import torch, for seconds.
WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[2])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_output(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(bytes(1 << 20))
    print(tmp, flush=True)
    sys.stdin.read()
"""


def start_writer(path) -> tuple[subprocess.Popen, str]:
    """A process in the middle of an atomic write of ``path``, and its temporary file."""
    atomic = os.path.join(ROOT, "data_pipelines", "atomic.py")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), atomic], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    return writer, writer.stdout.readline().strip()


def killed_writer(path) -> str:
    """The temporary file of a writer of ``path`` SIGKILLed mid-write."""
    writer, tmp = start_writer(path)
    writer.kill()
    writer.wait()
    writer.stdout.close()
    writer.stdin.close()
    return tmp


def test_only_the_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = killed_writer(tmp_path / "last.ckpt")
    assert os.path.getsize(dead) == 1 << 20
    alive, alive_tmp = start_writer(tmp_path / "export.safetensors")
    with atomic_output(tmp_path / "config.yaml") as own_tmp:
        assert remove_stale_temporaries(tmp_path) == [dead]
        assert os.path.exists(own_tmp) and os.path.exists(alive_tmp)
    alive.communicate("")  # the live writer finishes its file
    assert alive.returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "export.safetensors"]
    assert remove_stale_temporaries(tmp_path / "absent") == []


def run_train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``python train.py args`` in a process group of its own, so that a signal to the group stays in it."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join([ROOT, TESTS]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def signal_at(name: str, steps: list[int], **options: object) -> list[str]:
    """Overrides that make ``signal_probe.SignalAtSteps`` send ``name`` when the batch after each step starts."""
    extra = [f"+callbacks.speed_monitor.{key}={str(value).lower()}" for key, value in options.items()]
    return ["callbacks.speed_monitor._target_=signal_probe.SignalAtSteps", f"+callbacks.speed_monitor.signal_name={name}",
            f"+callbacks.speed_monitor.at_steps=[{','.join(map(str, steps))}]", *extra]


@pytest.fixture
def short_run(demo_overrides, tmp_path):  # noqa: F811 (the fixture imported above)
    """Overrides for a run in tmp_path that saves only when interrupted (no step or time interval reached)."""
    return [*demo_overrides, f"run_dir={tmp_path}", "+trainer.limit_val_batches=0", "checkpoint.every_n_steps=100",
            "checkpoint.every_n_minutes=null"]


def test_sigterm_saves_the_step_where_training_stopped_and_the_rerun_resumes_there(short_run, tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    # To the whole process group, as torchrun, systemd and `kill -- -PGID` send it: the DataLoader worker too.
    first = run_train([*short_run, "data.num_workers=1", "trainer.max_steps=20",
                       *signal_at("SIGTERM", [3], group=True)])
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    # Received during step 4: the vote taken after step 4 is read after step 5, where training stops.
    assert read_checkpoint(last)["global_step"] == 5
    assert f"SIGTERM: training stopped at step 5, saved in {last}; rerun the same command to resume" in first.stderr

    stale = killed_writer(last)  # a later save killed mid-write
    second = run_train([*short_run, "trainer.max_steps=7"])
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "training from step 5;" in output
    assert f"removed 1 temporary file(s) of interrupted writes: {stale}" in output and not os.path.exists(stale)
    assert read_checkpoint(last)["global_step"] == 7


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step_after_one_save(short_run, tmp_path, strategy):
    last = tmp_path / "checkpoints" / "last.ckpt"
    ddp = ["trainer.devices=2", "trainer.strategy=ddp"]
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
    # Rank 1 alone, which Lightning's own handling would hang on (StopOnSigterm's docstring).
    first = run_train([*short_run, *(ddp if strategy == "ddp" else fsdp), "trainer.max_steps=20",
                       *signal_at("SIGTERM", [3], rank=1)], timeout=400)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert read_checkpoint(last)["global_step"] == 5
    assert first.stderr.count("SIGTERM: training stopped at step 5") == 1  # rank 0's line
    if strategy == "fsdp":
        # The sharded save was committed before the processes ended (tests/test_fsdp.py resumes one).
        assert last.is_symlink() and os.listdir(str(last) + ".shards") == ["step-000000005"]
        return

    second = run_train([*short_run, *ddp, "trainer.max_steps=7"], timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training from step 5;" in second.stdout + second.stderr
    assert read_checkpoint(last)["global_step"] == 7


@pytest.mark.parametrize("steps", [[3], [3, 4]], ids=["once", "twice"])
def test_ctrl_c_saves_and_a_second_ctrl_c_ends_at_once(short_run, tmp_path, steps):
    last = tmp_path / "checkpoints" / "last.ckpt"
    # To the whole process group, as a terminal sends it: the DataLoader worker gets it too.
    result = run_train([*short_run, "data.num_workers=1", "trainer.max_steps=20",
                        *signal_at("SIGINT", steps, group=True)])
    if len(steps) == 1:
        assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
        assert read_checkpoint(last)["global_step"] == 5
        assert "SIGINT: training stopped at step 5" in result.stderr
    else:
        # The second arrives during step 5, before the save: the default action ends the process.
        assert result.returncode == -signal.SIGINT, result.stderr[-3000:]
        assert not last.exists() and "training stopped" not in result.stderr


class _Batches(L.Callback):
    """Records the first token row of each batch and the step training started from."""

    def __init__(self):
        self.batches, self.start = [], None

    def on_train_start(self, trainer, pl_module):
        self.start = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[1][0].clone())


def _fit(cfg, run_dir, resume=False):
    module, datamodule, trainer = train.build(cfg, str(run_dir))
    batches = _Batches()
    trainer.callbacks.append(batches)
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    trainer.fit(module, datamodule=datamodule, ckpt_path=last if resume else None)
    return batches, module


def test_the_checkpoint_of_an_interrupt_resumes_exactly(demo_overrides, tmp_path):  # noqa: F811
    """Ctrl-C in step 4, saved at 5 and resumed to 9 == trained to 9 at once: same batches, same weights."""
    cfg = compose_train([*demo_overrides, "optim.warmup_steps=3", "checkpoint.every_n_steps=100",
                         "checkpoint.every_n_minutes=null", "+trainer.limit_val_batches=0", "trainer.max_steps=9"])
    straight, straight_module = _fit(cfg, tmp_path / "straight")
    module, datamodule, trainer = train.build(cfg, str(tmp_path / "split"))
    trainer.callbacks.append(SignalAtSteps("SIGINT", [3]))
    with pytest.raises(SIGTERMException):
        trainer.fit(module, datamodule=datamodule)
    assert interrupted_by(trainer) == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back
    assert read_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")["global_step"] == 5

    resumed, resumed_module = _fit(cfg, tmp_path / "split", resume=True)
    assert resumed.start == 5 and len(resumed.batches) == 4
    for got, expected in zip(resumed.batches, straight.batches[5:]):
        assert torch.equal(got, expected)
    for (name, a), b in zip(straight_module.model.named_parameters(), resumed_module.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


class _SavedSteps(L.Callback):
    """The step in last.ckpt when each batch starts (None before the first save)."""

    def __init__(self, path):
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(read_checkpoint(self.path)["global_step"] if os.path.exists(self.path) else None)


@pytest.mark.parametrize(
    "minutes, every_n_steps, saved",
    [
        # Due after every step: rank 0's decision after step 1 is read after step 2, saved there; then 4.
        ("0", 100, [None, None, 2, 2, 4]),
        # By steps only, at 3; 3 does not divide 5, and the end is saved all the same.
        ("null", 3, [None, None, None, 3, 3]),
    ],
)
def test_last_checkpoint_by_time_and_at_the_end(demo_overrides, tmp_path, minutes, every_n_steps, saved):  # noqa: F811
    cfg = compose_train([*demo_overrides, f"run_dir={tmp_path}", "+trainer.limit_val_batches=0", "trainer.max_steps=5",
                         "optim.warmup_steps=2", f"checkpoint.every_n_minutes={minutes}",
                         f"checkpoint.every_n_steps={every_n_steps}", "checkpoint.async_save=false"])
    module, datamodule, trainer = train.build(cfg, str(tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    probe = _SavedSteps(last)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=datamodule)
    assert probe.steps == saved
    assert read_checkpoint(last)["global_step"] == 5


def test_a_negative_time_interval_says_what_to_set():
    with pytest.raises(ValueError) as error:
        LastCheckpointSchedule("last.ckpt", every_n_minutes=-1)
    assert str(error.value) == (
        "checkpoint.every_n_minutes=-1: give a number of minutes >= 0, or null to save by steps only"
    )
