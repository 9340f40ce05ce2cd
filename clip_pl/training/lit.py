"""Locked towers (LiT, "locked-image text tuning"): a pretrained tower kept fixed while the rest trains.

A tower is split into parameter groups from input to output, and locking it freezes all of them but
the last ``unlocked_groups``:

- image tower: timm's own grouping of the trunk (``group_matcher``): for a ViT, the patch and
  position embeddings (with the CLIP ViTs' pre-norm), then one group per block, the final norm
  joining the last block (ViT-B/32 and B/16: 13 groups, L/14: 25); for a ResNet, the stem, then one
  group per residual block (ResNet-50: 17 groups);
- text tower: the token and positional embeddings, then one group per block, ``ln_final`` joining
  the last block, as timm does for a ViT (12 layers: 13 groups).

The towers' projections into the shared embedding space always stay trainable: with a locked image
tower they are what aligns the fixed image features with the text embeddings.

Frozen parameters are left out of the optimizer (``CLIPModule.configure_optimizers`` takes only
those that require grad) and out of DDP's gradient reduction. ``eval_frozen_modules`` keeps the frozen
parts in eval mode during training, so batch norm statistics stay those of the pretrained model and
dropout stays off: ``requires_grad=False`` alone stops neither.
"""

from __future__ import annotations

from timm.models import group_parameters
from torch import nn

from clip_pl.model import ImageTower, TextTower


def _image_groups(tower: ImageTower) -> list[list[str]]:
    trunk = tower.trunk
    if not hasattr(trunk, "group_matcher"):
        raise ValueError(
            f"the timm model {tower.config.name!r} defines no parameter groups; "
            "lock its image tower whole with module.lock_image_unlocked_groups=0"
        )
    groups = group_parameters(trunk, trunk.group_matcher())
    return [[f"trunk.{name}" for name in groups[i]] for i in sorted(groups)]


def _text_groups(tower: TextTower) -> list[list[str]]:
    groups = [["token_embedding.weight", "positional_embedding"]]
    groups += [[f"blocks.{i}.{n}" for n, _ in block.named_parameters()] for i, block in enumerate(tower.blocks)]
    groups[-1] += [f"ln_final.{n}" for n, _ in tower.ln_final.named_parameters()]
    return groups


def _lock(tower: nn.Module, groups: list[list[str]], unlocked_groups: int, option: str) -> None:
    if not 0 <= unlocked_groups <= len(groups):
        raise ValueError(
            f"{option}={unlocked_groups}, but the tower has {len(groups)} parameter groups; "
            f"set it between 0 (all locked) and {len(groups)}"
        )
    trainable = {name for group in groups[len(groups) - unlocked_groups :] for name in group}
    for name, param in tower.named_parameters():
        if not name.startswith("proj.") and name not in trainable:
            param.requires_grad_(False)


def lock_image_tower(tower: ImageTower, unlocked_groups: int = 0) -> None:
    """Freezes the image tower's trunk but its last ``unlocked_groups`` parameter groups.

    Args:
        tower: The image tower; its projection stays trainable.
        unlocked_groups: Groups of the trunk, counted from the output, left trainable.
    """
    # With nothing unlocked the whole trunk freezes, which works for trunks without groups too.
    groups = _image_groups(tower) if unlocked_groups else []
    _lock(tower, groups, unlocked_groups, "module.lock_image_unlocked_groups")


def lock_text_tower(tower: TextTower, unlocked_groups: int = 0) -> None:
    """Freezes the text tower but its last ``unlocked_groups`` parameter groups.

    Args:
        tower: The text tower; its projection stays trainable.
        unlocked_groups: Groups, counted from the output, left trainable.
    """
    _lock(tower, _text_groups(tower), unlocked_groups, "module.lock_text_unlocked_groups")


def eval_frozen_modules(model: nn.Module) -> None:
    """Puts every submodule that has parameters, none of them trainable, in eval mode.

    Lightning trains modules in the mode they are in and restores that mode after each validation,
    so calling this once when training starts keeps them in eval mode for the whole run.
    """
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
