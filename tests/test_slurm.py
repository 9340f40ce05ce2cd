"""clip_pl on a real SLURM cluster: two slurmd "nodes" on localhost (tests/slurm/cluster.sh), CPU, gloo.

The session fixture starts the cluster (installing slurm-wlm and munge with apt if needed) and stops
it afterwards; where that is impossible the tests skip with the reason, unless
``CLIP_PL_REQUIRE_SLURM=1`` (set it in CI) turns that into a failure. Jobs train ``model=tiny`` on the
demo data with 8-sample batches; the node names do not resolve, so ``MASTER_ADDR=127.0.0.1``.
"""

from __future__ import annotations

import csv
import fcntl
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from clip_pl.distributed import free_port

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"

# 2 nodes x 1 task x 1 CPU; every sbatch line below adds its own output file and job name.
NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
TRAIN = [
    "trainer=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "trainer.strategy=ddp",
    "model=tiny",
    "logger=csv",
    "+logger.csv.flush_logs_every_n_steps=1",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    "optim.warmup_steps=2",
]


def read_log(path: Path) -> str:
    # Every task of the job writes into its one output file, so a character may be cut by another's bytes.
    return path.read_text(errors="replace")


def no_cluster(reason: str) -> None:
    """Skips (prints why), or fails where CLIP_PL_REQUIRE_SLURM=1 says the tests must run."""
    reason = f"no SLURM test cluster: {reason}"
    if os.environ.get("CLIP_PL_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    print(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Environment for sbatch/scontrol against the test cluster (started here unless already up)."""
    state = os.environ.get("CLIP_PL_SLURM_DIR", "/tmp/clip_pl_slurm")
    # Variables of an enclosing SLURM job would leak into the test jobs' srun.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["CLIP_PL_SLURM_DIR"] = state
    # One test session at a time on a machine: another one's start or stop would take this one's
    # cluster (same ports and state) down under its jobs.
    lock = open(f"{state}.lock", "w")
    deadline = time.monotonic() + 1200
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                no_cluster(f"another test session held {state}.lock for 20 minutes")
            time.sleep(2)
    was_up = subprocess.run([CLUSTER, "status"], env=env, capture_output=True).returncode == 0
    if not was_up:
        try:
            proc = subprocess.run([CLUSTER, "start"], env=env, capture_output=True, text=True, timeout=900)
            failure = proc.stderr.strip().splitlines()[-1] if proc.returncode else None
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = str(e)
        if failure:
            lock.close()
            no_cluster(failure)
    env.update(
        SLURM_CONF=f"{state}/slurm.conf",
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        # One demo dataset for all jobs, made by the first one.
        CLIP_PL_CACHE=os.environ.get("CLIP_PL_CACHE", str(REPO / ".cache" / "clip_pl")),
    )
    yield env
    if not was_up:
        subprocess.run([CLUSTER, "stop"], env=env, capture_output=True, timeout=120)
    lock.close()



def sbatch(env: dict[str, str], out_dir: Path, name: str, *overrides: str, nodes: list[str] = NODES) -> str:
    """Submits slurm/train.sbatch with train.py overrides; returns the job id."""
    cmd = ["sbatch", "--parsable", *nodes, f"--job-name={name}", f"--output={out_dir}/%x-%j.out"]
    # Lightning's port from the job id (15000 + its last 4 digits) can be in use by other tests on
    # this machine; a free one instead (kept across the requeue, as sbatch saved the environment).
    env = {**env, "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [*cmd, "slurm/train.sbatch", *overrides], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip().split(";")[0]


def job(env: dict[str, str], job_id: str) -> dict[str, str]:
    """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = read_log(log)[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.5)


def running(env: dict[str, str], job_id: str) -> bool:
    return job(env, job_id)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING")


def wait_until_finished(env: dict[str, str], job_id: str, timeout: float, log: Path) -> dict[str, str]:
    info: dict[str, str] = {}

    def finished() -> bool:
        info.update(job(env, job_id))
        return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

    wait_for(finished, timeout, f"job {job_id} to finish", log)
    return info


def train_steps(metrics_csv: Path) -> list[int]:
    """The steps of the rows that hold a training loss, in file order.

    Lightning rewrites the whole file when a new metric appears, so a reader polling during a run
    can see a cut header or row: those rows are skipped.
    """
    if not metrics_csv.exists():
        return []
    with open(metrics_csv, newline="") as f:
        return [
            int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss") and (row.get("step") or "").isdigit()
        ]


def metrics_files(run: Path) -> list[Path]:
    """The run's CSV files, one per (re)start: csv/version_0/metrics.csv, csv/version_1/metrics.csv, ..."""
    return sorted(run.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def rank_lines(train_log: Path) -> list[str]:
    """RequeueOnSignal's per-rank lines ("rank R of W: training ..."), in the order written."""
    return re.findall(r"rank \d+ of \d+: training [^\n]*", train_log.read_text())


def test_sbatch_template_trains_on_two_nodes(slurm_env, tmp_path):
    run = tmp_path / "run"
    job_id = sbatch(slurm_env, tmp_path, "clip_pl_two_nodes", *TRAIN, "trainer.max_steps=8", "data.num_workers=1",
                    f"run_dir={run}")  # fmt: skip
    log = tmp_path / f"clip_pl_two_nodes-{job_id}.out"
    info = wait_until_finished(slurm_env, job_id, 240, log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), read_log(log)[-4000:]

    output = read_log(log)
    assert f"job {job_id} (restart 0) on n[1-2], MASTER_ADDR=127.0.0.1" in output
    # Ranks and world size come from SLURM (SLURM_PROCID, SLURM_NTASKS), one process on each node.
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert sorted(rank_lines(run / "train.log")) == [
        "rank 0 of 2: training finished at step 8",
        "rank 0 of 2: training from step 0; on SIGUSR1: checkpoint and requeue",
        "rank 1 of 2: training finished at step 8",
        "rank 1 of 2: training from step 0; on SIGUSR1: checkpoint and requeue",
    ]
    assert saved_step(run / "checkpoints" / "last.ckpt") == 8
    assert [train_steps(m) for m in metrics_files(run)] == [list(range(8))]
    # The job name, not a timestamp, names the run (run_dir was given explicitly here).
    assert yaml.safe_load((run / "config.yaml").read_text())["run_name"] == "clip_pl_two_nodes"


def test_signalled_job_checkpoints_requeues_and_resumes_without_losing_a_step(slurm_env, tmp_path):
    run, target = tmp_path / "run", 40
    # Two DataLoader workers per rank: SLURM signals them too, and they must ignore it.
    job_id = sbatch(slurm_env, tmp_path, "clip_pl", *TRAIN, f"trainer.max_steps={target}", "data.num_workers=2",
                    f"run_dir={run}")  # fmt: skip
    log = tmp_path / f"clip_pl-{job_id}.out"
    first_run = run / "csv" / "version_0" / "metrics.csv"
    wait_for(lambda: len(train_steps(first_run)) >= 5 or not running(slurm_env, job_id), 240, "5 training steps", log)
    assert running(slurm_env, job_id), read_log(log)[-4000:]
    # What `#SBATCH --signal=USR1@120` does before the time limit: USR1 to every process of the step.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm_env, check=True)

    wait_for(lambda: job(slurm_env, job_id)["Restarts"] == "1", 120, "the requeue", log)
    wait_for(lambda: job(slurm_env, job_id)["JobState"] == "PENDING", 60, "the requeued job to be pending", log)
    # Slurm holds a requeued job ~120 s (BeginTime); release it now to keep the test short.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm_env, check=True)
    info = wait_until_finished(slurm_env, job_id, 300, log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), read_log(log)[-4000:]

    # Both ranks saved at the same step; SLURM then terminated the run (no "training stopped" line).
    train_log = (run / "train.log").read_text()
    saves = re.findall(r"rank (\d): SLURM signal SIGUSR1: saving \S+ at step (\d+) and requeueing", train_log)
    assert sorted(rank for rank, _ in saves) == ["0", "1"], train_log
    step = int(saves[0][1])
    assert saves[1][1] == str(step) and 5 <= step < target
    lines = rank_lines(run / "train.log")
    for rank in (0, 1):
        assert f"rank {rank} of 2: training from step {step}; on SIGUSR1: checkpoint and requeue" in lines
        assert f"rank {rank} of 2: training finished at step {target}" in lines
    output = read_log(log)
    assert output.count(f"requeued SLURM job {job_id}") == 1
    assert f"job {job_id} (restart 0)" in output and f"job {job_id} (restart 1)" in output
    # Every step exactly once across the two runs: the first ran 0..step-1, the second step..target-1.
    assert [train_steps(m) for m in metrics_files(run)] == [list(range(step)), list(range(step, target))]
    assert saved_step(run / "checkpoints" / "last.ckpt") == target


def test_task_layout_mismatch_ends_the_job_with_one_message(slurm_env, tmp_path):
    job_id = sbatch(
        slurm_env,
        tmp_path,
        "clip_pl_layout",
        "trainer=cpu",
        "trainer.devices=2",
        "model=tiny",
        f"run_dir={tmp_path / 'run'}",
        nodes=["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=5"],
    )
    log = tmp_path / f"clip_pl_layout-{job_id}.out"
    info = wait_until_finished(slurm_env, job_id, 180, log)
    output = read_log(log)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), output[-4000:]
    assert re.findall(r"^error: .*$", output, re.M) == [
        "error: SLURM starts 1 task(s) per node but trainer.devices=2; Lightning needs one task per device: "
        "set trainer.devices=1, or submit with --ntasks-per-node=2 (one per GPU)"
    ]
    assert "Traceback" not in output


def test_hydra_sweep_through_the_slurm_launcher_with_a_requeue_in_each_job(slurm_env, tmp_path):
    sweep, target = tmp_path / "sweep", 60
    launcher = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    train = [
        "trainer=cpu",
        "model=tiny",
        "logger=csv",
        "+logger.csv.flush_logs_every_n_steps=1",
        "optim.warmup_steps=2",
    ]
    train += ["trainer.log_every_n_steps=1", f"trainer.max_steps={target}", "data.batch_size=8", "data.num_workers=1"]
    cmd = ["python", "train.py", "-m", *launcher, *train, f"run_dir={sweep}", "optim.lr=1e-3,2e-3"]
    launcher_log = tmp_path / "launcher.log"
    with open(launcher_log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=slurm_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Each sweep point is task <array job>_<hydra job num>; signal each one once it has trained a little.
        signalled: set[str] = set()

        def signal_running_tasks() -> bool:
            for metrics in sweep.glob("*/csv/version_0/metrics.csv"):
                run = metrics.parents[2]
                num = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"]
                # submitit keeps one <array id>_<task> entry per job, next to hidden files of its own.
                array = next(m[1] for p in sweep.glob(".submitit/*") if (m := re.fullmatch(r"(\d+)_\d+", p.name)))
                task = f"{array}_{num}"
                if task not in signalled and len(train_steps(metrics)) >= 5:
                    subprocess.run(["scancel", "--signal=USR1", task], env=slurm_env, check=True)
                    signalled.add(task)
            return len(signalled) == 2

        wait_for(lambda: signal_running_tasks() or proc.poll() is not None, 240, "5 steps in both jobs", launcher_log)
        assert proc.poll() is None, read_log(launcher_log)[-4000:]
        for task in sorted(signalled):
            wait_for(lambda t=task: job(slurm_env, t)["Restarts"] == "1", 120, f"the requeue of {task}", launcher_log)
            wait_for(lambda t=task: job(slurm_env, t)["JobState"] == "PENDING", 60, f"{task} pending", launcher_log)
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], env=slurm_env, check=True)
        # The interrupted runs reported no result, so the launcher waited for the restarted jobs.
        assert proc.wait(timeout=300) == 0, read_log(launcher_log)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    runs = sorted(p.parents[1] for p in sweep.glob("*/checkpoints/last.ckpt"))
    assert sorted(yaml.safe_load((r / "config.yaml").read_text())["optim"]["lr"] for r in runs) == [1e-3, 2e-3]
    for run in runs:
        train_log = (run / "train.log").read_text()
        step = int(re.findall(r"rank 0: SLURM signal SIGUSR1: saving \S+ at step (\d+) and requeueing", train_log)[0])
        # Each job ran as a SLURM task (RequeueOnSignal armed), stopped once, resumed where it stopped.
        # Whether the stopped run logs its end before SLURM terminates it is a race: either is right.
        stopped = f"rank 0 of 1: training stopped for requeue at step {step}"
        lines = rank_lines(run / "train.log")
        assert lines.count(stopped) <= 1
        assert [line for line in lines if line != stopped] == [
            "rank 0 of 1: training from step 0; on SIGUSR1: checkpoint and requeue",
            f"rank 0 of 1: training from step {step}; on SIGUSR1: checkpoint and requeue",
            f"rank 0 of 1: training finished at step {target}",
        ]
        assert [train_steps(m) for m in metrics_files(run)] == [list(range(step)), list(range(step, target))]
        assert saved_step(run / "checkpoints" / "last.ckpt") == target
