"""Summarizes WebDataset shards: shards, samples, extensions, example captions, broken samples.

Usage::

    python -m data_pipelines.inspect_shards '/data/{00000..00099}.tar' --caption-key json:caption
    python -m data_pipelines.inspect_shards /data/shards/ --write-sizes   # count every shard, write sizes.json

The first ``--max-samples`` samples are checked the way training reads them (image decoded,
caption extracted); ``--write-sizes`` additionally counts every sample of every local shard and
writes ``sizes.json`` beside them, which epoch mode and ``samples_per_epoch`` rely on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from data_pipelines.errors import USER_ERRORS, report_user_error
from data_pipelines.samples import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_KEYS,
    SKIP_KINDS,
    SampleKey,
    SkipSample,
    decode_image,
    image_bytes,
    read_samples,
)
from data_pipelines.shards import local_path, parse_shard_spec, shard_sizes


@dataclass
class ShardReport:
    """Findings of ``inspect_shards``.

    Attributes:
        num_sources: Sources in the spec.
        num_shards: Shards in the spec.
        listed_samples: Sum of the sizes from sizes.json / stats files, None if some are unknown.
        checked: Samples checked (decoded).
        counted: Samples of each shard read to its end (every shard with ``count_all``).
        extensions: How many checked samples hold each extension.
        examples: The first captions.
        broken: Checked samples that training would skip, by reason (``unreadable_shard`` counts shards).
    """

    num_sources: int
    num_shards: int
    listed_samples: int | None
    checked: int = 0
    counted: dict[str, int] = field(default_factory=dict)
    extensions: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    broken: Counter = field(default_factory=Counter)

    @property
    def broken_share(self) -> float:
        """Share of checked samples that training would skip."""
        samples = sum(v for k, v in self.broken.items() if k != "unreadable_shard")
        return samples / self.checked if self.checked else 0.0


def inspect_shards(
    spec: str | Sequence[str],
    caption_key: str = "txt",
    max_samples: int = 10_000,
    num_examples: int = 5,
    image_keys: Sequence[str] = IMAGE_KEYS,
    count_all: bool = False,
    progress: bool = False,
) -> ShardReport:
    """Reads shards and reports what training would find.

    Args:
        spec: Shard spec, as for training.
        caption_key: ``"txt"`` or ``"json:FIELD"``.
        max_samples: Samples to check (decode) from the start.
        num_examples: Example captions to keep.
        image_keys: Image extensions, in lookup order.
        count_all: Read every shard to the end to count its samples.
        progress: Show a progress bar.
    """
    key = SampleKey.parse(caption_key)
    sources = parse_shard_spec(spec)
    urls = [u for s in sources for u in s.urls]
    sizes = shard_sizes(urls)
    report = ShardReport(len(sources), len(urls), None if None in sizes else sum(sizes))

    def unreadable(exn: Exception) -> bool:
        report.broken["unreadable_shard"] += 1
        return True

    with tqdm(unit="sample", desc="inspect", disable=not progress) as bar:
        for url in urls:
            if report.checked >= max_samples and not count_all:
                break
            count, complete = 0, True
            for sample in read_samples([url], unreadable):
                if report.checked >= max_samples and not count_all:
                    complete = False
                    break
                count += 1
                bar.update()
                if report.checked < max_samples:
                    _check(sample, key, image_keys, report, num_examples)
            if complete:
                report.counted[url] = count
    return report


def _check(sample: dict, key: SampleKey, image_keys: Sequence[str], report: ShardReport, num_examples: int) -> None:
    report.checked += 1
    report.extensions.update(k for k in sample if not k.startswith("__"))
    caption = key.caption(sample)
    if caption is not None and len(report.examples) < num_examples:
        report.examples.append(caption)
    data = image_bytes(sample, image_keys)
    if data is None:
        report.broken["missing_image"] += 1
    elif caption is None:
        report.broken["missing_caption"] += 1
    else:
        try:
            decode_image(data, DEFAULT_MAX_IMAGE_PIXELS)
        except SkipSample as exn:
            report.broken[exn.kind] += 1


def write_sizes(counts: dict[str, int]) -> list[str]:
    """Writes (or updates) ``sizes.json`` in the directory of each local shard; returns the files written."""
    by_dir: dict[str, dict[str, int]] = {}
    for url, count in counts.items():
        path = local_path(url)
        if path is None:
            raise ValueError(f"cannot write sizes.json for {url}: only local shards can be counted into a file")
        by_dir.setdefault(os.path.dirname(os.path.abspath(path)), {})[os.path.basename(path)] = count
    written = []
    for directory, sizes in by_dir.items():
        target = os.path.join(directory, "sizes.json")
        if os.path.isfile(target):
            with open(target) as f:
                sizes = {**json.load(f), **sizes}
        with open(target, "w") as f:
            json.dump(dict(sorted(sizes.items())), f, indent=1)
        written.append(target)
    return written


def format_report(report: ShardReport, caption_key: str) -> str:
    """The human-readable summary printed by the CLI."""
    counted_all = len(report.counted) == report.num_shards
    if report.listed_samples is not None:
        samples = f"{report.listed_samples} (from sizes.json / *_stats.json)"
    elif counted_all:
        samples = f"{sum(report.counted.values())} (counted)"
    else:
        samples = "unknown: no sizes.json or *_stats.json beside the shards (count them with --write-sizes)"
    lines = [
        f"shards:     {report.num_shards} in {report.num_sources} source(s)",
        f"samples:    {samples}",
        f"checked:    {report.checked} samples",
        "extensions: " + (", ".join(f"{k} {v}" for k, v in sorted(report.extensions.items())) or "none"),
        f"captions ({caption_key}):",
        *[f"  {c!r}" for c in report.examples],
        f"broken:     {report.broken_share:.2%} of checked samples would be skipped",
        *[f"  {kind}: {report.broken[kind]}" for kind in SKIP_KINDS if report.broken[kind]],
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.inspect_shards",
        description="Summarize WebDataset shards: counts, extensions, example captions, broken samples.",
    )
    parser.add_argument("spec", help="shard spec: path, brace pattern, directory, URL; sources joined by ::")
    parser.add_argument("--caption-key", default="txt", help="'txt' or 'json:FIELD' (default: txt)")
    parser.add_argument("--max-samples", type=int, default=10_000, help="samples to decode and check")
    parser.add_argument("--examples", type=int, default=5, help="example captions to print")
    parser.add_argument("--image-keys", default=",".join(IMAGE_KEYS), help="image extensions, in order")
    parser.add_argument("--write-sizes", action="store_true", help="count every shard and write sizes.json")
    args = parser.parse_args(argv)
    try:
        report = inspect_shards(
            args.spec,
            args.caption_key,
            args.max_samples,
            args.examples,
            [k.strip() for k in args.image_keys.split(",") if k.strip()],
            count_all=args.write_sizes,
            progress=sys.stderr.isatty(),
        )
        print(format_report(report, args.caption_key))
        if args.write_sizes:
            for path in write_sizes(report.counted):
                print(f"wrote {path}")
    except USER_ERRORS as exn:
        return report_user_error(exn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
