"""Tiny datasets written in clip_benchmark's WebDataset layout, as its ``clip_benchmark_export_wds`` writes them.

Images come in the three formats the layout allows, at sizes other than the models' input, so that
resizing and cropping are part of what the tests compare.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

CLASSNAMES = ["apple", "dog", "city at night", "blue car", "pizza", "cat"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "itap of a {c}."]
CAPTIONS = ["a photo of a red apple", "a green granny smith apple on a table", "an ipod with white earphones",
            "a slice of pizza with cheese", "a dog running on the beach", "a cat sleeping on a sofa",
            "a picture of the city at night", "a blue car parked in the street"]
FORMATS = ("webp", "png", "jpg")


def image_bytes(seed: int, extension: str) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(40, 120, 2))
    # Smooth colour fields with noise: a random model's features then differ from image to image.
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, 3)
    pixels = (base + 60 * np.sin(x[..., None] / rng.uniform(3, 12) + rng.uniform(0, 6, 3))
              + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    options = {"webp": {"lossless": True}, "png": {}, "jpg": {"quality": 90}}[extension]
    Image.fromarray(pixels).save(buffer, format={"jpg": "JPEG"}.get(extension, extension.upper()), **options)
    return buffer.getvalue()


def _write_shards(root: Path, samples: list[dict], shards: int) -> None:
    (root / "test").mkdir(parents=True)
    per_shard = -(-len(samples) // shards)
    for s in range(shards):
        with wds.TarWriter(str(root / "test" / f"{s}.tar"), encoder=False) as sink:
            for sample in samples[s * per_shard : (s + 1) * per_shard]:
                sink.write(sample)
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")


def write_classification(root: Path, samples: int = 23, shards: int = 2, seed: int = 0,
                         classnames: list[str] = CLASSNAMES, labels: list[int] | None = None) -> Path:
    rng = np.random.default_rng(seed)
    labels = labels if labels is not None else [int(v) for v in rng.integers(0, len(classnames), samples)]
    rows = [
        {"__key__": f"s{i:07d}", FORMATS[i % 3]: image_bytes(seed * 1000 + i, FORMATS[i % 3]), "cls": str(c).encode()}
        for i, c in enumerate(labels)
    ]
    _write_shards(root, rows, shards)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def write_multilabel(root: Path, samples: int = 17, shards: int = 1, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(samples):
        hot = (rng.random(len(CLASSNAMES)) < 0.35).astype(np.int64)
        hot[-1] = 0  # the last class has no positive sample
        buffer = io.BytesIO()
        np.save(buffer, hot)
        rows.append({"__key__": f"s{i:07d}", FORMATS[i % 3]: image_bytes(seed * 1000 + i, FORMATS[i % 3]),
                     "npy": buffer.getvalue()})
    _write_shards(root, rows, shards)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (root / "dataset_type.txt").write_text("multilabel\n")
    return root


def write_retrieval(root: Path, samples: int = 13, shards: int = 2, seed: int = 2) -> Path:
    # Every caption a different pair of phrases: no two captions tokenize alike (equal features would
    # tie, and ties rank by float noise that depends on the batching).
    pairs = iter(np.random.default_rng(seed).permutation(
        [(a, b) for a in range(len(CAPTIONS)) for b in range(len(CAPTIONS)) if a != b]))
    rows = []
    for i in range(samples):
        count = 1 + i % 3  # one to three captions per image
        captions = [f"{CAPTIONS[a]} and {CAPTIONS[b]}" for a, b in (next(pairs) for _ in range(count))]
        rows.append({"__key__": f"s{i:07d}", FORMATS[i % 3]: image_bytes(seed * 1000 + i, FORMATS[i % 3]),
                     "txt": "\n".join(captions).encode()})
    _write_shards(root, rows, shards)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root
