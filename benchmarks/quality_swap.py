"""Which part of a framework makes it learn faster: the model, the tokenizer or the input stream.

``benchmarks/quality.py`` compares the frameworks whole. This trains one variant at a time on
clip_pl's own input stream of the same digit shards (built by ``quality.py --out``), with
open_clip_train's optimizer step written out here (its parameter groups, AdamW, warmup and cosine,
the logit-scale clamp), so that only the model and the tokenizer change between variants:

* ``clip_pl``: clip_pl's model and its SentencePiece tokenizer (``quality.py``'s clip_pl side);
* ``openclip``: OpenCLIP's model and its BPE tokenizer, fed clip_pl's batches (captions re-tokenized);
* ``clip_pl_bpe``: clip_pl's model with OpenCLIP's BPE tokenizer (vocabulary 49408, EOS pooling at 49407).

``--clip-norm`` adds gradient clipping; with ``PYTHONPATH`` set to another checkout, that
checkout's clip_pl model (its initialisation) trains. ``--epochs 4 --workers 1`` cuts the stream as
``quality.py``'s ``train.py`` runs do (four epochs of 125 steps, read by one DataLoader worker)
instead of one epoch read in this process; ``--stream-seed`` draws another sample order and
``--shuffle-buffer`` sets the size of clip_pl's shuffle buffer. ``--stream openclip`` reads the
same shards through open_clip_train's input pipeline instead (its resampled shards, rolling shuffle
buffer and PIL crops, normalized with the model's mean and std), so that only the input pipeline
changes between runs of one variant. Its shard draws and crops follow the DataLoader's worker seed,
which comes from torch's generator after the model is built, so from ``--seed``; its sample
shuffle is seeded from the process id and the clock, as in OpenCLIP.

It prints the training loss averaged over every 25 steps. One thread per run, so two variants run
side by side on a 2-core machine. ``--init-stats N`` trains nothing: over N initialisation seeds it
prints the mean and standard deviation of what a fresh model does with the first batch (loss, the
spread of its image and text features, the gradient norm of each tower)::

    python benchmarks/quality.py --out /tmp/quality --steps 40 --eval-every 20    # builds the shards
    python benchmarks/quality_swap.py --data /tmp/quality/data --variant clip_pl --seed 0
    python benchmarks/quality_swap.py --data /tmp/quality/data --variant openclip --init-stats 12
"""

from __future__ import annotations

import argparse
import functools
import glob
import itertools
import math
import random
import statistics
import sys
from collections.abc import Iterator

import open_clip
import torch
from quality import IMAGE_SIZE

from clip_pl.loss import ClipLoss
from clip_pl.model import create_model
from data_pipelines.datamodule import ShardDataModule
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.transforms import NormalizeImages, PreprocessConfig

WIDTH, DEPTH, HEADS, PATCH, CONTEXT, EMBED_DIM = 128, 4, 4, 4, 16, 128
VARIANTS = ("clip_pl", "openclip", "clip_pl_bpe")


def build(variant: str, tokenizer: Tokenizer):
    """The model, its preprocessing config, and ``(normalized images, clip_pl tokens) -> model output``."""
    if variant == "openclip":
        vision = {"image_size": IMAGE_SIZE, "layers": DEPTH, "width": WIDTH, "patch_size": PATCH, "head_width": 32}
        text = {"context_length": CONTEXT, "vocab_size": 49408, "width": WIDTH, "heads": HEADS, "layers": DEPTH}
        model = open_clip.CLIP(EMBED_DIM, vision, text)
        config = PreprocessConfig(IMAGE_SIZE, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, "bicubic")
    else:
        text = {"context_length": CONTEXT, "width": WIDTH, "layers": DEPTH, "heads": HEADS}
        if variant == "clip_pl_bpe":
            # OpenAI's BPE: pad 0, EOS 49407 (its highest id).
            text.update(vocab_size=49408, pad_id=0, eos_id=49407)
        else:
            text.update(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
        kwargs = {"patch_size": PATCH, "depth": DEPTH, "embed_dim": WIDTH, "num_heads": HEADS}
        image = {"name": "vit_base_patch16_clip_224", "image_size": IMAGE_SIZE, "model_kwargs": kwargs}
        model = create_model("tiny", embed_dim=EMBED_DIM, image=image, text=text)
        config = model.preprocess_config
    if variant == "clip_pl":
        return model, config, lambda x, t: model(x, t)[:3]
    bpe = open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT)
    # The captions of clip_pl's batch, re-tokenized with OpenAI's BPE.
    return model, config, lambda x, t: model(x, bpe([tokenizer.decode(r) for r in t]))[:3]


