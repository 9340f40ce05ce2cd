"""Model quality of clip_pl against OpenCLIP at equal samples seen, same architecture, same data.

Both frameworks train the same small CLIP (a 32 px ViT with patch 4 and a 4-layer text transformer,
width 128) on the same real image-caption shards, built here from scikit-learn's handwritten digits
(``sklearn.datasets.load_digits``: 1797 8x8 scans, 16 grey levels, shipped with the package). Each
image is a scan upsampled to 24 px, placed at a random offset in a 32 px canvas and tinted with one
of six colours on a noisy grey background; its caption is "a {colour} handwritten {digit}". Colour
is the easy attribute (one glance at the pixels); the digit needs the spatial structure. The first
1500 scans make the training shards, the other 297 the held-out validation shards.

clip_pl trains with ``python train.py`` and its own defaults (only model, data, schedule length and
the hyperparameters below are set); OpenCLIP with ``open_clip_train.main`` and its defaults
(``benchmarks/openclip_launcher.py``), on a model config written here. Both get: batch 128, fp32,
AdamW lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.1, 50 warmup steps then cosine to 0,
resampled shards, one DataLoader worker, the same ``--seeds``. clip_pl uses a SentencePiece
tokenizer trained on the training captions; OpenCLIP its own BPE (vocabulary 49408). A clip_pl run
is reproducible from its seed; an OpenCLIP run is not quite: its sample shuffle buffer is seeded
from the process id and the clock.

Both are evaluated by the same code, ``clip_pl.evaluation.zero_shot``, every ``--eval-every`` steps:
zero-shot top-1 on the held-out images for the digit (10 classes, chance 10%) and the colour
(6 classes, chance 16.7%), with prompts that never equal a training caption ("a handwritten {}",
"a {} handwritten"), and image-text retrieval recall on the validation pairs. clip_pl computes them
in its own validation (read from its ``metrics.csv``); OpenCLIP's epoch checkpoints are evaluated
here through an adapter, the validation pairs read by clip_pl's validation pipeline.

Retrieval caveat: the 600 validation captions are only 60 distinct sentences, and equal scores
rank by index, so even a model that gets colour and digit right cannot place an image's own
caption before identical ones. The "ceiling" row gives the recall of such a perfect class-level
model; retrieval numbers only mean something relative to it.

    python benchmarks/quality.py --out /tmp/quality                      # 500 steps, seed 0, both
    python benchmarks/quality.py --out /tmp/quality --seeds 0 1 2
    python benchmarks/quality.py --out /tmp/quality --frameworks clip_pl --label clip1 \\
        --clip-pl-override trainer.gradient_clip_val=1.0                 # an ablation, clip_pl only
    python benchmarks/quality.py --out /tmp/quality --steps 40 --eval-every 20   # smoke test

Writes, under ``--out``: ``data/`` (shards and tokenizer, reused by later runs with the same
data options), ``runs/<label or openclip>/seed<S>/`` (each training run and its log) and
``results-<rows>.json`` / ``.md`` (every number, and the table that is also printed; ``<rows>`` names
the frameworks run, e.g. ``results-clip_pl-openclip``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

try:
    import open_clip
    from sklearn.datasets import load_digits
except ImportError as e:
    sys.exit(f'error: {e.name} is missing; this benchmark needs scikit-learn and OpenCLIP: pip install -e ".[dev]"')

from clip_pl.evaluation.metrics import retrieval_recall
from clip_pl.evaluation.zero_shot import ZeroShotTask, run_retrieval
from data_pipelines.datamodule import ShardDataModule
from data_pipelines.make_shards import Pair, write_shards
from data_pipelines.samples import read_samples
from data_pipelines.shards import parse_shard_spec
from data_pipelines.transforms import NormalizeImages, PreprocessConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (235, 210, 30),
    "purple": (145, 55, 190),
    "orange": (245, 135, 25),
}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION = "a {colour} handwritten {digit}"
# Scans before this index train, the rest are held out (1797 in all).
NUM_TRAIN_SCANS = 1500
IMAGE_SIZE, DIGIT_SIZE = 32, 24
SAMPLES_PER_SHARD = 1000
TOKENIZER_VOCAB = 128
# Bump when drawing or captions change, so that cached data is rebuilt.
DATA_VERSION = 1

# Prompts leave out the other attribute, so none of them is a training caption.
TASKS = (
    {"name": "digit", "classnames": list(DIGITS), "templates": ["a handwritten {}", "handwritten {}"]},
    {"name": "colour", "classnames": list(COLOURS), "templates": ["a {} handwritten", "{} handwritten"]},
)
# Table column -> clip_pl's logged metric name (OpenCLIP's are computed under the same names).
METRICS = {
    "digit top-1": "zero_shot/digit/top1",
    "colour top-1": "zero_shot/colour/top1",
    "image→text R@1": "val/image_to_text_R@1",
    "image→text R@5": "val/image_to_text_R@5",
    "text→image R@1": "val/text_to_image_R@1",
}
OPENCLIP_MODEL = "quality-vit-p4"


class UserError(Exception):
    """A mistake the user can fix; reported as one line."""


# --------------------------------------------------------------------------------------------
# Data


def _draw(scan: np.ndarray, colour: str, rng: np.random.Generator) -> bytes:
    """One JPEG: the scan as a tinted digit at a random offset on a noisy grey background."""
    ink = Image.fromarray((scan / 16).astype(np.float32), mode="F").resize((DIGIT_SIZE, DIGIT_SIZE), Image.BILINEAR)
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    top, left = rng.integers(0, IMAGE_SIZE - DIGIT_SIZE + 1, size=2)
    alpha[top : top + DIGIT_SIZE, left : left + DIGIT_SIZE, 0] = np.clip(np.asarray(ink), 0, 1)
    # A random grey with a faint cast, plus per-pixel noise: the background carries no label.
    grey = rng.uniform(70, 190) + rng.uniform(-12, 12, size=3)
    background = grey + rng.normal(0, 18, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    tint = np.asarray(COLOURS[colour]) + rng.uniform(-15, 15, size=3)
    pixels = np.clip(background * (1 - alpha) + tint * alpha, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    # 4:4:4: at 32 px, JPEG's default 4:2:0 would halve the resolution of the digit's colour.
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _pairs(images: np.ndarray, labels: np.ndarray, scans: range, count: int, rng: np.random.Generator) -> list[Pair]:
    """``count`` samples drawn from ``scans`` with random colour, place and noise, in random order."""
    pairs = []
    for scan in rng.choice(scans, size=count):
        colour_id, digit_id = int(rng.integers(len(COLOURS))), int(labels[scan])
        colour = list(COLOURS)[colour_id]
        caption = CAPTION.format(colour=colour, digit=DIGITS[digit_id])
        meta = {"colour_id": colour_id, "digit_id": digit_id, "scan": int(scan)}
        pairs.append(Pair(_draw(images[scan], colour, rng), caption, meta))
    return pairs


def prepare_data(root: str, seed: int, num_train: int, num_val: int) -> dict[str, str]:
    """Builds the digit shards and the clip_pl tokenizer under ``root``, or reuses them if built alike.

    Returns:
        Paths: ``train`` and ``val`` shard directories, ``tokenizer`` (SentencePiece model) and
        ``train_spec`` (brace pattern of the training shards, as OpenCLIP wants them).
    """
    paths = {name: os.path.join(root, name) for name in ("train", "val", "tokenizer.model")}
    params = {"version": DATA_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val}
    marker = os.path.join(root, "params.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            cached = json.load(f) == params
    else:
        cached = False
    if not cached:
        print(f"building the digit shards in {root}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        digits = load_digits()
        rng = np.random.default_rng(seed)
        train = _pairs(digits.images, digits.target, range(NUM_TRAIN_SCANS), num_train, rng)
        val = _pairs(digits.images, digits.target, range(NUM_TRAIN_SCANS, len(digits.images)), num_val, rng)
        write_shards(train, paths["train"], SAMPLES_PER_SHARD, processes=1, progress=False)
        write_shards(val, paths["val"], SAMPLES_PER_SHARD, processes=1, progress=False)
        command = [sys.executable, "-m", "data_pipelines.train_tokenizer", "--shards", paths["train"]]
        command += ["--output", paths["tokenizer.model"], "--vocab-size", str(TOKENIZER_VOCAB)]
        # BPE without byte fallback: the captions are 18 words of plain ASCII (as in the built-in demo).
        command += ["--model-type", "bpe", "--no-byte-fallback"]
        _run(command, os.path.join(root, "tokenizer.log"), "tokenizer")
        with open(marker, "w") as f:
            json.dump(params, f)
    shards = sorted(glob.glob(os.path.join(paths["train"], "*.tar")))
    return {
        "train": paths["train"],
        "val": paths["val"],
        "tokenizer": paths["tokenizer.model"],
        "train_spec": os.path.join(paths["train"], f"{{00000..{len(shards) - 1:05d}}}.tar"),
    }


# --------------------------------------------------------------------------------------------
# Training runs


def zero_shot_tasks(val: str) -> list[dict]:
    """``ZeroShotTask`` arguments of the digit and colour tasks on the held-out shards."""
    return [{**task, "data": val, "label_key": f"json:{task['name']}_id"} for task in TASKS]


def _hydra_value(value: object) -> str:
    """A value in Hydra's override grammar; strings quoted where Hydra would misread them ("json:digit_id")."""
    if isinstance(value, str):
        if re.fullmatch(r"[A-Za-z/_][\w./-]*", value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _run(command: list[str], log_path: str, what: str, cwd: str = REPO) -> float:
    """Runs ``command`` in ``cwd``, output to ``log_path``; returns its wall seconds."""
    # Nothing may reach the network: wandb stays offline, Hugging Face Hub is never asked.
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    print(f"{what}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n\n")
        log.flush()
        result = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise UserError(f"{what} failed (exit {result.returncode}); see {log_path}")
    return time.perf_counter() - start


def _fresh(directory: str) -> str:
    # A leftover run would be resumed (clip_pl) or refused (OpenCLIP): every run starts anew.
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    return directory


def run_clip_pl(args: argparse.Namespace, data: dict[str, str], seed: int) -> dict:
    """Trains with ``python train.py``; returns its metrics per evaluation point from metrics.csv."""
    run_dir = _fresh(os.path.join(args.out, "runs", args.label, f"seed{seed}"))
    tasks = [{"_target_": "clip_pl.evaluation.zero_shot.ZeroShotTask", **task} for task in zero_shot_tasks(data["val"])]
    overrides = {
        "data": "webdataset",
        "data.train_shards": _hydra_value(data["train"]),
        "data.val_shards": _hydra_value(data["val"]),
        "tokenizer.path": _hydra_value(data["tokenizer"]),
        "model": "tiny",
        "model.image.name": "vit_base_patch16_clip_224",
        # ++ sets a key whether or not the model preset's YAML already has it.
        "++model.image.model_kwargs": _hydra_value(
            {"patch_size": args.patch_size, "depth": args.depth, "embed_dim": args.width, "num_heads": args.heads}
        ),
        "model.image.image_size": IMAGE_SIZE,
        "++model.embed_dim": args.embed_dim,
        "model.text.context_length": args.context_length,
        "++model.text.width": args.width,
        "++model.text.layers": args.text_layers,
        "++model.text.heads": args.heads,
        "data.batch_size": args.batch_size,
        "data.num_workers": 1,
        # One epoch per evaluation point: validation (retrieval and zero-shot) runs at each epoch's end.
        "data.samples_per_epoch": args.eval_every * args.batch_size,
        "trainer.max_steps": args.steps,
        "trainer.precision": "32-true",
        "optim.lr": args.lr,
        "optim.betas": _hydra_value([0.9, 0.98]),
        "optim.eps": 1e-6,
        "optim.weight_decay": args.weight_decay,
        "optim.warmup_steps": args.warmup,
        "optim.min_lr": 0.0,
        "seed": seed,
        "run_dir": _hydra_value(run_dir),
        "logger": "csv",
        "callbacks.pictures": "null",
        "zero_shot": _hydra_value(tasks),
    }
    command = [sys.executable, "train.py", *(f"{k}={v}" for k, v in overrides.items()), *args.clip_pl_override]
    seconds = _run(command, os.path.join(run_dir, "train.log"), f"clip_pl seed {seed}", cwd=args.repo)
    metrics_files = glob.glob(os.path.join(run_dir, "csv", "version_*", "metrics.csv"))
    if len(metrics_files) != 1:
        raise UserError(f"expected one csv/version_*/metrics.csv in {run_dir}; the clip_pl runs need logger=csv")
    with open(metrics_files[0], newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get(METRICS["digit top-1"])]
    points = {}
    for row in rows:
        # Validation closes an epoch: epoch e ends after (e + 1) * eval_every steps.
        samples = (int(row["epoch"]) + 1) * args.eval_every * args.batch_size
        points[samples] = {name: float(row[name]) for name in METRICS.values()}
    return {"command": shlex.join(command), "train_seconds": seconds, "points": points}


def openclip_model_config(args: argparse.Namespace) -> dict:
    """OpenCLIP's config of the same model: its own ViT (pre-LayerNorm, class token) and text transformer."""
    return {
        "embed_dim": args.embed_dim,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": args.depth,
            "width": args.width,
            "patch_size": args.patch_size,
            "head_width": args.width // args.heads,
        },
        "text_cfg": {
            "context_length": args.context_length,
            "vocab_size": 49408,  # its BPE tokenizer's
            "width": args.width,
            "heads": args.heads,
            "layers": args.text_layers,
        },
    }


