"""The LightningModule on in-memory data: optimizer groups, schedule, checkpoint contents."""

import copy
import csv
import math
import os
import stat
import threading
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import clip_pl.model_files.checkpoint
from clip_pl.flops import model_flops_per_sample
from clip_pl.loss import ClipLoss, SigLipLoss
from clip_pl.model import create_model
from clip_pl.model_files.checkpoint import AtomicCheckpointIO, atomic_torch_save, read_checkpoint
from clip_pl.model_files.load import read_model_file
from clip_pl.training.callbacks import TrainingSpeedMonitor
from clip_pl.training.module import CLIPModule, _rng_state, _set_rng_state, forward_in_micro_batches
from clip_pl.training.optim import OptimizerConfig, _no_weight_decay
from data_pipelines.tokenizer import train_sentencepiece


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
            expected = 1e-3 * (step + 1) / 5  # OpenCLIP's warmup: no step at rate 0
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
    file = read_model_file(tmp_path / "c.ckpt")
    model, tok = file.build(), file.tokenizer
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
    old_umask = os.umask(0o027)
    try:
        atomic_torch_save({"step": 1}, path)
    finally:
        os.umask(old_umask)
    # Readable as any new file under the umask, by the group too (a temporary file's would be 0o600).
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640

    def crash(obj, f):
        with open(f, "wb") as partial:
            partial.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_async_save_writes_the_step_it_was_given_while_training_goes_on(tmp_path, monkeypatch):
    gate, started = threading.Event(), threading.Event()

    def held_save(obj, path):  # the real write, once the test lets it go
        started.set()
        assert gate.wait(timeout=30)
        atomic_torch_save(obj, path)

    monkeypatch.setattr(clip_pl.model_files.checkpoint, "atomic_torch_save", held_save)
    io = AtomicCheckpointIO(async_save=True)
    weight = torch.ones(3)
    io.save_checkpoint({"state_dict": {"w": weight}, "global_step": 6}, tmp_path / "last.ckpt")
    assert started.wait(timeout=30)
    # save_checkpoint has returned while the file is not written yet; training changes the weights.
    assert not (tmp_path / "last.ckpt").exists()
    weight.add_(1.0)
    gate.set()
    io.teardown()
    saved = torch.load(tmp_path / "last.ckpt")
    assert torch.equal(saved["state_dict"]["w"], torch.ones(3)) and saved["global_step"] == 6
    # The next save copies into the same host buffers, after the previous write has finished.
    monkeypatch.setattr(clip_pl.model_files.checkpoint, "atomic_torch_save", atomic_torch_save)
    io.save_checkpoint({"state_dict": {"w": weight}, "global_step": 7}, tmp_path / "step7.ckpt")
    weight.add_(1.0)
    io.save_checkpoint({"state_dict": {"w": weight}, "global_step": 8}, tmp_path / "last.ckpt")
    io.wait()
    assert torch.equal(torch.load(tmp_path / "step7.ckpt")["state_dict"]["w"], torch.full((3,), 2.0))
    assert torch.equal(torch.load(tmp_path / "last.ckpt")["state_dict"]["w"], torch.full((3,), 3.0))

    def failing_save(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(clip_pl.model_files.checkpoint, "atomic_torch_save", failing_save)
    io.save_checkpoint({"global_step": 9}, tmp_path / "last.ckpt")
    with pytest.raises(OSError, match="disk full"):  # the next save (or the end of training) reports it
        io.save_checkpoint({"global_step": 10}, tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt")["global_step"] == 8


def test_a_checkpoint_with_timms_scheduler_says_how_to_go_on(tokenizer):
    old = {"lr_schedulers": [{"t_initial": 950, "warmup_t": 50, "base_values": [1e-3]}]}
    with pytest.raises(ValueError, match="init.from_checkpoint"):
        _module(tokenizer).on_load_checkpoint(old)


def test_default_warmup_is_a_share_of_the_run(tokenizer, tmp_path):
    """Unset, the warmup is 5% of max_steps: a run of any length warms up, then decays to min_lr."""
    recorder = _LRRecorder()
    _trainer(tmp_path, 40, [recorder]).fit(_module(tokenizer, warmup_steps=None), _loader(n=320))
    lrs = [lr[0] for lr in recorder.lrs]
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])  # round(0.05 * 40) = 2 warmup steps
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] < 0.01 * lrs[1]