def _spread(features: torch.Tensor) -> float:
    """Mean cosine distance between different samples' features: 0 when the model tells none apart."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    return (1 - (f @ f.T)[~torch.eye(len(f), dtype=torch.bool)]).mean().item()


def openclip_stream(
    data_dir: str, tokenizer: Tokenizer, config: PreprocessConfig, steps: int, epochs: int, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (normalized images, clip_pl tokens) from open_clip_train's WebDataset pipeline."""
    from open_clip_train.data import get_wds_dataset
    from openclip_launcher import patch_tar_expander

    patch_tar_expander()
    shards = sorted(glob.glob(f"{data_dir}/train/*.tar"))
    args = argparse.Namespace(
        train_data=f"{data_dir}/train/{{00000..{len(shards) - 1:05d}}}.tar", dataset_resampled=True,
        train_num_samples=128 * steps // epochs, train_data_upsampling_factors=None, batch_size=128,
        # seed only orders shards without resampling; the resampled draws follow the worker seed.
        workers=workers, world_size=1, seed=0,
    )  # fmt: skip
    preprocess = open_clip.image_transform(
        IMAGE_SIZE, is_train=True, mean=config.mean, std=config.std, interpolation=config.interpolation
    )
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    for epoch in range(epochs):
        # open_clip_train's loop: the shared epoch seeds each epoch's shard draws.
        info.set_epoch(epoch)
        yield from info.dataloader


def clip_pl_stream(data_dir: str, tokenizer: Tokenizer, steps: int, epochs: int, workers: int, seed: int,
                   shuffle_buffer: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (uint8 images, tokens) from clip_pl's training stream, seeded ``seed``."""
    data = ShardDataModule(f"{data_dir}/train", tokenizer, batch_size=128, num_workers=workers,
                           image_size=IMAGE_SIZE, samples_per_epoch=128 * steps // epochs,
                           shuffle_buffer=shuffle_buffer, seed=seed)  # fmt: skip
    data.setup("fit")
    # Without DataLoader workers the crops draw from this process's generator: the same crops for every variant.
    random.seed(seed)
    # Each new iteration of the train loader is the stream's next epoch.
    return itertools.chain.from_iterable(data.train_dataloader() for _ in range(epochs))


def init_stats(variant: str, tokenizer: Tokenizer, batch: tuple[torch.Tensor, torch.Tensor], seeds: int) -> int:
    """Prints, over ``seeds`` fresh models, mean and std of their loss, feature spreads and gradient norms."""
    images, tokens = batch
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model, config, forward = build(variant, tokenizer)
        out = forward(NormalizeImages(config)(images).contiguous(), tokens)
        loss = ClipLoss()(*out)
        loss.backward()
        norms = {"image": 0.0, "text": 0.0}
        for name, param in model.named_parameters():
            if param.grad is not None and "logit" not in name:
                norms["image" if name.startswith(("visual", "image_tower")) else "text"] += param.grad.square().sum().item()
        rows.append((loss.item(), _spread(out[0]), _spread(out[1]), norms["image"] ** 0.5, norms["text"] ** 0.5))
    names = ("loss", "image spread", "text spread", "image grad norm", "text grad norm")
    summary = (f"{n} {statistics.mean(c):.4g} ± {statistics.stdev(c):.2g}" for n, c in zip(names, zip(*rows)))
    print(f"{variant}, {seeds} seeds: " + "; ".join(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/quality_swap.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="quality.py's data directory (OUT/data)")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--clip-norm", type=float, default=None, help="clip the gradient norm at this value")
    parser.add_argument("--schedule-steps", type=int, default=500, help="length of the cosine, as in quality.py")
    parser.add_argument("--stream-seed", type=int, default=0, help="seed of the data stream (order and crops)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs the stream's --steps are cut into")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers reading the stream")
    parser.add_argument("--stream", choices=("clip_pl", "openclip"), default="clip_pl", help="input pipeline")
    parser.add_argument("--shuffle-buffer", type=int, default=5000, help="clip_pl stream's shuffle buffer")
    parser.add_argument("--init-stats", type=int, metavar="N", help="statistics of N fresh models; no training")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(f"{args.data}/tokenizer.model", context_length=CONTEXT)
    # clip_pl's stream is the same for every variant and initialisation seed, seeded --stream-seed.
    clip_pl_batches = functools.partial(clip_pl_stream, args.data, tokenizer, args.steps, args.epochs, args.workers,
                                        args.stream_seed, args.shuffle_buffer)  # fmt: skip
    if args.init_stats:
        return init_stats(args.variant, tokenizer, next(clip_pl_batches()), args.init_stats)
    torch.manual_seed(args.seed)
    model, config, forward = build(args.variant, tokenizer)
    named = list(model.named_parameters())
    # open_clip_train's groups: no decay for gains, biases and the temperature.
    exclude = [p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n for n, p in named]
    groups = [
        {"params": [p for (_, p), e in zip(named, exclude) if e], "weight_decay": 0.0},
        {"params": [p for (_, p), e in zip(named, exclude) if not e], "weight_decay": 0.1},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    warmup, loss_fn, window = 50, ClipLoss(), []
    if args.stream == "openclip":
        # Its transform normalizes in the workers.
        batches = openclip_stream(args.data, tokenizer, config, args.steps, args.epochs, args.workers)
        normalize = torch.nn.Identity()
    else:
        batches = clip_pl_batches()
        normalize = NormalizeImages(config)
    for step, (images, tokens) in enumerate(batches):
        progress = (step - warmup) / (args.schedule_steps - warmup)
        lr = 1e-3 * ((step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(*forward(normalize(images).contiguous(), tokens))
        optimizer.zero_grad()
        loss.backward()
        if args.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        window.append(loss.item())
        if len(window) == 25:
            print(f"{args.variant} seed {args.seed} steps {step - 23}-{step + 1}: loss {sum(window) / 25:.3f}", flush=True)
            window.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
