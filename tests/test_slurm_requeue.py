"""clip_pl.training.slurm without a SLURM cluster: real Lightning fits that signal themselves, and the layout check.

The fits run in subprocesses (tests/slurm/tiny_fit.py) with a fake ``scontrol`` that records its
arguments, so a deadlock shows up as a timeout rather than a hung session.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_pl.training import slurm

TINY_FIT = Path(__file__).parent / "slurm" / "tiny_fit.py"


def fit(tmp_path: Path, *args: str) -> tuple[dict[int, dict], list[str]]:
    """Runs tiny_fit.py; returns each rank's report and the recorded scontrol calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    fake = bin_dir / "scontrol"
    # It also notes whether the checkpoint was on disk when the job was requeued.
    saved = f"if test -f {tmp_path}/last.ckpt; then touch {tmp_path}/saved_before; fi"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{saved}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(TINY_FIT), str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    return reports, calls.read_text().splitlines() if calls.exists() else []


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_signal_requeues_one_step_after_the_step_it_arrived_in_and_workers_ignore_it(tmp_path):
    # The DataLoader worker that loads sample 3 signals itself early on: it must neither die (the
    # fit would fail) nor trigger anything. The main process signals itself during batch 9 (step
    # 10); the vote taken after step 10 is read after step 11, where the run stops.
    reports, calls = fit(tmp_path, "--num-workers", "1", "--signal-batch", "9", "--worker-signal-index", "3")
    assert reports[0]["steps"] == list(range(11))
    assert reports[0]["global_step"] == 11
    assert reports[0]["stopped_for_requeue"] is True
    assert saved_step(tmp_path / "last.ckpt") == 11
    assert calls == ["requeue 4242"]
    # Afterwards the signal is ignored: one arriving while the process finishes must not kill it.
    assert reports[0]["handler_after_fit"] == "SIG_IGN"
    assert (tmp_path / "exited_normally").exists()


def test_a_checkpoint_written_in_the_background_is_on_disk_before_the_requeue(tmp_path):
    reports, calls = fit(tmp_path, "--signal-batch", "9", "--async-save-delay", "1.5")
    assert reports[0]["stopped_for_requeue"] is True and calls == ["requeue 4242"]
    assert (tmp_path / "saved_before").exists()
    assert saved_step(tmp_path / "last.ckpt") == 11


def test_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # Only rank 1 is signalled (during batch 5); the summed vote must stop both ranks after step 7,
    # with one checkpoint and one requeue (rank 0's).
    reports, calls = fit(tmp_path, "--devices", "2", "--signal-rank", "1", "--signal-batch", "5")
    assert sorted(reports) == [0, 1]
    for rank in (0, 1):
        assert reports[rank]["steps"] == list(range(7))
        assert reports[rank]["global_step"] == 7
        assert reports[rank]["stopped_for_requeue"] is True
    assert saved_step(tmp_path / "last.ckpt") == 7
    assert calls == ["requeue 4242"]
    assert [reports[rank]["handler_after_fit"] for rank in (0, 1)] == ["SIG_IGN", "SIG_IGN"]


@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, rank):
    # Lightning's own handling hangs here when rank 1 alone is signalled. StopOnSigterm: the flags
    # summed before batch 6 are read before batch 7, where every rank raises SIGTERMException.
    # Strategy ddp (processes started as scripts, as under SLURM): ddp_fork's parent would wait for a
    # result the stopped ranks never send.
    reports, calls = fit(
        tmp_path, "--devices", "2", "--strategy", "ddp", "--signal", "SIGTERM", "--signal-rank", str(rank),
        "--signal-batch", "5",
    )  # fmt: skip
    assert sorted(reports) == [0, 1]
    for r in (0, 1):
        assert reports[r]["steps"] == list(range(7))
        assert reports[r]["exception"] == "SIGTERMException"
        assert reports[r]["stopped_for_requeue"] is False
    assert calls == [] and not (tmp_path / "last.ckpt").exists()


