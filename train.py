"""The one entry point: `python train.py [overrides]` (see README.md and conf/train.yaml).

Examples:
    python train.py                                        # demo: tiny CLIP on generated shapes, CPU
    python train.py experiment=laion400m_vit_b16 trainer.devices=8 "data.train_shards='/data/{00000..41407}.tar'"
    python train.py -m optim.lr=1e-4,3e-4 loss=clip,siglip  # local sweep, one run dir per job
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from clip_pl.callbacks import AtomicCheckpointIO, SkippedSamplesMonitor, StopOnSigterm
from clip_pl.checkpoint import shape_differences
from clip_pl.errors import USER_ERRORS, report_user_error
from clip_pl.init import init_from_pretrained
from clip_pl.slurm import RequeueOnSignal, check_task_layout, is_slurm_task, stopped_for_requeue

log = logging.getLogger("clip_pl")

# What to give for the config's mandatory values (??? in conf/) when one is missing.
MISSING_HINTS = {
    "tokenizer.path": "a SentencePiece .model; python -m data_pipelines.train_tokenizer trains one on the shards",
    "data.train_shards": "\"data.train_shards='/data/{00000..00099}.tar'\" or a directory of shards",
}


def check_nothing_missing(cfg: DictConfig) -> None:
    """Raises ValueError naming every mandatory value (``???``) the command did not set."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = "; ".join(f"{key} ({MISSING_HINTS[key]})" if key in MISSING_HINTS else key for key in missing)
        raise ValueError(f"set on the command line: {keys}")


def run_directory(cfg: DictConfig) -> str:
    """Hydra's output dir: run_dir for a single run, run_dir/<job number> for a sweep job."""
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.run_dir


def build(cfg: DictConfig, run_dir: str) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiates tokenizer, model, data, loss, module, loggers, callbacks and trainer."""
    check_nothing_missing(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.prepare_data is not None:
        instantiate(cfg.prepare_data)
    tokenizer = instantiate(cfg.tokenizer)
    text = {"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id}
    model = instantiate(cfg.model, text={**text, **cfg.model.text}, _convert_="all")
    # A resuming run takes its weights from last.ckpt, and the pretrained files may be gone by then.
    if not os.path.isfile(os.path.join(run_dir, "checkpoints", "last.ckpt")):
        init_from_pretrained(model, tokenizer, **OmegaConf.to_container(cfg.init, resolve=True))
    preprocess = model.preprocess_config
    # Built objects go in as plain arguments (_partial_), so Hydra never converts them to config nodes.
    datamodule = instantiate(cfg.data, _partial_=True)(
        tokenizer=tokenizer,
        image_size=preprocess.image_size,
        interpolation=preprocess.interpolation,
    )
    module = instantiate(cfg.module, _partial_=True, _convert_="all")(
        model=model,
        tokenizer=tokenizer,
        loss=instantiate(cfg.loss),
        zero_shot_tasks=[instantiate(task, _convert_="all") for task in cfg.zero_shot],
    )
    loggers = [instantiate(c, save_dir=run_dir) for c in (cfg.logger or {}).values()]
    callbacks = [
        ModelCheckpoint(
            dirpath=os.path.join(run_dir, "checkpoints"),
            save_last=True,
            save_top_k=0,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            # last.ckpt is always the newest, also when another writer (RequeueOnSignal) saved it
            # last; with the counter, a resumed run would write last-v1.ckpt and resume stale.
            enable_version_counter=False,
        ),
        instantiate(cfg.speed_monitor),
        SkippedSamplesMonitor(),
        StopOnSigterm(),
    ]
    if cfg.pictures is not None:
        callbacks.append(instantiate(cfg.pictures))
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_cfg = cfg.trainer
    plugins = [AtomicCheckpointIO(async_save=cfg.checkpoint.async_save)]
    on_slurm = is_slurm_task()
    if on_slurm:
        # srun started every rank; RequeueOnSignal alone reacts to SLURM's signal (Lightning's own
        # requeue handler deadlocked), saving the last.ckpt that the requeued job resumes from.
        check_task_layout(trainer_cfg.devices, trainer_cfg.num_nodes)
        callbacks.append(RequeueOnSignal(os.path.join(run_dir, "checkpoints", "last.ckpt")))
        plugins.append(SLURMEnvironment(auto_requeue=False))
    make_trainer = instantiate(trainer_cfg, _partial_=True)
    kwargs = dict(logger=loggers or False, callbacks=callbacks, plugins=plugins, default_root_dir=run_dir)
    trainer = make_trainer(**kwargs)
    if (
        HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
        and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
    ):
        # This launcher starts the other local ranks by re-running the command line: its child would
        # run the whole sweep beside this process, in step only while every job has the same devices.
        # (Under SLURM or torchrun, which start the ranks themselves, there is no launcher.)
        trainer = make_trainer(**kwargs, strategy="ddp_spawn")
        log.info("sweep job: using strategy=ddp_spawn instead of ddp")
    return module, datamodule, trainer


def check_same_model(checkpoint: str, module: L.LightningModule, run_dir: str) -> None:
    """Raises ValueError, before the run's config.yaml is overwritten, when ``checkpoint`` holds another model."""
    differences = shape_differences(checkpoint, module)
    if differences:
        name, *shapes = differences[0]
        theirs, ours = ("absent" if shape is None else list(shape) for shape in shapes)
        raise ValueError(
            f"{run_dir} holds a run of another model ({len(differences)} weights differ, e.g. {name}: "
            f"{theirs} in {checkpoint}, {ours} now). To resume it, use its config "
            f"({os.path.join(run_dir, 'config.yaml')}); for a new run, set another run_name or run_dir"
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains, resuming from ``<run dir>/checkpoints/last.ckpt`` when it exists; returns final metrics."""
    run_dir = run_directory(cfg)
    module, datamodule, trainer = build(cfg, run_dir)
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    resume = last if os.path.isfile(last) else None
    if resume:
        check_same_model(resume, module, run_dir)
        log.info("resuming from %s", resume)
    if rank_zero_only.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    finally:
        if stopped_for_requeue(trainer):
            # The job is requeued: SLURM reruns this command, which resumes. How this run ends meanwhile
            # (SLURM's SIGTERM, DataLoader workers killed by it) is no error, and the run reports no
            # result (submitit would take one as the sweep job's final result).
            sys.exit(0)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        for name in sorted(k for k in metrics if k.startswith(("val/", "zeroshot/"))):
            print(f"{name:40s} {metrics[name]:.4f}")
    return metrics


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Exception as e:
        # Mistakes in the config or the data: one line that says what to change, not a traceback.
        # Hydra wraps what a constructor raises in an InstantiationException; report the original.
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        if not isinstance(cause, USER_ERRORS) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(report_user_error(cause))


if __name__ == "__main__":
    main()
