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
import warnings
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig, OmegaConf

from clip_pl.model_files.checkpoint import AtomicCheckpointIO, checkpoint_step, shape_differences
from clip_pl.model_files.openclip_models import openclip_model_config
from clip_pl.model_files.pretrained import init_from_pretrained
from clip_pl.training.callbacks import SaveOnInterrupt, StopOnSigterm, interrupted_by
from clip_pl.training.progress import ProgressBar
from clip_pl.training.run_dir import (
    config_changes,
    format_metrics,
    last_checkpoint_path,
    read_final_metrics,
    write_final_metrics,
)
from clip_pl.training.slurm import RequeueOnSignal, check_task_layout, is_slurm_task, stopped_for_requeue
from command_line import check_overrides
from data_pipelines.atomic import atomic_output, remove_stale_temporaries
from data_pipelines.errors import USER_ERRORS, report_user_error, user_error_line

log = logging.getLogger("clip_pl")


def quiet_lightning() -> None:
    """Silences three messages of Lightning's that ask nothing of the user, each matched by its text."""
    # torch deprecated the LeafSpec that Lightning 2.6 still builds for every step's outputs.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Lightning says this only where srun is installed but did not start the process, i.e. outside a
    # SLURM task; jobs go to SLURM through slurm/train.sbatch or hydra/launcher=slurm instead.
    warnings.filterwarnings(
        "ignore", message="The `srun` command is available on your system but is not used", category=PossibleUserWarning
    )
    # An advertisement at every start of a Trainer.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip: For seamless cloud logging")
    )


# At import, not in main(): the processes that ddp_spawn starts import this file but run no main().
quiet_lightning()

# What to give for the config's mandatory values (??? in conf/) when one is missing.
MISSING_HINTS = {
    "tokenizer.path": "a SentencePiece .model; python -m data_pipelines.train_tokenizer trains one on the shards",
    "data.train_shards": "\"data.train_shards='/data/{00000..00099}.tar'\" or a directory of shards",
}

RESUME_MODES = ("auto", "force")
# What a rerun in the run_dir of an existing run may change and still resume it (prefixes of dotted
# config keys): the length of the run, where and how it runs, what it logs and evaluates. Anything
# else would leave config.yaml describing weights it did not train, so it takes resume=force.
RESUME_MAY_CHANGE = (
    "resume", "run_name", "run_dir",
    "trainer.max_steps", "trainer.max_epochs", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.val_check_interval", "trainer.check_val_every_n_epoch", "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "checkpoint", "logger", "callbacks", "zero_shot", "suite",
    "data.num_workers", "data.val_shards", "data.val_samples", "module.compile",
)


def preset_field(field: str, *, _root_: DictConfig) -> Any:
    """``${preset:image.image_size}`` in conf/model: that field of the preset ``model.name`` names.

    The presets are defined once, in ``clip_pl.model.MODEL_CONFIGS``; a config that needs one of
    their values before the model is built (the demo's image size, the tokenizer's context length)
    reads it from there instead of restating it.
    """
    from clip_pl.model import get_model_config

    part, _, name = field.partition(".")
    return getattr(getattr(get_model_config(_root_.model.name), part), name)


OmegaConf.register_new_resolver("preset", preset_field, replace=True)


def check_nothing_missing(cfg: DictConfig) -> None:
    """Raises ValueError naming every mandatory value (``???``) the command did not set."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = "; ".join(f"{key} ({MISSING_HINTS[key]})" if key in MISSING_HINTS else key for key in missing)
        raise ValueError(f"set on the command line: {keys}")


def check_data_image_size(cfg: DictConfig) -> None:
    """Raises ValueError when ``prepare_data`` (the demo) would draw images at no size.

    ``model=openclip`` leaves ``model.image.image_size`` null, the pretrained model's size, which is
    known only once the model is built; the demo's images are drawn before that, at the config's size.
    """
    if cfg.prepare_data is None or cfg.prepare_data.get("image_size", 0) is not None:
        return
    if OmegaConf.select(cfg, "model.source") is None:
        raise ValueError("the demo data is drawn at model.image.image_size, which is null: set it")
    size = openclip_model_config(cfg.model.source, cfg.model.model_name)["vision_cfg"].get("image_size", 224)
    raise ValueError(
        "the demo data is drawn at model.image.image_size, which model=openclip leaves null: set "
        f"model.image.image_size={size} (the pretrained model's size)"
    )


def run_directory(cfg: DictConfig) -> str:
    """Hydra's output dir: run_dir for a single run, run_dir/<job number> for a sweep job."""
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.run_dir


