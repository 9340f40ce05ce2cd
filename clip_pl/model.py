"""The CLIP dual encoder: a timm image tower, a transformer text tower, and a learned temperature.

Both ``encode_image`` and ``encode_text`` return L2-normalized embeddings unless called with
``normalize=False``; ``CLIP.forward`` always returns normalized ones, which is what the losses expect.

Named configurations live in ``MODEL_CONFIGS`` (see ``list_models``) and are built with
``create_model(name, **overrides)``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import QuickGELU
from timm.models.vision_transformer import VisionTransformer

from data_pipelines.transforms import PreprocessConfig

# OpenAI CLIP's temperature: initialised at 1/0.07 and capped at 100.
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


@dataclass
class ImageTowerConfig:
    """Image tower: any timm model, its pooled features projected to the embedding.

    Attributes:
        name: timm model name (``timm.list_models()``), e.g. ``resnet50``, ``convnext_tiny``,
            ``vit_base_patch16_clip_224``.
        image_size: Square input resolution.
        weights: Optional local weights file (``.pth``/``.safetensors``) for the timm trunk.
        model_kwargs: Extra keyword arguments for ``timm.create_model`` (``depth``, ``patch_size``...);
            replacing ``name`` in ``get_model_config`` drops the preset's kwargs unless new ones are given.
        grad_checkpointing: Recompute trunk activations in backward to save memory.
        patch_dropout: Fraction of patch tokens dropped at random in training (FLIP, Li et al.
            2023): 0.5 encodes half the patches, nearly halving the image tower's cost. Evaluation
            always sees every patch. ViT trunks only (timm's ``patch_drop_rate``).
    """

    name: str = "vit_base_patch16_clip_224"
    image_size: int = 224
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0


@dataclass
class TextTowerConfig:
    """Pre-LayerNorm causal transformer over token ids, pooled at the EOS token.

    Attributes:
        vocab_size: Token embedding rows; must match the tokenizer.
        context_length: Maximum sequence length (learned positional embeddings).
        width: Residual stream width.
        layers: Number of transformer blocks.
        heads: Attention heads per block.
        mlp_ratio: Hidden width of each MLP relative to ``width``.
        pad_id: Padding id of the tokenizer.
        eos_id: End-of-sequence id of the tokenizer; the tower pools the output there.
        quick_gelu: QuickGELU (``x * sigmoid(1.702 x)``) in the MLPs instead of GELU, as in OpenAI's
            released CLIPs and OpenCLIP's ``*-quickgelu`` models; it has no weights, so weights
            trained with the other activation load silently and give shifted features.
        grad_checkpointing: Recompute block activations in backward to save memory.
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    pad_id: int = 0
    eos_id: int = 3
    quick_gelu: bool = False
    grad_checkpointing: bool = False


@dataclass
class CLIPConfig:
    """A complete CLIP model.

    Attributes:
        embed_dim: Dimension of the shared image-text embedding space.
        image: Image tower config.
        text: Text tower config.
        init_logit_scale: Initial log temperature (log(1/0.07) for CLIP, log(10) for SigLIP).
        init_logit_bias: Initial logit bias; ``None`` means no bias (CLIP), SigLIP uses -10.
    """

    embed_dim: int = 512
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    init_logit_scale: float = DEFAULT_LOGIT_SCALE
    init_logit_bias: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        return cls(image=ImageTowerConfig(**d.pop("image", {})), text=TextTowerConfig(**d.pop("text", {})), **d)


def _unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for the names."
    return f"unknown timm model {name!r}.{hint}"


def _create_trunk(name: str, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as e:
        # Convolutional families take any resolution and reject the img_size argument.
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, **kwargs)


class PatchProjection(nn.Conv2d):
    """A patch embedding's convolution (kernel = stride, no padding) computed as one matrix product.

    Measured on an H100 (``benchmarks/RESULTS.md``, A): cuDNN ran ViT-B/16's 16x16 stride-16
    convolution at about 60 TFLOP/s (about 2 ms of a 97 ms compiled step), where the tower's matrix
    products run at 720; over the image's patches it is one more such product (+5% samples/s).
    Same parameters and names as the ``nn.Conv2d`` it replaces, so checkpoints do not change; inputs
    whose size is not a multiple of the patch take the convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p, q = self.kernel_size
        if h % p or w % q:
            return super().forward(x)
        patches = x.reshape(b, c, h // p, p, w // q, q).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * q)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        # An NCHW view of the [B, patches, C] result: timm's flatten(2).transpose(1, 2) makes no copy.
        return out.reshape(b, h // p, w // q, -1).permute(0, 3, 1, 2)

    @classmethod
    def replace(cls, trunk: nn.Module) -> None:
        """Swaps ``trunk.patch_embed.proj`` for a ``PatchProjection`` where it is such a convolution."""
        conv = getattr(getattr(trunk, "patch_embed", None), "proj", None)
        if not (
            type(conv) is nn.Conv2d
            and conv.kernel_size == conv.stride
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        ):
            return
        # Built on the meta device: its own parameters are replaced by the convolution's at once.
        patch = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=conv.bias is not None, device="meta"
        )
        patch.weight, patch.bias = conv.weight, conv.bias
        trunk.patch_embed.proj = patch


def _is_clip_vit(trunk: nn.Module) -> bool:
    """A timm ViT with CLIP's layout: a LayerNorm before the blocks (timm's ``*_clip_*`` models)."""
    return isinstance(trunk, VisionTransformer) and isinstance(trunk.norm_pre, nn.LayerNorm)


def init_clip_vit(trunk: VisionTransformer) -> None:
    """OpenCLIP's init of a CLIP ViT, in place: PyTorch's defaults for the layers (Xavier for the
    attention's input projection, zero attention biases) and ``N(0, width**-0.5)`` for the class and
    position embeddings.

    timm's ViT init draws every weight from ``N(0, 0.02)``, the scale of PyTorch's default at ViT-B's
    width 768; at smaller widths it is several times smaller, and a 128-wide 4-block tower then gives
    nearly the same features for every image and learns far more slowly per sample
    (benchmarks/RESULTS.md, model quality).
    """
    for name, module in trunk.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            module.reset_parameters()
        if name.endswith("attn.qkv"):
            nn.init.xavier_uniform_(module.weight)
        if name.endswith(("attn.qkv", "attn.proj")) and module.bias is not None:
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        for embedding in (trunk.cls_token, trunk.pos_embed):
            if embedding is not None:
                embedding.normal_(std=trunk.embed_dim**-0.5)


class ImageTower(nn.Module):
    """A timm trunk without classifier, followed by a linear projection to ``embed_dim``."""

    def __init__(self, config: ImageTowerConfig, embed_dim: int):
        super().__init__()
        if not timm.is_model(config.name):
            raise ValueError(_unknown_model_message(config.name))
        self.config = config
        if not 0 <= config.patch_dropout < 1:
            raise ValueError(f"model.image.patch_dropout must be in [0, 1), got {config.patch_dropout}")
        kwargs = dict(pretrained=False, num_classes=0, **config.model_kwargs)
        if config.patch_dropout:
            kwargs["patch_drop_rate"] = config.patch_dropout
        try:
            self.trunk = _create_trunk(config.name, config.image_size, kwargs)
        except TypeError as e:
            if "patch_drop_rate" not in str(e):
                raise
            raise ValueError(
                f"model.image.patch_dropout needs a ViT image tower; {config.name!r} does not drop patch tokens"
            ) from None
        if _is_clip_vit(self.trunk):
            init_clip_vit(self.trunk)
        elif isinstance(self.trunk, VisionTransformer):
            warnings.warn(
                f"model.image.name={config.name!r} is a ViT without CLIP's pre-LayerNorm, which learns more slowly "
                "per sample (benchmarks/RESULTS.md); for a CLIP-style ViT of any size use vit_base_patch16_clip_224 "
                "with model_kwargs patch_size, depth, embed_dim and num_heads",
                stacklevel=2,
            )
        PatchProjection.replace(self.trunk)
        if config.weights:
            self._load_trunk_weights(config.weights)
        if config.grad_checkpointing:
            self.trunk.set_grad_checkpointing(True)
        self.proj = nn.Linear(self.trunk.num_features, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.trunk.num_features**-0.5)

    def _load_trunk_weights(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image tower weights {path!r} not found")
        state = timm.models.load_state_dict(path)
        missing, unexpected = self.trunk.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"image tower weights {path!r} do not fit {self.config.name!r}: "
                f"{len(missing)} missing keys, e.g. {missing[:3]}"
            )
        # Classifier heads of ImageNet checkpoints are expected extras; anything else is not.
        stray = [k for k in unexpected if not k.startswith(("head", "fc.", "classifier"))]
        if stray:
            raise ValueError(f"image tower weights {path!r} have unexpected keys, e.g. {stray[:3]}")

    @property
    def preprocess_config(self) -> PreprocessConfig:
        cfg = timm.data.resolve_model_data_config(self.trunk)
        return PreprocessConfig(
            image_size=self.config.image_size,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg["interpolation"],
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images))


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        activation = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), activation, nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    """Token ids ``[B, L]`` to embeddings ``[B, embed_dim]`` (not normalized)."""

    def __init__(self, config: TextTowerConfig, embed_dim: int):
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio, c.quick_gelu) for _ in range(c.layers))
        self.ln_final = nn.LayerNorm(c.width)
        self.proj = nn.Linear(c.width, embed_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # OpenAI CLIP's scheme, as OpenCLIP has it: residual projections shrink with depth so the stream
        # stays O(1); attention biases start at zero, the MLP's keep PyTorch's default.
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = c.width**-0.5, c.width**-0.5 * (2 * c.layers) ** -0.5, (2 * c.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)
        nn.init.normal_(self.proj.weight, std=c.width**-0.5)

    def eos_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the first EOS in each row; the last non-pad token where a row has none."""
        is_eos = tokens == self.config.eos_id
        last_real = (tokens != self.config.pad_id).sum(dim=1).clamp(min=1) - 1
        return torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), last_real)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.config.context_length:
            raise ValueError(
                f"token sequences of length {tokens.shape[1]} exceed the text tower's "
                f"context_length {self.config.context_length}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        # The causal mask means the EOS position has seen the whole caption and no padding.
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), self.eos_positions(tokens)])
        return self.proj(x)


