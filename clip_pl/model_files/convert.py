"""OpenAI/OpenCLIP weights into clip_pl towers and back: ViT image encoders and text transformers.

OpenAI and OpenCLIP store a ViT image encoder under ``visual.*`` (``conv1``,
``transformer.resblocks.N``, ``ln_post``, ``proj``...). timm's ``vit_*_clip_*`` models have the same
architecture, and timm ships the key mapping (``_convert_openai_clip``, reached through the
ViT ``checkpoint_filter_fn``, which also resamples position embeddings to another image size).
``visual.proj`` (``width x embed_dim``) becomes our ``image_tower.proj`` (an ``nn.Linear``, hence
transposed).

The text transformer (``token_embedding``, ``transformer.resblocks.N``, ``ln_final``,
``text_projection``) has the same layout as our ``TextTower`` under other names. OpenAI's tower pools
at ``argmax`` of the token ids, which is its EOS because EOS has the highest id of its vocabulary;
ours pools at ``eos_id``, so a converted text tower needs ``eos_id`` set to that tokenizer's EOS.

Activation: OpenAI's released CLIP ViTs, and OpenCLIP models named ``*-quickgelu``, use QuickGELU;
build those towers with timm's ``vit_base_patch32_clip_quickgelu_224`` /
``vit_base_patch16_clip_quickgelu_224`` trunks, e.g.
``create_model("vit_b32", image={"name": "vit_base_patch32_clip_quickgelu_224"})``.
The activation has no weights, so a mismatch loads without error and only shifts the features.

``python -m clip_pl.convert`` writes an image encoder's trunk weights for ``model.image.weights``.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from clip_pl.model import CLIP, ImageTower
from clip_pl.model_files.checkpoint import state_shape_differences
from clip_pl.model_files.export import is_safetensors_file

_PREFIXES = ("visual.", "module.visual.")
TOWERS = ("image_tower", "text_tower")


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``d dict (read with ``weights_only``).

    OpenCLIP training checkpoints (``{"state_dict": ...}``) are unwrapped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {os.fspath(path)!r} not found")
    if is_safetensors_file(path):
        return load_file(path, device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for archives it will not unpickle safely.
        raise ValueError(
            f"cannot read {os.fspath(path)!r} as a state dict ({type(e).__name__}). OpenAI's original .pt files "
            "are TorchScript archives: re-save them with "
            "torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'state_dict.pt')"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def convert_openclip_image_tower(
    state_dict: dict[str, torch.Tensor], image_tower: ImageTower
) -> dict[str, torch.Tensor]:
    """Maps an OpenAI/OpenCLIP ViT ``visual.*`` state dict onto ``image_tower``'s keys.

    Args:
        state_dict: A full CLIP state dict (text keys are ignored); a ``module.`` prefix is accepted.
        image_tower: The tower to fill; its trunk must be a timm ViT of the same width, depth and patch size.

    Returns:
        ``{"trunk.<timm key>": ..., "proj.weight": ...}``, ready for ``image_tower.load_state_dict``.
    """
    prefix = next((p for p in _PREFIXES if f"{p}class_embedding" in state_dict), None)
    if prefix is None:
        hint = (
            " It looks like a ResNet (ModifiedResNet) image encoder, which timm cannot host."
            if any(k.startswith(("visual.layer1.", "module.visual.layer1.")) for k in state_dict)
            else ""
        )
        raise ValueError(
            f"no OpenAI/OpenCLIP ViT image encoder (key 'visual.class_embedding') in the state dict.{hint}"
        )
    trunk = image_tower.trunk
    if not isinstance(trunk, VisionTransformer):
        raise ValueError(
            f"OpenCLIP ViT weights need a timm ViT trunk, not {image_tower.config.name!r}; "
            "use model vit_b32 or vit_b16 (or another vit_*_clip_* trunk)"
        )
    visual = {"visual." + k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    _check_shapes(visual, trunk, image_tower.config.name)
    converted = checkpoint_filter_fn(visual, trunk)
    proj = converted.pop("head.weight")
    converted.pop("head.bias")
    return {**{f"trunk.{k}": v for k, v in converted.items()}, "proj.weight": proj}


# OpenCLIP text transformer names -> ours; the rest of each key is the same.
_TEXT_RENAMES = (
    ("transformer.resblocks.", "blocks."),
    (".attn.in_proj_weight", ".attn.qkv.weight"),
    (".attn.in_proj_bias", ".attn.qkv.bias"),
    (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.0."),
    (".mlp.c_proj.", ".mlp.2."),
)


def convert_openclip_text_tower(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps an OpenAI/OpenCLIP text transformer (top-level keys of a CLIP state dict) onto ``TextTower``'s keys.

    Args:
        state_dict: A full CLIP state dict (``visual.*`` keys are ignored); a ``module.`` prefix is accepted.

    Returns:
        The ``TextTower`` state dict, ready for ``text_tower.load_state_dict``.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if "text_projection" not in state or "token_embedding.weight" not in state:
        raise ValueError(
            "no OpenAI/OpenCLIP text transformer (keys 'token_embedding.weight', 'text_projection') in the state dict"
        )
    converted = {}
    for key, value in state.items():
        if key.startswith("transformer.resblocks."):
            for old, new in _TEXT_RENAMES:
                key = key.replace(old, new)
            converted[key] = value
        elif key.startswith(("token_embedding.", "ln_final.")) or key == "positional_embedding":
            converted[key] = value
    converted["proj.weight"] = state["text_projection"].T
    return converted


# timm CLIP ViT block names -> OpenCLIP's: the inverse of timm's ``_convert_openai_clip`` inside the blocks.
_IMAGE_BLOCK_RENAMES = (
    ("blocks.", "transformer.resblocks."),
    (".norm1.", ".ln_1."),
    (".norm2.", ".ln_2."),
    (".attn.qkv.", ".attn.in_proj_"),
    (".attn.proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)
_IMAGE_BLOCK_KEYS = tuple(
    f"{name}.{p}" for name in ("ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")
) + ("attn.in_proj_weight", "attn.in_proj_bias")
# timm keys outside the blocks, with their OpenCLIP key and the reshape between the two layouts.
_IMAGE_TOP_KEYS = {
    "cls_token": ("class_embedding", lambda v: v.reshape(-1)),  # [1, 1, width] -> [width]
    "pos_embed": ("positional_embedding", lambda v: v[0]),  # [1, tokens, width] -> [tokens, width]
    "patch_embed.proj.weight": ("conv1.weight", lambda v: v),
    "norm_pre.weight": ("ln_pre.weight", lambda v: v),
    "norm_pre.bias": ("ln_pre.bias", lambda v: v),
    "norm.weight": ("ln_post.weight", lambda v: v),
    "norm.bias": ("ln_post.bias", lambda v: v),
}


def openclip_image_state_dict(image_tower: ImageTower) -> dict[str, torch.Tensor]:
    """The ``visual.*`` state dict of OpenCLIP's ViT holding ``image_tower``'s weights.

    The inverse of ``convert_openclip_image_tower``: ``visual.proj`` is our projection transposed.

    Raises:
        ValueError: The trunk is not a CLIP ViT as OpenCLIP builds it: it has a tensor OpenCLIP has no
            place for (layer scale, register tokens, q/k norms...) or lacks one (a bias turned off).
    """
    visual = {}
    for key, value in image_tower.trunk.state_dict().items():
        if key in _IMAGE_TOP_KEYS:
            key, reshape = _IMAGE_TOP_KEYS[key]
            value = reshape(value)
        elif key.startswith("blocks."):
            for old, new in _IMAGE_BLOCK_RENAMES:
                key = key.replace(old, new)
        visual[f"visual.{key}"] = value
    visual["visual.proj"] = image_tower.proj.weight.T
    expected = {f"visual.{name}" for name, _ in _IMAGE_TOP_KEYS.values()} | {"visual.proj"}
    blocks = range(len(image_tower.trunk.blocks))
    expected |= {f"visual.transformer.resblocks.{i}.{key}" for i in blocks for key in _IMAGE_BLOCK_KEYS}
    extra, missing = sorted(visual.keys() - expected), sorted(expected - visual.keys())
    if extra or missing:
        raise ValueError(
            f"OpenCLIP's ViT cannot hold the image tower {image_tower.config.name!r} (no place for {extra[:3]}, "
            f"nothing for {missing[:3]}); the export handles CLIP ViTs with timm's default options only: no "
            "model.image.model_kwargs other than patch_size, depth, embed_dim, num_heads and mlp_ratio"
        )
    return visual


def openclip_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The state dict of OpenCLIP's ``CLIP`` holding ``model``'s weights: the inverse of ``load_openclip_model``.

    Returns:
        ``visual.*`` (see ``openclip_image_state_dict``), the text transformer under its top-level
        OpenCLIP keys with ``text_projection`` our projection transposed, ``logit_scale`` and, where the
        model has one, ``logit_bias``; detached views of the model's tensors.
    """
    state = openclip_image_state_dict(model.image_tower)
    for key, value in model.text_tower.state_dict().items():
        if key.startswith("blocks."):
            # Reversed, so that "blocks." becomes "transformer.resblocks." after the names inside a block.
            for old, new in reversed(_TEXT_RENAMES):
                key = key.replace(new, old)
        state[key] = value
    state["text_projection"] = state.pop("proj.weight").T
    state["logit_scale"] = model.logit_scale
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias
    return {k: v.detach() for k, v in state.items()}


