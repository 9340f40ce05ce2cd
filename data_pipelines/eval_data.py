"""Labelled evaluation images: an image folder, WebDataset shards, or a dataset in clip_benchmark's layout.

Folders and shards yield ``(image_tensor, target)`` pairs: a class index for zero-shot
classification, a multi-hot vector for a multi-label set, the list of an image's captions for
retrieval. Shards are read with ``data_pipelines``' sample reader so that image extensions and
decoding match training.

clip_benchmark's WebDataset layout (the ``clip-benchmark/wds_*`` sets, DataComp's evaluation sets),
read as clip_benchmark reads it::

    ROOT/classnames.txt                          one class name per line (classification)
    ROOT/zeroshot_classification_templates.txt   one prompt per line, "{c}" for the class name
    ROOT/dataset_type.txt                        "retrieval" or "multilabel"; absent: classification
    ROOT/test/nshards.txt                        the number of shards, N
    ROOT/test/0.tar ... ROOT/test/{N-1}.tar      samples: an image (webp, png, jpg or jpeg) and
                                                 "cls" (class index), "npy" (multi-hot) or "txt"
                                                 (the image's captions, one per line)

ROOT is a local folder, an ``http(s)://`` folder, or a Hugging Face dataset page
(``https://huggingface.co/datasets/clip-benchmark/wds_vtab-cifar10/tree/main``).
"""

from __future__ import annotations

import io
import os
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import urlparse

import numpy as np

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision.datasets import ImageFolder

from data_pipelines.samples import IMAGE_KEYS, SampleKey, decode_image, image_bytes, read_samples
from data_pipelines.shards import parse_shard_spec
from data_pipelines.transforms import ImageTransform


def _open_image(path: str) -> Image.Image:
    # torchvision's default loader converts to RGB itself, turning transparency black; the
    # transform's own conversion composites on white, as training's decoding does.
    image = Image.open(path)
    image.load()
    return image