def test_no_step_reads_a_tensor_with_two_processes(tmp_path):
    # Lightning's per-batch SIGTERM broadcast would read one in every step (StopOnSigterm replaces it);
    # RequeueOnSignal's vote reads none either.
    reports, _ = fit(tmp_path, "--devices", "2", "--max-steps", "12")
    for r in (0, 1):
        assert reports[r]["global_step"] == 12
        assert sorted(map(int, reports[r]["reads"])) == list(range(1, 12))
        assert set(reports[r]["reads"].values()) == {0}


@pytest.mark.parametrize("batch", [6, 7])
def test_signal_during_the_last_two_steps_does_not_requeue(tmp_path, batch):
    # Its vote would be read after step 9 (signal in batch 7) or after the last step 8 (batch 6).
    reports, calls = fit(tmp_path, "--max-steps", "8", "--signal-batch", str(batch))
    assert reports[0]["global_step"] == 8
    assert reports[0]["stopped_for_requeue"] is False
    assert not (tmp_path / "last.ckpt").exists()
    assert calls == []


def test_failed_requeue_is_logged_with_the_checkpoint_to_resume_from(tmp_path, caplog, monkeypatch):
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with caplog.at_level(logging.ERROR, logger="clip_pl.training.slurm"):
        slurm._requeue("77", "/runs/x/checkpoints/last.ckpt")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "scontrol requeue 77 failed (Requested operation is presently disabled)" in message
    assert "/runs/x/checkpoints/last.ckpt" in message


@pytest.fixture
def slurm_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def test_requeue_targets_the_array_task_not_the_whole_array(slurm_env):
    slurm_env(SLURM_JOB_ID="17")
    assert slurm._this_job() == "17"
    # In an array one task's SLURM_JOB_ID equals the array's id; requeueing that id requeues all tasks.
    slurm_env(SLURM_JOB_ID="17", SLURM_ARRAY_JOB_ID="17", SLURM_ARRAY_TASK_ID="1")
    assert slurm._this_job() == "17_1"


@pytest.mark.filterwarnings("ignore:The `srun` command is available")
def test_slurm_task_detection_follows_lightning(slurm_env):
    assert not slurm.is_slurm_task()
    slurm_env(SLURM_JOB_ID="5", SLURM_NTASKS="2", SLURM_JOB_NAME="clip_pl")
    assert slurm.is_slurm_task()
    slurm_env(SLURM_JOB_NAME="bash")  # an interactive shell: the user starts the processes
    assert not slurm.is_slurm_task()


@pytest.mark.parametrize("devices", [2, "2", [0, 1]])
def test_layout_matching_the_job_passes(slurm_env, devices):
    slurm_env(SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NUM_NODES="2")
    slurm.check_task_layout(devices, 2)


def test_tasks_per_node_different_from_devices_is_one_clear_error(slurm_env):
    slurm_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="2")
    with pytest.raises(ValueError) as error:
        slurm.check_task_layout(8, 2)
    assert str(error.value) == (
        "SLURM starts 1 task(s) per node but trainer.devices=8; Lightning needs one task per device: "
        "set trainer.devices=1, or submit with --ntasks-per-node=8 (one per GPU)"
    )


def test_node_count_different_from_num_nodes_is_an_error(slurm_env):
    slurm_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="2")
    with pytest.raises(ValueError, match=r"2 node\(s\) but trainer.num_nodes=1; set trainer.num_nodes=2"):
        slurm.check_task_layout(1, 1)


def test_ntasks_without_ntasks_per_node_is_an_error(slurm_env):
    slurm_env(SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2")
    with pytest.raises(ValueError, match="4 tasks but no --ntasks-per-node"):
        slurm.check_task_layout(2, 2)


def test_auto_devices_are_left_to_lightning(slurm_env):
    slurm_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NUM_NODES="1")
    slurm.check_task_layout("auto", 1)
