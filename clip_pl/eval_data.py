"""Labelled evaluation images: an image folder, or WebDataset shards with a class index per sample.

Both yield ``(image_tensor, class_index)`` pairs for zero-shot classification. Shards are read with
``data_pipelines``' sample reader so that image extensions and decoding match training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from itertools import islice

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision.datasets import ImageFolder

from clip_pl.transforms import ImageTransform
from data_pipelines.samples import IMAGE_EXTENSIONS, decode_image, image_bytes, read_samples
from data_pipelines.shards import parse_shard_spec


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


class LabelKey:
    """Where a shard sample stores its class index: ``"cls"`` (a member file) or ``"json:FIELD"``.

    The syntax matches ``data_pipelines``' caption keys; dots in FIELD reach nested JSON fields.
    """

    def __init__(self, text: str):
        extension, sep, field = text.partition(":")
        self.extension = extension.strip().lower().lstrip(".")
        self.field = field.strip() if sep else None
        if not self.extension or (sep and not self.field):
            raise ValueError(f"label_key must look like 'cls' or 'json:label', got {text!r}")
        self.text = text

    def get(self, sample: dict) -> int:
        """The class index of a raw sample; fails naming the sample, since a skipped one would bias accuracy."""
        key = sample.get("__key__", "?")
        data = sample.get(self.extension)
        if data is None:
            found = ", ".join(k for k in sample if not k.startswith("__"))
            raise ValueError(
                f"sample {key!r} of {sample.get('__url__', 'the shards')} has no .{self.extension} member "
                f"(it has: {found}); set label_key to 'cls' or 'json:FIELD'"
            )
        try:
            value = data.decode("utf-8") if isinstance(data, bytes) else data
            if self.field is not None:
                value = json.loads(value)
                for name in self.field.split("."):
                    value = value[name]
            return int(value)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"sample {key!r}: cannot read an integer class index with label_key={self.text!r} ({e!r})"
            ) from None


class LabelledShards(IterableDataset):
    """``(image_tensor, class_index)`` from WebDataset shards, each sample once, in shard order.

    The samples are split between ranks and, within a rank, its DataLoader workers: each of the
    ``world_size x num_workers`` parts reads its own shards when there are at least that many,
    otherwise every part reads all shards and decodes every part-th sample (decoding is the cost).
    Together the parts yield each sample exactly once.

    Args:
        spec: Shard spec, as in training (``"val-{000..009}.tar"``, a directory, ``::``-joined sources).
        transform: PIL image -> tensor.
        label_key: See ``LabelKey``.
        image_keys: Image member extensions, tried in order.
        rank: This process's share of the samples (with ``world_size``).
        world_size: Processes the samples are split between.
    """

    def __init__(
        self,
        spec: str | Sequence[str],
        transform: ImageTransform,
        label_key: str = "cls",
        image_keys: Sequence[str] = IMAGE_EXTENSIONS,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.urls = [u for source in parse_shard_spec(spec) for u in source.urls]
        self.transform = transform
        self.label_key = LabelKey(label_key)
        self.image_keys = tuple(image_keys)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
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
            yield self.transform(decode_image(data)), self.label_key.get(sample)