def build(cfg: DictConfig, run_dir: str) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiates tokenizer, model, data, loss, module, loggers, callbacks and trainer."""
    check_nothing_missing(cfg)
    check_data_image_size(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.prepare_data is not None:
        instantiate(cfg.prepare_data)
    tokenizer = instantiate(cfg.tokenizer)
    text = {"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id}
    model = instantiate(cfg.model, text={**text, **cfg.model.text}, _convert_="all")
    last = last_checkpoint_path(run_dir)
    # A resuming run takes its weights from last.ckpt, and the pretrained files may be gone by then.
    if not os.path.exists(last):
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
        zero_shot_tasks=[instantiate(task, _convert_="all") for task in cfg.zero_shot]
        + ([instantiate(cfg.suite)] if cfg.suite.file else []),
    )
    loggers = [instantiate(c, save_dir=run_dir) for c in (cfg.logger or {}).values()]
    on_slurm = is_slurm_task()
    # conf/callbacks: the user's choice; then what depends on where the run is.
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    if not loggers:
        # Lightning refuses a LearningRateMonitor in a run without a logger.
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    # Under SLURM, RequeueOnSignal (below) saves on SLURM's warning signal and SIGTERM only stops
    # the ranks together; elsewhere SIGTERM and Ctrl-C save last.ckpt first.
    callbacks.append(StopOnSigterm() if on_slurm else SaveOnInterrupt(last))
    if cfg.trainer.get("enable_progress_bar") is not False:
        callbacks.append(ProgressBar())  # Lightning's bar, also right on a resumed run
    trainer_cfg = cfg.trainer
    plugins = [AtomicCheckpointIO(async_save=cfg.checkpoint.async_save)]
    if on_slurm:
        # srun started every rank; RequeueOnSignal alone reacts to SLURM's signal (Lightning's own
        # requeue handler deadlocked), saving the last.ckpt that the requeued job resumes from.
        check_task_layout(trainer_cfg.devices, trainer_cfg.num_nodes)
        callbacks.append(RequeueOnSignal(last))
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


def config_changes_since_saved(cfg: DictConfig, run_dir: str) -> dict[str, tuple]:
    """The settings in which ``cfg`` differs from the run's saved ``config.yaml`` beyond what a resume may change.

    Raises:
        ValueError: There are such settings and ``resume`` is not ``force``; raised before anything is
            written, so the run's ``config.yaml`` keeps describing its weights.
    """
    if cfg.resume not in RESUME_MODES:
        raise ValueError(f"resume={cfg.resume} is not one of {', '.join(RESUME_MODES)}")
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        return {}
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    changed = config_changes(saved, OmegaConf.to_container(cfg, resolve=True), RESUME_MAY_CHANGE)
    if changed and cfg.resume != "force":
        shown = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in list(changed.items())[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ValueError(
            f"{run_dir} holds a run with another config ({shown}{more}); for a new run set another run_name "
            "or run_dir, or add resume=force to resume this one with the new settings"
        )
    return changed


def save_config(cfg: DictConfig, run_dir: str, keep_previous: bool) -> None:
    """Writes the resolved config to ``run_dir/config.yaml``; ``keep_previous`` keeps the old one as config.<n>.yaml."""
    path = os.path.join(run_dir, "config.yaml")
    if keep_previous and os.path.isfile(path):
        n = 1
        while os.path.exists(os.path.join(run_dir, f"config.{n}.yaml")):
            n += 1
        os.replace(path, os.path.join(run_dir, f"config.{n}.yaml"))
        log.info("resume=force: the previous config is kept as %s", os.path.join(run_dir, f"config.{n}.yaml"))
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains, resuming from ``<run dir>/checkpoints/last.ckpt`` when it exists; returns final metrics."""
    run_dir = run_directory(cfg)
    last = last_checkpoint_path(run_dir)
    resume = last if os.path.exists(last) else None
    # A config.yaml without a last.ckpt describes no weights yet: it is replaced without a check.
    changed = config_changes_since_saved(cfg, run_dir) if resume else {}
    if resume:
        step = checkpoint_step(resume)
        if 0 < cfg.trainer.max_steps <= step:
            # Nothing to train: say so and show what the run ended with instead of a silent no-op.
            log.info(
                "%s already finished: its last.ckpt is at step %d (trainer.max_steps=%d). Raise trainer.max_steps "
                "to train on, or set another run_name for a new run", run_dir, step, cfg.trainer.max_steps,
            )
            final = read_final_metrics(run_dir)
            if final is not None and final[0] == step:
                log.info("%s", format_metrics(*final))
                return final[1]
            return {}
    module, datamodule, trainer = build(cfg, run_dir)
    if resume:
        check_same_model(resume, module, run_dir)
        log.info("resuming from %s", resume)
    if rank_zero_only.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, run_dir, keep_previous=bool(changed))
        # Left by writers killed mid-write (a checkpoint's is as large as the checkpoint).
        stale = remove_stale_temporaries(run_dir) + remove_stale_temporaries(os.path.dirname(last))
        if stale:
            log.info("removed %d temporary file(s) of interrupted writes: %s", len(stale), ", ".join(stale))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    finally:
        if stopped_for_requeue(trainer):
            # The job is requeued: SLURM reruns this command, which resumes. How this run ends meanwhile
            # (SLURM's SIGTERM, DataLoader workers killed by it) is no error, and the run reports no
            # result (submitit would take one as the sweep job's final result).
            sys.exit(0)
        signum = interrupted_by(trainer)
        if signum is not None:
            if trainer.is_global_zero:
                print(f"{signum.name}: training stopped at step {trainer.global_step}, saved in {last}; rerun the "
                      "same command to resume", file=sys.stderr)
            sys.exit(128 + signum)  # the shell's convention for a process ended by that signal
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    finished = 0 < trainer.max_steps <= trainer.global_step
    if finished and module.validated_step != trainer.global_step and has_validation(trainer, datamodule):
        # Validation runs at epoch ends; without this the reported metrics would describe older weights.
        # trainer.validate replaces the callback metrics with its own: the training ones are kept above.
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    final = {k: v for k, v in metrics.items() if k.startswith(("val/", "zero_shot/"))}
    if trainer.is_global_zero and final and module.validated_step == trainer.global_step:
        write_final_metrics(run_dir, trainer.global_step, final)
        log.info("%s", format_metrics(trainer.global_step, final))
    return metrics


def has_validation(trainer: L.Trainer, datamodule: L.LightningDataModule) -> bool:
    """Whether the run validates at all: validation data, and batches the trainer may run."""
    loaders = datamodule.val_dataloader()  # [] without validation data; a loader's len() may be unknown
    return trainer.limit_val_batches != 0 and not (isinstance(loaders, list) and not loaders)


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
        log_to_files(user_error_line(cause))
        sys.exit(report_user_error(cause))


def log_to_files(message: str) -> None:
    """Writes ``message`` to the log files of the run (Hydra's train.log), not to the console.

    For the error line, which the console gets on stderr from ``report_user_error``.
    """
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


if __name__ == "__main__":
    # Hydra would report a mistaken override in several lines with exit status 1, before main() could
    # make it one line; so the overrides are composed once before Hydra runs.
    try:
        check_overrides(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"), "train")
    except ValueError as e:
        sys.exit(report_user_error(e))
    main()
