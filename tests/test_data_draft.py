"""``decode_image(min_size=...)``: JPEG draft decoding at a reduced DCT scale."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.samples import SkipSample, decode_image, decode_pixels


def _encode(mode: str, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "min_size", "expected"),
    [
        ((512, 480), 224, (256, 240)),  # 1/2 keeps both sides >= 224
        ((1000, 900), 224, (250, 225)),  # 1/4
        ((2000, 1800), 224, (250, 225)),  # 1/8 is the largest reduction libjpeg offers
        ((447, 600), 224, (447, 600)),  # halving would make the short side 223 < 224
        ((300, 300), 224, (300, 300)),
    ],
)
def test_draft_scale_keeps_both_sides_at_least_min_size(size, min_size, expected):
    image = decode_image(_encode("RGB", size), min_size=min_size)
    assert image.mode == "RGB"
    assert image.size == expected
    assert min(image.size) >= min(min_size, *size)
    pixels = decode_pixels(_encode("RGB", size), min_size=min_size)
    assert pixels.shape == (3, expected[1], expected[0])
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), np.asarray(image))


def test_without_min_size_decodes_full_size():
    assert decode_image(_encode("RGB", (512, 480))).size == (512, 480)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_draft_of_other_jpeg_modes_still_gives_rgb(mode):
    image = decode_image(_encode(mode, (512, 512)), min_size=224)
    assert image.mode == "RGB"
    assert image.size == (256, 256)


def test_other_formats_ignore_min_size():
    assert decode_image(_encode("RGB", (512, 480), fmt="PNG"), min_size=224).size == (512, 480)


def test_pixel_limit_is_checked_on_the_full_size():
    with pytest.raises(SkipSample) as info:
        decode_image(_encode("RGB", (512, 512)), max_pixels=100_000, min_size=224)
    assert info.value.kind == "too_large"


def test_draft_pixels_match_a_downscaled_full_decode():
    # A smooth image, so the DCT-domain reduction and a box downscale agree closely.
    x = np.linspace(0, 255, 512, dtype=np.float32)
    pixels = np.stack([np.add.outer(x, x) / 2, np.add.outer(x, 255 - x) / 2, np.full((512, 512), 128.0)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=95)
    drafted = np.asarray(decode_image(buf.getvalue(), min_size=224), dtype=np.float32)
    reference = np.asarray(decode_image(buf.getvalue()).reduce(2), dtype=np.float32)
    assert drafted.shape == reference.shape
    assert np.abs(drafted - reference).mean() < 2.0
