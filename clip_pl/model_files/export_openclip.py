"""A clip_pl model as an OpenCLIP model folder, laid out as open_clip's Hugging Face hub repositories are.

``open_clip.create_model_and_transforms("local-dir:OUT_DIR")`` loads the folder, which holds:

- ``open_clip_config.json``: ``model_cfg`` (``openclip_models.openclip_config_from``); ``preprocess_cfg``
  (the model's image size, mean, std and interpolation; ``resize_mode`` ``shortest``, the resize of the
  shorter side and center crop that clip_pl's evaluation does); and a ``clip_pl`` entry saying which
  tokenizer gives the text tower's ids, which open_clip ignores;
- ``open_clip_model.safetensors``: the weights under OpenCLIP's keys (``convert.openclip_state_dict``);
- ``tokenizer.model``, for a model trained with a SentencePiece tokenizer only.

A model with the ``openclip_bpe`` tokenizer is complete: ``open_clip.get_tokenizer("local-dir:OUT_DIR")``
gives its ids. open_clip has no SentencePiece tokenizer, and its BPE gives other ids, so the towers of
a SentencePiece model only work on the ids of ``data_pipelines.tokenizer.Tokenizer.from_file("OUT_DIR/tokenizer.model",
context_length=...)``; the export says so in a warning.

``OUT_DIR`` may be new, empty, or an earlier export (its config has the ``clip_pl`` entry, or it holds
nothing but the export's files); any other non-empty folder is refused rather than mixed with the
export. Each file is written atomically, and the config last, after the old one is removed, so a
folder with a config is never a mix of two exports.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from safetensors.torch import save_file

from clip_pl.model import CLIP
from clip_pl.model_files.convert import openclip_state_dict
from clip_pl.model_files.load import load_model
from clip_pl.model_files.openclip_models import CONFIG_FILE, openclip_config_from
from data_pipelines.atomic import atomic_output, remove_stale_temporaries
from data_pipelines.openclip_tokenizer import KIND as OPENCLIP_BPE
from data_pipelines.tokenizer import TextTokenizer

WEIGHTS_FILE = "open_clip_model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
_TEMPORARY_PREFIXES = tuple(f".{name}." for name in _FILES)


def openclip_folder_config(model: CLIP, tokenizer: TextTokenizer) -> dict[str, Any]:
    """The ``open_clip_config.json`` of the export of ``model`` and ``tokenizer``.

    Raises:
        ValueError: open_clip cannot build the model (not a CLIP ViT image tower).
    """
    preprocess = model.preprocess_config
    note: dict[str, Any] = {"kind": tokenizer.kind, "context_length": tokenizer.context_length}
    if tokenizer.kind != OPENCLIP_BPE:
        note.update(file=TOKENIZER_FILE, lowercase=bool(getattr(tokenizer, "lowercase", False)))
    return {
        "model_cfg": openclip_config_from(model),
        "preprocess_cfg": {
            "size": preprocess.image_size,
            "mean": list(preprocess.mean),
            "std": list(preprocess.std),
            "interpolation": preprocess.interpolation,
            "resize_mode": "shortest",
        },
        "clip_pl": {"tokenizer": note},
    }


def _is_earlier_export(directory: str) -> bool:
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            return "clip_pl" in json.load(f)
    except (OSError, ValueError):  # no config, or not JSON: not one of ours
        return False


def _check_output_dir(directory: str) -> None:
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory!r} is a file; --format open_clip writes a folder, give a folder path")
    # An export killed mid-write leaves its files and atomic_output's temporaries of them.
    names = os.listdir(directory)
    if all(n in _FILES or n.startswith(_TEMPORARY_PREFIXES) for n in names) or _is_earlier_export(directory):
        remove_stale_temporaries(directory)
        return
    raise ValueError(
        f"{directory!r} is not empty and not an open_clip export of clip_pl; give a new or empty folder "
        "so that no other model's files end up next to the export"
    )


def _tokenizer_warnings(model: CLIP, tokenizer: TextTokenizer, directory: str) -> list[str]:
    if tokenizer.kind != OPENCLIP_BPE:
        lowercase = ", lowercase=True" if getattr(tokenizer, "lowercase", False) else ""
        return [
            f"open_clip's tokenizer will NOT give this model's token ids (it was trained with a {tokenizer.kind} "
            "tokenizer, open_clip's is OpenAI's BPE); tokenize with clip_pl instead: "
            f"data_pipelines.tokenizer.Tokenizer.from_file({os.path.join(directory, TOKENIZER_FILE)!r}, "
            f"context_length={tokenizer.context_length}{lowercase}), then model.encode_text(ids)"
        ]
    if tokenizer.context_length != model.config.text.context_length:
        return [
            f"clip_pl's tokenizer cuts captions at {tokenizer.context_length} tokens and open_clip's at "
            f"{model.config.text.context_length}: captions longer than {tokenizer.context_length} tokens get "
            "other embeddings in open_clip"
        ]
    return []


def export_openclip(model: CLIP, tokenizer: TextTokenizer, directory: str | os.PathLike) -> None:
    """Writes ``model`` as an OpenCLIP model folder (see the module docstring).

    Warns (``UserWarning``) where open_clip's tokenizer does not give the ids ``tokenizer`` gives.

    Raises:
        ValueError: open_clip cannot build the model, or ``directory`` holds other files.
        NotADirectoryError: ``directory`` is a file.
    """
    directory = os.fspath(directory)
    # Everything that can fail on the model fails before the folder is touched.
    config = openclip_folder_config(model, tokenizer)
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in openclip_state_dict(model).items()}
    _check_output_dir(directory)
    os.makedirs(directory, exist_ok=True)
    config_path, tokenizer_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, TOKENIZER_FILE)
    if os.path.exists(config_path):
        os.unlink(config_path)
    with atomic_output(os.path.join(directory, WEIGHTS_FILE)) as tmp:
        save_file(tensors, tmp)
    if tokenizer.kind == OPENCLIP_BPE:
        if os.path.exists(tokenizer_path):  # an earlier export's, of a SentencePiece model
            os.unlink(tokenizer_path)
    else:
        tokenizer.save(tokenizer_path)
    with atomic_output(config_path) as tmp, open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    for message in _tokenizer_warnings(model, tokenizer, directory):
        warnings.warn(message, UserWarning, stacklevel=2)


def export_openclip_file(source: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Converts a training checkpoint (``.ckpt``) or a clip_pl ``.safetensors`` export into an OpenCLIP folder."""
    model, tokenizer = load_model(source)
    export_openclip(model, tokenizer, directory)
