"""Zero-shot classification tasks: prompt ensembles into classifiers, and the loops that score a model.

The ``run_*`` helpers drive a model over a ``DataLoader``; ``ZeroShotTask`` is one zero-shot
benchmark as the trainer's validation and ``clip_pl.evaluate`` run it.

Zero-shot classification turns class names into a linear classifier: each class name is put
into every prompt template, the normalized prompt embeddings of a class are averaged and the mean
renormalized. An image's logits are then its normalized embedding times that ``[D, C]`` matrix.

Retrieval ranks every caption for every image (and the reverse) by cosine similarity; recall@k is
the share of queries whose matching item is among the first k. The metrics themselves live in
``clip_pl.evaluation.metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from clip_pl.distributed import all_gather_uneven, fail_together
from clip_pl.evaluation.metrics import retrieval_recall, topk_hits
from clip_pl.model import CLIP
from data_pipelines.eval_data import LabelledShards, image_folder
from data_pipelines.ranks import rank_and_world_size
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.transforms import image_transform

# Prompt templates in the style of CLIP's ImageNet prompts, worded for clip_pl. Ensembling many
# phrasings averages out the quirks of any single one; "{}" is replaced by the class name.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of the {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a blurry photo of a {}.",
    "a dark photo of the {}.",
    "a bright photo of a {}.",
    "a low resolution photo of the {}.",
    "a high resolution photo of a {}.",
    "a black and white photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a snapshot of my {}.",
    "a good photo of the {}.",
    "a bad photo of a {}.",
    "a drawing of a {}.",
    "a painting of the {}.",
    "a sketch of a {}.",
    "a cartoon {}.",
    "a toy {}.",
    "a sculpture of a {}.",
    "a rendering of a {}.",
    "the {} in a video game.",
    "a tattoo of a {}.",
    "a {} seen from far away.",
)

# "{c}" is clip_benchmark's placeholder.
_PLACEHOLDERS = ("{label}", "{c}", "{}")


def fill_template(template: str, classname: str) -> str:
    """Puts ``classname`` into a template's ``{}``, ``{c}`` or ``{label}`` placeholder.

    Plain string replacement rather than ``str.format``, so braces elsewhere in the template or the
    class name are kept as they are.
    """
    for placeholder in _PLACEHOLDERS:
        if placeholder in template:
            return template.replace(placeholder, classname)
    raise ValueError(f"prompt template {template!r} has no {{}}, {{c}} or {{label}} placeholder for the class name")


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (class names, templates)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file {os.fspath(path)!r} not found")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{os.fspath(path)!r} is empty; it needs one entry per line")
    return lines


def resolve_templates(spec: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """Prompt templates from a file, a single template string, a list, or ``None`` for the defaults.

    Args:
        spec: ``None`` for ``DEFAULT_TEMPLATES``; a path to a file with one template per line; a
            template string containing ``{}`` or ``{label}``; or a sequence of templates.
    """
    if spec is None:
        templates = list(DEFAULT_TEMPLATES)
    elif isinstance(spec, (str, os.PathLike)):
        if os.path.isfile(spec):
            templates = read_lines(spec)
        elif any(p in os.fspath(spec) for p in _PLACEHOLDERS):
            templates = [os.fspath(spec)]
        else:
            raise ValueError(f"templates {os.fspath(spec)!r} is neither a file nor a template with a {{}} placeholder")
    else:
        templates = list(spec)
    if not templates:
        raise ValueError("at least one prompt template is needed")
    for template in templates:
        fill_template(template, "x")  # Fails early, naming the template without a placeholder.
    return templates


def classifier_from_text_features(text_features: torch.Tensor) -> torch.Tensor:
    """Zero-shot classifier weights from prompt embeddings.

    Args:
        text_features: ``[C, T, D]`` embeddings of each class (C) under each template (T).

    Returns:
        ``[D, C]``: per class, the mean of the normalized prompt embeddings, renormalized.
    """
    if text_features.dim() != 3:
        raise ValueError(f"text_features must be [classes, templates, dim], got shape {tuple(text_features.shape)}")
    weights = F.normalize(F.normalize(text_features.float(), dim=-1).mean(dim=1), dim=-1)
    return weights.T.contiguous()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def build_zero_shot_classifier(
    model: CLIP,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    distributed: bool = False,
) -> torch.Tensor:
    """Embeds every (class, template) prompt and builds the ``[D, C]`` classifier.

    The model is used in whatever mode it is in; call ``model.eval()`` first (Lightning's
    validation loop does).

    Args:
        model: The CLIP model.
        tokenizer: The model's tokenizer.
        classnames: One name per class, in label order.
        templates: Prompt templates with a ``{}`` or ``{label}`` placeholder.
        batch_size: Prompts per forward pass.
        device: Where to run the text tower; defaults to the model's device.
        distributed: Every rank of the initialised process group calls this; each embeds its
            share of the classes and all get the whole classifier.

    Returns:
        Float tensor ``[D, C]`` on ``device``.
    """
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    templates = list(templates)
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    device = torch.device(device) if device is not None else _model_device(model)
    rank, world_size = rank_and_world_size() if distributed else (0, 1)
    # Each rank embeds a contiguous block of classes; gathered in rank order they are in class order.
    mine = classnames[len(classnames) * rank // world_size : len(classnames) * (rank + 1) // world_size]
    weights = torch.empty(0, model.config.embed_dim, device=device)
    with fail_together(device, "building the zero-shot classifier", world_size):
        prompts = [fill_template(t, name) for name in mine for t in templates]
        features = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size]).to(device)
            features.append(model.encode_text(tokens).float())
        if features:
            weights = classifier_from_text_features(torch.cat(features).view(len(mine), len(templates), -1)).T
    if world_size > 1:
        weights = all_gather_uneven(weights.contiguous())
    return weights.T.contiguous()


@torch.no_grad()
def run_zero_shot(
    model: CLIP,
    classifier: torch.Tensor,
    loader: Iterable,
    topk: Sequence[int] = (1, 5),
    device: str | torch.device | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Top-k zero-shot accuracy over a loader of ``(images, labels)`` batches.

    Args:
        model: The CLIP model.
        classifier: ``[D, C]`` from ``build_zero_shot_classifier``.
        loader: Batches of images and class indices.
        topk: The k values to report.
        device: Where to run the model; defaults to the model's device.
        distributed: Every rank of the initialised process group calls this with its own share of
            the images; all get the accuracy over all of them.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    classifier = classifier.to(device)
    world_size = rank_and_world_size()[1] if distributed else 1
    # Per k the hits, then the number of images: summed over batches, and over ranks.
    counts = torch.zeros(len(topk) + 1, dtype=torch.int64, device=device)
    with fail_together(device, "zero-shot evaluation", world_size):
        for images, labels in loader:
            logits = model.encode_image(images.to(device)).float() @ classifier
            counts[:-1] += topk_hits(logits, torch.as_tensor(labels), topk)
            counts[-1] += len(logits)
    if world_size > 1:
        dist.all_reduce(counts)
    *hits, total = counts.tolist()
    if not total:
        raise ValueError("the zero-shot data loader yielded no images")
    return {f"top{k}": h / total for k, h in zip(topk, hits)}


@torch.no_grad()
def run_retrieval(
    model: CLIP,
    loader: Iterable,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
    device: str | torch.device | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict[str, float]:
    """Retrieval recall@k over a loader of ``(images, tokens)`` batches, one caption per image.

    Args:
        model: The CLIP model.
        loader: Batches of images and token ids, as ``data_pipelines``' validation stream yields; or of
            images and lists of caption strings when ``tokenizer`` is given.
        ks: The k values to report.
        chunk_size: See ``retrieval_recall``.
        device: Where to run the model; defaults to the model's device.
        tokenizer: Tokenizes string captions.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    image_features, text_features = [], []
    for images, captions in loader:
        if not isinstance(captions, torch.Tensor):
            if tokenizer is None:
                raise ValueError("the loader yields caption strings; pass the tokenizer to run_retrieval")
            captions = tokenizer(list(captions))
        image_features.append(model.encode_image(images.to(device)).float())
        text_features.append(model.encode_text(captions.to(device)).float())
    if not image_features:
        raise ValueError("the retrieval data loader yielded no pairs")
    return retrieval_recall(torch.cat(image_features), torch.cat(text_features), ks, chunk_size)


