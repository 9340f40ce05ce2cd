"""What a sample is: an image file and a caption inside one WebDataset (img2dataset) sample.

A raw sample is the dict webdataset groups from a tar: ``{"__key__": ..., "jpg": bytes, "txt": bytes,
"json": bytes, ...}`` with lower-cased extensions as keys. The same caption extraction serves the
training pipeline, ``inspect`` and ``train_tokenizer``.

Caption keys: ``"txt"`` reads the caption file with that extension (any extension works, e.g.
``"caption"`` for ``key.caption``); ``"json:caption"`` reads field ``caption`` of the sample's
``.json`` (dots reach nested fields: ``"json:meta.caption"``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, url_opener

try:
    # Deprecated since torchvision 0.29 in favour of torchcodec (not a dependency here); PIL serves
    # wherever it is missing.
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - torchvision builds without image ops
    decode_jpeg = None

from data_pipelines.tar_reader import iter_tar
from data_pipelines.transforms import to_rgb, to_uint8_tensor

# The members tried for a sample's image, in order (data.image_keys).
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# PIL's own default limit (about 89.5 megapixels); larger images are treated as decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# webdataset's convention: files named __...__ carry shard metadata, not sample data.
_META_FILE = re.compile(r"__[^/]*__($|/)")

# Reasons a sample is dropped; the order is the column order of the shared skip counters.
SKIP_KINDS = ("unreadable_shard", "missing_image", "missing_caption", "bad_image", "too_large")


class SkipSample(Exception):
    """A sample that cannot be used; ``kind`` is one of ``SKIP_KINDS``."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass(frozen=True)
class SampleKey:
    """Where a value lives in a sample: a member file (``"txt"``, ``"cls"``) or a field of one (``"json:caption"``).

    The one syntax of ``data.caption_key``, ``label_key`` and the commands' ``--caption-key`` and
    ``--label-key``; dots in the field reach nested JSON fields (``"json:meta.caption"``).

    Attributes:
        extension: The member's file extension (``txt``, ``cls``, ``json``).
        field: Dotted path of the value inside the member's JSON, or None for the whole member.
    """

    extension: str
    field: str | None = None

    @classmethod
    def parse(cls, text: str, option: str = "caption_key") -> SampleKey:
        """Parses ``"txt"`` or ``"json:caption"``; an error names ``option``, the setting it came from."""
        ext, sep, field = text.partition(":")
        ext = ext.strip().lower().lstrip(".")
        if not ext or (sep and not field.strip()):
            example = "'cls' or 'json:label'" if option == "label_key" else "'txt' or 'json:caption'"
            raise ValueError(f"{option} must look like {example}, got {text!r}")
        return cls(ext, field.strip() if sep else None)

    def __str__(self) -> str:
        return f"{self.extension}:{self.field}" if self.field else self.extension

    def value(self, sample: dict) -> Any:
        """The member's text, or its JSON field's value.

        Raises:
            KeyError: The sample has no such member, or its JSON no such field.
            ValueError: The member is not UTF-8 or not JSON.
        """
        data = sample[self.extension]
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        if self.field is None:
            return text
        value = json.loads(text)
        for name in self.field.split("."):
            value = value[name]
        return value

    def caption(self, sample: dict) -> str | None:
        """The stripped caption of a raw sample, or None when missing, empty or unreadable."""
        try:
            text = self.value(sample)
        except (KeyError, ValueError, TypeError):
            return None
        if not isinstance(text, str):
            return None
        text = text.strip()
        return text or None

    def label(self, sample: dict) -> int:
        """The class index of a raw sample; fails naming the sample, since a skipped one would bias accuracy."""
        key = sample.get("__key__", "?")
        if self.extension not in sample:
            found = ", ".join(k for k in sample if not k.startswith("__"))
            raise ValueError(
                f"sample {key!r} of {sample.get('__url__', 'the shards')} has no .{self.extension} member "
                f"(it has: {found}); set label_key to 'cls' or 'json:FIELD'"
            )
        try:
            return int(self.value(sample))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"sample {key!r}: cannot read an integer class index with label_key={str(self)!r} ({e!r})"
            ) from None


