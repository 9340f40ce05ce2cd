"""Reading models: ``read_model_file`` for clip_pl's own files, ``load`` (``clip_pl.load``) for any model.

``read_model_file`` gives the config, weights and tokenizer of a training checkpoint or an export
without building the model; ``load`` builds it, from those files or from OpenCLIP/OpenAI models, with
its image transform and tokenizer.

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
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from clip_pl.model import CLIP, CLIPConfig
from clip_pl.model_files.checkpoint import is_sharded_checkpoint, model_contents, read_checkpoint
from clip_pl.model_files.export import FORMAT, invalid_export, is_safetensors_file, read_exported
from clip_pl.model_files.openclip_models import (
    CONFIG_FILE,
    create_model_from_openclip,
    is_torchscript_file,
    load_openclip,
)
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


@dataclass
class ModelFile:
    """What a clip_pl model file holds, read without building the model.

    Attributes:
        path: The file (or sharded checkpoint folder) it was read from.
        kind: ``"checkpoint"`` (a training checkpoint) or ``"export"`` (an exported ``.safetensors``).
        config: The model config.
        state_dict: The ``CLIP`` state dict (keys such as ``image_tower.proj.weight``).
        tokenizer: The tokenizer the model was trained with.
    """

    path: str
    kind: str
    config: CLIPConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: TextTokenizer

    def build(self) -> CLIP:
        """The model with these weights, in eval mode on CPU."""
        model = CLIP(self.config)
        try:
            # strict=False so that the error below can say what is missing and what is extra.
            result = model.load_state_dict(self.state_dict, strict=False)
        except RuntimeError as e:  # Shape mismatches are raised even when strict=False.
            raise self._invalid(f"its weights do not fit its model_config ({e})") from None
        if result.missing_keys or result.unexpected_keys:
            raise self._invalid(
                f"its weights do not fit its model_config ({len(result.missing_keys)} missing, e.g. "
                f"{result.missing_keys[:3]}; {len(result.unexpected_keys)} unexpected, e.g. "
                f"{result.unexpected_keys[:3]})"
            )
        return model.eval()

    def _invalid(self, what: str) -> ValueError:
        if self.kind == "export":
            return invalid_export(self.path, what)
        return ValueError(f"{self.path!r} is not a valid clip_pl checkpoint: {what}")


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """Reads a clip_pl model file: a training checkpoint (file or sharded folder) or an export.

    The format is told from the content: an export is a ``.safetensors`` file (``read_exported``),
    anything else is read as a training checkpoint (``read_checkpoint``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} not found")
    if os.path.isfile(path) and is_safetensors_file(path):
        return ModelFile(path, "export", *read_exported(path))
    return ModelFile(path, "checkpoint", *model_contents(read_checkpoint(path)))


def _exported_tokenizer(folder: str) -> TextTokenizer | None:
    """The tokenizer that ``python -m clip_pl.export --format open_clip`` names in its folder; None for other folders.

    A model trained with SentencePiece keeps its own ids there, which OpenAI's BPE would not give.
    """
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

    The format is detected from the content, not the name: a clip_pl training checkpoint (``.ckpt``
    file or sharded folder) or export (a ``.safetensors`` file whose metadata ``format`` is
    ``clip_pl``), read by ``read_model_file``; an OpenCLIP hub-style folder or one of OpenAI's
    TorchScript ``.pt`` files; any other weights file (an OpenCLIP ``.safetensors``, ``.bin``,
    ``.pt``) with ``openclip_model``. OpenCLIP/OpenAI models come with
    OpenAI's BPE tokenizer (``clip_pl.model_files.openclip_models.load_openclip``); a folder written by
    ``python -m clip_pl.export --format open_clip`` with the tokenizer it names.

    Args:
        path: The file or folder.
        openclip_model: The OpenCLIP model name (``ViT-B-32``) or config ``.json`` of a bare OpenCLIP
            weights file; for a folder it replaces the folder's own config.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} not found")
    own_config = f"{path!r} is a clip_pl model file, which holds its own model config: drop openclip_model"
    if is_sharded_checkpoint(path):
        if openclip_model is not None:
            raise ValueError(own_config)
    elif os.path.isdir(path):
        tokenizer = _exported_tokenizer(path)
        if tokenizer is None:
            return load_openclip(path, openclip_model)
        return create_model_from_openclip(path, openclip_model, load_weights=True).eval(), tokenizer
    elif is_torchscript_file(path):
        return load_openclip(path, openclip_model)
    elif is_safetensors_file(path):
        if not _is_clip_pl_export(path):
            if openclip_model is None:
                raise ValueError(f"{path!r} has weights but not clip_pl's metadata; {_OPENCLIP_HINT}")
            return load_openclip(path, openclip_model)
        if openclip_model is not None:
            raise ValueError(own_config)
    elif openclip_model is not None:
        return load_openclip(path, openclip_model)
    try:
        file = read_model_file(path)
    except ValueError as e:
        raise ValueError(f"{e}; {_OPENCLIP_HINT}") from None
    return file.build(), file.tokenizer


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
