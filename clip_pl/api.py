"""``clip_pl.load``: a trained model, its image transform and its tokenizer in one call.

Example:
    >>> model, preprocess, tokenizer = clip_pl.load("model.safetensors")
    >>> image_features = model.encode_image(preprocess(pil_image).unsqueeze(0))
    >>> text_features = model.encode_text(tokenizer(["a photo of a dog"]))
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from safetensors.torch import load_file

from clip_pl.checkpoint import STATE_DICT_PREFIX, model_from_checkpoint, read_checkpoint
from clip_pl.export import is_safetensors_file, read_exported
from clip_pl.model import CLIP
from clip_pl.tokenizer import Tokenizer
from clip_pl.transforms import image_transform


def load_model(path: str | os.PathLike) -> tuple[CLIP, Tokenizer]:
    """The model (eval mode, on CPU) and tokenizer from a ``.ckpt`` or an exported ``.safetensors`` file.

    The format is detected from the file's first bytes, not its name.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {os.fspath(path)!r} not found")
    if is_safetensors_file(path):
        return read_exported(path)
    return model_from_checkpoint(read_checkpoint(path))


def load(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[CLIP, Callable[..., torch.Tensor], Tokenizer]:
    """Loads a trained model for inference.

    Args:
        path: A training checkpoint (``.ckpt``) or a file written by ``python -m clip_pl.export``.
        device: Where to put the model.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode on ``device``; the evaluation
        image transform (PIL image -> normalized ``[3, S, S]`` tensor, see
        ``clip_pl.transforms.image_transform``); the tokenizer (list of str -> ``LongTensor[B, L]``).
    """
    model, tokenizer = load_model(path)
    model = model.to(device).eval()
    return model, image_transform(model.preprocess_config), tokenizer


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``CLIP`` state dict (keys such as ``image_tower.proj.weight``) stored in a model file.

    Reads only the weights, without building the model; see ``load_model`` for the formats.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {os.fspath(path)!r} not found")
    if is_safetensors_file(path):
        return load_file(path, device="cpu")
    state = read_checkpoint(path)["state_dict"]
    return {k[len(STATE_DICT_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_DICT_PREFIX)}
