"""OpenAI and OpenCLIP ViT CLIPs as clip_pl models: their configs, their files, both towers.

Sources of a pretrained model (nothing is downloaded):

- a Hugging Face hub-style folder: ``open_clip_config.json`` plus ``open_clip_model.safetensors``
  (or ``open_clip_pytorch_model.bin`` / ``.pth`` / ``.safetensors``), as ``hf-hub:`` repositories hold them;
- a weights file (``.safetensors``, ``.bin``, ``.pt``, an OpenCLIP training checkpoint) plus
  ``model_name``: an OpenCLIP model name (``ViT-L-14``, ``ViT-B-32-quickgelu``; the configs bundled
  with the open_clip package) or a model config ``.json`` (a user's own sizes included);
- OpenAI's original TorchScript files (``ViT-B-32.pt``...), whose config is read off the weights.

Families: OpenCLIP's own ViT towers at any size, so B/32, B/16, L/14, L/14-336, H/14, g/14 and
bigG/14, with QuickGELU where the config says so and other image sizes with the position embedding
resampled. Not supported, with a one-line error: OpenCLIP's ResNets (``ModifiedResNet`` has no timm
counterpart), towers hosted by timm or Hugging Face inside OpenCLIP (SigLIP, ConvNeXt, EVA, MobileCLIP,
XLM-R text...), and text-tower variants clip_pl does not build (no causal mask, pooling other than
at the end token, layer scale, projection bias).

The image tower becomes timm's CLIP ViT (``vit_base_patch16_clip[_quickgelu]_224`` sized by
``model_kwargs``), the text tower clip_pl's ``TextTower`` pooling at the BPE's end token (49407,
the id OpenCLIP's argmax pools at). ``openclip_config_from`` goes the other way, for export.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from typing import Any

import torch

from clip_pl.model import (
    CLIP,
    CLIPConfig,
    ImageTowerConfig,
    TextTowerConfig,
    _is_clip_vit,
    replace_tower_fields,
)
from clip_pl.model_files.convert import load_openclip_model, read_weights_file

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
# eos_id/pad_id with pool_type "eos": how clip_pl's export describes a tower pooled at a non-final end id.
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "eos_id", "pad_id"}
_TOP_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias"}
# Keys OpenCLIP writes, with the values clip_pl builds.
_NEUTRAL = {
    ("text_cfg", "pool_type"): ("argmax", "eos"),
    ("text_cfg", "proj_bias"): (False,),
    ("vision_cfg", "pool_type"): ("tok",),
}


def _base_vit(quick_gelu: bool) -> str:
    return "vit_base_patch16_clip_quickgelu_224" if quick_gelu else "vit_base_patch16_clip_224"


def clip_config_from_openclip(model_cfg: dict[str, Any]) -> CLIPConfig:
    """The clip_pl config of an OpenCLIP ``model_cfg`` (the dict in ``model_configs/*.json``).

    Raises:
        ValueError: The config names a tower clip_pl cannot build; the message names the key.
    """
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    # The towers first: their keys say most about what the model is.
    for part, keys, allowed in (("vision_cfg", vision, _VISION_KEYS), ("text_cfg", text, _TEXT_KEYS),
                                ("", model_cfg, _TOP_KEYS)):  # fmt: skip
        for key in keys:
            if key not in allowed and keys[key] not in _NEUTRAL.get((part, key), ()):
                where = f"{part}.{key}" if part else key
                raise ValueError(
                    f"OpenCLIP config key {where}={keys[key]!r} names a tower clip_pl does not build; it loads "
                    "OpenCLIP's ViT CLIPs (ViT-B-32 ... ViT-bigG-14, -quickgelu and other image sizes included), "
                    "not its ResNets or towers hosted by timm or Hugging Face (SigLIP, ConvNeXt, EVA, XLM-R...)"
                )
    if not isinstance(vision.get("layers", 12), int):
        raise ValueError("the OpenCLIP config is a ResNet (vision_cfg.layers is a list), which timm cannot host")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    width, head_width = vision.get("width", 768), vision.get("head_width", 64)
    image = ImageTowerConfig(
        name=_base_vit(quick_gelu),
        image_size=vision.get("image_size", 224),
        model_kwargs={
            "patch_size": vision.get("patch_size", 16),
            "depth": vision.get("layers", 12),
            "embed_dim": width,
            "num_heads": width // head_width,
            "mlp_ratio": vision.get("mlp_ratio", 4.0),
        },
    )
    vocab_size = text.get("vocab_size", 49408)
    text_config = TextTowerConfig(
        vocab_size=vocab_size,
        context_length=text.get("context_length", 77),
        width=text.get("width", 512),
        layers=text.get("layers", 12),
        heads=text.get("heads", 8),
        mlp_ratio=text.get("mlp_ratio", 4.0),
        pad_id=text.get("pad_id", 0),
        # OpenCLIP's default pooling (argmax) takes the highest id: the end token of OpenAI's BPE.
        eos_id=text.get("eos_id", vocab_size - 1) if text.get("pool_type") == "eos" else vocab_size - 1,
        quick_gelu=quick_gelu,
    )
    extra = {k: model_cfg[k] for k in ("init_logit_scale", "init_logit_bias") if model_cfg.get(k) is not None}
    return CLIPConfig(embed_dim=model_cfg["embed_dim"], image=image, text=text_config, **extra)


def openclip_config_from(model: CLIP) -> dict[str, Any]:
    """The OpenCLIP ``model_cfg`` of a clip_pl model, for an export open_clip can build.

    A text tower whose end token is not the last id (a SentencePiece vocabulary) gets OpenCLIP's
    ``pool_type: eos`` with its ``eos_id``, so that it pools where clip_pl's does.

    Raises:
        ValueError: The image tower is not a CLIP ViT, or the towers' activations differ.
    """
    trunk, config = model.image_tower.trunk, model.config
    if not _is_clip_vit(trunk) or trunk.cls_token is None or trunk.global_pool != "token":
        raise ValueError(
            f"open_clip builds only CLIP ViT image towers (timm's vit_*_clip_*), not {config.image.name!r}; "
            "export this model in clip_pl's format"
        )
    quick_gelu = "quickgelu" in config.image.name
    if quick_gelu != config.text.quick_gelu:
        raise ValueError("open_clip uses one activation for both towers; this model's image and text towers differ")
    block = trunk.blocks[0]
    vision = {
        "image_size": config.image.image_size,
        "layers": len(trunk.blocks),
        "width": trunk.embed_dim,
        "patch_size": trunk.patch_embed.patch_size[0],
        "head_width": trunk.embed_dim // block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / trunk.embed_dim,
    }
    text = {
        "context_length": config.text.context_length,
        "vocab_size": config.text.vocab_size,
        "width": config.text.width,
        "heads": config.text.heads,
        "layers": config.text.layers,
        "mlp_ratio": config.text.mlp_ratio,
    }
    if config.text.eos_id != config.text.vocab_size - 1:
        # OpenCLIP's default pools at the highest id, which is the end token only in OpenAI's vocabulary.
        text.update(pool_type="eos", eos_id=config.text.eos_id, pad_id=config.text.pad_id)
    cfg = {"embed_dim": config.embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": text}
    if config.init_logit_bias is not None:
        cfg["init_logit_bias"] = config.init_logit_bias
    return cfg


def _openai_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config of one of OpenAI's released ViTs, read off its weights (they all use QuickGELU, 64-wide heads)."""
    patch_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    return {
        "embed_dim": state["text_projection"].shape[1],
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": patch * grid,
            "layers": len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")}),
            "width": patch_width,
            "patch_size": patch,
        },
        "text_cfg": {
            "context_length": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        },
    }


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's original files): a zip holding compiled ``code/``.

    ``torch.save`` writes zip archives too, but without code; reading the directory tells them apart
    without loading any weights.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _read_torchscript(path: str) -> dict[str, torch.Tensor] | None:
    """The state dict of a TorchScript archive (OpenAI's original files), or None for any other file."""
    if not is_torchscript_file(path):
        return None
    with warnings.catch_warnings():
        # torch deprecates TorchScript; OpenAI's released files exist only in it.
        warnings.filterwarnings("ignore", message=r"`torch.jit.load` is deprecated", category=FutureWarning)
        try:
            archive = torch.jit.load(path, map_location="cpu")
        except RuntimeError as e:
            first_line = str(e).splitlines()[0]
            raise ValueError(f"{path!r} is a TorchScript archive torch.jit.load cannot read ({first_line})") from None
    return {k: v.float() for k, v in archive.state_dict().items()}


def _named_config(model_name: str) -> dict[str, Any]:
    if model_name.endswith(".json"):
        if not os.path.isfile(model_name):
            raise FileNotFoundError(f"OpenCLIP model config {model_name!r} not found")
        with open(model_name) as f:
            loaded = json.load(f)
        return loaded.get("model_cfg", loaded)
    try:
        import open_clip
    except ImportError:
        raise ImportError(
            f"the OpenCLIP model name {model_name!r} is looked up in the open_clip package: "
            'pip install -e ".[openclip]", or give the model config as a .json file'
        ) from None
    config = open_clip.get_model_config(model_name)
    if config is None:
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise ValueError(f"unknown OpenCLIP model name {model_name!r}{hint}")
    return config


def _weights_path(source: str) -> str:
    """The weights file of a source: the file itself, or the weights file inside a hub-style folder."""
    if os.path.isdir(source):
        found = next((os.path.join(source, f) for f in WEIGHTS_FILES if os.path.isfile(os.path.join(source, f))), None)
        if found is None:
            raise FileNotFoundError(
                f"{source!r} is not an OpenCLIP model folder: it has none of {', '.join(WEIGHTS_FILES)}"
            )
        return found
    if not os.path.isfile(source):
        raise FileNotFoundError(f"OpenCLIP model {source!r} not found (a hub-style folder or a weights file)")
    return source


def openclip_model_config(
    source: str | os.PathLike, model_name: str | None = None, state: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """The OpenCLIP ``model_cfg`` of a pretrained model; reads no weights unless they are its only description.

    Args:
        source: A hub-style folder, a weights file, or one of OpenAI's TorchScript files.
        model_name: An OpenCLIP model name or a model config ``.json``: required for a bare weights
            file, and it overrides a folder's own config. OpenAI's files need none.
        state: The source's weights where already read (``read_openclip_weights``), so that an
            OpenAI file, whose weights are its only description, is not read twice.
    """
    source = os.fspath(source)
    # The weights are not required where a config describes the model: a resumed run builds the
    # architecture again but takes its weights from its own checkpoint.
    if model_name is not None:
        return _named_config(model_name)
    config_path = os.path.join(source, CONFIG_FILE)
    if os.path.isfile(config_path):
        with open(config_path) as f:
            loaded = json.load(f)
        if "model_cfg" not in loaded:
            raise ValueError(f"{config_path!r} has no 'model_cfg'; it is not an OpenCLIP hub config")
        return loaded["model_cfg"]
    weights = _weights_path(source)
    if os.path.isdir(source):
        raise FileNotFoundError(f"{source!r} has no {CONFIG_FILE}; give the model's name or config as model_name")
    if not is_torchscript_file(weights):
        raise ValueError(
            f"{source!r} is a bare weights file; say which model it holds with an OpenCLIP model name "
            "(e.g. ViT-B-32 or ViT-B-32-quickgelu, as open_clip names it) or a model config .json"
        )
    return _openai_config(_read_torchscript(weights) if state is None else state)


def read_openclip_weights(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict (OpenCLIP's keys) of a hub-style folder, a weights file or an OpenAI TorchScript file."""
    path = _weights_path(os.fspath(source))
    state = _read_torchscript(path)
    return read_weights_file(path) if state is None else state


def create_model_from_openclip(
    source: str | os.PathLike,
    model_name: str | None = None,
    image: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    load_weights: bool = False,
) -> CLIP:
    """A clip_pl model of an OpenCLIP/OpenAI model's architecture, optionally with its weights.

    Args:
        source, model_name: The pretrained model; see ``openclip_model_config``.
        image: Fields of ``ImageTowerConfig`` to replace (``image_size``, ``grad_checkpointing``...); ``None``
            values keep the pretrained model's.
        text: Fields of ``TextTowerConfig`` to replace; another tokenizer's ``vocab_size``, ``pad_id``
            and ``eos_id`` (the new-language recipe) change the token embedding only.
        load_weights: Load both towers, the logit scale and bias. ``False`` builds the architecture
            with fresh weights (training fills it through ``init.openclip``, or from its checkpoint).
    """
    # Read once, before building a model that may be large; an OpenAI file is also its own config.
    state = read_openclip_weights(source) if load_weights else None
    config = clip_config_from_openclip(openclip_model_config(source, model_name, state))
    # null keeps the pretrained model's value
    image, text = ({k: v for k, v in (part or {}).items() if v is not None} for part in (image, text))
    replace_tower_fields(config, image, text)
    model = CLIP(config)
    if state is not None:
        load_openclip_model(model, state)
    return model


def load_openclip_weights(model: CLIP, source: str | os.PathLike, new_token_embedding: bool = False) -> None:
    """Fills ``model`` with a pretrained OpenCLIP/OpenAI model's weights, in place.

    Args:
        model: A model of the same architecture (``create_model_from_openclip``, or a preset).
        source: A hub-style folder, a weights file, or one of OpenAI's TorchScript files.
        new_token_embedding: Keep ``model``'s own token embedding (another tokenizer, another language).
    """
    state = read_openclip_weights(source)
    if new_token_embedding:
        state = {k: v for k, v in state.items() if k.removeprefix("module.") != "token_embedding.weight"}
        state["token_embedding.weight"] = model.text_tower.token_embedding.weight.detach().clone()
    load_openclip_model(model, state)


def load_openclip(source: str | os.PathLike, model_name: str | None = None) -> tuple[CLIP, Any]:
    """A pretrained OpenCLIP/OpenAI model (eval mode, CPU) with its own tokenizer, ready for inference."""
    from data_pipelines.openclip_tokenizer import OpenCLIPTokenizer

    model = create_model_from_openclip(source, model_name, load_weights=True).eval()
    return model, OpenCLIPTokenizer.from_file(context_length=model.config.text.context_length)