def run_openclip(args: argparse.Namespace, data: dict[str, str], seed: int, config_path: str) -> dict:
    """Trains with ``open_clip_train.main``, one checkpoint per epoch, each evaluated by ``evaluate_openclip``."""
    logs = os.path.join(args.out, "runs", "openclip")
    run_dir = _fresh(os.path.join(logs, f"seed{seed}"))
    argv = [
        "--model", OPENCLIP_MODEL,
        "--dataset-type", "webdataset",
        "--dataset-resampled",
        "--train-data", data["train_spec"],
        # One epoch per evaluation point, as for clip_pl; the cosine spans all epochs.
        "--train-num-samples", str(args.eval_every * args.batch_size),
        "--epochs", str(args.steps // args.eval_every),
        "--batch-size", str(args.batch_size),
        "--lr", str(args.lr),
        "--wd", str(args.weight_decay),
        "--warmup", str(args.warmup),
        "--beta1", "0.9",
        "--beta2", "0.98",
        "--eps", "1e-6",
        "--precision", "fp32",
        "--workers", "1",
        "--device", "cpu",
        "--seed", str(seed),
        "--save-frequency", "1",
        "--logs", logs,
        "--name", os.path.basename(run_dir),
    ]  # fmt: skip
    command = [sys.executable, os.path.join("benchmarks", "openclip_launcher.py"), config_path, *argv]
    seconds = _run(command, os.path.join(run_dir, "train.log"), f"OpenCLIP seed {seed}")
    model = open_clip.create_model(OPENCLIP_MODEL, pretrained=None)
    points = {}
    for epoch in range(1, args.steps // args.eval_every + 1):
        state = torch.load(os.path.join(run_dir, "checkpoints", f"epoch_{epoch}.pt"), weights_only=True)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["state_dict"].items()})
        points[epoch * args.eval_every * args.batch_size] = evaluate_openclip(model, data, args.batch_size)
    return {"command": shlex.join(command), "train_seconds": seconds, "points": points}


