"""The built-in demo dataset: coloured shapes with captions such as "a red circle at the top left".

``prepare_demo_data(cache_dir)`` draws the images, writes train and held-out val shards with
``make_shards`` and trains a tokenizer on the train captions. It runs once: later calls (and other
ranks, which wait on a file lock) reuse the cache when it was made with the same arguments.

Cache layout (stable, so configs can point at it)::

    CACHE_DIR/train/00000.tar ...   train shards (a directory is a valid shard spec)
    CACHE_DIR/val/00000.tar ...     held-out shards; each .json has colour, colour_id, shape, shape_id, position
    CACHE_DIR/tokenizer.model       SentencePiece model trained on the train captions

Zero-shot evaluation: ``DEMO_TASKS`` lists the class names per attribute in label order, the val
samples' JSON holds the label index as ``<task>_id``, and ``zero_shot_tasks`` gives ready-made task
descriptions (prompt templates that average over the other attribute).
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from data_pipelines.make_shards import Pair, write_shards
from data_pipelines.samples import decode_image, read_samples
from data_pipelines.tokenizer import train_sentencepiece

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "black": (35, 35, 35),
}
SHAPES = ("circle", "square", "triangle", "star")
# Shape centres as a share of the image side.
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
DEMO_TASKS: dict[str, list[str]] = {"colour": list(COLOURS), "shape": list(SHAPES)}

# Caption wordings, so the text tower cannot rely on one fixed sentence.
_CAPTIONS = (
    "a {colour} {shape} at the {position}",
    "a {colour} {shape} in the {position}",
    "a photo of a {colour} {shape} at the {position}",
    "there is a {colour} {shape} at the {position}",
    "the {position} has a {colour} {shape}",
    "a {colour} {shape}",
)
_SAMPLES_PER_SHARD = 500
# Bump when drawing or captions change, so existing caches are regenerated.
_VERSION = 2


@dataclass(frozen=True)
class DemoData:
    """Where the demo data lives.

    Attributes:
        train_shards: Shard spec of the training split.
        val_shards: Shard spec of the held-out split.
        tokenizer_path: The SentencePiece model.
        tasks: Class names per zero-shot attribute, in label order.
    """

    train_shards: str
    val_shards: str
    tokenizer_path: str
    tasks: dict[str, list[str]]


def draw_sample(colour: str, shape: str, position: str, image_size: int, rng: random.Random) -> Image.Image:
    """One image: a solid shape on a light background, slightly jittered in colour, size and place."""
    background = rng.randint(225, 255)
    image = Image.new("RGB", (image_size, image_size), (background,) * 3)
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * image_size
    cy = (fy + rng.uniform(-0.04, 0.04)) * image_size
    r = rng.uniform(0.17, 0.21) * image_size
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        points = []
        for k in range(10):
            radius = r * 1.15 if k % 2 == 0 else r * 0.5
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    return image


def _pairs(count: int, image_size: int, rng: random.Random) -> list[Pair]:
    pairs = []
    for _ in range(count):
        colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
        buf = io.BytesIO()
        draw_sample(colour, shape, position, image_size, rng).save(buf, format="PNG")
        caption = rng.choice(_CAPTIONS).format(colour=colour, shape=shape, position=position)
        meta = {
            "colour": colour,
            "colour_id": DEMO_TASKS["colour"].index(colour),
            "shape": shape,
            "shape_id": DEMO_TASKS["shape"].index(shape),
            "position": position,
        }
        pairs.append(Pair(buf.getvalue(), caption, meta))
    return pairs


def prepare_demo_data(
    cache_dir: str | os.PathLike,
    num_train: int = 6000,
    num_val: int = 600,
    image_size: int = 64,
    seed: int = 0,
    vocab_size: int = 128,
) -> DemoData:
    """Generates the demo shards and tokenizer once into ``cache_dir`` and returns their paths.

    Args:
        cache_dir: Cache directory (created).
        num_train: Training images.
        num_val: Held-out images (drawn with another seed).
        image_size: Image side in pixels.
        seed: Seed of the drawing.
        vocab_size: BPE tokenizer vocabulary (the captions use about 30 words).
    """
    root = os.path.abspath(os.fspath(cache_dir))
    os.makedirs(root, exist_ok=True)
    data = DemoData(
        train_shards=os.path.join(root, "train"),
        val_shards=os.path.join(root, "val"),
        tokenizer_path=os.path.join(root, "tokenizer.model"),
        tasks=DEMO_TASKS,
    )
    params = {
        "version": _VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "vocab_size": vocab_size,
    }
    marker = os.path.join(root, "demo_done.json")
    # Ranks of a distributed run call this together: one generates, the others wait and reuse.
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(marker):
            with open(marker) as f:
                if json.load(f) == params:
                    return data
            os.remove(marker)
        for split in (data.train_shards, data.val_shards):
            shutil.rmtree(split, ignore_errors=True)
        train = _pairs(num_train, image_size, random.Random(f"demo-train/{seed}"))
        write_shards(train, data.train_shards, _SAMPLES_PER_SHARD, processes=1, progress=False)
        write_shards(
            _pairs(num_val, image_size, random.Random(f"demo-val/{seed}")),
            data.val_shards,
            _SAMPLES_PER_SHARD,
            processes=1,
            progress=False,
        )
        # BPE: on this tiny, repetitive corpus unigram stops at about 45 pieces and splits words.
        train_sentencepiece(
            (p.caption for p in train),
            data.tokenizer_path,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=False,
            num_threads=1,
        )
        with open(marker, "w") as f:
            json.dump(params, f)
    return data


def zero_shot_tasks(data: DemoData) -> list[dict]:
    """One task description per attribute: name, data, classnames, templates, label_key.

    The templates of one attribute spell out every value of the other one ("a {} circle",
    "a {} square"...), so the class embedding averages over it, in the captions' own wording.
    """
    templates = {
        "colour": [f"a {{}} {shape}" for shape in SHAPES],
        "shape": [f"a {colour} {{}}" for colour in COLOURS],
    }
    return [
        {
            "name": f"demo_{task}",
            "data": data.val_shards,
            "classnames": list(names),
            "templates": templates[task],
            "label_key": f"json:{task}_id",
        }
        for task, names in data.tasks.items()
    ]


def demo_eval_set(
    data: DemoData, task: str, transform: Callable[[Image.Image], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out images, transformed and stacked, with their label index for ``task``."""
    if task not in data.tasks:
        raise ValueError(f"unknown demo task {task!r}; choose one of {', '.join(data.tasks)}")
    images, labels = [], []

    def fail(exn: Exception) -> bool:
        raise exn

    urls = sorted(os.path.join(data.val_shards, n) for n in os.listdir(data.val_shards) if n.endswith(".tar"))
    for sample in read_samples(urls, fail):
        images.append(transform(decode_image(sample["png"])))
        labels.append(json.loads(sample["json"])[f"{task}_id"])
    return torch.stack(images), torch.tensor(labels)
