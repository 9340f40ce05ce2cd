"""Tokenizers producing fixed-length id tensors for the text tower; SentencePiece is the default.

Every sequence is ``[bos] pieces... [eos] [pad]...`` of exactly ``context_length`` ids.
When a caption is too long the pieces are cut and EOS is kept, because the text tower
pools its output at the EOS position. A text tower loaded from OpenAI/OpenCLIP keeps the BPE
it was trained with (``data_pipelines.openclip_tokenizer``); both kinds share this interface, and
``tokenizer_from_state_dict`` rebuilds either from a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm
import torch

from data_pipelines.atomic import atomic_output

# Special ids written into every model trained by ``train_sentencepiece``. sentencepiece
# disables padding by default (pad_id=-1), so they are always set explicitly.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TextTokenizer(Protocol):
    """What the text tower, the data pipeline and the model files need of a tokenizer of any kind."""

    kind: str
    context_length: int
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor: ...

    def encode(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str: ...

    def vocabulary(self) -> list[str]: ...

    def state_dict(self) -> dict: ...

    def save(self, path: str | os.PathLike) -> None: ...


class Tokenizer:
    """Callable SentencePiece tokenizer: ``tokenizer(list_of_str) -> LongTensor[B, L]``.

    Args:
        model_proto: The serialized SentencePiece model (the bytes of a ``.model`` file).
        context_length: Length of every output row, BOS and EOS included.
        lowercase: Lowercase captions before encoding.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, context_length: int = 77, lowercase: bool = False):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (bos, one piece, eos), got {context_length}")
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.context_length = context_length
        self.lowercase = lowercase
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        missing = [n for n, i in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id)) if i < 0]
        if missing:
            raise ValueError(
                f"the SentencePiece model has no {', '.join(missing)} id; train it with "
                "`python -m data_pipelines.train_tokenizer`, which sets pad/bos/eos explicitly"
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int = 77, lowercase: bool = False) -> Tokenizer:
        """Loads a SentencePiece ``.model`` file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer model {str(path)!r} not found; train one with "
                "`python -m data_pipelines.train_tokenizer --output PATH ...`"
            )
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto, context_length=context_length, lowercase=lowercase)
        except RuntimeError as e:  # SentencePiece's parse error
            raise ValueError(f"tokenizer model {str(path)!r} is not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def state_dict(self) -> dict:
        """Everything needed to rebuild this tokenizer; stored inside checkpoints."""
        return {
            "kind": self.kind,
            "model_proto": self.model_proto,
            "context_length": self.context_length,
            "lowercase": self.lowercase,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Tokenizer:
        return cls(bytes(state["model_proto"]), int(state["context_length"]), bool(state["lowercase"]))

    def vocabulary(self) -> list[str]:
        """The piece of every id, in id order: two tokenizers with equal vocabularies give equal ids."""
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the SentencePiece model file (context length and lowercasing are config)."""
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            f.write(self.model_proto)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Pieces of each text, without special tokens and without truncation."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        return self.sp.encode(list(texts), out_type=int)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        body = self.context_length - 2
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(self.encode(texts)):
            ids = [self.bos_id, *ids[:body], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of one row of ids; special tokens are dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self.sp.decode([i for i in ids if i not in special])


def tokenizer_from_state_dict(state: dict) -> TextTokenizer:
    """Rebuilds a tokenizer of either kind from its ``state_dict()`` (older checkpoints: SentencePiece)."""
    kind = state.get("kind", Tokenizer.kind)
    if kind == Tokenizer.kind:
        return Tokenizer.from_state_dict(state)
    if kind == "openclip_bpe":
        from data_pipelines.openclip_tokenizer import OpenCLIPTokenizer

        return OpenCLIPTokenizer.from_state_dict(state)
    raise ValueError(f"unknown tokenizer kind {kind!r} (this clip_pl knows sentencepiece and openclip_bpe)")


def train_sentencepiece(
    sentences: Iterable[str],
    output: str | os.PathLike,
    vocab_size: int = 32000,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    sample_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    lowercase: bool = False,
    num_threads: int | None = None,
) -> Tokenizer:
    """Trains a SentencePiece model with clip_pl's special ids and writes it to ``output``.

    Args:
        sentences: Training text, one caption per item; only the first ``sample_size`` are read.
        output: Path of the ``.model`` file to write.
        vocab_size: Number of pieces, special tokens included.
        model_type: ``"unigram"`` or ``"bpe"``.
        byte_fallback: Encode characters outside the vocabulary as UTF-8 bytes instead of UNK.
        sample_size: Maximum number of sentences used for training.
        character_coverage: Share of characters covered by the vocabulary (1.0 for small alphabets).
        lowercase: Lowercase the training text (use the same setting in ``Tokenizer``).
        num_threads: Trainer threads; defaults to the CPU count.

    Returns:
        The trained tokenizer.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")

    def limited() -> Iterable[str]:
        for n, s in enumerate(sentences):
            if n >= sample_size:
                return
            s = s.strip()
            if s:
                yield s.lower() if lowercase else s

    # A failed training leaves a tokenizer already at ``output`` as it was.
    with atomic_output(output) as tmp, open(tmp, "wb") as writer:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(limited()),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            # Small corpora (tests, the demo) cannot always fill the requested vocabulary.
            hard_vocab_limit=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    return Tokenizer.from_file(output, lowercase=lowercase)
