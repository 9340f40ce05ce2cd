"""Training and validation streams of ``(images, tokens)`` batches over WebDataset shards.

Every rank yields exactly ``samples_per_epoch // (world_size * batch_size)`` full batches per epoch,
whatever the shard sizes and broken samples, because an uneven count hangs the all-gather of the
contrastive loss. Each rank's DataLoader workers split that count between them; the DataLoader asks
its workers in turn, so worker ``w`` serves the epoch's batches ``w, w + W, w + 2W, ...``.

Modes:

* ``"resampled"``: each (rank, worker) draws shards with replacement, from a generator seeded with
  (seed, epoch, resume point, rank, worker); reproducible, unlike ``WebDataset(resampled=True)``.
  Every sample is equally likely, or with source weights each source supplies its share of the
  samples (``ShardSet.draw_weights``).
* ``"epoch"``: the shard order is shuffled per epoch with the same seed on every rank; the shuffled
  samples are cut into one contiguous range per (rank, worker), so every sample of the epoch is
  read once by exactly one worker. Ranges start and end inside shards (a worker skips the head of
  its first shard), which needs the size of every shard. Samples past
  ``world_size * batches_per_epoch * batch_size`` (fewer than one global batch when
  ``samples_per_epoch`` is the dataset size) are left out of that epoch; the next epoch's shuffle
  leaves out others. A worker whose range holds broken samples tops up its last batch by reading
  its range again, so a broken sample costs one repeated sample, never a missing batch.

Shuffling: a resampled stream passes through a rolling buffer of ``shuffle_buffer`` samples. An
epoch is shuffled blockwise: ``shuffle_buffer`` consecutive samples are permuted together with a
generator seeded by their position. Unlike a rolling buffer this lets a resumed epoch start at the
exact sample where the interrupted one stopped.

The epoch and resume point live in shared memory (``StreamPosition``): persistent workers keep
their own copy of the dataset object, so a plain attribute set in the main process never reaches
them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle

from data_pipelines.counters import SkipCounters
from data_pipelines.ranks import rank_and_world_size
from data_pipelines.samples import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_KEYS,
    SampleKey,
    SkipSample,
    check_layout,
    decode_pixels,
    image_bytes,
    read_samples,
)
from data_pipelines.shards import ShardSource, describe_missing_sizes, parse_shard_spec, shard_sizes
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.transforms import ImageTransform, stack_pixels

MODES = ("resampled", "epoch")

# A worker that only meets unusable samples is misconfigured, not unlucky: stop it with a message
# instead of spinning forever (OpenCLIP's failure mode when the caption key never matches).
_MAX_FAILURES_IN_A_ROW = 1000
_MAX_EMPTY_SHARDS_IN_A_ROW = 100

Batch = tuple[torch.Tensor, torch.Tensor]


def batches_per_epoch(samples_per_epoch: int, world_size: int, batch_size: int) -> int:
    """Full batches each rank yields per epoch; the remainder of the epoch's samples is dropped.

    Raises:
        ValueError: The epoch holds less than one global batch.
    """
    batches = samples_per_epoch // (world_size * batch_size)
    if batches == 0:
        raise ValueError(
            f"samples_per_epoch={samples_per_epoch} is less than one global batch "
            f"(world_size {world_size} x batch_size {batch_size}); lower batch_size"
        )
    return batches


@dataclass(frozen=True)
class ShardSet:
    """Resolved shards of a dataset with their sizes.

    Attributes:
        sources: The parsed sources with their weights.
        urls: All shard URLs, sources concatenated.
        sizes: Sample count per shard, None where unknown.
        samples_per_epoch: Samples in one training epoch (explicit, or the sum of sizes).
    """

    sources: tuple[ShardSource, ...]
    urls: tuple[str, ...]
    sizes: tuple[int | None, ...]
    samples_per_epoch: int

    def draw_weights(self) -> list[float]:
        """Probability weight of each shard in resampled mode.

        A draw yields the whole shard, so a sample turns up as often as its shard is drawn: equal
        weights make every sample equally frequent, whatever the shard sizes. With source weights,
        each shard of a source gets the source's weight divided by the source's sample count, so
        the source supplies that share of the samples (its shard count stands in when some sizes
        are unknown).
        """
        weights: list[float] = []
        start = 0
        for source in self.sources:
            sizes = self.sizes[start : start + len(source.urls)]
            start += len(source.urls)
            if source.weight is None:
                weights.extend([1.0] * len(sizes))
            else:
                total = sum(sizes) if None not in sizes else len(sizes)
                weights.extend([source.weight / total] * len(sizes))
        return weights


def load_shard_set(
    spec: str | Sequence[str],
    weights: Sequence[float] | None = None,
    samples_per_epoch: int | None = None,
    mode: str = "resampled",
) -> ShardSet:
    """Parses a training shard spec and finds the epoch size.

    Args:
        spec: Shard spec (see ``data_pipelines.shards``).
        weights: One sampling weight per source (resampled mode only).
        samples_per_epoch: Overrides the sum of the shard sizes.
        mode: ``"resampled"`` or ``"epoch"``; epoch mode needs every shard's size.

    Raises:
        ValueError: With what to change, when sizes are missing or the arguments do not fit.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if weights is not None and mode == "epoch":
        raise ValueError("train_weights apply to mode='resampled' only; epoch mode reads every sample once")
    sources = parse_shard_spec(spec, weights)
    urls = tuple(u for s in sources for u in s.urls)
    sizes = tuple(shard_sizes(urls))
    known = None not in sizes
    if mode == "epoch" and not known:
        raise ValueError(describe_missing_sizes(urls, sizes) + " (epoch mode splits epochs by sample counts)")
    if samples_per_epoch is None:
        if not known:
            raise ValueError(describe_missing_sizes(urls, sizes))
        samples_per_epoch = sum(sizes)
    if samples_per_epoch <= 0:
        raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
    if mode == "epoch" and samples_per_epoch > sum(sizes):
        raise ValueError(
            f"samples_per_epoch={samples_per_epoch} exceeds the {sum(sizes)} samples of the shards; "
            "epoch mode reads each sample at most once per epoch (use mode='resampled' to draw more)"
        )
    return ShardSet(tuple(sources), urls, sizes, int(samples_per_epoch))


