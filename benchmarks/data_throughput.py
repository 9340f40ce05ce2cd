"""Samples/s of the training input path: clip_pl's ShardDataModule against OpenCLIP's WebDataset pipeline.

The full path is measured: tar read, JPEG decode, RandomResizedCrop to 224 px (scale 0.9-1.0,
bicubic), to tensor, normalization, caption tokenization and collation into batches, per number of
DataLoader workers. The shards are generated once into ``--cache-dir`` with clip_pl's
``write_shards``: JPEGs of 256-512 px per side (``--min-side``/``--max-side``) (smooth colour fields, shapes and sensor-like noise,
quality 90, so decoding costs what a photo of that size costs) with captions of 5-25 words.

Pipelines:

* ``clip_pl``: ``ShardDataModule(mode="resampled").train_dataloader()`` as it is, except for the
  shuffle buffer (see below); sentencepiece tokenizer trained on the captions, context 77; its
  batches are uint8 (normalization happens on the device, outside this benchmark).
* ``openclip``: OpenCLIP's training package (``open_clip_train``) is not installed and pins an old
  webdataset, so its WebDataset pipeline is rebuilt here stage by stage as its ``get_wds_dataset``
  lays it out for ``--dataset-resampled``: resampled shard URLs, tar to samples, ``shuffle(5000,
  initial=1000)`` (1000 here, see below), select samples with image and caption, ``decode("pilrgb")``, ``rename(image=
  "jpg;png;jpeg;webp", text="txt")``, ``map_dict(image=preprocess_train, text=tokenizer)``,
  ``to_tuple``, ``batched``, in a ``WebLoader``. ``preprocess_train`` and the tokenizer are
  open_clip's own (``open_clip.image_transform(224, is_train=True)``, the BPE tokenizer of
  ``open_clip.get_tokenizer("ViT-B-32")``).
* ``clip_pl:no_draft``: the same with ``draft_decode=False``.
* ``clip_pl:before``: clip_pl's decoding and transforms before the speed work, kept here for the
  comparison: PIL decode, PIL crop-resize, float conversion and normalization in the workers,
  float batches. It shares today's tar reader; the old one (webdataset's, on ``tarfile``) is timed
  in ``--stages``.

clip_pl's path today: clip_pl's tar reader (``data_pipelines.tar_reader``), ``decode_pixels``
(torchvision's JPEG decoder, or PIL draft decoding for JPEGs at least twice the needed size),
crop-resize on uint8 tensors with crop parameters drawn from Python's ``random``, uint8 batches
(normalized on the device by ``CLIPModule``).

Shuffle buffers: both shuffles hold raw (undecoded) samples, so their size does not change the work
per sample, but it changes *when* tar reading happens. clip_pl's resampled stream fills its rolling
buffer (``shuffle_buffer``, 1000-5000 in the configs) before the first sample, so a short window
early in a run may contain no tar reading at all; OpenCLIP's ``shuffle(5000, initial=1000)`` reads
two samples per sample yielded until its buffer is full (the first 4000 samples of each worker), so
a short window pays tar reading twice. Neither is the steady state of a long run, where each
sample is read once. The benchmark therefore uses ``shuffle_buffer=batch_size`` for clip_pl and
``shuffle(1000, initial=1000)`` for OpenCLIP: after the warm-up batches both read exactly one raw
sample per sample yielded.

Limits, single process, over the same JPEG bytes held in memory: ``decode-only:pil`` is
``Image.open(...).convert("RGB")``, ``decode-only`` is ``decode_pixels`` without draft (the fastest
full decode here, torchvision's), ``decode-only:draft`` is ``decode_pixels`` with the draft size
clip_pl's training crop asks for. An input path cannot beat the decode-only rate per worker; the
target is to stay within 2x of it.

Every pipeline is timed in windows that alternate between pipelines (A B C, then C B A, ...) for
each worker count; each window starts fresh loader workers, discards ``--warmup`` batches, then
times ``--batches`` batches. Compare the ratios; the absolute rates depend on the machine's load.

Commands::

    python benchmarks/data_throughput.py --workers 0 1 2 --rounds 5 --batches 15
    # larger images (448-640 px), where draft decoding applies to every image
    python benchmarks/data_throughput.py --min-side 448 --max-side 640
    # milliseconds per sample of each step (decode, crop, to tensor, normalize, tokenize, stack), one process
    python benchmarks/data_throughput.py --stages
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from data_pipelines.datamodule import ShardDataModule
from data_pipelines.make_shards import Pair, write_shards
from data_pipelines.pipeline import SampleDecoder
from data_pipelines.samples import SampleKey, decode_image, decode_pixels, image_bytes, jpeg_frame, read_samples
from data_pipelines.tokenizer import Tokenizer, train_sentencepiece
from data_pipelines.transforms import RandomResizedCrop, interpolation_mode, stack_pixels, to_rgb

PIPELINES = ("clip_pl", "openclip", "clip_pl:no_draft", "clip_pl:before")
# OpenCLIP's sample shuffle is shuffle(5000, initial=1000); see "Shuffle buffers" above.
OPENCLIP_SHUFFLE = 1000
DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "bench_shards")

_WORDS = {
    "adj": "red green blue small large old young wooden bright dark sunny rainy busy quiet happy tiny white "
    "black".split(),
    "noun": "dog cat car house tree woman man child bicycle street beach mountain river table phone bird boat "
    "flower train city kitchen".split(),
    "verb": "sitting standing running lying walking parked waiting playing resting".split(),
    "prep": "on in near under beside behind in front of next to".split(),
}


# --------------------------------------------------------------------------------------------
# Data


def _image(rng: np.random.Generator, min_side: int = 256, max_side: int = 512) -> bytes:
    """A JPEG with sides drawn from ``[min_side, max_side]``, with colour gradients, shapes and noise."""
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    # Low- and mid-frequency colour fields (bicubic upsampling of small random grids) give smooth
    # regions and edges like a photo; Gaussian noise adds the high-frequency detail JPEG must code.
    low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    mid = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    image = Image.blend(low, mid, 0.35)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _caption(rng: random.Random) -> str:
    words = ["a", rng.choice(_WORDS["adj"]), rng.choice(_WORDS["noun"]), rng.choice(_WORDS["verb"])]
    while len(words) < rng.randint(5, 25):
        words += [rng.choice(_WORDS["prep"]), "the", rng.choice(_WORDS["adj"]), rng.choice(_WORDS["noun"])]
    return " ".join(words)


@dataclass(frozen=True)
class Dataset:
    """The cached benchmark shards.

    Attributes:
        spec: Brace spec of the shards.
        urls: Shard paths.
        tokenizer_path: sentencepiece model trained on the captions.
        samples: Number of samples.
        mean_jpeg_bytes: Average encoded image size.
    """

    spec: str
    urls: list[str]
    tokenizer_path: str
    samples: int
    mean_jpeg_bytes: float


def ensure_dataset(
    cache_dir: str, samples: int, samples_per_shard: int, min_side: int = 256, max_side: int = 512, seed: int = 0
) -> Dataset:
    """Writes the shards and tokenizer into ``cache_dir`` unless the same ones are there already."""
    meta_path = os.path.join(cache_dir, "meta.json")
    want = {"samples": samples, "samples_per_shard": samples_per_shard, "sides": [min_side, max_side], "seed": seed}
    meta = None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    if meta is None or meta.get("params") != want:
        print(f"generating {samples} samples into {cache_dir} (once) ...", flush=True)
        start = time.perf_counter()
        rng, text_rng = np.random.default_rng(seed), random.Random(seed)
        pairs = [Pair(_image(rng, min_side, max_side), _caption(text_rng)) for _ in range(samples)]
        summary = write_shards(
            pairs, os.path.join(cache_dir, "shards"), samples_per_shard, overwrite=True, progress=False
        )
        train_sentencepiece(
            [p.caption for p in pairs], os.path.join(cache_dir, "tok.model"), vocab_size=2000, num_threads=1
        )
        meta = {
            "params": want,
            "spec": summary.spec,
            "shards": summary.shards,
            "mean_jpeg_bytes": sum(len(p.image) for p in pairs) / len(pairs),
        }
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    urls = [os.path.join(cache_dir, "shards", f"{i:05d}.tar") for i in range(meta["shards"])]
    return Dataset(meta["spec"], urls, os.path.join(cache_dir, "tok.model"), samples, meta["mean_jpeg_bytes"])


# --------------------------------------------------------------------------------------------
# Pipelines


@dataclasses.dataclass(frozen=True)
class _BeforeDecoder(SampleDecoder):
    """clip_pl's decoder before the speed work: PIL decode into a PIL-based float transform."""

    def __call__(self, sample: dict) -> tuple[torch.Tensor, str]:
        return self.transform(decode_image(image_bytes(sample), self.max_image_pixels)), self.caption_key.caption(sample)