# --------------------------------------------------------------------------------------------
# OpenCLIP evaluated by clip_pl.evaluation.zero_shot


class OpenCLIPForEvaluation(nn.Module):
    """An OpenCLIP model with what ``clip_pl.evaluation.zero_shot`` asks of a clip_pl ``CLIP``.

    Args:
        model: The OpenCLIP CLIP model.
        embed_dim: Its embedding width.
    """

    def __init__(self, model: nn.Module, embed_dim: int):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(embed_dim=embed_dim)
        # What OpenCLIP's own evaluation transform uses (its defaults: OpenAI's mean and std, bicubic).
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.preprocess_config = PreprocessConfig(size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


@torch.no_grad()
def evaluate_openclip(openclip_model: nn.Module, data: dict[str, str], batch_size: int) -> dict[str, float]:
    """Zero-shot and retrieval metrics of an OpenCLIP model, under clip_pl's metric names."""
    model = OpenCLIPForEvaluation(openclip_model, openclip_model.text_projection.shape[1]).eval()
    tokenizer = open_clip.get_tokenizer(OPENCLIP_MODEL)
    metrics = {}
    for task in zero_shot_tasks(data["val"]):
        results = ZeroShotTask(**task).evaluate(model, tokenizer)
        metrics.update({f"zero_shot/{task['name']}/{k}": v for k, v in results.items()})
    # clip_pl's validation pipeline (same order, same resize and crop), then OpenCLIP's mean and std.
    # Only its val loader is used; of the train shards it asks for, only the first sample is read (a check).
    pc = model.preprocess_config
    shards = ShardDataModule(
        data["val"], tokenizer, batch_size, val_shards=data["val"], num_workers=0,
        image_size=pc.image_size, interpolation=pc.interpolation,
    )  # fmt: skip
    normalize = NormalizeImages(pc)
    pairs = ((normalize(images), tokens) for images, tokens in shards.val_dataloader())
    metrics.update({f"val/{k}": v for k, v in run_retrieval(model, pairs).items()})
    return metrics


def retrieval_ceiling(val: str) -> dict[str, float]:
    """Recall of a model that tells every colour and digit apart but no two scans of one class.

    Its image and caption embeddings are one-hot codes of the caption, so scores tie within a class,
    and ``retrieval_recall`` breaks the ties by index, as it does for identical real captions.
    """

    def fail(exn: Exception) -> bool:
        raise exn

    urls = [url for source in parse_shard_spec(val) for url in source.urls]
    metas = [json.loads(s["json"]) for s in read_samples(urls, fail, lambda name: name.endswith(".json"))]
    classes = torch.tensor([m["colour_id"] * len(DIGITS) + m["digit_id"] for m in metas])
    codes = F.one_hot(classes, len(COLOURS) * len(DIGITS)).float()
    return {f"val/{k}": v for k, v in retrieval_recall(codes, codes).items()}


# --------------------------------------------------------------------------------------------
# Results


def _cell(values: Sequence[float]) -> str:
    """Percent, mean ± standard deviation over seeds when there are several."""
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def markdown_table(runs: dict[str, dict[int, dict]], ceiling: dict[str, float], batch_size: int) -> str:
    """One row per (samples seen, framework): each metric in percent over the seeds."""
    lines = [
        "| samples seen | steps | framework | " + " | ".join(METRICS) + " |",
        "| ---: | ---: | --- |" + " ---: |" * len(METRICS),
    ]
    points = sorted({samples for by_seed in runs.values() for run in by_seed.values() for samples in run["points"]})
    for samples in points:
        for framework, by_seed in runs.items():
            found = [run["points"][samples] for run in by_seed.values() if samples in run["points"]]
            if found:
                cells = [_cell([point[metric] for point in found]) for metric in METRICS.values()]
                lines.append(f"| {samples:,} | {samples // batch_size} | {framework} | " + " | ".join(cells) + " |")
    cells = ["–", "–", *(_cell([ceiling[metric]]) for metric in list(METRICS.values())[2:])]
    lines.append("| | | ceiling: every colour and digit right | " + " | ".join(cells) + " |")
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    lines.append("")
    lines.append(f"Seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds where several.")
    for framework, by_seed in runs.items():
        seconds = statistics.fmean(run["train_seconds"] for run in by_seed.values())
        steps = max(int(samples) for run in by_seed.values() for samples in run["points"]) // batch_size
        lines.append(
            f"{framework}: {seconds:.0f} s per training run ({seconds / steps:.2f} s per step, start-up included"
            + (", and its validations)" if framework != "OpenCLIP" else "; evaluated afterwards)")
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/quality.py",
        description="Model quality of clip_pl against OpenCLIP on captioned handwritten digits.",
    )
    parser.add_argument("--out", required=True, help="directory for the data, the runs and the results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (both frameworks)")
    parser.add_argument("--frameworks", nargs="+", choices=("clip_pl", "openclip"), default=["clip_pl", "openclip"])
    parser.add_argument("--label", default="clip_pl", help="name of the clip_pl rows (and their run directory)")
    parser.add_argument(
        "--clip-pl-override", action="append", default=[], metavar="KEY=VALUE",
        help="extra train.py override for an ablation (repeatable), e.g. trainer.gradient_clip_val=1.0",
    )  # fmt: skip
    parser.add_argument(
        "--repo",
        default=REPO,
        help="the clip_pl checkout whose train.py runs (another commit, for a before/after; its config keys and "
        "module paths must be this checkout's)",
    )
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--eval-every", type=int, default=125, help="steps between evaluations (divides --steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps before the cosine")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks")
    parser.add_argument("--width", type=int, default=128, help="width of both towers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of both towers")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=12_000, help="training samples in the shards")
    parser.add_argument("--num-val", type=int, default=600, help="held-out samples")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the drawn samples")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.eval_every <= 0 or args.steps % args.eval_every:
        parser.error(f"--eval-every ({args.eval_every}) must divide --steps ({args.steps})")
    if args.label == "openclip" or os.sep in args.label:
        parser.error(f"--label {args.label!r} must be a plain name other than 'openclip'")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = os.path.abspath(args.out)
    command_line = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    print(command_line, flush=True)
    runs: dict[str, dict[int, dict]] = {}
    try:
        data = prepare_data(os.path.join(args.out, "data"), args.data_seed, args.num_train, args.num_val)
        if "openclip" in args.frameworks:
            config_path = os.path.join(args.out, "openclip_config", f"{OPENCLIP_MODEL}.json")
            os.makedirs(os.path.dirname(config_path), exist_ok=True)
            with open(config_path, "w") as f:
                json.dump(openclip_model_config(args), f, indent=1)
            open_clip.add_model_config(config_path)  # for the evaluation in this process
        for seed in args.seeds:
            if "clip_pl" in args.frameworks:
                runs.setdefault(args.label, {})[seed] = run_clip_pl(args, data, seed)
            if "openclip" in args.frameworks:
                runs.setdefault("OpenCLIP", {})[seed] = run_openclip(args, data, seed, config_path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ceiling = retrieval_ceiling(data["val"])
    table = markdown_table(runs, ceiling, args.batch_size)
    stem = os.path.join(args.out, "results-" + "-".join(name.lower() for name in runs))
    with open(stem + ".json", "w") as f:
        json.dump({"command": command_line, "args": vars(args), "ceiling": ceiling, "runs": runs}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"`{command_line}`\n\n{table}\n")
    print(f"\n{command_line}\n\n{table}\n\n(written to {stem}.md and .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
