"""Checkpoint files: crash-safe writing (Lightning's too, ``AtomicCheckpointIO``), and a model read back out.

A training checkpoint is Lightning's dictionary plus one entry, ``checkpoint["clip_pl"]``, holding
everything needed to rebuild the model without the training config: the model config and the
tokenizer (its sentencepiece model bytes). Model weights are ``checkpoint["state_dict"]`` with the
prefix ``model.``.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from clip_pl.model import CLIP, CLIPConfig
from data_pipelines.atomic import atomic_output
from data_pipelines.tokenizer import TextTokenizer, tokenizer_from_state_dict

CHECKPOINT_KEY = "clip_pl"
STATE_DICT_PREFIX = "model."


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (see ``atomic_output``)."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a training checkpoint without executing code from it (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler's KeyError, UnpicklingError, RuntimeError... for other files
        raise ValueError(f"{str(path)!r} is not a clip_pl training checkpoint: torch.load failed ({e!r})") from e
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a clip_pl training checkpoint (no {CHECKPOINT_KEY!r} entry)")
    return checkpoint


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a training checkpoint was saved at, read without loading its tensors."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def shape_differences(
    path: str | os.PathLike, module: torch.nn.Module
) -> list[tuple[str, torch.Size | None, torch.Size | None]]:
    """Tensors of ``module``'s state dict whose shape differs from the checkpoint's, or that only one has.

    Reads shapes only: the checkpoint is memory-mapped, its data not loaded.

    Returns:
        ``(name, shape in the checkpoint, shape in the module)`` sorted by name; ``None`` where absent.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    return state_shape_differences(saved, module)


def state_shape_differences(
    state: dict[str, torch.Tensor], module: torch.nn.Module
) -> list[tuple[str, torch.Size | None, torch.Size | None]]:
    """Tensors whose shape differs between ``state`` and ``module``'s state dict, or that only one has.

    Returns:
        ``(name, shape in state, shape in the module)`` sorted by name; ``None`` where absent.
    """
    theirs = {name: tensor.shape for name, tensor in state.items()}
    ours = {name: tensor.shape for name, tensor in module.state_dict().items()}
    names = sorted(name for name in theirs.keys() | ours.keys() if theirs.get(name) != ours.get(name))
    return [(name, theirs.get(name), ours.get(name)) for name in names]


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``CLIP`` state dict in a Lightning checkpoint dict: its ``model.*`` entries, prefix removed."""
    state = checkpoint["state_dict"]
    return {k[len(STATE_DICT_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_DICT_PREFIX)}


def model_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[CLIP, TextTokenizer]:
    """Rebuilds the trained model (eval mode, on CPU) and its tokenizer from a checkpoint dict."""
    meta = checkpoint[CHECKPOINT_KEY]
    config = CLIPConfig.from_dict(meta["model_config"])
    # The trunk weights are in the checkpoint; do not look for the original weights file.
    config.image.weights = None
    model = CLIP(config)
    model.load_state_dict(model_state_dict(checkpoint))
    return model.eval(), tokenizer_from_state_dict(meta["tokenizer"])


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
            return atomic_torch_save(checkpoint, path)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._executor.submit(atomic_torch_save, self._snapshot(checkpoint), path)

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

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        self.wait()