def _before_transform() -> v2.Compose:
    return v2.Compose(
        [
            to_rgb,
            v2.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=interpolation_mode("bicubic")),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
        ]
    )


def clip_pl_loader(data: Dataset, variant: str, batch_size: int, workers: int, seed: int):
    """clip_pl's train loader (``no_draft``: without draft decoding; ``before``: the old decoder)."""
    tokenizer = Tokenizer.from_file(data.tokenizer_path, context_length=77)
    dm = ShardDataModule(
        data.spec,
        tokenizer,
        batch_size,
        num_workers=workers,
        mode="resampled",
        samples_per_epoch=10**9,  # an endless stream for the benchmark
        # Blocks of one batch: each batch reads its own samples inside the timed window (see above).
        shuffle_buffer=batch_size,
        seed=seed,
        image_size=224,
        pin_memory=False,
        draft_decode=variant != "clip_pl:no_draft",
    )
    if variant == "clip_pl:before":
        dm._train_decoder = _BeforeDecoder(SampleKey.parse("txt"), _before_transform())
    return dm.train_dataloader()


def _ignore(exn: Exception) -> bool:
    # OpenCLIP's log_and_continue without the logging (the benchmark data has no broken sample).
    return True


def _has_image_and_caption(sample: dict) -> bool:
    return "txt" in sample and any(k in sample for k in ("jpg", "png", "jpeg", "webp"))


