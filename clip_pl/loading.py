"""``clip_pl.load``: a trained or pretrained model, its image transform and its tokenizer in one call.

Example:
    >>> model, preprocess, tokenizer = clip_pl.load("model.safetensors")  # or an OpenCLIP folder, OpenAI's .pt
    >>> image_features = model.encode_image(preprocess(pil_image).unsqueeze(0))
    >>> text_features = model.encode_text(tokenizer(["a photo of a dog"]))
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from clip_pl.checkpoint import model_from_checkpoint, model_state_dict, read_checkpoint
from clip_pl.export import FORMAT, is_safetensors_file, read_exported
from clip_pl.model import CLIP
from data_pipelines.tokenizer import TextTokenizer, Tokenizer
from data_pipelines.transforms import image_transform


_OPENCLIP_HINT = (
    "for OpenCLIP/OpenAI weights, name the model they hold: openclip_model=NAME or a config .json "
    "(--openclip-model on the command line)"
)


def _is_clip_pl_export(path: str) -> bool:
    """Whether a safetensors file is clip_pl's export: its metadata names the format or holds a model config.

    OpenCLIP's ``.safetensors`` files have no metadata, or only ``{"format": "pt"}``. An unreadable file
    counts as an export, so that ``read_exported`` says what is wrong with it.
    """
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except SafetensorError:
        return True
    return metadata.get("format") == FORMAT or "model_config" in metadata


def _exported_tokenizer(folder: str) -> TextTokenizer | None:
    """The tokenizer that ``python -m clip_pl.export --format open_clip`` names in its folder; None for other folders.

    A model trained with SentencePiece keeps its own ids there, which OpenAI's BPE would not give.
    """
    from clip_pl.openclip_models import CONFIG_FILE
    from data_pipelines.openclip_tokenizer import OpenCLIPTokenizer

    config = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        note = json.load(f).get("clip_pl", {}).get("tokenizer")
    if note is None:
        return None
    if note["kind"] == OpenCLIPTokenizer.kind:
        return OpenCLIPTokenizer.from_file(context_length=note["context_length"])
    return Tokenizer.from_file(
        os.path.join(folder, note["file"]), context_length=note["context_length"], lowercase=note["lowercase"]
    )


def load_model(path: str | os.PathLike, openclip_model: str | None = None) -> tuple[CLIP, TextTokenizer]:
    """The model (eval mode, on CPU) and tokenizer of a clip_pl model file or a pretrained OpenCLIP/OpenAI model.

    The format is detected from the content, not the name: a clip_pl training checkpoint (``.ckpt``)
    or export (a ``.safetensors`` file whose metadata ``format`` is ``clip_pl``); an OpenCLIP hub-style
    folder or one of OpenAI's TorchScript ``.pt`` files; any other weights file (an OpenCLIP
    ``.safetensors``, ``.bin``, ``.pt``) with ``openclip_model``. OpenCLIP/OpenAI models come with
    OpenAI's BPE tokenizer (``clip_pl.openclip_models.load_openclip``); a folder written by
    ``python -m clip_pl.export --format open_clip`` with the tokenizer it names.

    Args:
        path: The file or folder.
        openclip_model: The OpenCLIP model name (``ViT-B-32``) or config ``.json`` of a bare OpenCLIP
            weights file; for a folder it replaces the folder's own config.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} not found")
    # Imported here: openclip_models imports clip_pl.convert, which imports this module.
    from clip_pl.openclip_models import create_model_from_openclip, is_torchscript_file, load_openclip

    if os.path.isdir(path):
        tokenizer = _exported_tokenizer(path)
        if tokenizer is None:
            return load_openclip(path, openclip_model)
        return create_model_from_openclip(path, openclip_model, load_weights=True).eval(), tokenizer
    if is_torchscript_file(path):
        return load_openclip(path, openclip_model)
    if is_safetensors_file(path):
        if _is_clip_pl_export(path):
            if openclip_model is not None:
                raise ValueError(f"{path!r} is a clip_pl export, which holds its own model config: drop openclip_model")
            return read_exported(path)
        if openclip_model is None:
            raise ValueError(f"{path!r} has weights but not clip_pl's metadata; {_OPENCLIP_HINT}")
        return load_openclip(path, openclip_model)
    if openclip_model is not None:
        return load_openclip(path, openclip_model)
    try:
        checkpoint = read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"{e}; {_OPENCLIP_HINT}") from None
    return model_from_checkpoint(checkpoint)


def load(
    path: str | os.PathLike, device: str | torch.device = "cpu", openclip_model: str | None = None
) -> tuple[CLIP, Callable[..., torch.Tensor], TextTokenizer]:
    """Loads a trained or pretrained model for inference.

    Args:
        path: A training checkpoint (``.ckpt``), a file written by ``python -m clip_pl.export``, or a
            pretrained OpenCLIP/OpenAI model: a hub-style folder, one of OpenAI's TorchScript ``.pt``
            files, or a weights file with ``openclip_model``; see ``load_model``.
        device: Where to put the model.
        openclip_model: The OpenCLIP model name or config ``.json`` of a bare OpenCLIP weights file.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode on ``device``; the evaluation
        image transform (PIL image -> normalized ``[3, S, S]`` tensor, see
        ``data_pipelines.transforms.image_transform``; for OpenCLIP's ViTs OpenAI's mean and std with a
        bicubic resize, as open_clip preprocesses); the tokenizer (list of str -> ``LongTensor[B, L]``).
    """
    model, tokenizer = load_model(path, openclip_model)
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
    return model_state_dict(read_checkpoint(path))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options that name a model for ``load``: ``--checkpoint`` and ``--openclip-model``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="training checkpoint (.ckpt), exported .safetensors, or a pretrained OpenCLIP/OpenAI model: "
        "hub-style folder, OpenAI's TorchScript .pt, or a weights file with --openclip-model",
    )
    parser.add_argument(
        "--openclip-model",
        help="the OpenCLIP model name (ViT-B-32) or config .json of a bare OpenCLIP weights file",
    )