@dataclass
class ZeroShotTask:
    """A zero-shot classification benchmark, run by the trainer at each validation or by ``clip_pl.evaluate``.

    Attributes:
        name: Label used in logs and result tables.
        data: A folder with one sub-folder of images per class (sorted sub-folder names give the
            label order), or a WebDataset shard spec (``"val-{000..009}.tar"``, a directory,
            ``::``-joined sources) whose samples carry an image and a class index.
        classnames: One name per class in label order, or a file with one per line. ``None`` takes
            a folder's sub-folder names with underscores as spaces; shards need it.
        templates: Prompt templates with a ``{}`` or ``{label}`` placeholder, a file with one per
            line, or ``None`` for ``DEFAULT_TEMPLATES``.
        label_key: For shards, where the class index is: ``"cls"`` (a ``.cls`` member) or
            ``"json:FIELD"`` (a field of the ``.json`` member).
        topk: Accuracies to report.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes for decoding.
    """

    name: str
    data: str | list[str]
    classnames: list[str] | str | None = None
    templates: list[str] | str | None = None
    label_key: str = "cls"
    topk: tuple[int, ...] = (1, 5)
    batch_size: int = 64
    num_workers: int = 0

    def dataset(
        self, transform: Callable[[Image.Image], torch.Tensor], rank: int = 0, world_size: int = 1
    ) -> tuple[Dataset, list[str]]:
        """The ``(image_tensor, class_index)`` dataset (this rank's share of it) and the class names."""
        if _is_image_folder(self.data):
            dataset, folder_names = image_folder(self.data, transform)
            if world_size > 1:
                dataset = Subset(dataset, range(rank, len(dataset), world_size))
        else:
            dataset = LabelledShards(self.data, transform, self.label_key, rank=rank, world_size=world_size)
            folder_names = None
        if self.classnames is None:
            if folder_names is None:
                raise ValueError(
                    f"zero-shot task {self.name!r} reads shards, so it needs classnames (a list or a file)"
                )
            return dataset, folder_names
        classnames = read_lines(self.classnames) if isinstance(self.classnames, str) else list(self.classnames)
        if folder_names is not None and len(classnames) != len(folder_names):
            raise ValueError(
                f"zero-shot task {self.name!r}: {len(classnames)} classnames for {len(folder_names)} class folders in "
                f"{self.data!r}; give one name per sub-folder, in sorted sub-folder order"
            )
        return dataset, classnames

    def evaluate(
        self,
        model: CLIP,
        tokenizer: Tokenizer,
        device: str | torch.device | None = None,
        distributed: bool = False,
    ) -> dict[str, float]:
        """Builds the classifier and returns top-k accuracies (fractions) keyed ``top1``, ``top5``...

        Args:
            model: The CLIP model, in eval mode.
            tokenizer: The model's tokenizer.
            device: Where to run the model; defaults to the model's device.
            distributed: Every rank of the initialised process group calls this; each embeds a
                share of the prompts and of the images, and all return the accuracy over all images.
        """
        rank, world_size = rank_and_world_size() if distributed else (0, 1)
        dataset, classnames = self.dataset(image_transform(model.preprocess_config), rank, world_size)
        templates = resolve_templates(self.templates)
        classifier = build_zero_shot_classifier(
            model, tokenizer, classnames, templates, device=device, distributed=distributed
        )
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        checked = _checked_labels(loader, len(classnames))
        return run_zero_shot(model, classifier, checked, self.topk, device, distributed=distributed)


def _is_image_folder(data: str | list[str]) -> bool:
    # A directory of .tar files is a shard spec, as in training.
    return isinstance(data, str) and os.path.isdir(data) and not any(f.endswith(".tar") for f in os.listdir(data))


def check_class_indices(labels: torch.Tensor, num_classes: int) -> None:
    """Fails on a label without a class name, instead of scoring it as wrong."""
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.numel():
        raise ValueError(
            f"class index {int(outside[0])} has no class name (there are {num_classes}); "
            "give one class name per label, in label order"
        )


def _checked_labels(loader: Iterable, num_classes: int) -> Iterator:
    """Passes batches through, checking their labels (``check_class_indices``)."""
    for images, labels in loader:
        labels = torch.as_tensor(labels)
        check_class_indices(labels, num_classes)
        yield images, labels