class _OpenClipText:
    """``tokenizer(text)[0]``, as a picklable callable."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer(text)[0]


def openclip_loader(data: Dataset, batch_size: int, workers: int, seed: int):
    """OpenCLIP's resampled WebDataset training pipeline, rebuilt stage by stage (see above)."""
    import open_clip
    import webdataset as wds

    preprocess_train = open_clip.image_transform(224, is_train=True)
    tokenizer = _OpenClipText(open_clip.get_tokenizer("ViT-B-32"))
    pipeline = wds.DataPipeline(
        wds.ResampledShards(data.urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=_ignore),
        wds.shuffle(OPENCLIP_SHUFFLE, initial=OPENCLIP_SHUFFLE),
        wds.select(_has_image_and_caption),
        wds.decode("pilrgb", handler=_ignore),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess_train, text=tokenizer),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=workers > 0)


def make_loader(variant: str, data: Dataset, batch_size: int, workers: int, seed: int):
    if variant == "openclip":
        return openclip_loader(data, batch_size, workers, seed)
    return clip_pl_loader(data, variant, batch_size, workers, seed)


def time_window(make: Callable[[], object], warmup: int, batches: int) -> float:
    """Samples/s over ``batches`` batches of a fresh loader, after ``warmup`` batches."""
    loader = make()
    it = iter(loader)
    try:
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        n = 0
        for _ in range(batches):
            images, tokens = next(it)
            n += len(images)
        return n / (time.perf_counter() - start)
    finally:
        # Stop this window's workers before the next pipeline's window starts.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del it, loader


def jpeg_bytes(data: Dataset, limit: int) -> list[bytes]:
    out = []
    for sample in read_samples(data.urls, lambda exn: True):
        out.append(sample["jpg"])
        if len(out) >= limit:
            break
    return out


def decode_rate(images: list[bytes], kind: str, draft_size: int) -> float:
    """Single-process images/s of one decoder (see "Limits" above)."""
    start = time.perf_counter()
    for data in images:
        if kind == "decode-only:pil":
            Image.open(io.BytesIO(data)).convert("RGB")
        else:
            decode_pixels(data, min_size=draft_size if kind == "decode-only:draft" else None)
    return len(images) / (time.perf_counter() - start)


DECODERS = ("decode-only", "decode-only:pil", "decode-only:draft")


def _webdataset_samples(urls: list[str]) -> list[dict]:
    """The raw samples as webdataset's own tar reader (Python's ``tarfile``) yields them."""
    import webdataset as wds

    return list(wds.tarfile_to_samples(handler=lambda exn: False)({"url": u} for u in urls))


