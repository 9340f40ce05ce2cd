"""OpenAI CLIP's byte-level BPE tokenizer, as OpenCLIP ships it, for text towers trained with it.

A pretrained OpenAI/OpenCLIP text tower only understands the ids it was trained on, so a model
loaded from one keeps this tokenizer: the same clean-up (ftfy, HTML unescaping, whitespace, lower
case), the same 49,408 ids, ``<start_of_text>`` first and ``<end_of_text>`` last (kept when a caption
is cut), padding with 0. The encoding is OpenCLIP's own ``SimpleTokenizer``, not a re-implementation;
the merges file (about 1.3 MB) is stored in checkpoints and exports, so they load without the file.

Needs OpenCLIP: ``pip install -e ".[openclip]"``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import torch

from data_pipelines.atomic import atomic_output

KIND = "openclip_bpe"


def _simple_tokenizer_class() -> Any:
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise ImportError(
            f"the openclip_bpe tokenizer needs OpenCLIP ({e.name} is missing): pip install -e \".[openclip]\""
        ) from None
    return SimpleTokenizer


def bundled_merges_path() -> str:
    """The BPE merges file inside the installed open_clip package (never downloaded)."""
    _simple_tokenizer_class()
    from open_clip.tokenizer import default_bpe

    return default_bpe()


class OpenCLIPTokenizer:
    """Callable BPE tokenizer: ``tokenizer(list_of_str) -> LongTensor[B, context_length]``.

    Args:
        merges: The gzipped BPE merges file's bytes (``bpe_simple_vocab_16e6.txt.gz``).
        context_length: Length of every output row, start and end tokens included.
    """

    kind = KIND
    pad_id = 0

    def __init__(self, merges: bytes, context_length: int = 77):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
        try:
            self._bpe = _simple_tokenizer_class()(io.BytesIO(merges), context_length=context_length)
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"not a gzipped OpenCLIP BPE merges file ({e})") from None
        self.merges = merges
        self.context_length = context_length
        self.vocab_size = self._bpe.vocab_size
        self.bos_id, self.eos_id = self._bpe.sot_token_id, self._bpe.eot_token_id

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, context_length: int = 77) -> OpenCLIPTokenizer:
        """Loads a merges file; ``None`` takes the one bundled with the open_clip package."""
        path = bundled_merges_path() if path is None else os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPE merges file {path!r} not found (tokenizer.path=null uses open_clip's own)")
        with open(path, "rb") as f:
            merges = f.read()
        try:
            return cls(merges, context_length=context_length)
        except ValueError as e:
            raise ValueError(f"tokenizer.path {path!r}: {e}; tokenizer.path=null uses open_clip's own") from None

    def state_dict(self) -> dict:
        """Everything needed to rebuild this tokenizer; stored inside checkpoints."""
        return {"kind": KIND, "merges": self.merges, "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> OpenCLIPTokenizer:
        return cls(bytes(state["merges"]), int(state["context_length"]))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the merges file (the context length is config)."""
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            f.write(self.merges)

    def vocabulary(self) -> list[str]:
        """The token of every id, in id order: two tokenizers with equal vocabularies give equal ids."""
        return [self._bpe.decoder[i] for i in range(self.vocab_size)]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text after OpenCLIP's clean-up, without special tokens and without truncation."""
        return [self._bpe.encode(self._bpe.clean_fn(t)) for t in texts]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self._bpe([texts] if isinstance(texts, str) else list(texts), context_length=self.context_length)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of one row of ids: what lies between the start and the end token (padding is id 0, also "!")."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._bpe.decode([i for i in ids if i != self.bos_id]).strip()
