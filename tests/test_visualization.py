import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from clip_pl.evaluation.visualization import (
    images_from_batch,
    retrieval_grid_image,
    similarity_matrix_image,
    to_array,
    wrap_text,
)
from data_pipelines.transforms import PreprocessConfig, image_transform

CAPTIONS = ["a red square", "a green square", "a blue square on a white table in a bright kitchen"]
COLOURS = [(220, 30, 30), (30, 160, 60), (40, 60, 200)]


def _images():
    return [Image.new("RGB", (40 + 10 * i, 30), colour) for i, colour in enumerate(COLOURS)]


SIMILARITY = torch.tensor([[0.30, 0.10, 0.05], [0.12, 0.28, 0.20], [0.22, 0.31, 0.02]])


def test_similarity_matrix_layout_and_colours():
    cell = 80
    picture = similarity_matrix_image(_images(), CAPTIONS, SIMILARITY, cell_size=cell)
    array = to_array(picture)
    header = picture.height - 3 * cell
    assert picture.size[0] == 4 * cell and header > 12
    assert array.shape == (picture.height, picture.width, 3) and array.dtype == np.uint8

    # Cell interiors (away from the value text and outlines) show the scale: the matrix maximum is
    # the darkest blue, the minimum near-white.
    def cell_pixel(i, j):
        return tuple(int(c) for c in array[header + cell * i + 8, cell * (j + 1) + 8])

    assert cell_pixel(2, 1) == (8, 48, 107)  # 0.31, the maximum
    assert cell_pixel(2, 2) == (247, 251, 255)  # 0.02, the minimum
    assert sum(cell_pixel(0, 0)) < sum(cell_pixel(1, 0))  # 0.30 darker than 0.12
    # Row thumbnails: the first row's thumbnail centre is the first image's colour.
    assert tuple(array[header + cell // 2, cell // 2]) == COLOURS[0]
    # Each row's best caption is outlined in orange: row 0 -> caption 0, row 1 -> caption 1.
    assert tuple(array[header + 2, cell + cell // 2]) == (230, 80, 0)
    assert tuple(array[header + cell + 2, 2 * cell + cell // 2]) == (230, 80, 0)
    assert tuple(array[header + 2, 2 * cell + cell // 2]) != (230, 80, 0)


def test_retrieval_grid_marks_true_caption_in_green():
    picture = retrieval_grid_image(_images(), CAPTIONS, SIMILARITY, k=2, thumb_size=64, text_width=300)
    array = to_array(picture)
    assert picture.width == 64 + 300 and picture.height >= 3 * 64
    # Rows end in a grey separator line; rows are at least a thumbnail high, taller for long captions.
    separators = np.flatnonzero(np.all(array == (210, 210, 210), axis=(1, 2)))
    assert len(separators) == 3 and separators[-1] == picture.height - 1
    bounds = [0, *(separators + 1).tolist()]
    assert all(b - a >= 64 for a, b in zip(bounds, bounds[1:]))
    green = np.all(array == (0, 130, 60), axis=-1)
    rows_with_green = [green[a:b].any() for a, b in zip(bounds, bounds[1:])]
    # Image 2's own caption (0.02) is last in its row, outside the top 2; images 0 and 1 find theirs.
    assert rows_with_green == [True, True, False]


def test_retrieval_grid_without_matches_and_errors():
    picture = retrieval_grid_image(_images()[:2], CAPTIONS, SIMILARITY[:2], k=5)
    assert not np.all(to_array(picture) == (0, 130, 60), axis=-1).any()
    with pytest.raises(ValueError, match=r"similarity must be \[images, captions\] = \[2, 3\]"):
        similarity_matrix_image(_images()[:2], CAPTIONS, SIMILARITY)


def test_wrap_text_fits_width_and_truncates():
    font = ImageFont.load_default(size=12)
    text = "a very long caption " * 10 + "withanunbreakablewordthatislongerthanaline"
    lines = wrap_text(text, font, width=100, max_lines=4)
    assert len(lines) == 4 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 100 for line in lines)
    split = wrap_text("withanunbreakablewordthatislongerthanaline", font, width=60, max_lines=10)
    assert "".join(split) == "withanunbreakablewordthatislongerthanaline" and len(split) > 1


def test_images_from_batch_undoes_normalization():
    config = PreprocessConfig(image_size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), interpolation="bilinear")
    original = Image.new("RGB", (16, 16), (200, 100, 50))
    batch = image_transform(config)(original).unsqueeze(0)
    (restored,) = images_from_batch(batch, config)
    assert np.abs(to_array(restored).astype(int) - np.asarray(original).astype(int)).max() <= 1
