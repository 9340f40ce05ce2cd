"""Checkpoint files: crash-safe writing (``AtomicCheckpointIO``, ``ShardedCheckpointIO``), and a model read back out.

A training checkpoint is Lightning's dictionary plus one entry, ``checkpoint["clip_pl"]``, holding
everything needed to rebuild the model without the training config: the model config and the
tokenizer (its sentencepiece model bytes). Model weights are ``checkpoint["state_dict"]`` with the
prefix ``model.``.

It comes in two forms, and every reader here takes both:

- a file (DDP, one process): the whole dictionary, ``torch.save``d by rank 0;
- a sharded checkpoint (``trainer=fsdp``): a folder in the format of ``torch.distributed.checkpoint``
  (DCP) holding every rank's shards of ``state_dict`` and ``optimizer_0``, plus ``meta.pt``, the
  rest of the dictionary (Lightning's layout). ``last.ckpt`` is then a symbolic link to the newest
  complete folder in ``last.ckpt.shards/``.
"""

from __future__ import annotations

import copy
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from clip_pl.model import CLIPConfig
from data_pipelines.atomic import atomic_output
from data_pipelines.tokenizer import TextTokenizer, tokenizer_from_state_dict

CHECKPOINT_KEY = "clip_pl"
STATE_DICT_PREFIX = "model."
# In a sharded checkpoint: everything but the weights and the optimizer state (Lightning's name).
SHARDED_META_FILE = "meta.pt"
SHARDED_FOLDER_SUFFIX = ".shards"
PARTIAL_SUFFIX = ".partial"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (see ``atomic_output``)."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (or a link to one)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SHARDED_META_FILE))


def _read_shards(path: str | os.PathLike, keys: set[str]) -> dict[str, Any]:
    """The entries ``keys`` of a sharded checkpoint, whole, in this process alone (no collective)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # torch's own way to read a whole DCP checkpoint into one process (format_utils.dcp_to_torch_save);
    # the public dcp.load fills a state dict that already holds every tensor, which would need the model.
    state: dict[str, Any] = {}
    _load_state_dict(state, FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return state


def _optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (DCP's) keyed by index instead, as ``Optimizer.state_dict``."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    return _rekeyed(state, {name: i for i, name in enumerate(names)})


def optimizer_state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``Optimizer.state_dict()``'s state keyed by parameter names, ``names`` in the optimizer's order."""
    return _rekeyed(state, dict(enumerate(names)))


def _rekeyed(state: dict[str, Any], key: dict[Any, Any]) -> dict[str, Any]:
    return {
        "state": {key[k]: value for k, value in state["state"].items()},
        "param_groups": [{**group, "params": [key[k] for k in group["params"]]} for group in state["param_groups"]],
    }