@dataclass(frozen=True)
class SampleDecoder:
    """Raw sample -> (image tensor, caption); raises ``SkipSample`` for unusable samples.

    The image is decoded to uint8 pixels (``decode_pixels``) and passed through ``transform``.
    """

    caption_key: SampleKey
    transform: ImageTransform
    image_keys: tuple[str, ...] = IMAGE_KEYS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # JPEG draft decoding down to about this side (see ``decode_image``); None decodes at full size.
    min_size: int | None = None

    def __call__(self, sample: dict) -> tuple[torch.Tensor, str]:
        data = image_bytes(sample, self.image_keys)
        if data is None:
            raise SkipSample("missing_image", sample.get("__key__", ""))
        caption = self.caption_key.caption(sample)
        if caption is None:
            raise SkipSample("missing_caption", sample.get("__key__", ""))
        return self.transform(decode_pixels(data, self.max_image_pixels, self.min_size)), caption


class StreamPosition:
    """Epoch number and batches already consumed in it, in shared memory."""

    def __init__(self) -> None:
        self._value = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set(self, epoch: int, batches_done: int = 0) -> None:
        self._value[0], self._value[1] = int(epoch), int(batches_done)

    def get(self) -> tuple[int, int]:
        epoch, done = self._value.tolist()
        return epoch, done


def _share(total: int, parts: int, index: int) -> int:
    """How many of ``total`` items dealt in turn to ``parts`` go to ``index``."""
    return total // parts + (index < total % parts)


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(items, size)):
        yield chunk


