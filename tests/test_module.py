"""The LightningModule on in-memory data: optimizer groups, schedule, checkpoint contents."""

import math
import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from clip_pl.callbacks import AtomicCheckpointIO
from clip_pl.checkpoint import atomic_torch_save, model_from_checkpoint, read_checkpoint
from clip_pl.loss import ClipLoss
from clip_pl.model import create_model
from clip_pl.module import CLIPModule, OptimizerConfig, _no_weight_decay, _rng_state, _set_rng_state
from clip_pl.tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    captions = [f"a {c} {s} at the {p}" for c in ("red", "green", "blue") for s in ("circle", "square") for p in ("top", "bottom")]
    return train_sentencepiece(captions * 5, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=60, byte_fallback=False)


def _module(tokenizer, **optim):
    model = create_model("tiny", image={"image_size": 32}, text={"vocab_size": 64})
    return CLIPModule(model, tokenizer, ClipLoss(), OptimizerConfig(**{"warmup_steps": 5, "lr": 1e-3, **optim}))


def _loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 50, (n, 32), generator=g)
    tokens[:, 12] = 3
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), tokens), batch_size=batch)


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
    )


def test_weight_decay_only_on_weight_matrices(tokenizer):
    module = _module(tokenizer)
    skip = _no_weight_decay(module.model)
    for name in ("logit_scale", "text_tower.token_embedding.weight", "text_tower.positional_embedding",
                 "image_tower.trunk.pos_embed", "image_tower.trunk.cls_token", "text_tower.ln_final.weight",
                 "text_tower.blocks.0.attn.qkv.bias", "image_tower.trunk.blocks.0.norm1.weight"):
        assert name in skip, name
    for name in ("text_tower.blocks.0.attn.qkv.weight", "image_tower.proj.weight", "image_tower.trunk.patch_embed.proj.weight"):
        assert name not in skip, name


class _LRRecorder(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_linear_warmup_then_cosine_per_step(tokenizer, tmp_path):
    module, recorder = _module(tokenizer, min_lr=1e-5), _LRRecorder()
    _trainer(tmp_path, 20, [recorder]).fit(module, _loader(n=64))
    lrs = [lr[0] for lr in recorder.lrs]
    assert len(lrs) == 20 and all(a == b for a, b in recorder.lrs)  # both groups share the schedule
    for step, lr in enumerate(lrs):
        if step < 5:
            expected = 1e-3 * step / 5
        else:
            expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (step - 5) / 15))
        assert lr == pytest.approx(expected, rel=1e-6, abs=1e-12), step
    groups = module.optimizers().optimizer.param_groups
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0


def test_training_lowers_the_loss_on_a_fixed_batch(tokenizer, tmp_path):
    torch.manual_seed(0)
    module = _module(tokenizer, warmup_steps=0, lr=1e-3, weight_decay=0.0)
    images, tokens = next(iter(_loader(n=8, batch=8)))
    with torch.no_grad():
        before = ClipLoss()(*module.model(images, tokens)).item()
    _trainer(tmp_path, 30).fit(module, DataLoader(TensorDataset(images, tokens), batch_size=8))
    with torch.no_grad():
        after = ClipLoss()(*module.model(images, tokens)).item()
    assert after < 0.5 * before


def test_checkpoint_holds_model_and_tokenizer(tokenizer, tmp_path):
    module = _module(tokenizer)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, _loader())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    model, tok = model_from_checkpoint(read_checkpoint(tmp_path / "c.ckpt"))
    images, tokens = next(iter(_loader()))
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), module.model.encode_image(images), atol=1e-6)
    assert torch.equal(tok(["a red circle"]), tokenizer(["a red circle"]))


def test_rng_state_round_trip():
    state = _rng_state()
    first = (torch.rand(3), __import__("numpy").random.rand(3).tolist(), __import__("random").random())
    _set_rng_state(state)
    again = (torch.rand(3), __import__("numpy").random.rand(3).tolist(), __import__("random").random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_atomic_save_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def crash(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_warmup_longer_than_training_is_warned_about(tokenizer, tmp_path):
    recorder = _LRRecorder()
    with pytest.warns(UserWarning, match="optim.warmup_steps"):
        _trainer(tmp_path, 5, [recorder]).fit(_module(tokenizer, warmup_steps=5), _loader())
    # What the warning is about: every step of the run trains below the peak rate of 1e-3.
    assert len(recorder.lrs) == 5 and max(lr[0] for lr in recorder.lrs) < 1e-3
