"""A suite of zero-shot benchmarks in clip_benchmark's WebDataset layout, run as one.

A suite file (YAML) lists datasets by their clip_benchmark names::

    dataset_root: wds_{dataset_cleaned}_test   # where each dataset's folder is (see below)
    datasets:
      - name: imagenet1k
        task: zeroshot_classification
        groups: [ImageNet]
      - name: vtab/caltech101
        task: zeroshot_classification
        main_metric: mean_per_class_recall
        groups: [VTAB]
      - name: mscoco_captions
        task: zeroshot_retrieval
        root: wds_mscoco_captions                # this dataset's own folder

``dataset_root`` and ``root`` are patterns in the way of clip_benchmark's ``--dataset_root``:
``{dataset}`` is the dataset's name and ``{dataset_cleaned}`` the name with ``/`` as ``-``. A
relative result is taken from the folder given to the command (``--suite-root``) or the working
directory. Each folder is read by ``data_pipelines.eval_data.read_benchmark_folder``.

Every dataset is evaluated as clip_benchmark evaluates it (``clip_pl.evaluation.metrics``), and its images are
embedded once: classification reports ``top1``, ``top5`` (with 5 classes or more) and
``mean_per_class_recall``, a multi-label set ``mean_average_precision``, retrieval
``image_to_text_R@k`` and ``text_to_image_R@k`` for k = 1, 5, 10 and their mean at 1, ``mean_R@1``
(DataComp's ``mean_recall@1``). The suite's ``average`` is DataComp's: the mean over datasets of
each one's main metric; a group's average is the mean over the datasets tagged with it.

A dataset whose folder is missing is skipped with one line naming the folder; the suite goes on.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from clip_pl.distributed import all_gather_uneven, fail_together
from clip_pl.evaluation.metrics import classification_metrics, mean_average_precision, retrieval_recall
from clip_pl.evaluation.zero_shot import build_zero_shot_classifier, check_class_indices
from clip_pl.model import CLIP
from data_pipelines.errors import USER_ERRORS, user_error_line
from data_pipelines.eval_data import BenchmarkFolder, LabelledShards, caption_lines, multi_hot, read_benchmark_folder
from data_pipelines.ranks import rank_and_world_size
from data_pipelines.tokenizer import TextTokenizer
from data_pipelines.transforms import image_transform

SUITES_DIR = os.path.join(os.path.dirname(__file__), "suites")
TASKS = ("zeroshot_classification", "zeroshot_retrieval")
RETRIEVAL_KS = (1, 5, 10)
# The metric a dataset is ranked by unless its entry names another, per kind of data.
DEFAULT_MAIN_METRIC = {"classification": "top1", "multilabel": "mean_average_precision", "retrieval": "mean_R@1"}
METRICS = (
    "top1", "top5", "mean_per_class_recall", "mean_average_precision", "mean_R@1",
    *(f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in RETRIEVAL_KS),
)
PRECISIONS = ("fp32", "bf16")
_ENTRY_KEYS = {"name", "task", "root", "main_metric", "groups", "split"}


def shipped_suites() -> list[str]:
    """Names of the suite files that ship with clip_pl (``clip_pl/evaluation/suites/*.yaml``)."""
    return sorted(f[: -len(".yaml")] for f in os.listdir(SUITES_DIR) if f.endswith(".yaml"))


def suite_file(name_or_path: str | os.PathLike) -> str:
    """The path of a suite file: an existing file, or the name of a shipped suite."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return path
    shipped = os.path.join(SUITES_DIR, f"{path}.yaml")
    if os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(f"no suite file {path!r}; give a YAML file or one of: {', '.join(shipped_suites())}")


@dataclass(frozen=True)
class SuiteDataset:
    """One entry of a suite.

    Attributes:
        name: clip_benchmark's name of the dataset (``imagenet1k``, ``vtab/caltech101``); results
            and logs use it.
        task: ``zeroshot_classification`` (single- or multi-label, as the folder's
            ``dataset_type.txt`` says) or ``zeroshot_retrieval``.
        root: The dataset's folder, a pattern with ``{dataset}`` / ``{dataset_cleaned}``.
        main_metric: The metric the suite's average takes; None for the default of the data's kind.
        groups: Names of the averages this dataset counts in (DataComp's "VTAB", "Retrieval"...).
        split: The folder's split.
    """

    name: str
    task: str
    root: str
    main_metric: str | None = None
    groups: tuple[str, ...] = ()
    split: str = "test"

    def folder(self, suite_root: str | os.PathLike | None = None) -> str:
        """The dataset's folder: ``root`` filled in, under the suite's root folder when relative."""
        path = self.root.format(dataset=self.name, dataset_cleaned=self.name.replace("/", "-"))
        if "://" in path or os.path.isabs(path) or suite_root is None:
            return path
        return os.path.join(os.fspath(suite_root), path)


@dataclass
class DatasetResult:
    """What one dataset of a suite gave: its metrics (fractions), its main metric and its cost."""

    task: str
    metrics: dict[str, float]
    main_metric: str
    images: int
    seconds: float

    @property
    def main(self) -> float:
        return self.metrics[self.main_metric]


@dataclass
class SuiteResult:
    """A suite's results: per dataset, the datasets skipped or failed with their one-line reason, the averages."""

    suite: str
    datasets: dict[str, DatasetResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def listed(self) -> int:
        """The datasets the suite lists: evaluated, skipped or failed."""
        return len(self.datasets) + len(self.skipped) + len(self.failed)

    @property
    def average(self) -> float | None:
        """DataComp's average: the mean of the evaluated datasets' main metrics."""
        mains = [r.main for r in self.datasets.values()]
        return sum(mains) / len(mains) if mains else None

    def group_averages(self) -> dict[str, tuple[float, int, int]]:
        """Per group: the mean main metric, the datasets it covers and the datasets the group lists."""
        out = {}
        for group, names in self.groups.items():
            mains = [self.datasets[n].main for n in names if n in self.datasets]
            if mains:
                out[group] = (sum(mains) / len(mains), len(mains), len(names))
        return out

    def flat(self) -> dict[str, float]:
        """``{"DATASET/METRIC": value, "average": ..., "group/GROUP": ...}``, for loggers."""
        out = {f"{name}/{k}": v for name, r in self.datasets.items() for k, v in r.metrics.items()}
        if self.average is not None:
            out["average"] = self.average
        out.update({f"group/{g}": avg for g, (avg, _, _) in self.group_averages().items()})
        return out

    def to_json(self) -> dict[str, Any]:
        """The results as JSON-ready data (fractions)."""
        return {
            "suite": self.suite,
            "average": self.average,
            "datasets_evaluated": len(self.datasets),
            "datasets_listed": self.listed,
            "groups": {g: {"average": a, "datasets": n, "of": m} for g, (a, n, m) in self.group_averages().items()},
            "datasets": {
                name: {
                    "task": r.task,
                    "main_metric": r.main_metric,
                    "main": r.main,
                    "metrics": r.metrics,
                    "images": r.images,
                    "seconds": round(r.seconds, 2),
                }
                for name, r in self.datasets.items()
            },
            "skipped": self.skipped,
            "failed": self.failed,
        }

    def table(self) -> str:
        """A plain-text table, values in percent: one row per dataset, then the averages."""
        rows = [("dataset", "main metric", "main %", "other metrics %", "images", "s")]
        for name, r in self.datasets.items():
            others = "  ".join(f"{k} {100 * v:.2f}" for k, v in r.metrics.items() if k != r.main_metric)
            rows.append((name, r.main_metric, f"{100 * r.main:.2f}", others, str(r.images), f"{r.seconds:.1f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {2, 4, 5}
        lines = [
            "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        if self.average is not None:
            lines.append(f"average of {len(self.datasets)} of {self.listed} datasets: {100 * self.average:.2f}")
        for group, (avg, n, m) in self.group_averages().items():
            lines.append(f"  {group} ({n} of {m}): {100 * avg:.2f}")
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"failed {name}: {why}" for name, why in self.failed.items()]
        return "\n".join(lines)


def _collate(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    # Retrieval targets are lists of captions, which default_collate would transpose.
    images = torch.stack([image for image, _ in batch])
    targets = [target for _, target in batch]
    if isinstance(targets[0], torch.Tensor):
        return images, torch.stack(targets)
    if isinstance(targets[0], int):
        return images, torch.tensor(targets)
    return images, targets


def _precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Suite:
    """Datasets in clip_benchmark's layout, evaluated one after the other and averaged.

    Also a zero-shot task of the trainer's validation (``suite.file`` in the training config):
    ``evaluate`` splits every dataset's images and prompts across the ranks and returns the flat
    results, logged as ``zero_shot/SUITE/DATASET/METRIC`` and ``zero_shot/SUITE/average``.

    Args:
        name: The suite's name in results and logs.
        datasets: The entries.
        root: The folder that relative dataset folders are under; None: the working directory.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        precision: ``fp32`` or ``bf16`` (autocast); None: bf16 on a GPU, fp32 elsewhere.
    """

    def __init__(
        self,
        name: str,
        datasets: Sequence[SuiteDataset],
        root: str | os.PathLike | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        precision: str | None = None,
    ):
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)} (or null for the device's), got {precision!r}"
            )
        if batch_size < 1:
            raise ValueError(f"the suite's batch_size must be positive, got {batch_size}")
        self.name, self.datasets, self.root = name, list(datasets), root
        self.batch_size, self.num_workers, self.precision = batch_size, num_workers, precision
        self._warned: set[str] = set()

    @classmethod
    def from_file(
        cls,
        file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        dataset_root: str | None = None,
        **kwargs: Any,
    ) -> Suite:
        """Reads a suite file (a path, or the name of a shipped suite such as ``datacomp``).

        Args:
            file: The suite file.
            root: See the class.
            dataset_root: Replaces the file's ``dataset_root`` pattern (entries with their own
                ``root`` keep it).
            **kwargs: ``batch_size``, ``num_workers``, ``precision``.
        """
        path = suite_file(file)
        where = f"suite file {path}"
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                at = f" at line {mark.line + 1}" if mark is not None else ""
                raise ValueError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
            raise ValueError(f"{where} needs a non-empty 'datasets:' list")
        pattern = dataset_root or data.get("dataset_root")
        entries, seen = [], set()
        for i, entry in enumerate(data["datasets"]):
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(f"{where}: dataset {i + 1} needs a 'name'")
            name = str(entry["name"])
            unknown = set(entry) - _ENTRY_KEYS
            if unknown:
                raise ValueError(
                    f"{where}: dataset {name} has unknown keys {sorted(unknown)}; known: {sorted(_ENTRY_KEYS)}"
                )
            if entry.get("task") not in TASKS:
                raise ValueError(f"{where}: dataset {name} needs task: {' or '.join(TASKS)}, got {entry.get('task')!r}")
            if entry.get("main_metric") not in (None, *METRICS):
                raise ValueError(
                    f"{where}: dataset {name} has main_metric {entry['main_metric']!r}; known: {', '.join(METRICS)}"
                )
            folder = entry.get("root") or pattern
            if not folder:
                raise ValueError(f"{where}: dataset {name} has no root, and the file no dataset_root")
            if name in seen:
                raise ValueError(f"{where}: dataset {name} is listed twice")
            seen.add(name)
            groups = entry.get("groups") or ()
            dataset = SuiteDataset(
                name=name,
                task=entry["task"],
                root=str(folder),
                main_metric=entry.get("main_metric"),
                groups=tuple(groups) if isinstance(groups, (list, tuple)) else (str(groups),),
                split=str(entry.get("split", "test")),
            )
            try:
                dataset.folder()
            except (KeyError, IndexError, ValueError):
                raise ValueError(
                    f"{where}: dataset {name} has root {folder!r}; a pattern may hold only {{dataset}} and "
                    "{dataset_cleaned}"
                ) from None
            entries.append(dataset)
        name = str(data.get("name") or os.path.splitext(os.path.basename(path))[0])
        return cls(name, entries, root=root, **kwargs)

    def run(
        self,
        model: CLIP,
        tokenizer: TextTokenizer,
        device: str | torch.device | None = None,
        distributed: bool = False,
        progress: bool = False,
        on_dataset: Callable[[str, SuiteResult], None] | None = None,
    ) -> SuiteResult:
        """Evaluates every dataset; a missing one is skipped, a failing one recorded, and the rest run.

        Args:
            model: The model, in eval mode.
            tokenizer: Its tokenizer.
            device: Where to run; defaults to the model's device.
            distributed: Every rank of the process group calls this; each embeds its share of the
                images and prompts, and all return the same results.
            progress: Show a progress bar per dataset (rank 0).
            on_dataset: Called after each dataset with its name and the results so far.
        """
        device = torch.device(device) if device is not None else next(model.parameters()).device
        precision = self.precision or ("bf16" if device.type == "cuda" else "fp32")
        result = SuiteResult(self.name)
        for dataset in self.datasets:
            for group in dataset.groups:
                result.groups.setdefault(group, []).append(dataset.name)
        for dataset in self.datasets:
            try:
                folder = read_benchmark_folder(dataset.folder(self.root), dataset.split)
                with _precision_context(device, precision):
                    result.datasets[dataset.name] = self._evaluate(
                        dataset, folder, model, tokenizer, device, distributed, progress
                    )
            except FileNotFoundError as e:
                result.skipped[dataset.name] = str(e)
            except USER_ERRORS as e:
                result.failed[dataset.name] = user_error_line(e).removeprefix("error: ")
            if on_dataset is not None:
                on_dataset(dataset.name, result)
        return result

    def evaluate(
        self,
        model: CLIP,
        tokenizer: TextTokenizer,
        device: str | torch.device | None = None,
        distributed: bool = False,
    ) -> dict[str, float]:
        """``run``'s results flattened (``SuiteResult.flat``), as the trainer's zero-shot tasks return them.

        Datasets skipped or failed are warned about once each (rank 0), not at every validation.
        """
        result = self.run(model, tokenizer, device, distributed)
        for name, why in {**result.skipped, **result.failed}.items():
            if name not in self._warned and rank_and_world_size()[0] == 0:
                warnings.warn(f"suite {self.name}: {name} left out: {why}", stacklevel=2)
            self._warned.add(name)
        return result.flat()

    def _evaluate(
        self,
        dataset: SuiteDataset,
        folder: BenchmarkFolder,
        model: CLIP,
        tokenizer: TextTokenizer,
        device: torch.device,
        distributed: bool,
        progress: bool,
    ) -> DatasetResult:
        retrieval = folder.kind == "retrieval"
        if retrieval != (dataset.task == "zeroshot_retrieval"):
            raise ValueError(
                f"{folder.root} holds a {folder.kind} set (its dataset_type.txt) but the suite says "
                f"task: {dataset.task}; correct the task"
            )
        rank, world_size = rank_and_world_size() if distributed else (0, 1)
        start = time.perf_counter()
        target = {"retrieval": caption_lines, "multilabel": multi_hot}.get(folder.kind, "cls")
        shards = LabelledShards(
            list(folder.urls), image_transform(model.preprocess_config), target, rank=rank, world_size=world_size
        )
        loader = DataLoader(shards, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=_collate)
        with fail_together(device, f"embedding {dataset.name}", world_size):
            images, targets, texts, text_image = _embed(
                model, tokenizer, loader, device, retrieval, progress and rank == 0, dataset.name
            )
        if folder.kind == "multilabel":
            # Also the empty share of a rank without samples gets its columns, for the gather.
            targets = targets.float().reshape(-1, len(folder.classnames))
        if world_size > 1:
            if retrieval:
                # In rank order, this rank's images come after those of the ranks before it.
                counts = all_gather_uneven(torch.tensor([len(images)], device=device))
                text_image = all_gather_uneven(text_image + int(counts[:rank].sum()))
                texts = all_gather_uneven(texts)
            else:
                targets = all_gather_uneven(targets)
            images = all_gather_uneven(images)
        if not len(images):
            raise ValueError(f"{folder.root} has no samples in its {dataset.split} shards")
        if retrieval:
            metrics = retrieval_recall(images, texts, RETRIEVAL_KS, text_to_image_index=text_image)
            metrics["mean_R@1"] = (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"]) / 2
        else:
            classifier = build_zero_shot_classifier(
                model,
                tokenizer,
                list(folder.classnames),
                list(folder.templates),
                device=device,
                distributed=distributed,
            )
            logits = images @ classifier
            metrics = _classification_metrics(logits, targets, folder.kind, folder.root)
        main = dataset.main_metric or DEFAULT_MAIN_METRIC[folder.kind]
        if main not in metrics:
            raise ValueError(
                f"main_metric {main!r} is not a metric of {dataset.name}; it has {', '.join(metrics)}"
            )
        return DatasetResult(dataset.task, metrics, main, len(images), time.perf_counter() - start)


def _classification_metrics(logits: torch.Tensor, targets: torch.Tensor, kind: str, root: str) -> dict[str, float]:
    num_classes = logits.shape[1]
    if kind == "multilabel":
        if targets.dim() != 2 or targets.shape[1] != num_classes:
            raise ValueError(
                f"{root}: multi-label targets of shape {tuple(targets.shape[1:])} for {num_classes} classes"
            )
        return {"mean_average_precision": mean_average_precision(logits, targets)}
    check_class_indices(targets, num_classes)
    # clip_benchmark reports no top-5 with fewer than 5 classes.
    return classification_metrics(logits, targets, (1, 5) if num_classes >= 5 else (1,))


@torch.no_grad()
def _embed(
    model: CLIP,
    tokenizer: TextTokenizer,
    loader: Iterable,
    device: torch.device,
    retrieval: bool,
    progress: bool,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """This rank's image features and targets; for retrieval its caption features and each caption's image instead."""
    embed_dim = model.config.embed_dim
    images, targets, texts, text_image = [], [], [], []
    seen = 0
    with tqdm(desc=name, unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for batch, target in loader:
            images.append(model.encode_image(batch.to(device, non_blocking=True)).float())
            if retrieval:
                captions = [c for captions in target for c in captions]
                texts.append(model.encode_text(tokenizer(captions).to(device)).float())
                text_image += [seen + i for i, captions in enumerate(target) for _ in captions]
            else:
                targets.append(target)
            seen += len(batch)
            bar.update(len(batch))
    image_features = torch.cat(images) if images else torch.empty(0, embed_dim, device=device)
    if not retrieval:
        labels = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
        return image_features, labels.to(device), None, None
    text_features = torch.cat(texts) if texts else torch.empty(0, embed_dim, device=device)
    return image_features, None, text_features, torch.tensor(text_image, dtype=torch.long, device=device)
