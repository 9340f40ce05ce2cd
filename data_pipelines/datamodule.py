"""LightningDataModule over WebDataset shards: train/val loaders, skip counts, resumable position.

Position and resume: the datamodule knows which epoch its train loader is in and how many batches
of it were consumed. Under a Lightning ``Trainer`` that count is the fit loop's number of processed
training batches, so nothing has to be called from the LightningModule; outside Lightning it is the
number of batches the loader has yielded. ``state_dict()`` (stored by Lightning in every checkpoint)
saves ``(epoch, batches_done)`` and ``load_state_dict()`` makes the next train iteration start at that
point, so a resumed run does not replay consumed data:

* ``mode="epoch"``: the epoch continues at the exact sample where it stopped, provided world size,
  workers, batch size, seed and shards are unchanged and no sample was skipped as broken before the
  checkpoint (each such sample makes one sample be seen twice). With a changed layout the same
  number of batches is skipped from the new split, which is approximate; a warning says so.
* ``mode="resampled"``: the stream restarts from a seed that includes the resume point and yields
  only the remaining batches of the epoch.

``set_position(epoch, batches_done)`` does the same by hand (e.g. in a notebook). Every rank computes
its own part of the position, so rank 0's state (the one Lightning saves) is valid for all ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from data_pipelines.counters import SkipCounters
from data_pipelines.pipeline import (
    MODES,
    ShardStream,
    ValStream,
    batches_per_epoch,
    load_shard_set,
    make_decoder,
    select_val_shards,
)
from data_pipelines.ranks import rank_and_world_size
from data_pipelines.samples import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_KEYS, SampleKey, check_layout
from data_pipelines.shards import local_path
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.transforms import CROP_RATIO, PreprocessConfig, image_transform

# State entries that must match for a resume to continue at the exact sample.
_LAYOUT_KEYS = ("mode", "seed", "world_size", "num_workers", "batch_size", "samples_per_epoch", "shuffle_buffer")


class _EpochLoader(DataLoader):
    """Train DataLoader that reports each iteration (epoch) and batch to its datamodule.

    It also exposes the datamodule's position as ``state_dict``/``load_state_dict``: Lightning
    then treats it as resumable (instead of warning that a mid-epoch resume is unreliable) and
    restores the same position the datamodule's own state holds.
    """

    def __init__(self, dataset: ShardStream, datamodule: ShardDataModule, **kw):
        super().__init__(dataset, **kw)
        self._datamodule = datamodule

    def __iter__(self) -> Iterator:
        # Runs at the first next(), before the DataLoader (re)starts its workers' iterators, so the
        # shared position is set when the workers read it.
        self._datamodule._begin_epoch()
        for batch in super().__iter__():
            self._datamodule._count_batch()
            yield batch

    def state_dict(self) -> dict:
        return self._datamodule.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._datamodule.set_position(int(state_dict["epoch"]), int(state_dict["batches_done"]))


class ShardDataModule(LightningDataModule):
    """Image-text batches ``(images [B,3,H,W] uint8, tokens [B,L] long)`` from WebDataset shards.

    Images leave the workers as uint8 pixels, cropped and resized but not normalized: 4x fewer bytes
    to pin and copy. ``CLIPModule`` normalizes them on the device with the image tower's mean and
    std; elsewhere apply ``data_pipelines.transforms.NormalizeImages(model.preprocess_config)`` to them.

    Args:
        train_shards: Training shard spec (paths, brace patterns, URLs, ``pipe:``; sources joined
            by ``::`` or listed).
        tokenizer: Caption tokenizer (run inside the DataLoader workers).
        batch_size: Samples per batch on each device.
        val_shards: Held-out shard spec, or None for no validation.
        num_workers: DataLoader workers per rank (persistent between epochs).
        samples_per_epoch: Samples per epoch over all ranks; default the shards' total size.
        val_samples: Validate on the first shards holding at least this many samples; default all.
        caption_key: ``"txt"`` (caption file extension) or ``"json:FIELD"``.
        mode: ``"resampled"`` (shards drawn with replacement) or ``"epoch"`` (each sample once per epoch).
        train_weights: One sampling weight per training source (resampled mode), e.g. ``[1, 3]``.
        shuffle_buffer: Samples shuffled together within each worker.
        seed: Seed of shard order, shard draws, shuffles and augmentations.
        image_size: Side of the square images, from the image tower's config.
        interpolation: Resize interpolation, from the image tower's config.
        crop_scale: Area range of the training RandomResizedCrop.
        horizontal_flip: Flip training images (off: captions name left and right).
        draft_decode: Decode JPEGs at least twice the needed size at 1/2, 1/4 or 1/8 scale (libjpeg's
            DCT scaling), never below the size the crop needs: the same crop from far fewer pixels.
        image_keys: Image file extensions looked up in each sample, in order.
        max_image_pixels: Larger images are skipped as decompression bombs.
        val_batch_size: Validation batch size; default ``batch_size``.
        pin_memory: Pin batches for faster host-to-GPU copies; default when CUDA is available.
        rank: Overrides torch.distributed's rank (tests, notebooks).
        world_size: Overrides torch.distributed's world size; pass it to read ``batches_per_epoch``
            before the process group exists.

    Raises:
        ValueError: On construction, when a local shard does not exist, a needed shard size is
            unknown, or the first samples of a local training source hold no image or caption
            under ``image_keys`` and ``caption_key`` (remote sources: at the first train loader).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        tokenizer: Tokenizer,
        batch_size: int,
        val_shards: str | Sequence[str] | None = None,
        num_workers: int = 4,
        samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        caption_key: str = "txt",
        mode: str = "resampled",
        train_weights: Sequence[float] | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        image_size: int = 224,
        interpolation: str = "bicubic",
        crop_scale: tuple[float, float] = (0.9, 1.0),
        horizontal_flip: bool = False,
        draft_decode: bool = True,
        image_keys: Sequence[str] = IMAGE_KEYS,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        val_batch_size: int | None = None,
        pin_memory: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.train_shards, self.val_shards, self.tokenizer = train_shards, val_shards, tokenizer
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.samples_per_epoch, self.val_samples = num_workers, samples_per_epoch, val_samples
        self.mode, self.train_weights, self.shuffle_buffer, self.seed = mode, train_weights, shuffle_buffer, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.rank, self.world_size = rank, world_size
        key = SampleKey.parse(caption_key)
        # Mean and std are the module's business (NormalizeImages on the device); geometry only here.
        geometry = PreprocessConfig(image_size, (0.0,) * 3, (1.0,) * 3, interpolation)
        # Built here so that a bad interpolation or crop_scale fails at construction.
        train_images = image_transform(
            geometry, train=True, crop_scale=tuple(crop_scale), horizontal_flip=horizontal_flip, normalize=False
        )
        val_images = image_transform(geometry, normalize=False)
        # Draft decoding must leave the smallest random crop (area crop_scale[0], the narrowest
        # aspect) at least image_size pixels on its short side, or the crop would be upsampled.
        narrowest = min(CROP_RATIO[0], 1 / CROP_RATIO[1])
        train_min = math.ceil(image_size / math.sqrt(crop_scale[0] * narrowest)) if draft_decode else None
        val_min = image_size if draft_decode else None
        self._train_decoder = make_decoder(key, train_images, image_keys, max_image_pixels, train_min)
        self._val_decoder = make_decoder(key, val_images, image_keys, max_image_pixels, val_min)
        self._counters = {"train": SkipCounters(num_workers), "val": SkipCounters(num_workers)}
        # Resolved and checked here, so that a missing shard, an unknown size or a wrong caption or
        # image key stops a run before the trainer starts (and prints its banner).
        self._shards = load_shard_set(train_shards, train_weights, samples_per_epoch, mode)
        self._val_urls = None if val_shards is None else select_val_shards(val_shards, val_samples)
        self._check_layouts(local=True)
        self._stream: ShardStream | None = None
        # Position bookkeeping: the epoch being iterated, the batch it started at, batches yielded
        # since, and a position waiting for the next iteration (from load_state_dict/set_position).
        self._epoch: int | None = None
        self._start = self._yielded = 0
        self._pending: tuple[int, int] | None = None

    def _check_layouts(self, local: bool) -> None:
        """Reads the first samples of each local (or each remote) training source for the caption and image keys.

        Local sources are checked on construction. Remote ones (URLs, ``pipe:`` commands) only when
        the first train loader is made: opening them may take long, or hang on a prompt for credentials.
        """
        for source in self._shards.sources:
            if (local_path(source.urls[0]) is not None) == local:
                decoder = self._train_decoder
                check_layout(source.urls, decoder.caption_key, decoder.image_keys, source_name=source.spec)

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per epoch on each rank: ``samples_per_epoch // (world_size * batch_size)``."""
        _, world_size = rank_and_world_size(self.rank, self.world_size)
        return batches_per_epoch(self._shards.samples_per_epoch, world_size, self.batch_size)

    def train_dataloader(self) -> DataLoader:
        if self._stream is None:
            self._check_layouts(local=False)
        self._stream = ShardStream(
            self._shards,
            self.tokenizer,
            self.batch_size,
            self._train_decoder,
            mode=self.mode,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            counters=self._counters["train"],
            check=False,
        )
        # Lightning warns that an IterableDataset's length may be wrong with several workers; this
        # one is exact by construction (workers split the count, see data_pipelines.pipeline).
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        return _EpochLoader(self._stream, self, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader (every held-out sample once across ranks), or [] without val_shards."""
        if self._val_urls is None:
            return []
        stream = ValStream(
            self._val_urls,
            self.tokenizer,
            self.val_batch_size,
            self._val_decoder,
            rank=self.rank,
            world_size=self.world_size,
            counters=self._counters["val"],
        )
        return DataLoader(stream, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict:
        # batch_size=None: the streams yield whole batches built in the workers.
        return dict(
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def skipped_counts(self, split: str = "train") -> dict[str, int]:
        """Samples this rank skipped since this datamodule was made, summed over its workers, by reason.

        Reasons: unreadable_shard (missing, truncated or corrupt tar), missing_image,
        missing_caption (absent or empty), bad_image (undecodable), too_large (over max_image_pixels).

        Args:
            split: ``"train"`` or ``"val"``.
        """
        return self._counters[split].totals()

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Makes the next train iteration be epoch ``epoch`` without its first ``batches_done`` batches."""
        if batches_done < 0 or epoch < 0:
            raise ValueError(f"epoch and batches_done must be >= 0, got {epoch}, {batches_done}")
        per_epoch = self.batches_per_epoch
        self._pending = (epoch + 1, 0) if batches_done >= per_epoch else (epoch, batches_done)

    def _fitting_trainer(self):
        trainer = self.trainer
        return trainer if trainer is not None and trainer.state.fn == "fit" else None

    def _begin_epoch(self) -> None:
        if self._pending is not None:
            epoch, done = self._pending
            self._pending = None
        elif (trainer := self._fitting_trainer()) is not None:
            epoch, done = trainer.current_epoch, 0
        else:
            epoch, done = (0 if self._epoch is None else self._epoch + 1), 0
        self._stream.set_position(epoch, done)
        self._epoch, self._start, self._yielded = epoch, done, 0

    def _count_batch(self) -> None:
        self._yielded += 1

    def _position(self) -> tuple[int, int]:
        if self._pending is not None:
            return self._pending
        if self._epoch is None:
            return 0, 0
        trainer = self._fitting_trainer()
        if trainer is not None:
            # Batches whose training step ran; the loader itself is ahead by the prefetched ones.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        else:
            done = self._start + self._yielded
        return (self._epoch + 1, 0) if done >= self.batches_per_epoch else (self._epoch, done)

    def _layout(self) -> dict:
        _, world_size = rank_and_world_size(self.rank, self.world_size)
        return {
            "mode": self.mode,
            "seed": self.seed,
            "world_size": world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "samples_per_epoch": self._shards.samples_per_epoch,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        """Position of the training stream, saved by Lightning in checkpoints."""
        epoch, done = self._position()
        return {"epoch": epoch, "batches_done": done, **self._layout()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Makes the next training iteration continue where the checkpointed run stopped."""
        now = self._layout()
        changed = [f"{k} {state_dict.get(k)} -> {now[k]}" for k in _LAYOUT_KEYS if state_dict.get(k) != now[k]]
        if changed:
            warnings.warn(
                f"the data layout changed since the checkpoint ({', '.join(changed)}): epoch "
                f"{state_dict['epoch']} resumes after {state_dict['batches_done']} batches, but the samples "
                "skipped are no longer exactly those consumed before; later epochs are unaffected",
                stacklevel=2,
            )
        self.set_position(int(state_dict["epoch"]), int(state_dict["batches_done"]))
