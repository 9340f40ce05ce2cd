"""module.lock_*: locked towers do not change in training, their last unlocked groups and the rest do."""

import lightning as L
import pytest
import torch
from test_train import compose_train, demo_overrides, run_cli  # noqa: F401  (demo_overrides is a fixture)

import train
from clip_pl.loss import ClipLoss
from clip_pl.model import create_model
from clip_pl.model_files.checkpoint import read_checkpoint
from clip_pl.training.module import CLIPModule


class _Modes(L.Callback):
    """Records, at every training batch, whether the named submodules are in train mode."""

    def __init__(self, names):
        self.names, self.seen = names, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        modules = dict(pl_module.model.named_modules())
        self.seen.append({name: modules[name].training for name in self.names})


def _train(overrides, run_dir, watch):
    """Trains 4 steps with a validation after step 2; returns the changed state keys, all keys, and the modes."""
    cfg = compose_train([*overrides, "trainer.max_steps=4", "optim.warmup_steps=1", "+trainer.val_check_interval=2",
                         "+trainer.limit_val_batches=1", "zero_shot=[]", "callbacks.pictures=null"])
    module, datamodule, trainer = train.build(cfg, str(run_dir))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    modes = _Modes(watch)
    trainer.callbacks.append(modes)
    trainer.fit(module, datamodule=datamodule)
    after = module.model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}, set(before), modes.seen


def test_locked_image_tower_is_fixed(demo_overrides, tmp_path):  # noqa: F811
    changed, keys, seen = _train([*demo_overrides, "module.lock_image=true"], tmp_path,
                                 ["image_tower.trunk", "text_tower"])
    # Only the trunk is fixed: the image projection, the text tower and the temperature all train.
    assert changed == {k for k in keys if not k.startswith("image_tower.trunk.")}
    assert "image_tower.proj.weight" in changed and "logit_scale" in changed
    # Batches 3 and 4 come after the validation, which must not leave the trunk in train mode.
    assert seen == [{"image_tower.trunk": False, "text_tower": True}] * 4


def test_last_groups_of_locked_image_tower_train(demo_overrides, tmp_path):  # noqa: F811
    # The tiny ViT's groups: embeddings, blocks 0..3 (the last with the final norm); two stay unlocked.
    changed, keys, seen = _train([*demo_overrides, "module.lock_image=true", "module.lock_image_unlocked_groups=2"],
                                 tmp_path, ["image_tower.trunk.blocks.1", "image_tower.trunk.blocks.2"])
    unlocked = ("image_tower.trunk.blocks.2.", "image_tower.trunk.blocks.3.", "image_tower.trunk.norm.")
    assert changed == {k for k in keys if not k.startswith("image_tower.trunk.") or k.startswith(unlocked)}
    assert any(k.startswith("image_tower.trunk.blocks.3.") for k in changed)
    assert seen == [{"image_tower.trunk.blocks.1": False, "image_tower.trunk.blocks.2": True}] * 4


def test_locked_batch_norm_keeps_its_statistics(demo_overrides, tmp_path):  # noqa: F811
    # requires_grad=False alone would still update the running mean and variance in train mode.
    changed, keys, _ = _train([*demo_overrides, "module.lock_image=true", "model.image.name=resnet10t"], tmp_path, [])
    assert "image_tower.trunk.layer1.0.bn1.running_mean" in keys
    assert changed == {k for k in keys if not k.startswith("image_tower.trunk.")}


def test_locked_text_tower_and_its_errors():
    model = create_model("tiny", image={"image_size": 32}, text={"vocab_size": 64})
    tokenizer = type("Tok", (), {"vocab_size": 64})()
    module = CLIPModule(model, tokenizer, ClipLoss(), lock_text=True, lock_text_unlocked_groups=1)
    trainable = {n for n, p in module.model.text_tower.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.text_tower.named_parameters() if n.startswith(("blocks.3.", "ln_final.", "proj."))}
    assert all(p.requires_grad for p in module.model.image_tower.parameters())
    # 4 blocks and the embeddings: 5 groups.
    with pytest.raises(ValueError, match="lock_text_unlocked_groups=6, but the tower has 5 parameter groups"):
        CLIPModule(create_model("tiny", text={"vocab_size": 64}), tokenizer, ClipLoss(), lock_text=True,
                   lock_text_unlocked_groups=6)
    with pytest.raises(ValueError, match="module.lock_image_unlocked_groups is set but module.lock_image is not"):
        CLIPModule(create_model("tiny", text={"vocab_size": 64}), tokenizer, ClipLoss(), lock_image_unlocked_groups=1)


@pytest.mark.slow
def test_ddp_trains_with_a_locked_tower(demo_overrides, tmp_path):  # noqa: F811
    overrides = [*demo_overrides, "module.lock_image=true", "module.lock_image_unlocked_groups=1",
                 "trainer.max_steps=3", "optim.warmup_steps=1", "+trainer.limit_val_batches=0"]
    result = run_cli([*overrides, f"run_dir={tmp_path / 'ddp'}", "trainer.devices=2", "trainer.strategy=ddp"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All distributed processes registered" in result.stdout + result.stderr
    trained = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")["state_dict"]
    # The same seed builds the same initial weights in this process.
    module, _, _ = train.build(compose_train(overrides), str(tmp_path / "fresh"))
    initial = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    unlocked = ("model.image_tower.trunk.blocks.3.", "model.image_tower.trunk.norm.")
    assert changed == {k for k in initial if not k.startswith("model.image_tower.trunk.") or k.startswith(unlocked)}