def write_checkpoint_file(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes a whole checkpoint to ``path`` atomically; the sharded checkpoint it replaces, if any, goes."""
    atomic_torch_save(checkpoint, path)
    shutil.rmtree(str(path) + SHARDED_FOLDER_SUFFIX, ignore_errors=True)


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", optimizer: bool = False
) -> dict[str, Any]:
    """Loads a training checkpoint, a file or a sharded folder, without executing code from it.

    Args:
        path: The ``.ckpt`` file or sharded checkpoint folder.
        map_location: Where the tensors of a file go (those of a sharded checkpoint go to the CPU).
        optimizer: Also read a sharded checkpoint's optimizer state, as Lightning's
            ``optimizer_states`` list keyed by parameter index (a file always holds it).

    Returns:
        Lightning's checkpoint dictionary, whole: a sharded checkpoint is gathered in this process.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    if is_sharded_checkpoint(path):
        checkpoint = torch.load(os.path.join(path, SHARDED_META_FILE), map_location="cpu", weights_only=True)
        shards = _read_shards(path, {"state_dict", "optimizer_0"} if optimizer else {"state_dict"})
        checkpoint["state_dict"] = shards["state_dict"]
        if optimizer:
            checkpoint["optimizer_states"] = [_optimizer_state_by_index(shards["optimizer_0"])]
        return checkpoint
    if os.path.isdir(path):
        raise ValueError(f"{str(path)!r} is a folder but not a sharded clip_pl checkpoint (no {SHARDED_META_FILE})")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler's KeyError, UnpicklingError, RuntimeError... for other files
        raise ValueError(f"{str(path)!r} is not a clip_pl training checkpoint: torch.load failed ({e!r})") from e
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a clip_pl training checkpoint (no {CHECKPOINT_KEY!r} entry)")
    return checkpoint


def _read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dictionary with its tensors memory-mapped, not loaded (for a folder: ``meta.pt``)."""
    file = os.path.join(path, SHARDED_META_FILE) if is_sharded_checkpoint(path) else path
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a training checkpoint was saved at, read without loading its tensors."""
    return int(_read_meta(path)["global_step"])


def _saved_shapes(path: str | os.PathLike) -> dict[str, torch.Size]:
    """The shape of every weight in the checkpoint's ``state_dict``, read without loading any."""
    if not is_sharded_checkpoint(path):
        return {name: tensor.shape for name, tensor in _read_meta(path)["state_dict"].items()}
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    prefix = "state_dict."
    return {
        fqn[len(prefix) :]: item.size
        for fqn, item in metadata.state_dict_metadata.items()
        if fqn.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }


def shape_differences(
    path: str | os.PathLike, module: torch.nn.Module
) -> list[tuple[str, torch.Size | None, torch.Size | None]]:
    """Tensors of ``module``'s state dict whose shape differs from the checkpoint's, or that only one has.

    Reads shapes only: a file is memory-mapped, a sharded checkpoint's metadata read, no data loaded.

    Returns:
        ``(name, shape in the checkpoint, shape in the module)`` sorted by name; ``None`` where absent.
    """
    return _shape_differences(_saved_shapes(path), module)


def state_shape_differences(
    state: dict[str, torch.Tensor], module: torch.nn.Module
) -> list[tuple[str, torch.Size | None, torch.Size | None]]:
    """Tensors whose shape differs between ``state`` and ``module``'s state dict, or that only one has.

    Returns:
        ``(name, shape in state, shape in the module)`` sorted by name; ``None`` where absent.
    """
    return _shape_differences({name: tensor.shape for name, tensor in state.items()}, module)


def _shape_differences(
    theirs: dict[str, torch.Size], module: torch.nn.Module
) -> list[tuple[str, torch.Size | None, torch.Size | None]]:
    ours = {name: tensor.shape for name, tensor in module.state_dict().items()}
    names = sorted(name for name in theirs.keys() | ours.keys() if theirs.get(name) != ours.get(name))
    return [(name, theirs.get(name), ours.get(name)) for name in names]


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``CLIP`` state dict in a Lightning checkpoint dict: its ``model.*`` entries, prefix removed."""
    state = checkpoint["state_dict"]
    return {k[len(STATE_DICT_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_DICT_PREFIX)}


def model_contents(checkpoint: dict[str, Any]) -> tuple[CLIPConfig, dict[str, torch.Tensor], TextTokenizer]:
    """The model config, ``CLIP`` state dict and tokenizer that a checkpoint dict holds."""
    meta = checkpoint[CHECKPOINT_KEY]
    config = CLIPConfig.from_dict(meta["model_config"])
    # The trunk weights are in the checkpoint; do not look for the original weights file.
    config.image.weights = None
    return config, model_state_dict(checkpoint), tokenizer_from_state_dict(meta["tokenizer"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO writing local files with ``atomic_torch_save``, optionally in the background.

    Lightning's own writer goes through a temporary file in ``$TMPDIR``; when that is another
    filesystem (node-local scratch) the final move is a copy, and a kill mid-copy leaves a
    truncated ``last.ckpt``. Remote URLs (``s3://`` ...) keep Lightning's behaviour.

    With ``async_save``, training waits only while the checkpoint's tensors are copied to host
    memory, a snapshot of that step; a thread then writes it. For ViT-B/16's 1.67 GiB checkpoint
    on the CPU machine training stopped 0.14 s instead of 2.2 s (``benchmarks/checkpoint_save.py``,
    ``benchmarks/RESULTS.md``, B). The host buffers stay allocated between saves (the checkpoint's
    size, pinned when the tensors are on a GPU). One write is in flight at a time: the next save,
    a load, a removal, ``wait`` and the end of training (``teardown``) wait for it and raise its
    error, if it had one. Lightning's ``AsyncCheckpointIO`` would keep its snapshot on the GPU.

    Args:
        async_save: Write in a background thread.
    """

    def __init__(self, async_save: bool = False) -> None:
        super().__init__()
        self.async_save = async_save
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._buffers: list[torch.Tensor] = []

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the trainer into the processes it starts; a thread pool cannot go along.
        return {**self.__dict__, "_executor": None, "_pending": None, "_buffers": []}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.wait()
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if not self.async_save:
            return write_checkpoint_file(checkpoint, path)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._executor.submit(write_checkpoint_file, self._snapshot(checkpoint), path)

    def _snapshot(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint with its tensors copied to host memory, into the last save's buffers.

        Every save has the same tensors, so the buffers are allocated (pinned, for copies from the
        GPU) once; fresh memory for each save would cost its page faults again.
        """
        old, new = iter(self._buffers), []

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            buffer = next(old, None)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            new.append(buffer.copy_(tensor.detach(), non_blocking=True))
            return buffer

        snapshot = apply_to_collection(checkpoint, torch.Tensor, copy)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the copies from the GPU are done before the thread reads them
        self._buffers = new
        return snapshot

    def wait(self) -> None:
        """Returns when the checkpoint being written, if any, is on disk; raises the write's error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        self.wait()
        if is_sharded_checkpoint(path):
            # A run saved with trainer=fsdp resumes without it: the shards gathered in every process.
            return read_checkpoint(path, optimizer=True)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        self.wait()


class ShardedCheckpointIO(CheckpointIO):
    """Writes sharded checkpoints: every rank its shards (DCP), committed once all of them are on disk.

    ``save_checkpoint(checkpoint, "…/last.ckpt")`` is called on every rank with Lightning's dictionary
    whose ``state_dict`` and optimizer state hold this rank's shards. Every rank writes its shards
    into ``last.ckpt.shards/step-<step>.partial/``; when all are written, rank 0 adds ``meta.pt``
    (the rest of the dictionary), renames the folder to ``step-<step>`` and points the symbolic
    link ``last.ckpt`` at it, an atomic replace, then removes the older folders. A run killed at any
    moment of a save leaves ``last.ckpt`` at the previous complete checkpoint; the next save removes
    the partial folder.

    With ``async_save``, training waits only while the shards are copied to host memory (DCP's
    ``async_save``); a thread writes them, over a gloo process group of its own so that its
    collectives never interleave with training's. The next save, a load, ``wait`` and the end of
    training commit the write in flight. Every method but ``remove_checkpoint`` is collective.

    Args:
        async_save: Write in the background.
    """

    def __init__(self, async_save: bool = False) -> None:
        self.async_save = async_save
        self._pending: tuple[Future, str, str, dict[str, Any]] | None = None
        self._group: Any = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        import torch.distributed.checkpoint as dcp

        self.wait()
        path = str(path)
        staging = self._staging_folder(path, int(checkpoint["global_step"]))
        state = {"state_dict": checkpoint["state_dict"]}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.get("optimizer_states", []))})
        meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        if not self.async_save:
            dcp.save(state, checkpoint_id=staging)
            return self._commit(staging, path, meta)
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        future = dcp.async_save(state, checkpoint_id=staging, process_group=self._group)
        self._pending = (future, staging, path, copy.deepcopy(meta))

    def _staging_folder(self, path: str, step: int) -> str:
        """Rank 0 makes an empty ``step-<step>.partial`` folder no committed checkpoint uses; all ranks get its name."""
        name = None
        if dist.get_rank() == 0:
            folder = path + SHARDED_FOLDER_SUFFIX
            os.makedirs(folder, exist_ok=True)
            taken = {entry for entry in os.listdir(folder) if not entry.endswith(PARTIAL_SUFFIX)}
            name, n = f"step-{step:09d}", 1
            while name in taken:  # the same step saved again (an interrupt right after a scheduled save)
                name, n = f"step-{step:09d}-{n}", n + 1
            staging = os.path.join(folder, name + PARTIAL_SUFFIX)
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        names = [name]
        dist.broadcast_object_list(names, src=0)
        return os.path.join(path + SHARDED_FOLDER_SUFFIX, names[0] + PARTIAL_SUFFIX)

    def _commit(self, staging: str, path: str, meta: dict[str, Any]) -> None:
        """Every rank's shards are written: rank 0 makes the folder ``last.ckpt``; all wait for it."""
        if dist.get_rank() == 0:
            atomic_torch_save(meta, os.path.join(staging, SHARDED_META_FILE))
            final = staging[: -len(PARTIAL_SUFFIX)]
            os.rename(staging, final)
            link = path + ".link" + PARTIAL_SUFFIX
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.relpath(final, os.path.dirname(path)), link)
            os.replace(link, path)
            folder = os.path.dirname(final)
            for entry in os.listdir(folder):
                if entry != os.path.basename(final):
                    shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
        dist.barrier()

    def wait(self) -> None:
        """Commits the checkpoint being written, if any, once every rank's shards are on disk; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            future, staging, path, meta = pending
            future.result()
            self._commit(staging, path, meta)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        self.wait()
        return read_checkpoint(path, optimizer=True)

    def remove_checkpoint(self, path: Any) -> None:
        """Removes the link ``path`` and its folders (rank 0 alone)."""
        path = str(path)
        if os.path.lexists(path):
            os.remove(path)
        shutil.rmtree(path + SHARDED_FOLDER_SUFFIX, ignore_errors=True)

    def teardown(self) -> None:
        self.wait()


def wait_for_write(io: Any) -> None:
    """Returns when the checkpoint that ``io``, a trainer's checkpoint IO, is writing is on disk (collective)."""
    if isinstance(io, (AtomicCheckpointIO, ShardedCheckpointIO)):
        io.wait()
