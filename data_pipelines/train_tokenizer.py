"""Trains the SentencePiece tokenizer of the text tower on captions from shards or a text file.

Usage::

    python -m data_pipelines.train_tokenizer --shards '/data/{00000..00099}.tar' --output tok.model
    python -m data_pipelines.train_tokenizer --text captions.txt --output tok.model --vocab-size 8000

Captions are read from shards with the training pipeline's caption extraction (``--caption-key``),
so the tokenizer sees exactly the text training will tokenize. Any language works; for scripts with
many characters (Chinese...) keep ``--byte-fallback`` so rare characters never become UNK.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from itertools import islice

from tqdm import tqdm

from data_pipelines.errors import USER_ERRORS, report_user_error
from data_pipelines.samples import SampleKey, read_samples
from data_pipelines.shards import parse_shard_spec
from data_pipelines.tokenizer import train_sentencepiece


def shard_captions(spec: str | Sequence[str], caption_key: str = "txt") -> Iterator[str]:
    """Captions of the shards in order; samples without one and unreadable shards are passed over."""
    key = SampleKey.parse(caption_key)
    urls = [u for s in parse_shard_spec(spec) for u in s.urls]

    def keep_caption_file(name: str) -> bool:
        # Only the caption member is kept; image bytes are skipped as the tar streams past.
        return name.rsplit(".", 1)[-1].lower() == key.extension

    def skip_shard(exn: Exception) -> bool:
        print(f"warning: skipping unreadable shard: {exn}", file=sys.stderr)
        return True

    for sample in read_samples(urls, skip_shard, select_files=keep_caption_file):
        caption = key.caption(sample)
        if caption is not None:
            yield caption


def text_lines(path: str | os.PathLike) -> Iterator[str]:
    """Non-empty lines of a UTF-8 text file, one caption per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {os.fspath(path)!r} not found")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.train_tokenizer",
        description="Train a SentencePiece tokenizer (with clip_pl's pad/bos/eos ids) on captions.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="shard spec to read captions from")
    source.add_argument("--text", help="UTF-8 text file, one caption per line")
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    parser.add_argument(
        "--byte-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode unknown characters as UTF-8 bytes instead of UNK (needs vocab-size above 260)",
    )
    parser.add_argument("--sample-size", type=int, default=2_000_000, help="captions to train on")
    parser.add_argument("--caption-key", default="txt", help="with --shards: 'txt' or 'json:FIELD'")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--lowercase", action="store_true", help="lowercase captions (set it in the config too)")
    args = parser.parse_args(argv)
    try:
        captions = shard_captions(args.shards, args.caption_key) if args.shards else text_lines(args.text)
        read = tqdm(islice(captions, args.sample_size), total=args.sample_size, unit="caption", desc="reading")
        tokenizer = train_sentencepiece(
            read,
            args.output,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            byte_fallback=args.byte_fallback,
            sample_size=args.sample_size,
            character_coverage=args.character_coverage,
            lowercase=args.lowercase,
        )
    except (*USER_ERRORS, RuntimeError) as exn:
        return report_user_error(exn)
    print(f"wrote {args.output}: {args.model_type} tokenizer with {tokenizer.vocab_size} pieces ({read.n} captions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
