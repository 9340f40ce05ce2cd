"""Training-step throughput of clip_pl against OpenCLIP on the same model config, interleaved.

Both frameworks train on the same synthetic batch, with the same AdamW hyperparameters (clip_pl's
``OptimizerConfig`` defaults: lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on matrices
only), each with its own contrastive loss (clip_pl's ``ClipLoss``, OpenCLIP's ``ClipLoss`` as its
trainer builds it) and each with its own no-decay rule. The OpenCLIP model is built by
``open_clip.create_model`` from a model config registered under ``clip_pl-<model>`` that mirrors the
clip_pl config: its own ``VisionTransformer`` for timm ViT trunks (same width, depth, heads, patch,
image size, pre-norm), its timm tower (``timm_model_name``, average pool, linear projection) for
other timm trunks such as ``resnet50``, and its text transformer with the same width, layers,
heads, context length and vocabulary.

Variants (``--variants``) run in one process and are timed in alternating windows (A B C, then
C B A, ...), so a load change on a shared machine hits all of them alike; compare the ratios, not
the absolute numbers. A variant is ``FRAMEWORK[:OPT+OPT...]`` with FRAMEWORK ``clip_pl`` or
``openclip`` and options:

The ``clip_pl`` variant runs clip_pl's own training path, as ``CLIPModule`` does under a Trainer:
uint8 host batch copied to the device and normalized there (``CLIPModule.on_after_batch_transfer``),
channels-last for conv towers, ``forward_in_micro_batches``, ``build_optimizer`` (fused AdamW).
``openclip`` gets a float batch normalized on the host, as its data pipeline delivers.

* ``fused`` / ``foreach`` / ``loop``: AdamW implementation instead of the default (clip_pl: fused;
  OpenCLIP: torch's default, foreach on CUDA, the per-tensor loop on CPU).
* ``compile``: ``model.compile()`` in place (``CLIPModule(compile=True)`` for clip_pl).
* ``autotune`` / ``cudagraphs``: with ``compile``, inductor's ``max-autotune-no-cudagraphs`` mode
  (matrix products and fused kernels tuned per shape) or ``reduce-overhead`` mode (the compiled
  graphs replayed as CUDA graphs), through ``model.compile(mode=...)`` on both frameworks.
* ``channels_last``: model and images in channels-last memory format (OpenCLIP; clip_pl does it by
  itself for conv towers).
* ``patch_dropout``: drop ``--patch-dropout`` of the image patches in training (FLIP), both frameworks.
* ``grad_checkpointing``: both towers recompute each block's activations in backward (clip_pl's
  ``model.{image,text}.grad_checkpointing``, OpenCLIP's ``set_grad_checkpointing``).
* ``micro_batch``: the batch in pieces of ``--micro-batch-size``, the memory of a smaller batch with
  the loss of the whole one. clip_pl encodes the pieces with activation checkpointing
  (``CLIPModule(micro_batch_size=...)``): one forward without saving, then in backward each piece
  is recomputed. OpenCLIP runs its trainer's ``--accum-freq`` step (``train_one_epoch`` in
  ``open_clip_train``, rebuilt here, each piece standing for one of its accumulated batches): a
  forward of every piece without gradients caches the features, then each piece runs forward
  again and back-propagates the whole batch's loss with its own features in place of the cached
  ones (one loss and one backward per piece).

Each step copies the host batch to the device (pinned memory on CUDA), then zero_grad, forward
and loss under autocast (``--precision bf16``), backward, optimizer step, as both trainers do.
Reported per variant: samples/s (median over windows), the ratio to the first OpenCLIP variant
(median of the per-round ratios), a phase breakdown from separately timed steps with a device sync
between phases, memory and MFU.

Memory: on CUDA the peak of ``max_memory_allocated`` in the variant's windows, minus what was
allocated before them (weights and optimizer state of every variant, which stay resident);
on CPU only the process's RSS high-water mark exists, for all variants together. On every device
the bytes autograd saves for backward in one step (activations, counted exactly with
``saved_tensors_hooks``) are given per framework.

MFU = FLOPs per sample (one step's forward, loss and backward as run, counted by
``torch.utils.flop_counter``: attention included, causal masking not discounted, flash attention's
backward counted as the kernel runs it, with its recomputed scores) x samples/s / peak. The peak is
``clip_pl.flops.dense_peak_flops`` for the GPU at bf16 (989.5 TFLOP/s on an H100 SXM); on CPU
none is assumed and MFU is printed only with ``--peak-tflops``. Training logs ``train/mfu`` from
model FLOPs (``clip_pl.flops.model_flops_per_sample``: no recomputation, no loss), 0.6% fewer
than this count for ViT-B/16.

Commands::

    python benchmarks/train_throughput.py --model tiny --batch-size 32 --device cpu
    python benchmarks/train_throughput.py --model tiny --batch-size 32 \\
        --variants clip_pl openclip clip_pl:fused clip_pl:compile openclip:compile
    python benchmarks/train_throughput.py --model vit_b16 --batch-size 256 --precision bf16 --device cuda \\
        --variants clip_pl openclip clip_pl:foreach clip_pl:compile openclip:compile
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from clip_pl.flops import dense_peak_flops, flop_counter
from clip_pl.loss import ClipLoss
from clip_pl.model import CLIP, create_model, list_models
from clip_pl.training.module import CLIPModule, forward_in_micro_batches
from clip_pl.training.optim import OptimizerConfig, build_optimizer

FRAMEWORKS = ("clip_pl", "openclip")
OPTIONS = (
    "fused",
    "foreach",
    "loop",
    "compile",
    "autotune",
    "cudagraphs",
    "channels_last",
    "patch_dropout",
    "micro_batch",
    "grad_checkpointing",
)
COMPILE_MODES = {"autotune": "max-autotune-no-cudagraphs", "cudagraphs": "reduce-overhead"}
# Options that change the model itself, so its FLOPs and saved activations are counted separately.
MODEL_OPTIONS = ("patch_dropout", "grad_checkpointing")

# Token ids of the synthetic captions (clip_pl's tokenizer layout: pad 0, bos 2, eos 3).
PAD_ID, BOS_ID, EOS_ID = 0, 2, 3


# --------------------------------------------------------------------------------------------
# Models


def _timm_vit_geometry(trunk: nn.Module) -> dict | None:
    """The OpenCLIP ``vision_cfg`` of a timm VisionTransformer trunk, or None for other trunks."""
    if not (hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed") and hasattr(trunk, "cls_token")):
        return None
    width = trunk.embed_dim
    block = trunk.blocks[0]
    patch = trunk.patch_embed.patch_size
    image = trunk.patch_embed.img_size
    act = type(block.mlp.act).__name__.lower()
    return {
        "image_size": image[0] if isinstance(image, (tuple, list)) else image,
        "layers": len(trunk.blocks),
        "width": width,
        "head_width": width // block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / width,
        "patch_size": patch[0] if isinstance(patch, (tuple, list)) else patch,
        # timm's CLIP ViTs have a LayerNorm before the blocks (OpenCLIP's ln_pre); plain ViTs do not.
        "no_ln_pre": isinstance(trunk.norm_pre, nn.Identity),
        "pool_type": "tok" if trunk.global_pool == "token" else "avg",
        "quick_gelu": "quick" in act,
    }


def openclip_config(model: CLIP) -> tuple[dict, bool]:
    """(OpenCLIP model config dict, quick_gelu) equivalent to a clip_pl model."""
    config = model.config
    vision = _timm_vit_geometry(model.image_tower.trunk)
    if vision is None:
        vision = {
            "timm_model_name": config.image.name,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": config.image.image_size,
        }
        quick_gelu = False
    else:
        quick_gelu = vision.pop("quick_gelu")
    t = config.text
    text = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_ratio,
    }
    return {"embed_dim": config.embed_dim, "vision_cfg": vision, "text_cfg": text}, quick_gelu


def create_openclip(model: CLIP, patch_dropout: float = 0.0) -> nn.Module:
    """An OpenCLIP model with random weights built through ``open_clip.create_model``."""
    import logging

    import open_clip
    from open_clip import factory

    cfg, quick_gelu = openclip_config(model)
    if patch_dropout:
        cfg["vision_cfg"]["patch_dropout"] = patch_dropout
    name = f"clip_pl-bench-{id(model)}-{patch_dropout}"
    factory._MODEL_CONFIGS[name] = cfg
    # open_clip logs a warning that no pretrained weights were loaded, which is the intent here.
    logging.getLogger().setLevel(logging.ERROR)
    return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def openclip_param_groups(model: nn.Module) -> list[dict]:
    """OpenCLIP's trainer rule: no decay for gains, biases, norms and the temperature."""

    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if not exclude(n, p)], "weight_decay": OptimizerConfig().weight_decay},
        {"params": [p for n, p in params if exclude(n, p)], "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------------------------
# Runners


@dataclass
class Batch:
    """The synthetic batch on the host (pinned on CUDA): uint8 pixels and their normalized floats."""

    images: torch.Tensor
    images_u8: torch.Tensor
    tokens: torch.Tensor


def make_batch(batch_size: int, image_size: int, context_length: int, vocab_size: int, pin: bool) -> Batch:
    g = torch.Generator().manual_seed(0)
    images_u8 = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    images = (images_u8.float() / 255 - mean) / std
    tokens = torch.full((batch_size, context_length), PAD_ID, dtype=torch.long)
    for row in range(batch_size):
        # Caption lengths spread over the context, as with real captions.
        length = int(torch.randint(3, context_length - 1, (1,), generator=g))
        tokens[row, 0] = BOS_ID
        tokens[row, 1 : length + 1] = torch.randint(4, vocab_size, (length,), generator=g)
        tokens[row, length + 1] = EOS_ID
    if pin:
        images, images_u8, tokens = images.pin_memory(), images_u8.pin_memory(), tokens.pin_memory()
    return Batch(images, images_u8, tokens)


@dataclass
class Runner:
    """One variant: a model copy, its loss, optimizer and step options."""

    name: str
    framework: str
    options: frozenset[str]
    model: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    module: CLIPModule | None
    device: torch.device
    autocast: bool
    micro_batch_size: int | None = None  # OpenCLIP's accum-freq pieces (clip_pl's are the module's)
    rates: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(
        default_factory=lambda: {"data": [], "forward": [], "backward": [], "optimizer": []}
    )
    peak_bytes: list[int] = field(default_factory=list)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch.tokens.to(self.device, non_blocking=True)
        if self.module is not None:
            images = batch.images_u8.to(self.device, non_blocking=True)
            return self.module.on_after_batch_transfer((images, tokens), 0)
        images = batch.images.to(self.device, non_blocking=True)
        if "channels_last" in self.options:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, tokens

    def autocast_context(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def forward_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | _AccumFreqLoss:
        if self.module is None and self.micro_batch_size:
            return _AccumFreqLoss(self, images, tokens)
        with self.autocast_context():
            if self.module is not None:
                m = self.module
                return m.loss(*forward_in_micro_batches(m.model, images, tokens, m.micro_batch_size))
            image_features, text_features, logit_scale = self.model(images, tokens)
            return self.loss(image_features, text_features, logit_scale)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if self.framework == "openclip":
            # OpenCLIP's trainer clamps the temperature after each step; clip_pl clamps in forward.
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100))

    def step(self, batch: Batch) -> None:
        images, tokens = self.inputs(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_loss(images, tokens).backward()
        self.optimizer_step()

    def timed_step(self, batch: Batch, sync: Callable[[], None]) -> None:
        """One step with a sync between phases, adding each phase's seconds to ``phases``."""
        sync()
        t0 = time.perf_counter()
        images, tokens = self.inputs(batch)
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        t1 = time.perf_counter()
        loss = self.forward_loss(images, tokens)
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        self.optimizer_step()
        sync()
        t4 = time.perf_counter()
        for key, seconds in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.phases[key].append(seconds)


class _AccumFreqLoss:
    """OpenCLIP's ``--accum-freq`` step on the pieces of one batch, after its gradient-free forward.

    Construction is the first pass: every piece's features, without gradients. ``backward`` is the
    second: per piece, a forward with gradients, the loss of the whole batch with this piece's
    features in place of its cached ones, and a backward.
    """

    def __init__(self, runner: Runner, images: torch.Tensor, tokens: torch.Tensor):
        self.runner = runner
        self.pieces = list(zip(images.split(runner.micro_batch_size), tokens.split(runner.micro_batch_size)))
        with torch.no_grad(), runner.autocast_context():
            cached = [runner.model(i, t)[:2] for i, t in self.pieces]
        self.image_features, self.text_features = [c[0] for c in cached], [c[1] for c in cached]

    def backward(self) -> None:
        model, loss_fn = self.runner.model, self.runner.loss
        for j, (images, tokens) in enumerate(self.pieces):
            with self.runner.autocast_context():
                image_j, text_j, logit_scale = model(images, tokens)
                image_features = torch.cat([*self.image_features[:j], image_j, *self.image_features[j + 1 :]])
                text_features = torch.cat([*self.text_features[:j], text_j, *self.text_features[j + 1 :]])
                loss = loss_fn(image_features, text_features, logit_scale)
            loss.backward()


def flops_key(runner: Runner) -> str:
    model_options = [o for o in MODEL_OPTIONS if o in runner.options]
    return runner.framework + (":" + "+".join(model_options) if model_options else "")


def parse_variant(text: str) -> tuple[str, frozenset[str]]:
    framework, _, opts = text.partition(":")
    if framework not in FRAMEWORKS:
        raise ValueError(f"variant {text!r}: framework must be one of {FRAMEWORKS}")
    options = frozenset(o for o in opts.split("+") if o)
    unknown = options - set(OPTIONS)
    if unknown:
        raise ValueError(f"variant {text!r}: unknown options {sorted(unknown)}; choose from {OPTIONS}")
    if len(options & {"fused", "foreach", "loop"}) > 1:
        raise ValueError(f"variant {text!r}: choose one of fused, foreach, loop")
    if options & set(COMPILE_MODES) and not ("compile" in options and len(options & set(COMPILE_MODES)) == 1):
        raise ValueError(f"variant {text!r}: autotune or cudagraphs (one of them) needs compile")
    return framework, options


class _Vocabulary:
    """Stands in for the tokenizer, which ``CLIPModule`` only checks and stores in checkpoints."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def variant_model(framework: str, options: frozenset[str], base: dict[str, nn.Module], patch_dropout: float):
    """A copy of the framework's base model, rebuilt with the variant's model options."""
    if "patch_dropout" not in options:
        model = copy.deepcopy(base[framework])
    elif framework == "clip_pl":
        config = copy.deepcopy(base["clip_pl"].config)
        config.image.patch_dropout = patch_dropout
        model = CLIP(config)
    else:
        model = create_openclip(base["clip_pl"], patch_dropout)
    if "patch_dropout" in options:
        model.load_state_dict(base[framework].state_dict())
    if "grad_checkpointing" in options:
        if framework == "clip_pl":
            model.image_tower.trunk.set_grad_checkpointing(True)
            model.config.image.grad_checkpointing = model.config.text.grad_checkpointing = True
        else:
            model.set_grad_checkpointing(True)
    return model


def build_runner(
    text: str, base: dict[str, nn.Module], device: torch.device, autocast: bool, args: argparse.Namespace
) -> Runner:
    framework, options = parse_variant(text)
    model = variant_model(framework, options, base, args.patch_dropout).to(device).train()
    compile_mode = next((COMPILE_MODES[o] for o in options if o in COMPILE_MODES), None)
    module = None
    if framework == "clip_pl":
        module = CLIPModule(
            model,
            _Vocabulary(model.config.text.vocab_size),
            ClipLoss(),
            compile="compile" in options and compile_mode is None,
            channels_last=True if "channels_last" in options else None,
            micro_batch_size=args.micro_batch_size if "micro_batch" in options else None,
        ).to(device)
        module.configure_model()  # channels-last and compile, as under the Trainer
        if compile_mode:
            model.compile(mode=compile_mode)  # what CLIPModule's compile does, with the mode
        optimizer = build_optimizer(
            model, OptimizerConfig(fused="fused" in options or not options & {"foreach", "loop"})
        )
        loss: nn.Module = module.loss
    else:
        if "channels_last" in options:
            model = model.to(memory_format=torch.channels_last)
        groups = openclip_param_groups(model)
        o = OptimizerConfig()
        optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=("fused" in options) or None
        )
        import open_clip

        # As open_clip_train's create_loss builds it for one process.
        loss = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
        if "compile" in options:
            model.compile(mode=compile_mode)
    for group in optimizer.param_groups:
        if options & {"foreach", "loop"}:
            group["foreach"] = "foreach" in options
    runner = Runner(text, framework, options, model, loss, optimizer, module, device, autocast)
    if framework == "openclip" and "micro_batch" in options:
        runner.micro_batch_size = args.micro_batch_size
    return runner


# --------------------------------------------------------------------------------------------
# Measurements


def _op_kind(op_name: str) -> str:
    """Matrix products, convolutions, attention or other, for an aten op's name."""
    if "attention" in op_name:
        return "attention"
    if "convolution" in op_name:
        return "conv"
    if op_name.split(".")[-1].split("_")[0] in ("mm", "addmm", "bmm", "baddbmm", "matmul"):
        return "matmul"
    return "other"


def flops_per_sample(runner: Runner, batch: Batch) -> tuple[float, dict[str, float]]:
    """FLOPs of one forward + loss + backward per sample (eager model, attention included), in total
    and by kind of op (``_op_kind``)."""
    images, tokens = runner.inputs(batch)
    counter = flop_counter()
    with counter:
        runner.forward_loss(images, tokens).backward()
    runner.optimizer.zero_grad(set_to_none=True)
    by_kind: dict[str, float] = {}
    for op, flops in counter.get_flop_counts()["Global"].items():
        kind = _op_kind(str(op))
        by_kind[kind] = by_kind.get(kind, 0.0) + flops / images.shape[0]
    return counter.get_total_flops() / images.shape[0], by_kind


def saved_activation_bytes(runner: Runner, batch: Batch) -> int:
    """Bytes autograd keeps for backward in one step, parameters excluded, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in runner.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    images, tokens = runner.inputs(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = runner.forward_loss(images, tokens)
    loss.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def run_window(runner: Runner, batch: Batch, steps: int, sync: Callable[[], None], cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step(batch)
    sync()
    seconds = time.perf_counter() - start
    runner.rates.append(steps * batch.tokens.shape[0] / seconds)
    if cuda:
        runner.peak_bytes.append(torch.cuda.max_memory_allocated() - base)
    # Gradients are freed so that the next variant's window starts from the same resident memory.
    runner.optimizer.zero_grad(set_to_none=True)


def interleaved(runners: list[Runner], rounds: int, fn: Callable[[Runner], None]) -> None:
    """Calls ``fn`` on every runner per round, the order reversed every other round."""
    for r in range(rounds):
        for runner in runners if r % 2 == 0 else reversed(runners):
            fn(runner)


# Device kernels by kind, the first matching pattern deciding (cuDNN's attention kernels also say
# "fprop", its convolutions also say "gemm"; "conv" alone would catch dtype "convert" kernels):
# cuBLAS's nvjet/xmma/cutlass GEMMs and inductor's matmul templates (triton_tem), inductor's fused
# pointwise and reduction kernels (triton_poi/red/per).
KERNEL_KINDS = (
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("conv", ("fprop", "dgrad", "wgrad", "convolution", "convolve")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem", "cublas")),
    ("optimizer", ("adam", "multi_tensor")),
    ("inductor fused", ("triton_",)),
    ("copy", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, patterns in KERNEL_KINDS if any(p in lowered for p in patterns)), "other")


def profile_steps(
    runner: Runner,
    batch: Batch,
    steps: int,
    sync: Callable[[], None],
    flops_by_kind: dict[str, float],
    peak_tflops: float | None,
) -> None:
    """Prints the ops that took the most device time (CPU time on CPU) over ``steps`` steps and, on
    CUDA, the kernel time per step by kind with the rate each kind reached on its counted FLOPs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            runner.step(batch)
        sync()
        wall_ms = 1000 * (time.perf_counter() - start) / steps
    runner.optimizer.zero_grad(set_to_none=True)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile of {runner.name}, {steps} steps, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    if not cuda or not peak_tflops:
        return
    ms: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kind = kernel_kind(event.name)
            ms[kind] = ms.get(kind, 0.0) + event.time_range.elapsed_us() / 1000 / steps
    total = sum(ms.values())
    samples = batch.tokens.shape[0]
    print(f"{runner.name}: device time by kind, ms per step (wall {wall_ms:.1f} ms per step under the profiler)")
    for kind, t in sorted(ms.items(), key=lambda kv: -kv[1]):
        flops = flops_by_kind.get(kind)
        rate = f"{flops * samples / (t / 1000) / 1e12:7.0f} TFLOP/s" if flops and kind != "other" else ""
        print(f"  {kind:16s} {t:8.1f} {100 * t / total:6.1f}%  {rate}")
    busy = sum(ms.get(k, 0.0) for k in ("matmul", "conv", "attention"))
    counted = sum(flops_by_kind.values()) * samples
    ceiling = (
        f"{100 * counted / (busy / 1000) / (peak_tflops * 1e12):.1f}% of {peak_tflops:g} TFLOP/s" if busy else "n/a"
    )
    print(f"  {'all kernels':16s} {total:8.1f}; MFU if only the matmul, conv and attention kernels ran: {ceiling}")


def _fmt_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):8.1f}" if values else f"{'n/a':>8s}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=list_models(), help="clip_pl model config (default: tiny)")
    parser.add_argument("--image-size", type=int, help="override the config's image size (conv trunks on CPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast to bfloat16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--variants", nargs="+", default=["clip_pl", "openclip"], help="FRAMEWORK[:OPT+OPT] (see above)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per variant first (compilation happens here)"
    )
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=5, help="timed windows per variant, interleaved")
    parser.add_argument("--breakdown-steps", type=int, default=3, help="phase-timed steps per variant per round")
    parser.add_argument(
        "--peak-tflops", type=float, help="device peak for MFU (default: clip_pl.flops.dense_peak_flops)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--patch-dropout", type=float, default=0.5, help="fraction of patches the patch_dropout option drops"
    )
    parser.add_argument("--micro-batch-size", type=int, default=64, help="piece size of the micro_batch option")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timing, profile N steps of each variant and print its top kernels",
    )
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as exn:
            parser.error(str(exn))
    if not any(v.startswith("openclip") for v in args.variants):
        warnings.warn("no openclip variant: ratios are relative to the first variant", stacklevel=1)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    known_peak = dense_peak_flops(device, "bf16-mixed" if args.precision == "bf16" else "32-true")
    peak_tflops = args.peak_tflops or (known_peak / 1e12 if known_peak else None)

    overrides = {"image": {"image_size": args.image_size}} if args.image_size else {}
    torch.manual_seed(args.seed)
    base = {"clip_pl": create_model(args.model, **overrides)}
    torch.manual_seed(args.seed)
    base["openclip"] = create_openclip(base["clip_pl"])
    counts = {k: n_params(m) for k, m in base.items()}
    diff = abs(counts["clip_pl"] - counts["openclip"]) / counts["openclip"]
    config = base["clip_pl"].config
    batch = make_batch(
        args.batch_size, config.image.image_size, config.text.context_length, config.text.vocab_size, cuda
    )

    print(
        f"model {args.model} (image {config.image.name} @ {config.image.image_size}px, "
        f"text {config.text.layers}x{config.text.width}), "
        f"batch {args.batch_size}, {args.precision}, device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"parameters: clip_pl {counts['clip_pl']:,}  openclip {counts['openclip']:,}  (differ by {100 * diff:.2f}%)")
    if diff > 0.03:
        print("WARNING: parameter counts differ by more than 3%: the configs are not equivalent", file=sys.stderr)

    autocast = args.precision == "bf16"
    runners = [build_runner(v, base, device, autocast, args) for v in args.variants]

    # FLOPs and saved activations per framework, on eager models (compilation changes neither the math
    # nor, much, what must be kept; the hooks do not see inside compiled graphs).
    # Patch dropout and checkpointing change the model's FLOPs or saved activations: counted separately.
    per_framework: dict[str, dict] = {}
    for r in runners:
        key = flops_key(r)
        if key in per_framework:
            continue
        probe = build_runner(key, base, device, autocast, args)
        flops, flops_by_kind = flops_per_sample(probe, batch)
        per_framework[key] = {
            "flops_per_sample": flops,
            "flops_per_sample_by_kind": flops_by_kind,
            "saved_bytes": saved_activation_bytes(probe, batch),
        }
        del probe

    for runner in runners:
        for _ in range(args.warmup):
            runner.step(batch)
        runner.optimizer.zero_grad(set_to_none=True)
    sync()

    interleaved(runners, args.rounds, lambda r: run_window(r, batch, args.steps, sync, cuda))
    if args.breakdown_steps:

        def breakdown(r: Runner) -> None:
            for _ in range(args.breakdown_steps):
                r.timed_step(batch, sync)
            r.optimizer.zero_grad(set_to_none=True)

        interleaved(runners, args.rounds, breakdown)

    reference = next((r for r in runners if r.framework == "openclip"), runners[0])
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\n{args.rounds} interleaved windows of {args.steps} steps per variant; breakdown from "
        f"{args.rounds * args.breakdown_steps} synced steps; ratio = median of per-round ratios to {reference.name}"
    )
    header = (
        f"{'variant':28s} {'samples/s':>10s} {'min':>8s} {'max':>8s} {'ratio':>6s} "
        f"{'data ms':>8s} {'fwd ms':>8s} {'bwd ms':>8s} {'optim ms':>8s} {'peak MiB':>9s} {'MFU':>6s}"
    )
    print(header)
    results = []
    for r in runners:
        ratio = statistics.median(a / b for a, b in zip(r.rates, reference.rates))
        rate = statistics.median(r.rates)
        flops = per_framework[flops_key(r)]["flops_per_sample"]
        mfu = flops * rate / (peak_tflops * 1e12) if peak_tflops else None
        peak = statistics.median(r.peak_bytes) / 2**20 if r.peak_bytes else None
        print(
            f"{r.name:28s} {rate:10.1f} {min(r.rates):8.1f} {max(r.rates):8.1f} {ratio:6.3f} "
            f"{_fmt_ms(r.phases['data'])} {_fmt_ms(r.phases['forward'])} {_fmt_ms(r.phases['backward'])} "
            f"{_fmt_ms(r.phases['optimizer'])} {(f'{peak:9.0f}' if peak is not None else '      n/a')} "
            f"{(f'{100 * mfu:5.1f}%' if mfu is not None else '   n/a')}"
        )
        results.append(
            {
                "variant": r.name,
                "samples_per_s": rate,
                "rates": r.rates,
                "ratio": ratio,
                "phases_ms": {k: 1000 * statistics.median(v) for k, v in r.phases.items() if v},
                "peak_mib": peak,
                "mfu": mfu,
            }
        )
    print()
    for framework, info in per_framework.items():
        print(
            f"{framework:22s} FLOPs/sample (fwd+bwd) {info['flops_per_sample'] / 1e9:8.3f} GFLOP   "
            f"autograd-saved activations {info['saved_bytes'] / 2**20:8.1f} MiB per step"
        )
    if cuda:
        print("peak MiB = max_memory_allocated during the variant's windows minus the memory resident before them")
    else:
        print(f"peak memory: n/a per variant on CPU; process RSS high-water mark {rss_mib:.0f} MiB (all variants)")
    if peak_tflops is None:
        print("MFU: not meaningful on CPU without a peak; pass --peak-tflops to compute it")
    else:
        print(f"MFU relative to {peak_tflops:g} TFLOP/s")
    if args.profile:
        for runner in runners:
            flops_by_kind = per_framework[flops_key(runner)]["flops_per_sample_by_kind"]
            profile_steps(runner, batch, args.profile, sync, flops_by_kind, peak_tflops)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "params": counts,
                    "per_framework": per_framework,
                    "results": results,
                    "rss_mib": rss_mib,
                    "torch": torch.__version__,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
