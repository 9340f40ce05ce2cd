"""Image -> the tensor ``[3, S, S]`` an image tower expects.

Training, validation, evaluation and inference all build their transform here from the tower's
``preprocess_config`` (size, mean, std, interpolation), so the four can never disagree. Training's
geometry (crop, resize) runs on uint8 tensors, whose antialiased resize is several times faster than
PIL's and matches it within 2 of 255 levels; evaluation resizes a PIL image with PIL, as OpenCLIP does.

Training batches stay uint8 until they are on the accelerator: ``image_transform(...,
normalize=False)`` in the DataLoader workers, ``NormalizeImages`` on the device (``CLIPModule`` does
it after the batch transfer). That moves 4x fewer bytes to the device and takes the float
conversion out of the workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F


class PreprocessConfig(NamedTuple):
    """How images must be prepared for the image tower."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


ImageTransform = Callable[[Image.Image | torch.Tensor], torch.Tensor]

# Aspect-ratio range (width / height) of the training crops, torchvision's default.
CROP_RATIO = (3 / 4, 4 / 3)


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


def to_uint8_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """RGB pixels ``[3, H, W]`` uint8 of a PIL image (any mode, see ``to_rgb``) or of a uint8 tensor.

    A greyscale tensor ``[1, H, W]`` or ``[H, W]`` is repeated into three channels.
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
    if image.dtype != torch.uint8:
        raise TypeError(f"image tensors must be uint8 pixels [3, H, W], got {image.dtype}")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image tensors must be [3, H, W] or [1, H, W], got shape {tuple(image.shape)}")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _rgb(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    return to_rgb(image) if isinstance(image, Image.Image) else to_uint8_tensor(image)


class NormalizeImages:
    """uint8 pixels ``[..., 3, H, W]`` to the float32 input of the image tower: ``(x / 255 - mean) / std``.

    One fused multiply-add per element, on the device of the pixels; the two constants follow
    them there once. Deliberately not an ``nn.Module``: a buffer in the LightningModule would make
    DDP broadcast it at every forward, a collective that hangs when ranks run different numbers of
    validation batches.

    Args:
        config: The model's ``preprocess_config``.
    """

    def __init__(self, config: PreprocessConfig):
        self.scale = torch.tensor([1 / (255 * s) for s in config.std]).view(3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(config.mean, config.std)]).view(3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale.device != images.device:
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
        return torch.addcmul(self.shift, images.float(), self.scale)


def interpolation_mode(name: str) -> InterpolationMode:
    """The torchvision interpolation for a timm interpolation name such as ``"bicubic"``."""
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        options = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"interpolation must be one of {options}; got {name!r}") from None


class RandomResizedCrop:
    """torchvision's RandomResizedCrop (and optional flip) on uint8 tensors, drawn from Python's ``random``.

    The same crops as ``v2.RandomResizedCrop``: up to ten tries of an area fraction uniform in
    ``scale`` and an aspect ratio log-uniform in ``ratio``, the first that fits is placed uniformly;
    if none fits, the largest center crop within ``ratio``. torchvision draws each of these numbers
    as a one-element torch tensor; with a mild ``scale`` such as (0.9, 1.0) most tries fail, and
    those draws cost 0.1-0.25 ms per image, up to a fifth of the JPEG decode. Python's generator
    takes 0.01 ms. Seed it with ``random.seed`` (the training stream does, per worker).

    Args:
        size: Side of the square output.
        scale: Range of the crop's area relative to the image.
        interpolation: Resize interpolation (antialiased).
        horizontal_flip: Flip half of the crops left-right.
        ratio: Range of the crop's aspect ratio (width / height).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float],
        interpolation: InterpolationMode,
        horizontal_flip: bool = False,
        ratio: tuple[float, float] = CROP_RATIO,
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.interpolation, self.horizontal_flip = interpolation, horizontal_flip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """A crop ``(top, left, height, width)`` of an image of the given size."""
        area = height * width
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels = to_uint8_tensor(image)
        top, left, h, w = self.params(*pixels.shape[-2:])
        # libjpeg-turbo and PIL give HWC pixels. torch's vectorised uint8 resize needs its input
        # contiguous in that layout, which a crop is not; copying the crop first is 1.1-1.4x
        # faster than resizing the strided view (benchmarks/RESULTS.md, C). The output stays HWC
        # in memory (see ``stack_pixels``).
        crop = pixels[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
        out = F.resize(crop, [self.size, self.size], self.interpolation, antialias=True)[0]
        if self.horizontal_flip and random.random() < 0.5:
            out = out.flip(-1)
        return out


def stack_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    """Stacks ``[3, S, S]`` uint8 images into a batch ``[B, 3, S, S]``, keeping an HWC memory layout.

    Training crops are HWC in memory (channels-last). ``torch.stack`` would transpose each into
    CHW, about 0.2 ms per 224 px image, a fifth of its JPEG decode; stacking the HWC views is a
    copy (0.01-0.02 ms). The batch is then channels-last; ``CLIPModule`` sets the layout its image
    tower wants after normalizing on the device.
    """
    hwc = [image.permute(1, 2, 0) for image in images]
    if all(x.is_contiguous() for x in hwc):
        return torch.stack(hwc).permute(0, 3, 1, 2)
    return torch.stack(images)


def image_transform(
    config: PreprocessConfig,
    train: bool = False,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    horizontal_flip: bool = False,
    normalize: bool = True,
) -> ImageTransform:
    """The transform for a tower's ``preprocess_config``: PIL image or uint8 tensor in, ``[3, S, S]`` out.

    Evaluation resizes the shorter side to ``S`` (a PIL image with PIL, exactly as OpenCLIP's
    preprocessing) and takes the center ``S x S`` crop. Training takes
    a random crop covering ``crop_scale`` of the area instead; the default is mild because a caption
    often names objects near the borders, which an ImageNet-style crop would cut away.

    Args:
        config: The model's ``preprocess_config``.
        train: Random resized crop instead of resize and center crop.
        crop_scale: Range of the crop's area relative to the image (training).
        horizontal_flip: Random flips (training); off by default since captions name left and right.
        normalize: Return the float32 input of the tower; False returns uint8 pixels for
            ``NormalizeImages`` to finish on the device.
    """
    size, interpolation = config.image_size, interpolation_mode(config.interpolation)
    if train:
        steps = [RandomResizedCrop(size, tuple(crop_scale), interpolation, horizontal_flip)]
    else:
        # A PIL image is resized by PIL, as OpenCLIP's and OpenAI's preprocessing does, so that
        # evaluation sees the pixels clip_benchmark and open_clip see (a tensor by torchvision).
        # The cost, measured on a 500x375 image on 2 CPU cores: 2.2 ms against 0.56 ms for
        # torchvision's uint8 resize; training's validation decodes to tensors and keeps the latter.
        steps = [_rgb, v2.Resize(size, interpolation=interpolation), v2.CenterCrop(size), to_uint8_tensor]
    if normalize:
        steps.append(NormalizeImages(config))
    return v2.Compose(steps)
