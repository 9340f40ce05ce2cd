"""train.py end to end: the real config, composed with overrides, on a small demo dataset."""

import csv
import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from reads_probe import ReadsPerStep

import train
from clip_pl.model_files.checkpoint import read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


@pytest.fixture(scope="module")
def demo_overrides(tmp_path_factory):
    """Overrides that make the demo small: 512 train / 128 val images of 32 px, batch 16."""
    cache = tmp_path_factory.mktemp("demo_cache")
    return [
        f"demo_cache={cache}",
        "prepare_data.num_train=512",
        "prepare_data.num_val=128",
        "model.image.image_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
    ]


def compose_train(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run_cli(args, timeout=300, env=None):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_few_steps_each_loss(loss, demo_overrides, tmp_path):
    overrides = ["trainer.max_steps=4", "trainer.log_every_n_steps=2", "callbacks.speed_monitor.peak_tflops=0.25"]
    cfg = compose_train([*demo_overrides, f"loss={loss}", f"run_dir={tmp_path}", *overrides])
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    has_bias = "model.logit_bias" in checkpoint["state_dict"]
    assert has_bias == (loss == "siglip")
    assert (tmp_path / "config.yaml").is_file()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    (logged,) = [r for r in rows if r.get("train/mfu")]  # at step 2 (4 is the last step: no next batch)
    assert float(logged["train/mfu"]) == pytest.approx(float(logged["train/model_tflops_per_device"]) / 0.25)


class _Recorder(L.Callback):
    """Records what a run saw: the first token row of each batch, and the state at start."""

    def __init__(self):
        self.batches, self.start = [], None

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        adam_steps = [s["step"].item() for s in optimizer.state.values() if "step" in s]
        self.start = {"global_step": trainer.global_step, "adam_steps": set(adam_steps),
                      "lr": optimizer.param_groups[0]["lr"]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[1][0].clone())


class _StopAt(L.Callback):
    """Stops training after ``step`` optimizer steps, as a preemption would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit(cfg, run_dir, resume=False, stop_at=None):
    module, datamodule, trainer = train.build(cfg, str(run_dir))
    recorder = _Recorder()
    trainer.callbacks.append(recorder)
    if stop_at is not None:
        trainer.callbacks.append(_StopAt(stop_at))
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    trainer.fit(module, datamodule=datamodule, ckpt_path=last if resume else None)
    return recorder, module


def test_resume_continues_exactly_where_it_stopped(demo_overrides, tmp_path):
    """Stopped at step 6 and resumed to 12 == trained to 12 at once: same batches, same weights."""
    cfg = compose_train([*demo_overrides, "data.mode=epoch", "optim.warmup_steps=3", "checkpoint.every_n_steps=3",
                         "+trainer.limit_val_batches=0", "trainer.max_steps=12"])
    # 512 samples / 16 = 32 batches per epoch: steps 6..12 stay inside epoch 0.
    straight, straight_module = _fit(cfg, tmp_path / "straight")
    first, _ = _fit(cfg, tmp_path / "split", stop_at=6)
    resumed, resumed_module = _fit(cfg, tmp_path / "split", resume=True)

    assert len(first.batches) == 6 and resumed.start["global_step"] == 6
    assert resumed.start["adam_steps"] == {6.0}
    assert len(resumed.batches) == 6
    for got, expected in zip(resumed.batches, straight.batches[6:]):
        assert torch.equal(got, expected)
    assert not torch.equal(resumed.batches[0], straight.batches[0])
    for (name, a), b in zip(straight_module.model.named_parameters(), resumed_module.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert read_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")["global_step"] == 12


def test_rerunning_the_command_resumes(demo_overrides, tmp_path):
    args = [*demo_overrides, f"run_dir={tmp_path}", "+trainer.limit_val_batches=0"]
    first = run_cli([*args, "trainer.max_steps=3"])
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli([*args, "trainer.max_steps=5"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stderr + second.stdout
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5

    # The same run_dir with another model: one line that says what to do, and the run's config kept.
    config = (tmp_path / "config.yaml").read_text()
    other = run_cli([*args, "trainer.max_steps=7", "+model.text.width=32"])
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds a run with another config (model.text.width: (absent) -> 32); for a new run set "
        "another run_name or run_dir, or add resume=force to resume this one with the new settings"
    ], other.stderr[-2000:]
    # Forced, the weights still have to fit the model.
    forced = run_cli([*args, "trainer.max_steps=7", "+model.text.width=32", "resume=force"])
    assert forced.returncode == 2 and "Traceback" not in forced.stderr
    assert (
        f"error: {tmp_path} holds a run of another model (" in forced.stderr
        and "weights differ, e.g. model.text_tower." in forced.stderr
        and f"To resume it, use its config ({tmp_path / 'config.yaml'}); for a new run, set another run_name"
        in forced.stderr
    ), forced.stderr[-2000:]
    assert (tmp_path / "config.yaml").read_text() == config


def test_a_finished_run_reports_instead_of_training_and_a_changed_config_stops(demo_overrides, tmp_path, caplog):
    caplog.set_level("INFO", logger="clip_pl")
    args = [*demo_overrides, f"run_dir={tmp_path}", "+trainer.val_check_interval=3", "+trainer.limit_val_batches=2"]
    metrics = train.train(compose_train([*args, "trainer.max_steps=5"]))
    # Validated at step 3 by the interval, and again at the end: the final metrics are those of step 5.
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        val_steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("val/loss")]
    # Lightning logs a validation inside fit at the index of the step before it (2), and trainer.validate
    # after fit at the number of steps done (5).
    assert val_steps == [2, 5]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["step"] == 5 and final["metrics"]["val/loss"] == pytest.approx(metrics["val/loss"])
    assert "Final metrics of the weights at step 5:" in caplog.text

    # The same command again: nothing trained, nothing written, the final metrics reported.
    checkpoint, config = tmp_path / "checkpoints" / "last.ckpt", (tmp_path / "config.yaml").read_text()
    mtime = checkpoint.stat().st_mtime_ns
    caplog.clear()
    again = train.train(compose_train([*args, "trainer.max_steps=5"]))
    assert f"{tmp_path} already finished: its last.ckpt is at step 5 (trainer.max_steps=5)" in caplog.text
    assert again == final["metrics"] and checkpoint.stat().st_mtime_ns == mtime

    # Another seed would leave config.yaml describing weights it did not train: stop before writing.
    with pytest.raises(ValueError, match=r"another config \(data.seed: 0 -> 1; seed: 0 -> 1\).*add resume=force"):
        train.train(compose_train([*args, "trainer.max_steps=6", "seed=1"]))
    assert (tmp_path / "config.yaml").read_text() == config and checkpoint.stat().st_mtime_ns == mtime
    # Forced: it trains on, and the old config is kept beside the new one.
    train.train(compose_train([*args, "trainer.max_steps=6", "seed=1", "resume=force"]))
    assert read_checkpoint(checkpoint)["global_step"] == 6
    assert (tmp_path / "config.1.yaml").read_text() == config
    assert "seed: 1" in (tmp_path / "config.yaml").read_text()


# The demo's one val shard leaves rank 1 without validation batches. With BatchNorm buffers (resnet18)
# DDP's buffer broadcast at the first validation forward once hung such a run. The ViT run is
# compiled, as the experiment recipes are (tests/test_module.py checks compiled against eager).
@pytest.mark.parametrize("tower, compile", [("vit_tiny_patch16_224", True), ("resnet18", False)])
def test_ddp_two_cpu_processes_through_entry_point(demo_overrides, tmp_path, tower, compile):
    result = run_cli([*demo_overrides, f"run_dir={tmp_path}", "trainer.devices=2", "trainer.strategy=ddp",
                      "trainer.max_steps=3", "data.num_workers=1", "+trainer.limit_val_batches=2",
                      "+trainer.val_check_interval=3", f"model.image.name={tower}", f"module.compile={compile}"],
                     timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "distributed_backend=gloo" in output and "All distributed processes registered" in output
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    assert "val/image_to_text_R@1" in output and "zero_shot/demo_shape/top1" in output
    assert "sync_dist=True" not in output  # Lightning's warning for epoch metrics left unsynced


def test_local_sweep_runs_each_job(demo_overrides, tmp_path):
    # Two devices: strategy=auto picks DDP, whose launcher re-runs the command line (the whole sweep);
    # sweep jobs spawn their ranks instead.
    result = run_cli(["-m", *demo_overrides, f"run_dir={tmp_path}", "optim.lr=1e-4,3e-4", "trainer.max_steps=2",
                      "+trainer.limit_val_batches=0", "trainer.devices=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("sweep job: using strategy=ddp_spawn") == 2
    for job, lr in (("0", 1e-4), ("1", 3e-4)):
        assert f"optim.lr={lr:g}" in (tmp_path / job / ".hydra" / "overrides.yaml").read_text()
        checkpoint = read_checkpoint(tmp_path / job / "checkpoints" / "last.ckpt")
        assert checkpoint["global_step"] == 2
        assert checkpoint["lr_schedulers"][0]["base_lrs"][0] == pytest.approx(lr)


def test_missing_tokenizer_is_one_clear_line(tmp_path):
    result = run_cli([f"run_dir={tmp_path}", "model.image.name=vit_base_patch61_clip_224", "prepare_data=null",
                      "tokenizer.path=/nonexistent"], timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "tokenizer model '/nonexistent' not found" in result.stderr


def test_values_the_command_must_set_are_named_in_one_line(tmp_path):
    result = run_cli([f"run_dir={tmp_path}", "data=webdataset"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: set on the command line: data.train_shards (\"data.train_shards='/data/{00000..00099}.tar'\" or a "
        "directory of shards); tokenizer.path (a SentencePiece .model; python -m data_pipelines.train_tokenizer "
        "trains one on the shards)"
    )
    assert not os.path.exists(tmp_path / "config.yaml")


def test_unknown_timm_model_suggests(demo_overrides, tmp_path):
    result = run_cli([*demo_overrides, f"run_dir={tmp_path}", "model.image.name=vit_base_patch61_clip_224"], timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown timm model 'vit_base_patch61_clip_224'" in result.stderr
    assert "vit_base_patch16_clip_224" in result.stderr


def test_training_steps_read_no_tensor_values_but_to_log(demo_overrides, tmp_path):
    # A per-step read keeps the host from queueing the next step while the GPU runs this one.
    # Lightning reads progress-bar values at every step, so the loss goes there only with a bar.
    cfg = compose_train([*demo_overrides, f"run_dir={tmp_path}", "trainer.max_steps=9", "trainer.log_every_n_steps=4"])
    module, datamodule, trainer = train.build(cfg, str(tmp_path))
    probe = ReadsPerStep()
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=datamodule)
    assert sorted(probe.reads) == list(range(1, 9))
    assert {step for step, n in probe.reads.items() if n} == {4, 8}  # the logging steps

    cfg = compose_train([*demo_overrides, f"run_dir={tmp_path / 'bar'}", "trainer.max_steps=2",
                         "trainer.enable_progress_bar=true"])  # fmt: skip
    module, datamodule, trainer = train.build(cfg, str(tmp_path / "bar"))
    trainer.fit(module, datamodule=datamodule)
    assert "train/loss" in trainer.progress_bar_metrics


def test_demo_beats_chance(tmp_path_factory, tmp_path):
    """A shortened `python train.py`: 64 px demo images, 1.5 epochs, zero-shot colour well above 1/6."""
    cache = tmp_path_factory.mktemp("demo64")
    cfg = compose_train([f"demo_cache={cache}", "prepare_data.num_train=1536", "prepare_data.num_val=192",
                         f"run_dir={tmp_path}", "trainer.max_steps=36", "data.batch_size=64",
                         "data.num_workers=0", "trainer.enable_progress_bar=false", "optim.warmup_steps=10",
                         "+trainer.val_check_interval=12"])
    metrics = train.train(cfg)
    assert metrics["zero_shot/demo_colour/top1"] > 0.5


def test_skipped_samples_are_logged_summed_over_ranks(make_tiny_shards, tmp_path):
    import csv
    from collections import Counter

    from test_data_pipeline import _broken_shards

    from data_pipelines.datamodule import ShardDataModule
    from data_pipelines.tokenizer import train_sentencepiece

    spec, _ = _broken_shards(make_tiny_shards)
    tokenizer = train_sentencepiece([f"photo {i}" for i in range(40)], tmp_path / "tok.model", vocab_size=40,
                                    byte_fallback=False, num_threads=1)
    # Each rank's own counts in each of two epochs (32 samples: 8 batches of 2 per rank), read here.
    expected = [Counter(), Counter()]
    for epoch in range(2):
        for rank in range(2):
            dm = ShardDataModule(spec, tokenizer, batch_size=2, num_workers=1, mode="epoch", seed=0, image_size=32,
                                 max_image_pixels=10_000, rank=rank, world_size=2)
            dm.set_position(epoch)
            assert sum(1 for _ in dm.train_dataloader()) == 8
            expected[epoch].update(dm.skipped_counts())
    assert all(e["bad_image"] >= 1 and e["missing_caption"] >= 1 for e in expected)

    result = run_cli([
        "data=webdataset", f"data.train_shards='{spec}'", "data.batch_size=2", "data.num_workers=1", "data.mode=epoch",
        "+data.max_image_pixels=10000", f"tokenizer.path={tmp_path / 'tok.model'}", "model.image.image_size=32",
        "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=16", "trainer.enable_progress_bar=false",
        "+trainer.limit_val_batches=0", "logger=csv", f"run_dir={tmp_path / 'run'}",
    ], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist=True" not in result.stderr  # Lightning's warning for unsynced epoch metrics
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    # One row per epoch with that epoch's counts, not the running total.
    logged = [{k.removeprefix("data/skipped_"): float(v) for k, v in row.items() if k.startswith("data/skipped_")}
              for row in rows if row.get("data/skipped_bad_image")]
    assert logged == [{k: float(v) for k, v in e.items()} for e in expected]


@pytest.mark.parametrize("args, line", [
    (["optim.lrr=1"], "error: unknown config key optim.lrr; did you mean optim.lr? (+optim.lrr=VALUE adds a new key)"),
    # Every option a sweep names is checked before its first job starts.
    (["-m", "loss=clip,siglip", "model=tiny,vit_b61"],
     "error: unknown option model=vit_b61; did you mean model=vit_b16? "
     "(options: openclip, rn50, tiny, vit_b16, vit_b32, vit_bigg14, vit_g14, vit_h14, vit_l14, vit_l14_336)"),
])
def test_a_mistaken_override_is_one_line(args, line, tmp_path):
    result = run_cli([*args, f"run_dir={tmp_path}"], timeout=120)
    assert (result.returncode, result.stderr, result.stdout) == (2, line + "\n", "")


def test_a_data_mistake_is_one_line_before_the_trainer_starts_and_in_train_log(demo_overrides, tmp_path):
    result = run_cli([*demo_overrides, f"run_dir={tmp_path}", "data.caption_key=json:text"], timeout=120)
    assert result.returncode == 2
    *before, last = result.stderr.splitlines()
    assert last.startswith("error: caption_key='json:text' matches no non-empty caption in the first 512 samples")
    assert not any("error" in line or "GPU available" in line for line in before), result.stderr[-2000:]
    assert last in (tmp_path / "train.log").read_text()


def test_a_run_prints_no_lightning_noise_and_logs_its_final_metrics(demo_overrides, tmp_path):
    # Lightning tells everyone who has srun on the PATH to prepend it.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    result = run_cli([*demo_overrides, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2",
                      "+trainer.limit_val_batches=1"], env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in ("`srun` command", "LeafSpec", "litlogger"):
        assert noise not in output, output[-3000:]
    # The final metrics go through the clip_pl logger: to the console and to Hydra's train.log.
    line = re.search(r"^zero_shot/demo_colour/top1 +[0-9.]+$", result.stdout, re.M)
    assert line and line[0] in (tmp_path / "run" / "train.log").read_text()


def test_a_resumed_run_shows_its_epoch_and_length(demo_overrides, tmp_path, capsys):
    args = [*demo_overrides, f"run_dir={tmp_path}", "+trainer.limit_val_batches=0", "checkpoint.every_n_steps=1"]
    train.train(compose_train([*args, "trainer.max_steps=2"]))
    capsys.readouterr()
    train.train(compose_train([*args, "trainer.max_steps=3", "trainer.enable_progress_bar=true"]))
    bar = capsys.readouterr().out.replace("\r", "\n")
    # Lightning's own bar read "Training: 3/?" (no epoch, no total) from the first resumed batch on.
    assert re.search(r"^Epoch \d+: 100%.*\| 3/3 ", bar, re.M), bar[-2000:]
    assert not re.search(r"\b[1-9]\d*/\?", bar), bar[-2000:]


def test_callbacks_are_added_and_removed_by_override(demo_overrides, tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, Timer

    from clip_pl.training.callbacks import LastCheckpointSchedule, RunCheckpoint, TrainingSpeedMonitor
    from clip_pl.training.validation_pictures import ValidationPictures

    def kinds(*overrides):
        cfg = compose_train([*demo_overrides, f"run_dir={tmp_path}", *overrides])
        _, _, trainer = train.build(cfg, str(tmp_path))
        return {type(c) for c in trainer.callbacks}

    default = kinds()
    assert {RunCheckpoint, LastCheckpointSchedule, TrainingSpeedMonitor, LearningRateMonitor, ValidationPictures} <= default
    changed = kinds("callbacks.pictures=null", "+callbacks.timer={_target_: lightning.pytorch.callbacks.Timer}")
    assert changed == (default - {ValidationPictures}) | {Timer}
    # Lightning refuses a learning-rate monitor without a logger.
    assert LearningRateMonitor not in kinds("logger=none")
