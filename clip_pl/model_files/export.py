"""The exported model: one self-contained ``.safetensors`` file for inference.

The file holds the model weights (state dict keys of ``CLIP``, no ``model.`` prefix) and, in the
safetensors string metadata, everything else needed to rebuild the model:

- ``format``: ``"clip_pl"``, and ``format_version``: ``"1"``;
- ``model_config``: ``CLIPConfig.to_dict()`` as JSON;
- ``tokenizer_kind``: ``"sentencepiece"`` (the default when absent) or ``"openclip_bpe"``;
- ``tokenizer_model``: the SentencePiece model bytes, or the gzipped BPE merges file, base64;
- ``tokenizer_context_length`` and ``tokenizer_lowercase`` (``"true"``/``"false"``; always
  ``"false"`` for ``openclip_bpe``, which lowercases as part of its own clean-up).

Unlike a training checkpoint it carries no optimizer state and reading it never unpickles
anything, so it is safe to load from an untrusted source.

``python -m clip_pl.export`` writes it from a training checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clip_pl.model import CLIP, CLIPConfig
from data_pipelines.atomic import atomic_output
from data_pipelines.tokenizer import TextTokenizer, Tokenizer, tokenizer_from_state_dict

FORMAT = "clip_pl"
FORMAT_VERSION = "1"
_REQUIRED_METADATA = ("model_config", "tokenizer_model", "tokenizer_context_length", "tokenizer_lowercase")


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file: a little-endian u64 header size, then ``{``.

    Torch checkpoints start with ``PK`` (zip) or a pickle opcode, so this tells them apart; the size
    is not checked against the file's, so a truncated export is still reported as one.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1


def _tokenizer_bytes(tokenizer: TextTokenizer) -> bytes:
    state = tokenizer.state_dict()
    return state["model_proto"] if tokenizer.kind == Tokenizer.kind else state["merges"]


def export_model(model: CLIP, tokenizer: TextTokenizer, path: str | os.PathLike) -> None:
    """Writes ``model`` and ``tokenizer`` to one safetensors file.

    The file is written next to ``path`` and renamed into place, so an interrupted export never
    leaves a truncated file behind.
    """
    config = CLIPConfig.from_dict(model.config.to_dict())
    # The trunk weights are in the file; a path to the original weights would be meaningless elsewhere.
    config.image.weights = None
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(config.to_dict()),
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_model": base64.b64encode(_tokenizer_bytes(tokenizer)).decode("ascii"),
        "tokenizer_context_length": str(tokenizer.context_length),
        "tokenizer_lowercase": "true" if getattr(tokenizer, "lowercase", False) else "false",
    }
    # safetensors stores plain contiguous buffers; views and non-contiguous tensors must be copied.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def invalid_export(path: str, what: str) -> ValueError:
    """The error for a file that is not a valid export, saying how to write a valid one."""
    return ValueError(
        f"{path!r} is not a valid clip_pl export: {what}. Re-export it with "
        "`python -m clip_pl.export CHECKPOINT.ckpt OUT.safetensors`"
    )


def _tokenizer_from_metadata(path: str, metadata: dict[str, str]) -> TextTokenizer:
    try:
        model_proto = base64.b64decode(metadata["tokenizer_model"], validate=True)
    except binascii.Error as e:
        raise invalid_export(path, f"tokenizer_model is not base64 ({e})") from None
    try:
        context_length = int(metadata["tokenizer_context_length"])
    except ValueError:
        raise invalid_export(
            path, f"tokenizer_context_length {metadata['tokenizer_context_length']!r} is not an integer"
        ) from None
    lowercase = metadata["tokenizer_lowercase"]
    if lowercase not in ("true", "false"):
        raise invalid_export(path, f"tokenizer_lowercase must be 'true' or 'false', got {lowercase!r}")
    kind = metadata.get("tokenizer_kind", Tokenizer.kind)
    if kind == Tokenizer.kind:
        state = {"model_proto": model_proto, "lowercase": lowercase == "true"}
    else:
        state = {"merges": model_proto}
    try:
        return tokenizer_from_state_dict({**state, "kind": kind, "context_length": context_length})
    except (RuntimeError, ValueError) as e:
        raise invalid_export(path, f"the tokenizer cannot be rebuilt ({e})") from None


def _config_from_metadata(path: str, metadata: dict[str, str]) -> CLIPConfig:
    try:
        config = CLIPConfig.from_dict(json.loads(metadata["model_config"]))
    except json.JSONDecodeError as e:
        raise invalid_export(path, f"model_config is not JSON ({e})") from None
    except (TypeError, AttributeError, ValueError) as e:
        raise invalid_export(path, f"model_config does not describe a CLIPConfig ({e})") from None
    config.image.weights = None
    return config


def read_exported(path: str | os.PathLike) -> tuple[CLIPConfig, dict[str, torch.Tensor], TextTokenizer]:
    """The model config, weights and tokenizer of an exported file, the tokenizer checked against the config.

    Whether the weights fit the config is checked when the model is built (``ModelFile.build``).

    Raises:
        ValueError: The file is not a clip_pl export, or its metadata is inconsistent.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model {path!r} not found")
    if not is_safetensors_file(path):
        raise invalid_export(path, "it is not a safetensors file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise invalid_export(path, f"safetensors cannot read it ({e})") from None
    if metadata.get("format") != FORMAT:
        raise invalid_export(path, f"its metadata 'format' is {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise invalid_export(
            path,
            f"format_version {metadata.get('format_version')!r} is not supported by this clip_pl "
            f"(it reads version {FORMAT_VERSION})",
        )
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing:
        raise invalid_export(path, f"its metadata lacks {', '.join(missing)}")
    tokenizer = _tokenizer_from_metadata(path, metadata)
    config = _config_from_metadata(path, metadata)
    if tokenizer.vocab_size > config.text.vocab_size:
        raise invalid_export(
            path,
            f"its tokenizer has {tokenizer.vocab_size} pieces but the text tower only "
            f"{config.text.vocab_size} token embeddings",
        )
    return config, state, tokenizer