def test_warmup_longer_than_training_is_warned_about(tokenizer, tmp_path):
    recorder = _LRRecorder()
    with pytest.warns(UserWarning, match="optim.warmup_steps"):
        _trainer(tmp_path, 5, [recorder]).fit(_module(tokenizer, warmup_steps=5), _loader())
    # What the warning is about: the rate only rises, to the peak at the last step, and never decays.
    lrs = [lr[0] for lr in recorder.lrs]
    assert lrs == sorted(lrs) and lrs == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])


# ---------------------------------------------------------------- speed options


def _batch(n=12, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 50, (n, 32), generator=g)
    tokens[:, 12] = 3
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), tokens


def _loss_and_grads(module, images, tokens):
    module.zero_grad(set_to_none=True)
    loss = module.loss(*forward_in_micro_batches(module.model, images, tokens, module.micro_batch_size))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(tokenizer, loss_name):
    overrides = {"init_logit_bias": -10.0} if loss_name == "siglip" else {}
    loss = ClipLoss() if loss_name == "clip" else SigLipLoss()
    torch.manual_seed(0)
    model = create_model("tiny", image={"image_size": 32}, text={"vocab_size": 64}, **overrides)
    whole, pieces = (CLIPModule(copy.deepcopy(model), tokenizer, loss, micro_batch_size=m) for m in (None, 5))
    images, tokens = whole.on_after_batch_transfer(_batch(), 0)
    expected_loss, expected = _loss_and_grads(whole, images, tokens)
    got_loss, got = _loss_and_grads(pieces, images, tokens)  # pieces of 5, 5 and 2
    assert got_loss == pytest.approx(expected_loss, abs=1e-6)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
    assert expected["logit_scale"].abs().item() > 1e-4


def test_micro_batches_keep_only_features_through_the_forward_pass(tokenizer):
    images, tokens = _batch(n=16)
    saved = {}
    for micro in (None, 4):
        module = _module(tokenizer)
        module.micro_batch_size = micro
        images_f, tokens_f = module.on_after_batch_transfer((images, tokens), 0)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_in_micro_batches(module.model, images_f, tokens_f, micro)
        saved[micro] = total
    # Without pieces autograd keeps every activation; with them only inputs and features.
    assert saved[4] < saved[None] / 20


def test_uint8_batches_are_normalized_on_the_device_like_the_eval_transform(tokenizer):
    module = _module(tokenizer)
    images, tokens = _batch(n=2)
    normalized, same_tokens = module.on_after_batch_transfer((images, tokens), 0)
    config = module.model.preprocess_config
    mean, std = torch.tensor(config.mean).view(3, 1, 1), torch.tensor(config.std).view(3, 1, 1)
    torch.testing.assert_close(normalized, (images.float() / 255 - mean) / std)
    assert same_tokens is tokens
    # ShardDataModule's batches are channels-last; a ViT tower still gets its usual layout.
    from_loader, _ = module.on_after_batch_transfer((images.contiguous(memory_format=torch.channels_last), tokens), 0)
    assert from_loader.is_contiguous() and torch.equal(from_loader, normalized)
    # Float batches are taken as already normalized.
    assert module.on_after_batch_transfer((normalized, tokens), 0)[0] is normalized


def test_conv_towers_run_channels_last_with_the_same_outputs(tokenizer):
    model = create_model("tiny", image={"name": "resnet18", "image_size": 32}, text={"vocab_size": 64})
    module = CLIPModule(model, tokenizer, ClipLoss())
    assert module.channels_last and not _module(tokenizer).channels_last  # auto: ResNet yes, ViT no
    images, tokens = _batch(n=2)
    model.eval()
    expected = model.encode_image(module.normalize_images(images))
    module.configure_model()
    assert model.image_tower.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images_cl, _ = module.on_after_batch_transfer((images, tokens), 0)
    assert images_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.encode_image(images_cl), expected, atol=1e-5, rtol=1e-4)


def test_compiled_training_matches_eager_and_keeps_checkpoint_names(tokenizer, tmp_path):
    # The experiment recipes set module.compile=true; inductor compiles for CPU too (about a minute here).
    runs = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = create_model("tiny", image={"image_size": 32}, text={"vocab_size": 64})
        module = CLIPModule(model, tokenizer, ClipLoss(), OptimizerConfig(warmup_steps=0, lr=1e-3), compile=compile)
        start = {k: v.clone() for k, v in module.state_dict().items()}
        _trainer(tmp_path, max_steps=4).fit(module, _loader())
        runs[compile] = start, module.state_dict()
    (start, eager), (_, compiled) = runs[False], runs[True]
    assert list(compiled) == list(eager)  # no "_orig_mod." prefixes: checkpoints load either way
    # Adam's update turns float noise in a near-zero gradient into a full step, so single weights
    # may differ by a few percent of their move; the whole update agrees far closer than that.
    moved = sum((eager[k] - start[k]).float().norm() ** 2 for k in eager).sqrt().item()
    differ = sum((compiled[k] - eager[k]).float().norm() ** 2 for k in eager).sqrt().item()
    assert moved > 0.05 and differ < moved / 1000, (moved, differ)