def _strided_resized_crop(crop: RandomResizedCrop, pixels: torch.Tensor) -> torch.Tensor:
    """``crop`` as it ran at 4699114: resized without first copying the crop into one HWC block."""
    top, left, h, w = crop.params(*pixels.shape[-2:])
    return F.resized_crop(pixels, top, left, h, w, [crop.size, crop.size], crop.interpolation, antialias=True)


def stage_costs(data: Dataset, images: list[bytes], batch_size: int, rounds: int, draft_size: int) -> dict[str, float]:
    """Median milliseconds per sample of each step of clip_pl's path, and of the path before, in this process."""
    tokenizer = Tokenizer.from_file(data.tokenizer_path, context_length=77)
    captions = [_caption(random.Random(i)) for i in range(len(images))]
    crop = RandomResizedCrop(224, (0.9, 1.0), interpolation_mode("bicubic"))
    torchvision_crop = v2.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=interpolation_mode("bicubic"))
    before = _before_transform().transforms
    import open_clip

    openclip_image = open_clip.image_transform(224, is_train=True)
    openclip_text = _OpenClipText(open_clip.get_tokenizer("ViT-B-32"))
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable, items: list, per: int | None = None) -> list:
        start = time.perf_counter()
        out = [fn(x) for x in items]
        times.setdefault(name, []).append(1000 * (time.perf_counter() - start) / (per or len(images)))
        return out

    batches = [slice(i, i + batch_size) for i in range(0, len(images), batch_size)]
    for _ in range(rounds):
        timed(
            "now: tar read + group (clip_pl's reader)",
            lambda u: list(read_samples([u], lambda e: False)),
            data.urls,
            data.samples,
        )
        timed(
            "before: tar read + group (webdataset, tarfile)",
            lambda u: _webdataset_samples([u]),
            data.urls,
            data.samples,
        )
        timed("now: JPEG size from the frame header", jpeg_frame, images)
        timed("before: JPEG size from PIL.Image.open", lambda b: Image.open(io.BytesIO(b)).size, images)
        pixels = timed("now: decode_pixels", decode_pixels, images)
        timed(f"now: decode_pixels, draft to >= {draft_size}", lambda b: decode_pixels(b, min_size=draft_size), images)
        timed("now: crop parameters (Python random)", lambda p: crop.params(*p.shape[-2:]), pixels)
        timed("before: crop parameters (torchvision, torch RNG)", lambda p: torchvision_crop.make_params([p]), pixels)
        crops = timed("now: RandomResizedCrop 224 bicubic (uint8 tensor)", crop, pixels)
        timed("at 4699114: the same on the strided crop", lambda p: _strided_resized_crop(crop, p), pixels)
        timed("now: stack_pixels uint8 batch (channels-last)", lambda s: stack_pixels(crops[s]), batches)
        timed("at 4699114: torch.stack uint8 batch (CHW)", lambda s: torch.stack(crops[s]), batches)
        timed("tokenize (per batch)", lambda s: tokenizer(captions[s]), batches)
        decoded = timed("before: decode_image (PIL)", decode_image, images)
        pil_crops = timed("before: RandomResizedCrop 224 bicubic (PIL)", before[1], decoded)
        tensors = timed("before: PILToTensor", before[2], pil_crops)
        floats = timed("before: ToDtype float32", before[3], tensors)
        normed = timed("before: Normalize", before[4], floats)
        timed("before: torch.stack float batch", lambda s: torch.stack(normed[s]), batches)
        # OpenCLIP's counterparts, for comparison.
        timed("open_clip preprocess_train (all 4 steps)", openclip_image, decoded)
        timed("open_clip tokenizer (per sample)", openclip_text, captions)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache-dir", default=DEFAULT_CACHE, help=f"shards are generated here once (default: {DEFAULT_CACHE})"
    )
    parser.add_argument("--samples", type=int, default=2000, help="samples to generate")
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--min-side", type=int, default=256, help="smallest generated image side")
    parser.add_argument("--max-side", type=int, default=512, help="largest generated image side")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per window")
    parser.add_argument("--warmup", type=int, help="batches discarded per window (default: 1 + 2 x workers)")
    parser.add_argument("--rounds", type=int, default=3, help="windows per pipeline and worker count")
    parser.add_argument(
        "--draft-size", type=int, default=273, help="min_size of decode-only:draft (273: what the 224 px crop asks for)"
    )
    parser.add_argument("--decode-images", type=int, default=300, help="images in each decode-only window")
    parser.add_argument("--stages", action="store_true", help="only time each step of clip_pl's path in one process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    # Batches are built in the workers (or here with 0 workers); one thread each, as DataLoader workers get.
    torch.set_num_threads(1)
    cache_dir = args.cache_dir
    if (args.min_side, args.max_side) != (256, 512):
        cache_dir = f"{cache_dir}_{args.min_side}-{args.max_side}"
    data = ensure_dataset(cache_dir, args.samples, args.samples_per_shard, args.min_side, args.max_side)
    images = jpeg_bytes(data, args.decode_images)
    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    drafted = sum(min(w // args.draft_size, h // args.draft_size) >= 2 for w, h in sizes) / len(sizes)
    print(
        f"{data.samples} samples ({args.min_side}-{args.max_side} px) in {len(data.urls)} shards, mean JPEG "
        f"{data.mean_jpeg_bytes / 1024:.0f} KiB; draft decoding to >= {args.draft_size} px applies to "
        f"{100 * drafted:.0f}% of them; batch {args.batch_size}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    if args.stages:
        costs = stage_costs(data, images, args.batch_size, args.rounds, args.draft_size)
        print("milliseconds per sample, one process, median of", args.rounds, "rounds:")
        for name, ms in costs.items():
            print(f"  {name:50s} {ms:7.2f}")
        return 0

    # Each round times every pipeline once, then the decode-only limits, the order reversed every other round.
    rates: dict[tuple[str, int], list[float]] = {}
    decode: dict[str, list[float]] = {k: [] for k in DECODERS}
    for workers in args.workers:
        warmup = args.warmup if args.warmup is not None else 1 + 2 * workers
        for r in range(args.rounds):
            order = args.pipelines if r % 2 == 0 else list(reversed(args.pipelines))
            for variant in order:
                rate = time_window(
                    lambda: make_loader(variant, data, args.batch_size, workers, args.seed + r),
                    warmup,
                    args.batches,
                )
                rates.setdefault((variant, workers), []).append(rate)
                print(f"  workers={workers} round={r} {variant:14s} {rate:7.1f} samples/s", flush=True)
            for kind in DECODERS if r % 2 == 0 else reversed(DECODERS):
                decode[kind].append(decode_rate(images, kind, args.draft_size))
    decode_median = {k: statistics.median(v) for k, v in decode.items()}

    reference = "openclip" if "openclip" in args.pipelines else args.pipelines[0]
    print(
        f"\nload average now {os.getloadavg()[0]:.2f}; decode-only (1 process): "
        + ", ".join(f"{k} {v:.1f} img/s" for k, v in decode_median.items())
    )
    print(
        f"{'pipeline':16s} {'workers':>7s} {'samples/s':>10s} {'per worker':>10s} {'min':>7s} {'max':>7s} "
        f"{'vs ' + reference:>12s} {'vs decode-only':>15s}"
    )
    results = []
    for variant in args.pipelines:
        for workers in args.workers:
            values = rates[(variant, workers)]
            ref = rates[(reference, workers)]
            ratio = statistics.median(a / b for a, b in zip(values, ref))
            rate = statistics.median(values)
            per_worker = rate / max(1, workers)
            vs_decode = per_worker / decode_median["decode-only"]
            print(
                f"{variant:16s} {workers:7d} {rate:10.1f} {per_worker:10.1f} {min(values):7.1f} {max(values):7.1f} "
                f"{ratio:12.3f} {vs_decode:15.2f}"
            )
            results.append(
                {
                    "pipeline": variant,
                    "workers": workers,
                    "samples_per_s": rate,
                    "rates": values,
                    "ratio": ratio,
                    "per_worker_vs_decode_only": vs_decode,
                }
            )
    print(
        "per worker = samples/s / max(1, workers); vs decode-only = per worker / single-process decode-only rate "
        "(the machine has only",
        os.cpu_count(),
        "cores, so 2 workers cannot double the rate)",
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "decode_only": decode, "drafted_fraction": drafted, "results": results},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
