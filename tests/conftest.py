"""Shared fixtures: a tiny SentencePiece tokenizer and a factory of tiny WebDataset shards."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.tokenizer import Tokenizer, train_sentencepiece

# Captions of the tiny shards are "photo <id>", so a test can read back which sample a token row is.
_TOKENIZER_TEXT = [f"photo {i}" for i in range(200)] + [
    "a red circle at the top left",
    "a blue square in the center",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    """A SentencePiece model trained in about a second on the tiny shards' captions."""
    path = tmp_path_factory.mktemp("tokenizer") / "tiny.model"
    return train_sentencepiece(_TOKENIZER_TEXT, path, vocab_size=60, byte_fallback=False, num_threads=1)


@pytest.fixture
def read_ids(tiny_tokenizer):
    """``read_ids(tokens) -> list[int]``: which samples a batch holds, from their ``photo <id>`` captions."""
    return lambda tokens: [int(tiny_tokenizer.decode(row).split()[-1]) for row in tokens]


class ShardFactory:
    """Writes tiny shards in img2dataset's layout into a temporary directory."""

    def __init__(self, root: Path):
        self.root = root

    @staticmethod
    def png(value: int, size: int = 8) -> bytes:
        """A constant-colour PNG whose red channel is ``value`` (mod 256)."""
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (value % 256, 7, 200)).save(buf, format="PNG")
        return buf.getvalue()

    @staticmethod
    def record(i: int, image: bytes | None = None, caption: str | None = None, **extra) -> dict:
        """Sample ``i``: a PNG, caption ``photo i`` in ``.txt`` and in the ``.json``'s ``caption``."""
        caption = f"photo {i}" if caption is None else caption
        meta = {"key": f"{i:09d}", "caption": caption, **extra}
        return {
            "__key__": f"{i:09d}",
            "png": ShardFactory.png(i) if image is None else image,
            "txt": caption.encode(),
            "json": json.dumps(meta).encode(),
        }

    @staticmethod
    def write_tar(path: Path, records: list[dict]) -> None:
        with wds.TarWriter(str(path), encoder=False) as writer:
            for r in records:
                writer.write(r)

    def __call__(
        self, sizes: list[int], name: str = "shards", start: int = 0, sizes_json: bool = True
    ) -> tuple[str, list[int]]:
        """Shards ``00000.tar...`` holding ``sizes[k]`` samples each, ids counting from ``start``.

        Returns:
            The brace spec of the shards and the ids written.
        """
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        ids, index = [], {}
        next_id = start
        for shard, size in enumerate(sizes):
            records = [self.record(i) for i in range(next_id, next_id + size)]
            self.write_tar(directory / f"{shard:05d}.tar", records)
            index[f"{shard:05d}.tar"] = size
            ids.extend(range(next_id, next_id + size))
            next_id += size
        if sizes_json:
            (directory / "sizes.json").write_text(json.dumps(index))
        return os.fspath(directory / f"{{00000..{len(sizes) - 1:05d}}}.tar"), ids


@pytest.fixture
def make_tiny_shards(tmp_path) -> ShardFactory:
    """Factory: ``make_tiny_shards([3, 5])`` writes two shards and returns ``(spec, ids)``."""
    return ShardFactory(tmp_path)