def image_bytes(sample: dict, image_keys: Sequence[str] = IMAGE_KEYS) -> bytes | None:
    """The encoded image of a raw sample (first of ``image_keys`` present), or None."""
    for key in image_keys:
        if key in sample:
            return sample[key]
    return None


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Opens an encoded image lazily (header only) and rejects decompression bombs before decoding."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample("too_large", f"{width}x{height} pixels")
    return image


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Turns every decoding failure into a ``SkipSample``; PIL raises many types on bad data."""
    try:
        with warnings.catch_warnings():
            # The pixel limit of _open_checked is the check; PIL's warning for big images would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as exn:
        raise SkipSample("too_large", str(exn)) from None
    except SkipSample:
        raise
    except Exception as exn:  # OSError, SyntaxError, ValueError, RuntimeError (torchvision)...
        raise SkipSample("bad_image", repr(exn)) from None


def _draftable(width: int, height: int, min_size: int | None) -> bool:
    """Whether a JPEG of this size decodes at 1/2 scale or less with both sides >= ``min_size``."""
    return min_size is not None and min(width, height) >= 2 * min_size


def _draft(image: Image.Image, min_size: int | None) -> None:
    """Asks PIL to decode a JPEG at 1/2, 1/4 or 1/8 scale when both sides stay >= ``min_size``."""
    if image.format == "JPEG" and _draftable(*image.size, min_size):
        # Mode "RGB" asks for scaling only: draft never converts an RGB/CMYK JPEG's mode then.
        image.draft("RGB", (min_size, min_size))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_size: int | None = None) -> Image.Image:
    """Decodes an encoded image into an RGB PIL image.

    Args:
        data: The encoded image (JPEG, PNG, WebP, ...).
        max_pixels: Larger images are rejected before their pixels are decoded.
        min_size: When given, a JPEG at least twice this size on both sides is decoded at 1/2, 1/4
            or 1/8 scale (libjpeg's DCT scaling, PIL's ``draft``): the largest reduction that keeps
            both sides at least ``min_size`` pixels. Decoding fewer pixels is much cheaper than
            decoding all and shrinking afterwards; other formats and smaller JPEGs are unaffected.
            None (the default) always decodes at full size.

    Raises:
        SkipSample: ``too_large`` for a decompression bomb, ``bad_image`` when it cannot be decoded.
    """
    with _decode_errors():
        image = _open_checked(data, max_pixels)
        _draft(image, min_size)
        image.load()
        return to_rgb(image)


# Frame headers libjpeg-turbo decodes the way PIL does: baseline, extended and progressive Huffman.
_SOF_MARKERS = (0xC0, 0xC1, 0xC2)


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """``(marker, height, width, components)`` of a JPEG's frame header, None when ``data`` is no JPEG.

    Reads the marker segments up to the frame header, a few jumps through the first bytes: what
    ``PIL.Image.open`` learns in 0.03-0.07 ms (up to a twelfth of a 400 px decode) by parsing every segment.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, end = 2, len(data) - 9
    while pos < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a segment
            pos += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = (
                int.from_bytes(data[pos + 5 : pos + 7], "big"),
                int.from_bytes(data[pos + 7 : pos + 9], "big"),
            )
            return marker, height, width, data[pos + 9]
        elif marker == 0xDA:  # scan data before any frame header
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def decode_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_size: int | None = None) -> torch.Tensor:
    """Decodes an encoded image into RGB pixels, a uint8 tensor ``[3, H, W]``: the training input path.

    The same pixels as ``decode_image``: a full-size RGB or greyscale JPEG (its size read by
    ``jpeg_frame``, without PIL) is decoded by torchvision's libjpeg-turbo decoder (the same library
    as PIL's, without PIL's buffering and copies: as fast at 256-512 px, 1.2x at 600-1000 px, see
    benchmarks/RESULTS.md); draft-scaled JPEGs, other JPEGs (CMYK, lossless...) and other formats
    are decoded by PIL.

    Args:
        data: The encoded image.
        max_pixels: Larger images are rejected before their pixels are decoded.
        min_size: JPEG draft decoding as in ``decode_image``.

    Raises:
        SkipSample: ``too_large`` for a decompression bomb, ``bad_image`` when it cannot be decoded.
    """
    with _decode_errors():
        frame = jpeg_frame(data) if decode_jpeg is not None else None
        if frame is not None and frame[0] in _SOF_MARKERS and frame[3] in (1, 3) and frame[1] > 0:
            _, height, width, _ = frame
            if width * height > max_pixels:
                raise SkipSample("too_large", f"{width}x{height} pixels")
            if not _draftable(width, height, min_size):
                warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
                # bytearray: a writable buffer, so torch does not warn about aliasing read-only bytes.
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        image = _open_checked(data, max_pixels)
        _draft(image, min_size)
        image.load()
        return to_uint8_tensor(image)


