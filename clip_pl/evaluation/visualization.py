"""Pictures of what the model matches, drawn with PIL only: for TensorBoard, wandb or PNG files.

- ``similarity_matrix_image``: images as rows, captions as columns, the cosine similarity in
  every cell, thumbnails and wrapped captions on the axes, each row's best caption outlined.
- ``retrieval_grid_image``: every image next to its top-k captions with their scores, the true
  caption in green.

Both return PIL images; ``to_array`` gives the ``HWC`` uint8 array that
``SummaryWriter.add_image(..., dataformats="HWC")`` and ``wandb.Image`` accept.
``images_from_batch`` turns a normalized training batch back into PIL thumbnails.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.transforms import PreprocessConfig

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_MATCH = (0, 130, 60)
_OUTLINE = (230, 80, 0)
# Ends of the cell colour scale: low similarity is near-white, high is dark blue.
_LOW = np.array([247, 251, 255], dtype=np.float64)
_HIGH = np.array([8, 48, 107], dtype=np.float64)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> Font:
    # Pillow's bundled font: no system font files needed, scalable where FreeType is available.
    return ImageFont.load_default(size=size)


def images_from_batch(images: torch.Tensor, preprocess: PreprocessConfig) -> list[Image.Image]:
    """Undoes the normalization of an image batch ``[B, 3, H, W]`` and returns RGB PIL images."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def to_array(image: Image.Image) -> np.ndarray:
    """``HWC`` uint8 RGB array of a PIL image."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _thumbnail(image: Image.Image, size: int) -> Image.Image:
    """The image fitted into a ``size x size`` white square, aspect ratio kept."""
    image = image.convert("RGB")
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    square = Image.new("RGB", (size, size), _BACKGROUND)
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return square


def wrap_text(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are split, extra lines end in '…'."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and font.getlength(word) > width:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "…"]
    return lines


def _line_height(font: Font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom - min(top, 0)) + 2


def _cell_colour(value: float) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.round(_LOW + (_HIGH - _LOW) * value))


def _check(images: Sequence[Image.Image], captions: Sequence[str], similarity: torch.Tensor) -> torch.Tensor:
    similarity = torch.as_tensor(similarity).detach().float().cpu()
    if similarity.shape != (len(images), len(captions)):
        raise ValueError(
            f"similarity must be [images, captions] = [{len(images)}, {len(captions)}], got {tuple(similarity.shape)}"
        )
    return similarity


def similarity_matrix_image(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    similarity: torch.Tensor,
    cell_size: int = 112,
    font_size: int = 12,
    max_caption_lines: int = 7,
) -> Image.Image:
    """The image-caption cosine similarity matrix as a picture.

    Cell colours span the matrix's own minimum to maximum, because a trained CLIP's cosine
    similarities live in a narrow band (about 0.1 to 0.4) that a fixed -1..1 scale would flatten.

    Args:
        images: N images, drawn as row labels.
        captions: M captions, wrapped above the columns.
        similarity: ``[N, M]`` scores, e.g. ``image_features @ text_features.T``.
        cell_size: Side of a cell and of a thumbnail, in pixels.
        font_size: Caption and value font size.
        max_caption_lines: Longer captions are cut with '…'.

    Returns:
        An RGB image of ``(cell_size * (M + 1), header + cell_size * N)`` pixels.
    """
    similarity = _check(images, captions, similarity)
    font = _font(font_size)
    value_font = _font(font_size + 2)
    line_height = _line_height(font)
    pad = 4
    wrapped = [wrap_text(c, font, cell_size - 2 * pad, max_caption_lines) for c in captions]
    header = pad * 2 + line_height * max((len(w) for w in wrapped), default=1)
    n, m = similarity.shape
    canvas = Image.new("RGB", (cell_size * (m + 1), header + cell_size * n), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    for j, lines in enumerate(wrapped):
        x = cell_size * (j + 1) + pad
        # Captions sit at the bottom of the header, next to the cells they label.
        y = header - pad - line_height * len(lines)
        for line in lines:
            draw.text((x, y), line, fill=_TEXT, font=font)
            y += line_height

    low, high = similarity.min().item(), similarity.max().item()
    span = high - low if high > low else 1.0
    best = similarity.argmax(dim=1)
    for i, image in enumerate(images):
        top = header + cell_size * i
        canvas.paste(_thumbnail(image, cell_size - 2), (1, top + 1))
        for j in range(m):
            value = similarity[i, j].item()
            shade = (value - low) / span
            box = (cell_size * (j + 1), top, cell_size * (j + 2) - 1, top + cell_size - 1)
            draw.rectangle(box, fill=_cell_colour(shade), outline=_BACKGROUND)
            if j == best[i].item():
                draw.rectangle((box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1), outline=_OUTLINE, width=3)
            draw.text(
                ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                f"{value:.2f}",
                fill=_BACKGROUND if shade > 0.55 else _TEXT,
                font=value_font,
                anchor="mm",
            )
    return canvas


def retrieval_grid_image(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    similarity: torch.Tensor,
    k: int = 3,
    matches: Sequence[int] | None = None,
    thumb_size: int = 112,
    text_width: int = 420,
    font_size: int = 13,
) -> Image.Image:
    """Each image beside its top-k captions by similarity, with scores; the true caption in green.

    Args:
        images: N images.
        captions: M candidate captions.
        similarity: ``[N, M]`` scores.
        k: Captions shown per image (at most M).
        matches: Index of each image's true caption; defaults to caption ``i`` for image ``i`` when
            N == M, else no caption is marked.
        thumb_size: Side of a thumbnail, in pixels.
        text_width: Width of the caption column, in pixels.
        font_size: Caption font size.

    Returns:
        An RGB image ``thumb_size + text_width`` pixels wide, one ``thumb_size``-high row per image
        (taller where the captions need it).
    """
    similarity = _check(images, captions, similarity)
    if matches is None and len(images) == len(captions):
        matches = range(len(images))
    k = min(k, len(captions))
    font = _font(font_size)
    line_height = _line_height(font)
    pad = 6
    ranked = similarity.topk(k, dim=1)
    rows = []
    for i, image in enumerate(images):
        entries = []
        for rank, (score, j) in enumerate(zip(ranked.values[i].tolist(), ranked.indices[i].tolist()), start=1):
            lines = wrap_text(f"{rank}. [{score:.2f}] {captions[j]}", font, text_width - 2 * pad, max_lines=2)
            entries.append((lines, _MATCH if matches is not None and j == matches[i] else _TEXT))
        height = max(thumb_size, 2 * pad + line_height * sum(len(lines) for lines, _ in entries) + pad * (k - 1))
        row = Image.new("RGB", (thumb_size + text_width, height), _BACKGROUND)
        row.paste(_thumbnail(image, thumb_size), (0, (height - thumb_size) // 2))
        draw = ImageDraw.Draw(row)
        y = pad
        for lines, colour in entries:
            for line in lines:
                draw.text((thumb_size + pad, y), line, fill=colour, font=font)
                y += line_height
            y += pad
        draw.line((0, height - 1, row.width, height - 1), fill=(210, 210, 210))
        rows.append(row)
    canvas = Image.new("RGB", (thumb_size + text_width, sum(r.height for r in rows)), _BACKGROUND)
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height
    return canvas