class CLIPOutput(NamedTuple):
    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


class CLIP(nn.Module):
    """Image and text towers sharing one embedding space.

    Args:
        config: The model configuration.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.image_tower = ImageTower(config.image, config.embed_dim)
        self.text_tower = TextTower(config.text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.init_logit_bias))) if config.init_logit_bias is not None else None
        )

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.image_tower.preprocess_config

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeds images ``[B, 3, H, W]`` (normalized as ``preprocess_config`` says)."""
        features = self.image_tower(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeds token ids ``[B, L]`` from the model's tokenizer."""
        features = self.text_tower(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def temperature(self) -> torch.Tensor:
        """The logit multiplier ``exp(logit_scale)``, capped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> CLIPOutput:
        return CLIPOutput(self.encode_image(images), self.encode_text(tokens), self.temperature(), self.logit_bias)


def _text(width: int, heads: int, layers: int = 12) -> TextTowerConfig:
    return TextTowerConfig(width=width, heads=heads, layers=layers)


# Shapes follow OpenAI CLIP (embed dims 1024/512/512/768, text width 512/512/512/768, 12 layers,
# context 77). The image trunks are timm's; the ViTs are timm's CLIP variants, whose layout
# matches OpenAI/OpenCLIP weights.
MODEL_CONFIGS: dict[str, CLIPConfig] = {
    # A 64 px ViT with 4 blocks: one training step at batch 32 takes a fraction of a second on CPU.
    # Sized down from timm's CLIP ViT (pre-LayerNorm, no patch bias), which learns much faster per
    # sample than timm's plain ViT of the same size (benchmarks/RESULTS.md, model quality).
    "tiny": CLIPConfig(
        embed_dim=64,
        image=ImageTowerConfig(
            name="vit_base_patch16_clip_224",
            image_size=64,
            model_kwargs={"patch_size": 8, "depth": 4, "embed_dim": 128, "num_heads": 4},
        ),
        text=TextTowerConfig(vocab_size=1000, context_length=32, width=128, layers=4, heads=4),
    ),
    "rn50": CLIPConfig(embed_dim=1024, image=ImageTowerConfig(name="resnet50"), text=_text(512, 8)),
    "vit_b32": CLIPConfig(embed_dim=512, image=ImageTowerConfig(name="vit_base_patch32_clip_224"), text=_text(512, 8)),
    "vit_b16": CLIPConfig(embed_dim=512, image=ImageTowerConfig(name="vit_base_patch16_clip_224"), text=_text(512, 8)),
    "vit_l14": CLIPConfig(
        embed_dim=768, image=ImageTowerConfig(name="vit_large_patch14_clip_224"), text=_text(768, 12)
    ),
    "vit_l14_336": CLIPConfig(
        embed_dim=768, image=ImageTowerConfig(name="vit_large_patch14_clip_336", image_size=336), text=_text(768, 12)
    ),
    # OpenCLIP's larger ViTs (LAION-2B): image towers with 80-, 88- and 104-wide heads.
    "vit_h14": CLIPConfig(
        embed_dim=1024, image=ImageTowerConfig(name="vit_huge_patch14_clip_224"), text=_text(1024, 16, 24)
    ),
    "vit_g14": CLIPConfig(
        embed_dim=1024, image=ImageTowerConfig(name="vit_giant_patch14_clip_224"), text=_text(1024, 16, 24)
    ),
    "vit_bigg14": CLIPConfig(
        embed_dim=1280, image=ImageTowerConfig(name="vit_gigantic_patch14_clip_224"), text=_text(1280, 20, 32)
    ),
}


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(MODEL_CONFIGS)


def replace_tower_fields(
    config: CLIPConfig, image: dict[str, Any] | None = None, text: dict[str, Any] | None = None
) -> None:
    """Sets fields of ``config``'s image and text tower configs in place; an unknown field is a ValueError."""
    for part, fields in (("image", image), ("text", text)):
        for key, value in (fields or {}).items():
            if not hasattr(getattr(config, part), key):
                allowed = [f.name for f in dataclasses.fields(getattr(config, part))]
                raise ValueError(f"model.{part}.{key} is not a {part} tower option; options: {', '.join(allowed)}")
            setattr(getattr(config, part), key, value)


def get_model_config(
    name: str,
    *,
    embed_dim: int | None = None,
    image: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
) -> CLIPConfig:
    """The named config with the given fields replaced.

    Args:
        name: A key of ``MODEL_CONFIGS``.
        embed_dim: Replaces the embedding dimension.
        image: Fields of ``ImageTowerConfig`` to replace, e.g. ``{"image_size": 256}``; None keeps the preset's.
        text: Fields of ``TextTowerConfig`` to replace, e.g. ``{"vocab_size": 32000}``; None keeps the preset's.
        init_logit_scale: Replaces the initial log temperature.
        init_logit_bias: Adds a learnable logit bias with this initial value (SigLIP).
    """
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}.{hint}")
    config = copy.deepcopy(MODEL_CONFIGS[name])
    # None keeps the preset's value: the training config lists the fields it lets a user set as null.
    image = {k: v for k, v in (image or {}).items() if v is not None}
    text = {k: v for k, v in (text or {}).items() if v is not None}
    if image.get("name", config.image.name) != config.image.name and "model_kwargs" not in image:
        # A preset's timm kwargs (depth, patch size...) belong to its own trunk, not to a replacement.
        config.image.model_kwargs = {}
    replace_tower_fields(config, image, text)
    if embed_dim is not None:
        config.embed_dim = embed_dim
    if init_logit_scale is not None:
        config.init_logit_scale = init_logit_scale
    if init_logit_bias is not None:
        config.init_logit_bias = init_logit_bias
    return config


def create_model(name: str, **overrides: Any) -> CLIP:
    """Builds a named CLIP model with random weights; see ``get_model_config`` for overrides.

    Example:
        >>> model = create_model("tiny", text={"vocab_size": tokenizer.vocab_size})
    """
    return CLIP(get_model_config(name, **overrides))
