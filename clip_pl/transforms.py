"""PIL image -> the normalized tensor ``[3, S, S]`` an image tower expects.

Training, validation, evaluation and inference all build their transform here from the tower's
``preprocess_config`` (size, mean, std, interpolation), so the four can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from clip_pl.model import PreprocessConfig

ImageTransform = Callable[[Image.Image], torch.Tensor]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels become white rather than PIL's black.

    A module-level function rather than a lambda, so transforms pickle into DataLoader workers.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: PIL's direct conversion clips everything above 255 to white.
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def interpolation_mode(name: str) -> InterpolationMode:
    """The torchvision interpolation for a timm interpolation name such as ``"bicubic"``."""
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        options = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"interpolation must be one of {options}; got {name!r}") from None


def image_transform(
    config: PreprocessConfig,
    train: bool = False,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    horizontal_flip: bool = False,
) -> ImageTransform:
    """The transform for a tower's ``preprocess_config``.

    Evaluation resizes the shorter side to ``S`` and takes the center ``S x S`` crop. Training takes
    a random crop covering ``crop_scale`` of the area instead; the default is mild because a caption
    often names objects near the borders, which an ImageNet-style crop would cut away.

    Args:
        config: The model's ``preprocess_config``.
        train: Random resized crop instead of resize and center crop.
        crop_scale: Range of the crop's area relative to the image (training).
        horizontal_flip: Random flips (training); off by default since captions name left and right.
    """
    size, interpolation = config.image_size, interpolation_mode(config.interpolation)
    if train:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
        geometry = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=interpolation)]
        if horizontal_flip:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = [v2.Resize(size, interpolation=interpolation), v2.CenterCrop(size)]
    return v2.Compose(
        [
            to_rgb,
            *geometry,
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(config.mean), list(config.std)),
        ]
    )
