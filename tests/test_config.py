"""The real Hydra config, composed with overrides as users write them."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import command_line
import train  # noqa: F401 (registers the ${preset:...} resolver of conf/model)

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")))


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_model_builds(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.run_name == experiment
    with torch.device("meta"):
        model = instantiate(cfg.model, text={"vocab_size": 32000, **cfg.model.text}, _convert_="all")
    assert model.config.text.context_length == cfg.tokenizer.context_length
    if experiment.startswith("laion400m"):
        # OpenCLIP's published global batches: 128 x 256 (B/32) and 176 x 192 (B/16).
        global_batch = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
        assert global_batch == {"laion400m_vit_b32": 32768, "laion400m_vit_b16": 33792}[experiment]
        assert cfg.trainer.max_steps == pytest.approx(32 * cfg.data.samples_per_epoch / global_batch, abs=1)
        assert cfg.trainer.precision == "bf16-mixed"


def test_demo_schedule_wins_over_group_defaults():
    cfg = compose_train([])
    assert (cfg.trainer.max_steps, cfg.optim.warmup_steps, cfg.optim.lr, cfg.data.batch_size) == (400, 50, 1e-3, 64)
    # data=webdataset leaves the warmup to the run's length, so the default schedule decays.
    assert compose_train(["data=webdataset"]).optim.warmup_steps is None
    # An experiment still overrides the data group's choices.
    cfg = compose_train(["experiment=cc3m_rn50"])
    assert (cfg.optim.warmup_steps, cfg.data.batch_size) == (10000, 128)


def test_siglip_loss_adds_bias_to_model():
    cfg = compose_train(["loss=siglip"])
    assert cfg.loss._target_ == "clip_pl.loss.SigLipLoss"
    assert cfg.model.init_logit_bias == -10.0


@pytest.mark.parametrize("group,options", [("model", ["tiny", "rn50", "vit_b32", "vit_b16", "vit_l14"]),
                                           ("logger", ["csv", "tensorboard", "wandb", "none"]),
                                           ("trainer", ["cpu", "gpu", "multinode"])])
def test_groups_compose(group, options):
    for option in options:
        cfg = compose_train([f"{group}={option}"])
        assert cfg[group] is not None or option == "none"


def test_user_facing_keys_exist():
    cfg = compose_train(["data=webdataset", "data.train_shards='/x/{0..1}.tar'", "trainer.devices=2", "trainer.num_nodes=3"])
    for key in ("data.train_shards", "data.val_shards", "data.caption_key", "data.image_keys", "data.batch_size",
                "data.num_workers",
                "data.samples_per_epoch", "tokenizer.path", "trainer.max_steps", "trainer.devices",
                "trainer.num_nodes", "trainer.precision", "seed", "run_dir"):
        parent, _, leaf = key.rpartition(".")
        assert leaf in (OmegaConf.select(cfg, parent) if parent else cfg).keys(), key


@pytest.mark.parametrize("devices, strategy", [(1, "SingleDeviceStrategy"), (2, "DDPStrategy")])
def test_gpu_trainer_wraps_in_ddp_only_several_devices(devices, strategy):
    # DDP around one GPU copies every gradient through its buckets and splits the compiled model
    # into a graph per bucket. The GPU config on CPU, with what only a GPU has replaced.
    cfg = compose_train(["trainer=gpu", "trainer.accelerator=cpu", f"trainer.devices={devices}",
                         "trainer.precision=32-true"])
    trainer = instantiate(cfg.trainer, logger=False)
    assert type(trainer.strategy).__name__ == strategy


@pytest.mark.parametrize("argv", [
    [],
    ["-m", "optim.lr=1e-4,3e-4", "loss=clip,siglip", "seed=range(0,3)"],
    ["+new=1", "++optim.lr=1", "++run_name=x", "~callbacks.pictures"],
    ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.job.chdir=true"],
    ["--cfg", "job", "model=vit_b16"],
    ["--help", "optim.lrr=1"],  # left to Hydra
])
def test_overrides_that_hydra_takes_pass_the_check(argv):
    command_line.check_overrides(argv, CONF, "train")


@pytest.mark.parametrize("argv, message", [
    (["foo=1"], "unknown config key foo (+foo=VALUE adds a new key)"),
    (["data=webdataset", "data.caption_keyy=txt"],
     "unknown config key data.caption_keyy; did you mean data.caption_key? (+data.caption_keyy=VALUE adds a new key)"),
    (["-m", "hydra/launcher=slurm", "hydra.launcher.partitionn=gpu"],
     "unknown config key hydra.launcher.partitionn; did you mean hydra.launcher.partition? "
     "(+hydra.launcher.partitionn=VALUE adds a new key)"),
    (["hydra/launcher=slurmm"],
     "unknown option hydra/launcher=slurmm; did you mean hydra/launcher=slurm? "
     "(options: basic, slurm, submitit_local, submitit_slurm)"),
    (["-m", "model=tiny,vit_b61"],
     "unknown option model=vit_b61; did you mean model=vit_b16? (options: openclip, rn50, tiny, vit_b16, vit_b32, "
     "vit_bigg14, vit_g14, vit_h14, vit_l14, vit_l14_336)"),
    (["optim.lr=["], "cannot parse the override 'optim.lr=[': no viable alternative at input '['"),
])
def test_mistaken_overrides_are_named_with_the_closest_key(argv, message):
    with pytest.raises(ValueError) as error:
        command_line.check_overrides(argv, CONF, "train")
    assert str(error.value) == message


MODEL_PRESETS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "model")) if f != "openclip.yaml")


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_a_model_config_names_its_preset_and_restates_nothing(preset):
    from clip_pl.model import get_model_config

    cfg = compose_train([f"model={preset}"])
    raw = OmegaConf.to_container(cfg.model, resolve=False)
    assert raw["name"] == preset
    values = [v for part in ("image", "text") for v in raw[part].values()]
    # Every listed field is null (the preset's) or reads the preset (${preset:...}).
    assert all(v is None or (isinstance(v, str) and v.startswith("${preset:")) for v in values), raw
    with torch.device("meta"):
        model = instantiate(cfg.model, text={"vocab_size": 1000, **cfg.model.text}, _convert_="all")
    assert model.config == get_model_config(preset, text={"vocab_size": 1000})
    assert cfg.tokenizer.context_length == model.config.text.context_length


def test_a_field_of_the_model_config_overrides_the_preset_and_what_reads_it():
    cfg = compose_train(["model.image.image_size=48", "model.text.context_length=20", "+model.text.layers=2"])
    assert cfg.prepare_data.image_size == 48 and cfg.demo_cache.endswith("demo_48px")
    assert cfg.tokenizer.context_length == 20
    with torch.device("meta"):
        model = instantiate(cfg.model, text={"vocab_size": 1000, **cfg.model.text}, _convert_="all")
    assert (model.config.image.image_size, model.config.text.context_length, model.config.text.layers) == (48, 20, 2)
