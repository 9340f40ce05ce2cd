"""Writes img2dataset-compatible WebDataset shards from image-caption pairs.

Inputs: a folder of ``name.jpg|png|...`` images each with a ``name.txt`` caption beside it, or a
CSV / TSV / parquet table with an image-path column and a caption column (other columns are kept
in each sample's ``.json``).

Output, as img2dataset writes it: ``00000.tar, 00001.tar, ...`` whose samples are
``KEY.jpg|png|webp``, ``KEY.txt`` and ``KEY.json`` (``key``, ``caption``, ``width``, ``height``,
``original_width``, ``original_height``, ``source`` and extra fields), with 9-digit keys (shard
number, then index in the shard); one ``NNNNN_stats.json`` per shard and a ``sizes.json`` for the
training pipeline. Every image is decoded with the training decoder, so what is written can be read;
unreadable images and empty captions are left out and counted in the stats.

Usage::

    python -m data_pipelines.make_shards photos/ shards/ --max-size 512
    python -m data_pipelines.make_shards pairs.csv shards/ --image-column path --caption-column text
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from glob import glob

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data_pipelines.errors import USER_ERRORS, report_user_error
from data_pipelines.samples import IMAGE_KEYS, SkipSample, decode_image

# Formats accepted as input; anything but IMAGE_KEYS is re-encoded as JPEG.
INPUT_EXTENSIONS = (*IMAGE_KEYS, "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class Pair:
    """One image-caption pair to write.

    Attributes:
        image: Path of the image file, or its encoded bytes (format guessed from the content).
        caption: The caption.
        meta: Extra fields for the sample's ``.json`` (JSON-serializable).
    """

    image: str | bytes
    caption: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShardsSummary:
    """What ``write_shards`` wrote.

    Attributes:
        output_dir: The shard directory.
        shards: Number of tar files.
        samples: Samples written.
        failures: Pairs left out, by reason.
    """

    output_dir: str
    shards: int
    samples: int
    failures: dict[str, int]

    @property
    def spec(self) -> str:
        """Brace spec of the written shards, for ``train_shards``."""
        return os.path.join(self.output_dir, f"{{00000..{self.shards - 1:05d}}}.tar")


def pairs_from_folder(folder: str | os.PathLike) -> list[Pair]:
    """Images under ``folder`` (recursively) that have a ``.txt`` caption with the same name, sorted."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"input folder {folder!r} not found")
    pairs = []
    for path in sorted(glob(os.path.join(folder, "**", "*"), recursive=True)):
        stem, ext = os.path.splitext(path)
        if ext.lower().lstrip(".") in INPUT_EXTENSIONS and os.path.isfile(stem + ".txt"):
            with open(stem + ".txt", encoding="utf-8") as f:
                pairs.append(Pair(path, f.read().strip(), {"source": os.path.relpath(path, folder)}))
    if not pairs:
        raise ValueError(
            f"no image with a caption in {folder!r}: expected name.jpg (or {', '.join(INPUT_EXTENSIONS)}) "
            "next to name.txt"
        )
    return pairs