def load_openclip_model(model: CLIP, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads a whole OpenAI/OpenCLIP ViT CLIP: both towers, the logit scale and, where present, the logit bias.

    Every tensor of ``model`` must be covered; a mismatch says which config to change.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    load_openclip_image_tower(model, state)
    load_tower(model, "text_tower", convert_openclip_text_tower(state), "the OpenCLIP state dict")
    with torch.no_grad():
        model.logit_scale.copy_(state["logit_scale"])
        if (model.logit_bias is None) != ("logit_bias" not in state):
            raise ValueError("the OpenCLIP state dict and the model disagree on a logit bias (model.init_logit_bias)")
        if model.logit_bias is not None:
            model.logit_bias.copy_(state["logit_bias"])


def _check_shapes(visual: dict[str, torch.Tensor], trunk: VisionTransformer, name: str) -> None:
    """Refuses weights of another ViT size; timm would otherwise resample a patch embedding silently."""
    width, _, patch, _ = visual["visual.conv1.weight"].shape
    depth = len({k.split(".")[3] for k in visual if k.startswith("visual.transformer.resblocks.")})
    theirs = (width, depth, patch)
    ours = (trunk.embed_dim, len(trunk.blocks), trunk.patch_embed.proj.weight.shape[-1])
    if theirs != ours:
        raise ValueError(
            f"the weights are a ViT of width {theirs[0]}, {theirs[1]} blocks, patch {theirs[2]}, but the image "
            f"tower {name!r} has width {ours[0]}, {ours[1]} blocks, patch {ours[2]}; pick the matching model "
            "(vit_b32: 768/12/32, vit_b16: 768/12/16, vit_l14: 1024/24/14, vit_h14: 1280/32/14, vit_g14: 1408/40/14, "
            "vit_bigg14: 1664/48/14), or model=openclip, which reads it from the pretrained model"
        )


def load_openclip_image_tower(model: CLIP, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads OpenAI/OpenCLIP ViT image encoder weights into ``model.image_tower`` (all keys required)."""
    converted = convert_openclip_image_tower(state_dict, model.image_tower)
    if converted["proj.weight"].shape != model.image_tower.proj.weight.shape:
        raise ValueError(
            f"the weights project to {converted['proj.weight'].shape[0]} dimensions but the model's embed_dim is "
            f"{model.config.embed_dim}; build the model with embed_dim={converted['proj.weight'].shape[0]}"
        )
    load_tower(model, "image_tower", converted, "the OpenCLIP/OpenAI weights")


def load_tower(model: CLIP, tower: str, weights: dict[str, torch.Tensor], source: str) -> None:
    """Loads ``weights`` into ``model.<tower>`` strictly; a mismatch says which config to change.

    Args:
        model: The model receiving the weights.
        tower: ``"image_tower"`` or ``"text_tower"``.
        weights: The tower's state dict, without the tower prefix.
        source: Where the weights come from, for the error message.
    """
    differ = state_shape_differences(weights, getattr(model, tower))
    if differ:
        (key, *shapes), part = differ[0], tower.split("_")[0]
        shape_there, shape_here = ("absent" if shape is None else list(shape) for shape in shapes)
        raise ValueError(
            f"the {tower} of {source} does not fit this model ({len(differ)} tensors differ, first {tower}.{key}: "
            f"{shape_there} there, {shape_here} here); build the model with that model's {part} config "
            f"(model=..., model.{part}.*)"
        )
    getattr(model, tower).load_state_dict(weights)
