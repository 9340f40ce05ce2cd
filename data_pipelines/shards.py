"""Shard specs: which tar files form a dataset, how sources are weighted, how many samples each holds.

Spec syntax (the same for training and validation):

* one source is a local path, a brace pattern (``/data/{00000..41407}.tar``), a local directory
  (all its ``*.tar`` files, sorted), an ``http(s)://`` URL or a ``pipe:COMMAND`` that writes a tar to
  stdout (for example ``pipe:aws s3 cp s3://bucket/00001.tar -``);
* several sources are joined with ``::`` (``/a/{0..9}.tar::/b/{0..4}.tar``) or given as a list;
  a list item may itself contain ``::``;
* sampling weights are a separate list with one positive number per source, the share of training
  samples drawn from that source (``[1, 3]``: a quarter from the first). They apply to
  ``mode="resampled"`` only.

Sizes come from ``sizes.json`` (shard basename -> sample count, as written by ``make_shards`` or
``python -m data_pipelines.inspect_shards --write-sizes``) or img2dataset's ``NNNNN_stats.json`` (field
``successes``) in the shard's directory. For ``http(s)`` shards only ``sizes.json`` is fetched;
``pipe:`` shards have no known size.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from glob import glob
from urllib.parse import urlparse

import braceexpand

# Seconds to wait for a remote sizes.json; a slow server must not stall the start of training.
_REMOTE_TIMEOUT_S = 10


@dataclass(frozen=True)
class ShardSource:
    """One data source: its shard URLs and optional sampling weight.

    Attributes:
        spec: The text the source was written as, for error messages.
        urls: Expanded shard URLs or paths, in the spec's order.
        weight: Relative share of training samples drawn from this source; None when no weights are
            given (every sample of every source is then equally likely).
    """

    spec: str
    urls: tuple[str, ...]
    weight: float | None = None


def parse_shard_spec(spec: str | Sequence[str], weights: Sequence[float] | None = None) -> list[ShardSource]:
    """Expands a shard spec into sources.

    Args:
        spec: A spec string (sources joined by ``::``) or a list of such strings.
        weights: One positive weight per source, or None.

    Returns:
        The sources, in order.

    Raises:
        ValueError: If the spec is empty, a source matches no shard, local shards do not exist, or the
            weights do not match the sources.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for item in items for p in str(item).split("::") if p.strip()]
    if not parts:
        raise ValueError(
            f"empty shard spec {spec!r}; give a path, brace pattern or URL like /data/{{00000..00099}}.tar"
        )
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(parts):
            raise ValueError(
                f"got {len(weights)} weights for {len(parts)} shard sources ({', '.join(parts)}); "
                "give one weight per '::'-separated source"
            )
        if any(not w > 0 for w in weights):
            raise ValueError(f"source weights must be positive, got {weights}")
    sources = []
    for i, part in enumerate(parts):
        urls = _expand_source(part)
        if not urls:
            raise ValueError(f"shard source {part!r} matches no tar file")
        missing = [u for u in urls if local_path(u) is not None and not os.path.exists(local_path(u))]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(urls)} shards of {part!r} do not exist, e.g. {missing[0]}; correct the "
                "pattern, or give the directory to read the shards it holds"
            )
        sources.append(ShardSource(spec=part, urls=tuple(urls), weight=None if weights is None else weights[i]))
    return sources


def _expand_source(part: str) -> list[str]:
    if local_path(part) is not None and "://" not in part:
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            return sorted(glob(os.path.join(part, "*.tar")))
    # Braces in pipe: commands and URLs are shard numbers too (pipe:curl -s http://host/{000..009}.tar).
    return list(braceexpand.braceexpand(part))


def local_path(url: str) -> str | None:
    """The filesystem path of a local shard (plain path or ``file://``), else None."""
    if url.startswith("pipe:"):
        return None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    # A one-letter scheme is a Windows drive, not a protocol.
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return url
    return None


def shard_sizes(urls: Sequence[str]) -> list[int | None]:
    """Sample count of each shard from ``sizes.json`` or ``*_stats.json`` files, None where unknown."""
    indexes: dict[str, dict[str, int] | None] = {}
    sizes: list[int | None] = []
    for url in urls:
        directory, name = _split(url)
        if directory is None:
            sizes.append(None)
            continue
        if directory not in indexes:
            indexes[directory] = _read_sizes_json(directory)
        index = indexes[directory]
        if index is not None and name in index:
            sizes.append(int(index[name]))
        else:
            sizes.append(_read_stats_json(url))
    return sizes


def _split(url: str) -> tuple[str | None, str]:
    local = local_path(url)
    if local is not None:
        return os.path.dirname(os.path.abspath(local)), os.path.basename(local)
    if urlparse(url).scheme in ("http", "https"):
        head, _, name = url.rpartition("/")
        return head, name
    return None, url


def _read_sizes_json(directory: str) -> dict[str, int] | None:
    if urlparse(directory).scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(directory + "/sizes.json", timeout=_REMOTE_TIMEOUT_S) as f:
                return json.load(f)
        except (OSError, ValueError):
            # Most servers simply have no sizes.json: the sizes are unknown, which is not an error.
            return None
    path = os.path.join(directory, "sizes.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); fix or delete it") from None


def _read_stats_json(url: str) -> int | None:
    local = local_path(url)
    if local is None:
        return None
    stem = local[: -len(".tar")] if local.endswith(".tar") else local
    path = stem + "_stats.json"
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        stats = json.load(f)
    if "successes" not in stats:
        raise ValueError(f"{path} has no 'successes' field (fields: {sorted(stats)})")
    return int(stats["successes"])


def describe_missing_sizes(urls: Sequence[str], sizes: Sequence[int | None]) -> str:
    """A one-line explanation of which shards have no known size and how to fix it."""
    missing = [u for u, s in zip(urls, sizes, strict=False) if s is None]
    return (
        f"the sample count of {len(missing)} of {len(urls)} shards is unknown (e.g. {missing[0]}): "
        "there is no sizes.json or img2dataset NNNNN_stats.json next to them. Write one with "
        "`python -m data_pipelines.inspect_shards SPEC --write-sizes`, or pass samples_per_epoch"
    )