def image_folder(root: str | os.PathLike, transform: ImageTransform) -> tuple[Dataset, list[str]]:
    """A folder with one sub-folder of images per class.

    Args:
        root: The folder.
        transform: PIL image in any mode -> tensor (``image_transform`` converts to RGB itself).

    Returns:
        The dataset of ``(image_tensor, class_index)`` and the class names: the sorted sub-folder
        names with underscores turned into spaces (``granny_smith`` -> ``granny smith``), which reads
        better inside a prompt.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {os.fspath(root)!r} not found")
    try:
        dataset = ImageFolder(os.fspath(root), transform=transform, loader=_open_image)
    except FileNotFoundError as e:
        raise ValueError(
            f"{os.fspath(root)!r} must hold one sub-folder of images per class (like val/dog/1.jpg): {e}"
        ) from None
    return dataset, [name.replace("_", " ") for name in dataset.classes]


def multi_hot(sample: dict) -> torch.Tensor:
    """The multi-hot label vector of a clip_benchmark multi-label sample (its ``.npy`` member)."""
    data = sample.get("npy")
    if data is None:
        raise ValueError(f"sample {sample.get('__key__', '?')!r} of a multi-label set has no .npy member")
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def caption_lines(sample: dict) -> list[str]:
    """The captions of a clip_benchmark retrieval sample: its ``.txt`` member, one caption per line."""
    data = sample.get("txt")
    if data is None:
        raise ValueError(f"sample {sample.get('__key__', '?')!r} of a retrieval set has no .txt member")
    return data.decode("utf-8").splitlines()


class LabelledShards(IterableDataset):
    """``(image_tensor, target)`` from WebDataset shards, each sample once, in shard order.

    The samples are split between ranks and, within a rank, its DataLoader workers: each of the
    ``world_size x num_workers`` parts reads its own shards when there are at least that many,
    otherwise every part reads all shards and decodes every part-th sample (decoding is the cost).
    Together the parts yield each sample exactly once.

    Args:
        spec: Shard spec, as in training (``"val-{000..009}.tar"``, a directory, ``::``-joined sources).
        transform: PIL image -> tensor.
        label_key: Where the class index is (see ``SampleKey``), or a function from a raw sample to
            its target (``multi_hot``, ``caption_lines``).
        image_keys: Image member extensions, tried in order.
        rank: This process's share of the samples (with ``world_size``).
        world_size: Processes the samples are split between.
    """

    def __init__(
        self,
        spec: str | Sequence[str],
        transform: ImageTransform,
        label_key: str | Callable[[dict], Any] = "cls",
        image_keys: Sequence[str] = IMAGE_KEYS,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.urls = [u for source in parse_shard_spec(spec) for u in source.urls]
        self.transform = transform
        self.target = SampleKey.parse(label_key, "label_key").label if isinstance(label_key, str) else label_key
        self.image_keys = tuple(image_keys)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        part, parts = self.rank * num_workers + worker, self.world_size * num_workers

        def reraise(exn: Exception) -> bool:
            # A missing or truncated evaluation shard must not silently shrink the test set.
            raise exn

        if len(self.urls) >= parts:
            samples = read_samples(self.urls[part::parts], reraise)
        else:
            samples = islice(read_samples(self.urls, reraise), part, None, parts)
        for sample in samples:
            data = image_bytes(sample, self.image_keys)
            if data is None:
                raise ValueError(f"sample {sample.get('__key__')!r} has no image ({'/'.join(self.image_keys)})")
            yield self.transform(decode_image(data)), self.target(sample)


# What dataset_type.txt may say, as clip_benchmark reads it; anything else is single-label classification.
_DATASET_KINDS = ("retrieval", "multilabel")


@dataclass(frozen=True)
class BenchmarkFolder:
    """A dataset in clip_benchmark's WebDataset layout (see the module docstring).

    Attributes:
        root: The folder, as given.
        kind: ``classification``, ``multilabel`` or ``retrieval``, from ``dataset_type.txt``.
        urls: The split's shards.
        classnames: Class names in label order; None for retrieval.
        templates: Prompt templates; None for retrieval.
    """

    root: str
    kind: str
    urls: tuple[str, ...]
    classnames: tuple[str, ...] | None
    templates: tuple[str, ...] | None


def _metadata_and_shard_roots(root: str) -> tuple[str, str]:
    # A Hugging Face page serves text files under /raw/ and LFS tars under /resolve/, as clip_benchmark reads them.
    prefix = "https://huggingface.co/datasets/"
    if root.startswith(prefix):
        head, _, path = root[len(prefix) :].partition("/tree/")
        if path:
            return f"{prefix}{head}/raw/{path}", f"{prefix}{head}/resolve/{path}"
    return root, root


def _read_text(location: str) -> str | None:
    """A text file's contents, None when it does not exist (local) or cannot be fetched (http)."""
    if urlparse(location).scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(location, timeout=30) as f:
                return f.read().decode("utf-8")
        except OSError:
            return None
    if not os.path.isfile(location):
        return None
    with open(location, encoding="utf-8") as f:
        return f.read()


def read_benchmark_folder(root: str | os.PathLike, split: str = "test") -> BenchmarkFolder:
    """Reads a clip_benchmark WebDataset folder's metadata and lists its shards.

    Raises:
        FileNotFoundError: The folder, its split or its ``nshards.txt`` is missing; or a
            classification set has no ``classnames.txt`` or templates file.
    """
    root = os.fspath(root).rstrip("/")
    remote = urlparse(root).scheme in ("http", "https")
    if not remote and not os.path.isdir(root):
        raise FileNotFoundError(f"no dataset folder {root}")
    metadata, shards = _metadata_and_shard_roots(root)
    dataset_type = (_read_text(f"{metadata}/dataset_type.txt") or "").strip().lower()
    kind = dataset_type if dataset_type in _DATASET_KINDS else "classification"
    nshards = _read_text(f"{metadata}/{split}/nshards.txt")
    if nshards is None:
        raise FileNotFoundError(f"no {split}/nshards.txt in {root} (clip_benchmark's WebDataset layout)")
    try:
        count = int(nshards.strip())
    except ValueError:
        raise ValueError(
            f"{metadata}/{split}/nshards.txt must hold the number of shards, got {nshards.strip()!r}"
        ) from None
    urls = tuple(f"{shards}/{split}/{i}.tar" for i in range(count))
    if kind == "retrieval":
        return BenchmarkFolder(root, kind, urls, None, None)
    lists = {}
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        text = _read_text(f"{metadata}/{name}")
        if text is None:
            raise FileNotFoundError(f"no {name} in {root}; a classification set needs it")
        lists[name] = tuple(line.strip() for line in text.splitlines())
    return BenchmarkFolder(root, kind, urls, lists["classnames.txt"], lists["zeroshot_classification_templates.txt"])