def pairs_from_table(
    path: str | os.PathLike,
    image_column: str = "image",
    caption_column: str = "caption",
    image_root: str | os.PathLike | None = None,
) -> list[Pair]:
    """Rows of a ``.csv``, ``.tsv`` or ``.parquet`` table; other columns go into the samples' JSON.

    Args:
        path: The table.
        image_column: Column with image paths.
        caption_column: Column with captions.
        image_root: Base of relative image paths; default the table's directory.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"table {path!r} not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
        rows = pq.read_table(path).to_pylist()
    elif ext in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
    else:
        raise ValueError(f"unsupported table {path!r}: use .csv, .tsv or .parquet")
    columns = list(rows[0]) if rows else []
    missing = [c for c in (image_column, caption_column) if c not in columns]
    if missing:
        raise ValueError(
            f"{path!r} has no column {', '.join(map(repr, missing))} (columns: {', '.join(columns) or 'none'}); "
            "set --image-column / --caption-column"
        )
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    pairs = []
    for row in rows:
        image = os.path.join(root, str(row[image_column]))
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        caption = "" if row[caption_column] is None else str(row[caption_column]).strip()
        pairs.append(Pair(image, caption, {"source": str(row[image_column]), **extra}))
    return pairs


@dataclass(frozen=True)
class _Options:
    output_dir: str
    key_digits: int
    max_size: int | None
    reencode: bool
    quality: int


def _encode(pair: Pair, options: _Options) -> tuple[str, bytes, dict]:
    """(extension, encoded image, size fields) of a pair, resized and re-encoded as requested."""
    if isinstance(pair.image, bytes):
        data, ext = pair.image, None
    else:
        with open(pair.image, "rb") as f:
            data = f.read()
        ext = os.path.splitext(pair.image)[1].lower().lstrip(".")
    image = decode_image(data)
    if ext is None:
        with Image.open(io.BytesIO(data)) as original:
            ext = (original.format or "").lower().replace("jpeg", "jpg")
    sizes = {"original_width": image.width, "original_height": image.height}
    resize = options.max_size is not None and max(image.size) > options.max_size
    if resize:
        image.thumbnail((options.max_size, options.max_size), Image.Resampling.BICUBIC)
    if resize or options.reencode or ext not in IMAGE_KEYS:
        ext = "jpg"
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=options.quality)
        data = buf.getvalue()
    return ext, data, {"width": image.width, "height": image.height, **sizes}


def _write_shard(shard: int, pairs: Sequence[Pair], options: _Options) -> dict:
    """Writes one shard and its stats file; returns the stats."""
    start = time.time()
    status: Counter[str] = Counter()
    name = os.path.join(options.output_dir, f"{shard:05d}")
    # Written under a temporary name so that an interrupted run leaves no complete-looking shard.
    # A whole-second mtime: TarWriter's default (a float) costs every file a 1 KiB PAX header.
    with wds.TarWriter(name + ".tar.tmp", encoder=False, mtime=int(start)) as writer:
        for index, pair in enumerate(pairs):
            key = f"{shard:05d}{index:0{options.key_digits}d}"
            if not pair.caption.strip():
                status["empty caption"] += 1
                continue
            try:
                ext, data, sizes = _encode(pair, options)
            except OSError as exn:
                status[f"unreadable file: {exn.strerror or exn}"] += 1
                continue
            except SkipSample as exn:
                status[exn.kind] += 1
                continue
            meta = {"key": key, "caption": pair.caption, "status": "success", **sizes, **pair.meta}
            writer.write(
                {
                    "__key__": key,
                    ext: data,
                    "txt": pair.caption.encode("utf-8"),
                    "json": json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8"),
                }
            )
            status["success"] += 1
    os.replace(name + ".tar.tmp", name + ".tar")
    end = time.time()
    stats = {
        "count": len(pairs),
        "successes": status["success"],
        "failed_to_resize": len(pairs) - status["success"],
        "duration": end - start,
        "start_time": start,
        "end_time": end,
        "status_dict": dict(status),
    }
    with open(name + "_stats.json", "w") as f:
        json.dump(stats, f, indent=2)
    return stats


def write_shards(
    pairs: Sequence[Pair],
    output_dir: str | os.PathLike,
    samples_per_shard: int = 10_000,
    max_size: int | None = None,
    reencode: bool = False,
    quality: int = 95,
    processes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardsSummary:
    """Writes pairs as img2dataset-compatible shards, several shards in parallel.

    Args:
        pairs: What to write, in order (``pairs_from_folder``, ``pairs_from_table`` or your own).
        output_dir: Shard directory (created).
        samples_per_shard: Pairs per shard (fewer are written when some fail).
        max_size: Downscale images whose longer side exceeds this, keeping the aspect ratio.
        reencode: Re-encode every image as JPEG (resized images always are; other images keep their bytes).
        quality: JPEG quality of re-encoded images.
        processes: Worker processes; default ``min(cpu count, number of shards)``; 1 runs in this process.
        overwrite: Replace shards already in ``output_dir`` instead of failing.
        progress: Show a progress bar.
    """
    if not pairs:
        raise ValueError("no image-caption pair to write")
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    old = glob(os.path.join(output_dir, "*.tar")) + glob(os.path.join(output_dir, "*_stats.json"))
    if old and not overwrite:
        raise FileExistsError(
            f"{output_dir!r} already holds shards; choose an empty directory or pass --overwrite (overwrite=True)"
        )
    for path in old:
        os.remove(path)
    options = _Options(output_dir, max(4, len(str(samples_per_shard - 1))), max_size, reencode, quality)
    chunks = [pairs[i : i + samples_per_shard] for i in range(0, len(pairs), samples_per_shard)]
    processes = min(processes or os.cpu_count() or 1, len(chunks))
    stats: dict[int, dict] = {}
    with tqdm(total=len(pairs), unit="img", desc="make_shards", disable=not progress) as bar:
        if processes == 1:
            for shard, chunk in enumerate(chunks):
                stats[shard] = _write_shard(shard, chunk, options)
                bar.update(len(chunk))
        else:
            with ProcessPoolExecutor(processes) as pool:
                futures = {pool.submit(_write_shard, s, c, options): s for s, c in enumerate(chunks)}
                for future, shard in futures.items():
                    stats[shard] = future.result()
                    bar.update(len(chunks[shard]))
    sizes = {f"{s:05d}.tar": stats[s]["successes"] for s in sorted(stats)}
    with open(os.path.join(output_dir, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=1)
    failures: Counter[str] = Counter()
    for s in stats.values():
        failures.update({k: v for k, v in s["status_dict"].items() if k != "success"})
    return ShardsSummary(output_dir, len(chunks), sum(sizes.values()), dict(failures))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.make_shards",
        description="Write img2dataset-compatible WebDataset shards from an image folder or a table.",
    )
    parser.add_argument("input", help="folder of name.jpg + name.txt pairs, or a .csv/.tsv/.parquet table")
    parser.add_argument("output_dir", help="directory for 00000.tar, ..., sizes.json")
    parser.add_argument("--image-column", default="image", help="table column with image paths (default: image)")
    parser.add_argument("--caption-column", default="caption", help="table column with captions (default: caption)")
    parser.add_argument("--image-root", help="base of relative image paths in the table (default: its directory)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--max-size", type=int, help="downscale so that the longer side is at most this")
    parser.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument("--processes", type=int, help="worker processes (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in output_dir")
    args = parser.parse_args(argv)
    try:
        if not os.path.exists(args.input):
            raise FileNotFoundError(
                f"input {args.input!r} not found: give a folder of name.jpg + name.txt pairs or a .csv, .tsv or "
                ".parquet table"
            )
        if os.path.isdir(args.input):
            pairs = pairs_from_folder(args.input)
        else:
            pairs = pairs_from_table(args.input, args.image_column, args.caption_column, args.image_root)
        summary = write_shards(
            pairs,
            args.output_dir,
            samples_per_shard=args.samples_per_shard,
            max_size=args.max_size,
            reencode=args.reencode,
            quality=args.quality,
            processes=args.processes,
            overwrite=args.overwrite,
        )
    except (*USER_ERRORS, ImportError) as exn:
        return report_user_error(exn)
    failed = sum(summary.failures.values())
    detail = f" ({', '.join(f'{k}: {v}' for k, v in sorted(summary.failures.items()))})" if failed else ""
    print(f"wrote {summary.samples} samples in {summary.shards} shards: {summary.spec}; {failed} left out{detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
