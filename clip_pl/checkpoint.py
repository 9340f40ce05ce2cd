"""Checkpoint files: crash-safe writing, and reading a model back out of one.

A training checkpoint is Lightning's dictionary plus one entry, ``checkpoint["clip_pl"]``, holding
everything needed to rebuild the model without the training config: the model config and the
tokenizer (its sentencepiece model bytes). Model weights are ``checkpoint["state_dict"]`` with the
prefix ``model.``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

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