def test_adamw_is_fused_on_cpu(tokenizer, tmp_path):
    module = _module(tokenizer)
    module.trainer = _trainer(tmp_path, max_steps=10)
    assert module.configure_optimizers()["optimizer"].defaults["fused"]
    module = _module(tokenizer, fused=False)
    module.trainer = _trainer(tmp_path, max_steps=10)
    assert not module.configure_optimizers()["optimizer"].defaults["fused"]


class _GradNormRecorder(CLIPModule):
    """Records the gradient norm that reaches the optimizer's update, i.e. after clipping."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        optimizer, step = config["optimizer"], config["optimizer"].step
        self.norms = []

        def recording_step(closure):
            loss = closure()  # forward, backward and Lightning's gradient clipping
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            step()
            return loss

        optimizer.step = recording_step
        return config


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradient_clipping_works_with_the_fused_optimizer(tokenizer, tmp_path, precision, clip):
    # Lightning's mixed-precision plugin raises for a fused optimizer with gradient_clip_val.
    module = _GradNormRecorder(create_model("tiny", image={"image_size": 32}, text={"vocab_size": 64}), tokenizer, ClipLoss())
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, precision=precision, gradient_clip_val=clip,
    )
    trainer.fit(module, _loader())
    assert module.trainer.optimizers[0].defaults["fused"] and len(module.norms) == 3
    if clip is None:
        assert min(module.norms) > 0.05  # so clipping at 0.05 below has work to do
    else:
        assert max(module.norms) == pytest.approx(clip, rel=1e-3)


class _SlowBatches(torch.utils.data.IterableDataset):
    """Batches of 8 that each take 50 ms to produce."""

    def __iter__(self):
        for images, tokens in _loader(n=64):
            time.sleep(0.05)
            yield images, tokens


@pytest.mark.parametrize("peak_tflops", [None, 0.5])
def test_speed_monitor_logs_throughput_data_wait_and_mfu_at_logging_steps(tokenizer, tmp_path, peak_tflops):
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, logger=CSVLogger(tmp_path, name="csv"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=3,
        callbacks=[TrainingSpeedMonitor(window=2, peak_tflops=peak_tflops)],
    )
    module = _module(tokenizer)
    trainer.fit(module, DataLoader(_SlowBatches(), batch_size=None))
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")) if r["train/samples_per_sec"]]
    assert [int(r["step"]) for r in rows] == [3, 6]
    flops_per_sample = model_flops_per_sample(module.model.config)
    for r in rows:
        wait, rate = float(r["train/data_wait_ms"]), float(r["train/samples_per_sec"])
        assert wait >= 50  # each batch took 50 ms to arrive
        assert rate <= 8 / 0.05  # so no more than 8 samples per 50 ms
        assert float(r["train/samples_per_sec_per_device"]) == rate  # one device
        assert 0 < float(r["train/data_wait_fraction"]) < 1
        tflops = float(r["train/model_tflops_per_device"])
        assert tflops == pytest.approx(flops_per_sample * rate / 1e12, rel=1e-6)
        if peak_tflops is None:  # no peak is known for a CPU
            assert not r.get("train/mfu")
        else:
            assert float(r["train/mfu"]) == pytest.approx(tflops / peak_tflops, rel=1e-6)


def test_module_adds_no_buffers_for_ddp_to_broadcast(tokenizer):
    # DDP broadcasts buffers at forward; validation forwards run unevenly across ranks, so a
    # buffer of the module's own (e.g. normalization constants) would hang a DDP validation.
    module = _module(tokenizer)
    assert [n for n, _ in module.named_buffers()] == [f"model.{n}" for n, _ in module.model.named_buffers()]


def test_optimizer_settings_out_of_range_name_their_config_key():
    with pytest.raises(ValueError, match=r"^optim.lr must be >= 0, got -0.001$"):
        OptimizerConfig(lr=-1e-3)
    with pytest.raises(ValueError, match=r"^optim.betas must be two numbers in \[0, 1\), got \(0.9, 1.5\)$"):
        OptimizerConfig(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match=r"^optim.min_lr must be in \[0, optim.lr\], got 0.1$"):
        OptimizerConfig(lr=1e-3, min_lr=0.1)