def _tar_files(
    streams: Iterable[dict], handler: Callable[[Exception], bool], select_files: Callable[[str], bool] | None
) -> Iterator[dict]:
    """The files of opened shards as webdataset's grouping stage takes them, ``{}`` closing each shard."""
    for source in streams:
        url = source["url"]
        try:
            for name, data in iter_tar(source["stream"], select_files):
                if not _META_FILE.match(name):
                    yield {"fname": name, "data": data, "__url__": url}
        except Exception as exn:
            exn.args = (f"{exn.args[0] if exn.args else exn!r} @ {url}", *exn.args[1:])
            if not handler(exn):
                return
        yield {}


def read_samples(
    urls: Iterable[str],
    handler: Callable[[Exception], bool],
    select_files: Callable[[str], bool] | None = None,
) -> Iterator[dict]:
    """Raw samples of the given shards in order: webdataset's URL opening and grouping, clip_pl's tar reader.

    Args:
        urls: Shard URLs or paths.
        handler: Called with every shard-level error (missing or truncated tar...); return True to
            go on with the next shard.
        select_files: Keep only tar members whose name passes (saves reading unused images).
    """
    streams = url_opener(({"url": u} for u in urls), handler=handler)
    return group_by_keys(_tar_files(streams, handler, select_files), handler=handler)


def check_layout(
    urls: Sequence[str],
    caption_key: SampleKey,
    image_keys: Sequence[str] = IMAGE_KEYS,
    max_samples: int = 1000,
    source_name: str = "",
) -> None:
    """Fails fast when the first samples of a source never hold an image or the caption.

    Reads raw samples (no image decoding) from the first shards until ``max_samples`` were seen.
    Runs in the main process, so a wrong key stops training with one message instead of
    workers silently skipping every sample.

    Raises:
        ValueError: Naming the keys actually present (and the JSON fields) with what to change.
    """
    errors: list[Exception] = []

    def remember(exn: Exception) -> bool:
        errors.append(exn)
        return len(errors) < 10

    extensions: dict[str, int] = {}
    json_fields: set[str] = set()
    n = with_image = with_caption = 0
    for sample in islice(read_samples(urls, remember), max_samples):
        n += 1
        for k in sample:
            if not k.startswith("__"):
                extensions[k] = extensions.get(k, 0) + 1
        if "json" in sample:
            try:
                json_fields.update(json.loads(sample["json"]))
            except (ValueError, TypeError):
                pass
        with_image += image_bytes(sample, image_keys) is not None
        with_caption += caption_key.caption(sample) is not None
        if with_image and with_caption:
            return
    where = f"source {source_name!r}" if source_name else "the shards"
    if n == 0:
        detail = f": {errors[0]}" if errors else ""
        raise ValueError(f"no readable sample in the first shards of {where} (first: {urls[0]}){detail}")
    found = ", ".join(f"{k} ({c})" for k, c in sorted(extensions.items())) or "nothing"
    if not with_image:
        raise ValueError(
            f"none of the first {n} samples of {where} has an image file with extension "
            f"{'/'.join(image_keys)}; the samples contain: {found}. Set image_keys to the image extension."
        )
    hint = f"; the JSON fields are: {', '.join(sorted(json_fields))}" if json_fields else ""
    raise ValueError(
        f"caption_key={str(caption_key)!r} matches no non-empty caption in the first {n} samples of {where}; "
        f"the samples contain: {found}{hint}. Set caption_key to 'txt' (a caption file) or 'json:FIELD'."
    )
