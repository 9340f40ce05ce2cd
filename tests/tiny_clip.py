"""Builders shared by the evaluation, inference and conversion tests: a tiny model and its files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip_pl.model import CLIP, create_model
from clip_pl.model_files.checkpoint import CHECKPOINT_KEY, STATE_DICT_PREFIX
from data_pipelines.tokenizer import Tokenizer, train_sentencepiece

CAPTIONS = [
    "a photo of a red apple",
    "a green granny smith apple on a table",
    "an ipod with white earphones",
    "a slice of pizza with cheese",
    "a dog running on the beach",
    "a cat sleeping on a sofa",
    "a picture of the city at night",
    "a blue car parked in the street",
] * 10


CONTEXT_LENGTH = 32


def make_tokenizer(directory: Path) -> Tokenizer:
    trained = train_sentencepiece(CAPTIONS, directory / "tok.model", vocab_size=100, byte_fallback=False, num_threads=1)
    return Tokenizer(trained.model_proto, context_length=CONTEXT_LENGTH)


def make_model(tokenizer: Tokenizer, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return create_model("tiny", text={"vocab_size": tokenizer.vocab_size, "context_length": CONTEXT_LENGTH}).eval()


def checkpoint_dict(model: CLIP, tokenizer: Tokenizer) -> dict:
    """What a training checkpoint holds for inference (Lightning's other entries are not read)."""
    return {
        "state_dict": {STATE_DICT_PREFIX + k: v for k, v in model.state_dict().items()},
        CHECKPOINT_KEY: {"model_config": model.config.to_dict(), "tokenizer": tokenizer.state_dict()},
    }


def write_checkpoint(model: CLIP, tokenizer: Tokenizer, path: Path) -> Path:
    torch.save(checkpoint_dict(model, tokenizer), path)
    return path


def random_image(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_image_folder(root: Path, classes: list[str], per_class: int) -> Path:
    """``root/<class>/<i>.png`` with random pixels."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            random_image(100 * c + i).save(root / name / f"{i}.png")
    return root