class _Tally:
    """Counts the skips of one worker's iteration and stops a stream that only fails.

    Attributes:
        counting: False while a worker re-reads its range to replace broken samples.
    """

    def __init__(self, counters: SkipCounters):
        self.counters = counters
        self.counting = True
        self.in_a_row: dict[str, int] = {}
        self.last_error: Exception | None = None

    def skip(self, kind: str, exn: Exception) -> None:
        self.last_error = exn
        if self.counting:
            self.counters.add(kind)
        self.in_a_row[kind] = self.in_a_row.get(kind, 0) + 1
        if sum(self.in_a_row.values()) >= _MAX_FAILURES_IN_A_ROW:
            counts = ", ".join(f"{k}={v}" for k, v in self.in_a_row.items())
            raise ValueError(
                f"{_MAX_FAILURES_IN_A_ROW} samples in a row were unusable ({counts}; last error: "
                f"{self.last_error!r}); check caption_key, image_keys and the shards"
            )

    def ok(self) -> None:
        self.in_a_row.clear()


class ShardStream(IterableDataset):
    """Training stream yielding ``(images [B,3,H,W], tokens [B,L] long)`` batches, images as the decoder makes them.

    Pass it to a ``DataLoader`` with ``batch_size=None`` (batches are built in the workers, where
    images are decoded and captions tokenized). Call ``set_position(epoch)`` before each epoch;
    ``ShardDataModule`` does it for you.

    Args:
        shards: Resolved shards (``load_shard_set``).
        tokenizer: Caption tokenizer, run in the workers.
        batch_size: Samples per batch on this rank.
        decoder: Turns a raw sample into (image tensor, caption).
        mode: ``"resampled"`` or ``"epoch"``.
        shuffle_buffer: Samples in the rolling shuffle buffer (resampled) or permuted together (epoch).
        seed: Seed of shard order, draws and shuffles.
        rank: This rank; default from torch.distributed.
        world_size: Number of ranks; default from torch.distributed.
        counters: Where skipped samples are counted (shared with the main process).
        check: Read the first samples of each source in this process to fail fast on wrong keys.
    """

    def __init__(
        self,
        shards: ShardSet,
        tokenizer: Tokenizer,
        batch_size: int,
        decoder: SampleDecoder,
        mode: str = "resampled",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        counters: SkipCounters | None = None,
        check: bool = True,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size <= 0 or shuffle_buffer <= 0:
            raise ValueError(f"batch_size and shuffle_buffer must be positive, got {batch_size}, {shuffle_buffer}")
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        self.batches_per_epoch = batches_per_epoch(shards.samples_per_epoch, self.world_size, batch_size)
        if check:
            for source in shards.sources:
                check_layout(source.urls, decoder.caption_key, decoder.image_keys, source_name=source.spec)
        self.shards, self.tokenizer, self.batch_size, self.decoder = shards, tokenizer, batch_size, decoder
        self.mode, self.shuffle_buffer, self.seed = mode, shuffle_buffer, seed
        self.counters = counters if counters is not None else SkipCounters(0)
        self.position = StreamPosition()

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch (a resumed epoch yields the remaining ones)."""
        return self.batches_per_epoch

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Selects the epoch the next iteration yields, skipping its first ``batches_done`` batches."""
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done must be in [0, {self.batches_per_epoch}], got {batches_done}")
        self.position.set(epoch, batches_done)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, start = self.position.get()
        # The DataLoader restarts its turn at worker 0 on every iteration. Rotating the workers'
        # roles by the resume point makes worker 0 serve the next batch of the interrupted order,
        # so a resumed epoch continues exactly like the uninterrupted one.
        slot = (worker + start) % num_workers
        total, done = _share(self.batches_per_epoch, num_workers, slot), _share(start, num_workers, slot)
        if done >= total:
            return
        tag = f"{self.seed}/{epoch}/{self.rank}/{self.world_size}/{slot}/{num_workers}"
        if info is not None:
            # Augmentations draw from the global generators of Python (crops) and torch (custom
            # transforms), which are this worker's own.
            augment_seed = _stable_int(f"augment/{tag}/{start}")
            random.seed(augment_seed)
            torch.manual_seed(augment_seed)
        tally = _Tally(self.counters)
        if self.mode == "epoch":
            raw = self._epoch_samples(tag, epoch, slot, num_workers, done * self.batch_size, tally)
        else:
            raw = self._resampled_samples(f"{tag}/{start}", tally)
        try:
            yield from islice(_batches(raw, self.decoder, self.tokenizer, self.batch_size, tally), total - done)
        finally:
            raw.close()

    def _epoch_samples(
        self, tag: str, epoch: int, slot: int, num_workers: int, offset: int, tally: _Tally
    ) -> Iterator[dict]:
        quotas = [_share(self.batches_per_epoch, num_workers, s) * self.batch_size for s in range(num_workers)]
        begin = self.rank * self.batches_per_epoch * self.batch_size + sum(quotas[:slot])
        length = quotas[slot]
        pieces = _range_pieces(self.shards, self.seed, epoch, begin, length)
        # Past the end of the range (its broken samples were replaced) the range is read again.
        lap, offset = divmod(offset, length)
        while True:
            # Repeated reads of a broken sample are not counted again.
            tally.counting = lap == 0
            first_block, drop = divmod(offset, self.shuffle_buffer)
            seen = 0
            raw = _read_pieces(pieces, first_block * self.shuffle_buffer, tally)
            for block_no, block in enumerate(_chunks(raw, self.shuffle_buffer), start=first_block):
                random.Random(f"block/{tag}/{lap}/{block_no}").shuffle(block)
                seen += len(block)
                yield from block[drop:]
                drop = 0
            if seen == 0 and offset == 0:
                raise ValueError(
                    f"no readable sample in this worker's part of epoch {epoch} "
                    f"({len(pieces)} shards, first {pieces[0][0]}; last error: {tally.last_error!r})"
                )
            lap, offset = lap + 1, 0

    def _resampled_samples(self, tag: str, tally: _Tally) -> Iterator[dict]:
        rng = random.Random(f"resampled/{tag}")
        urls, cum_weights = self.shards.urls, list(accumulate(self.shards.draw_weights()))

        def draws() -> Iterator[dict]:
            empty_in_a_row = 0
            while True:
                url = rng.choices(urls, cum_weights=cum_weights)[0]
                count = 0
                for sample in _read_piece(url, tally):
                    count += 1
                    yield sample
                empty_in_a_row = 0 if count else empty_in_a_row + 1
                if empty_in_a_row >= _MAX_EMPTY_SHARDS_IN_A_ROW:
                    raise ValueError(
                        f"{empty_in_a_row} shards drawn in a row held no sample (last {url}; "
                        f"last error: {tally.last_error!r})"
                    )

        # A rolling buffer (webdataset's), filled before the first sample: a batch mixes samples of
        # more shards than blocks of the same size give (7.9 against 4.6 with shards of a fifth of
        # the buffer, benchmarks/RESULTS.md). A resampled stream restarts from a new seed on resume
        # anyway, so it needs no block boundaries to resume at.
        yield from wds_shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(draws())


def _batches(
    samples: Iterator[dict],
    decoder: SampleDecoder,
    tokenizer: Tokenizer,
    batch_size: int,
    tally: _Tally,
    partial: bool = False,
) -> Iterator[Batch]:
    """Decodes, drops and counts unusable samples, tokenizes, and groups into batches."""
    images: list[torch.Tensor] = []
    captions: list[str] = []
    for sample in samples:
        try:
            image, caption = decoder(sample)
        except SkipSample as exn:
            tally.skip(exn.kind, exn)
            continue
        tally.ok()
        images.append(image)
        captions.append(caption)
        if len(images) == batch_size:
            yield stack_pixels(images), tokenizer(captions)
            images, captions = [], []
    if partial and images:
        yield stack_pixels(images), tokenizer(captions)


def _range_pieces(shards: ShardSet, seed: int, epoch: int, begin: int, length: int) -> list[tuple[str, int, int]]:
    """(url, first sample, count) pieces covering samples ``[begin, begin + length)`` of an epoch's shard order."""
    order = list(range(len(shards.urls)))
    random.Random(f"shard-order/{seed}/{epoch}").shuffle(order)
    pieces = []
    position, end = 0, begin + length
    for i in order:
        size = shards.sizes[i]
        lo, hi = max(position, begin), min(position + size, end)
        if lo < hi:
            pieces.append((shards.urls[i], lo - position, hi - lo))
        position += size
        if position >= end:
            break
    return pieces


def _read_pieces(pieces: Sequence[tuple[str, int, int]], skip: int, tally: _Tally) -> Iterator[dict]:
    for url, first, count in pieces:
        if skip >= count:
            # Whole shards before the resume point are not even opened.
            skip -= count
            continue
        yield from _read_piece(url, tally, first, count, skip)
        skip = 0


def _read_piece(url: str, tally: _Tally, first: int = 0, count: int | None = None, skip: int = 0) -> Iterator[dict]:
    """Samples ``[first + skip, first + count)`` of one shard (to its end without ``count``).

    A broken shard is counted once, although a truncated tar raises twice. A shard split between
    two workers' ranges is read (in part) by both; only the reader whose range holds the place
    where the shard breaks off counts it.
    """
    reached = 0  # samples the shard has produced, skipped ones included
    broken = False

    def handler(exn: Exception) -> bool:
        nonlocal broken
        if not broken and reached >= first:
            tally.skip("unreadable_shard", exn)
        broken = True
        return True

    for sample in read_samples([url], handler):
        reached += 1
        if reached > first + skip:
            yield sample
        if reached == (None if count is None else first + count):
            return
    if count is not None and not broken and reached >= first:
        # tarfile ends silently when a tar is cut exactly between two members; only the size
        # listed for the shard reveals it.
        tally.skip("unreadable_shard", ValueError(f"{url} ended after {reached} samples, short of its listed size"))


class ValStream(IterableDataset):
    """Validation stream: every sample of the shards exactly once across ranks and workers.

    Shards are dealt to ranks, then to workers; batches are full except each reader's last. Ranks
    may therefore yield different numbers of batches: validation must not run a collective per
    batch (gather features at epoch end, or compute the loss per rank).

    Args:
        urls: Validation shard URLs.
        tokenizer: Caption tokenizer, run in the workers.
        batch_size: Samples per batch.
        decoder: Turns a raw sample into (image tensor, caption).
        rank: This rank; default from torch.distributed.
        world_size: Number of ranks; default from torch.distributed.
        counters: Where skipped samples are counted.
    """

    def __init__(
        self,
        urls: Sequence[str],
        tokenizer: Tokenizer,
        batch_size: int,
        decoder: SampleDecoder,
        rank: int | None = None,
        world_size: int | None = None,
        counters: SkipCounters | None = None,
    ):
        super().__init__()
        self.urls, self.tokenizer, self.batch_size, self.decoder = list(urls), tokenizer, batch_size, decoder
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        self.counters = counters if counters is not None else SkipCounters(0)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        tally = _Tally(self.counters)
        mine = self.urls[self.rank :: self.world_size][worker::num_workers]
        samples = (sample for url in mine for sample in _read_piece(url, tally))
        yield from _batches(samples, self.decoder, self.tokenizer, self.batch_size, tally, partial=True)


def select_val_shards(spec: str | Sequence[str], val_samples: int | None = None) -> list[str]:
    """Validation shard URLs; with ``val_samples``, the first shards holding at least that many samples.

    Whole shards keep validation exactly-once and identical at every evaluation.
    """
    urls = [u for s in parse_shard_spec(spec) for u in s.urls]
    if val_samples is None:
        return urls
    sizes = shard_sizes(urls)
    if None in sizes:
        raise ValueError(describe_missing_sizes(urls, sizes).replace("samples_per_epoch", "val_samples=None"))
    ends = list(accumulate(sizes))
    return urls[: next((i + 1 for i, end in enumerate(ends) if end >= val_samples), len(urls))]


def make_decoder(
    caption_key: str | SampleKey,
    transform: ImageTransform,
    image_keys: Sequence[str] = IMAGE_KEYS,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    min_size: int | None = None,
) -> SampleDecoder:
    """A ``SampleDecoder`` from plain arguments."""
    key = caption_key if isinstance(caption_key, SampleKey) else SampleKey.parse(caption_key)
    image_keys = tuple(k.lower().lstrip(".") for k in image_keys)
    return SampleDecoder(key, transform, image_keys, max_image_pixels, min_size)
