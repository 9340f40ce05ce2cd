"""Training and validation streams through real DataLoaders (ranks simulated with rank/world_size)."""

from __future__ import annotations

import functools
import io
import json
import os
import random
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import pipeline
from data_pipelines.datamodule import ShardDataModule
from data_pipelines.errors import report_user_error
from data_pipelines.samples import SkipSample, decode_image, decode_pixels, jpeg_frame
from data_pipelines.transforms import NormalizeImages, PreprocessConfig


def datamodule(spec, tokenizer, **kw) -> ShardDataModule:
    defaults = dict(batch_size=4, num_workers=2, image_size=8, shuffle_buffer=3, mode="epoch")
    return ShardDataModule(spec, tokenizer, **{**defaults, **kw})


def epoch_ids(loader, read_ids) -> list[list[int]]:
    """One pass over a loader: the sample ids of each batch."""
    return [read_ids(tokens) for _, tokens in loader]


def test_epoch_mode_reads_every_sample_once_across_2_ranks_x_2_workers(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, ids = make_tiny_shards([7, 13, 4, 9, 7])
    runs = []
    for rank in range(2):
        loader = datamodule(spec, tiny_tokenizer, rank=rank, world_size=2, batch_size=5).train_dataloader()
        images, tokens = next(iter(loader))
        assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8
        assert tokens.shape == (5, tiny_tokenizer.context_length) and tokens.dtype == torch.long
        # Same loader, persistent workers: two epochs.
        runs.append([epoch_ids(loader, read_ids) for _ in range(2)])
    for epoch in range(2):
        assert [len(runs[rank][epoch]) for rank in range(2)] == [4, 4]
        assert sorted(i for rank in range(2) for batch in runs[rank][epoch] for i in batch) == ids
    assert runs[0][0] != runs[0][1], "the epoch number did not reach the persistent workers"


def test_epoch_counter_reaches_persistent_workers(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, _ = make_tiny_shards([7, 13, 4, 9, 7])
    loader = datamodule(spec, tiny_tokenizer).train_dataloader()
    epochs = [epoch_ids(loader, read_ids) for _ in range(3)]
    fresh = datamodule(spec, tiny_tokenizer)
    fresh.set_position(2)
    # Epoch 2 of long-lived workers is exactly epoch 2 of new ones.
    assert epoch_ids(fresh.train_dataloader(), read_ids) == epochs[2]
    assert len({str(e) for e in epochs}) == 3


def test_all_ranks_get_equal_batch_counts_from_uneven_shards(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, ids = make_tiny_shards([1, 17, 3, 2, 8])
    for mode, samples_per_epoch, expected in [("epoch", None, 3), ("epoch", 16, 2), ("resampled", 60, 5)]:
        seen = []
        for rank in range(3 if mode == "resampled" else 2):
            world = 3 if mode == "resampled" else 2
            dm = datamodule(
                spec, tiny_tokenizer, rank=rank, world_size=world, mode=mode, samples_per_epoch=samples_per_epoch
            )
            assert dm.batches_per_epoch == expected
            batches = epoch_ids(dm.train_dataloader(), read_ids)
            assert [len(b) for b in batches] == [4] * expected
            seen += [i for b in batches for i in b]
        if mode == "epoch":
            assert len(seen) == len(set(seen)) == expected * 4 * 2 and set(seen) <= set(ids)


def test_resampled_weights_1_to_3_give_about_1_to_3(make_tiny_shards, tiny_tokenizer, read_ids):
    # Tiny shards: many draws, so 1500 samples measure the share to about 0.013 (one sd).
    spec_a, _ = make_tiny_shards([1, 3], name="a")
    spec_b, _ = make_tiny_shards([1, 1, 2], name="b", start=1000)
    dm = datamodule(
        f"{spec_a}::{spec_b}",
        tiny_tokenizer,
        mode="resampled",
        train_weights=[1, 3],
        samples_per_epoch=1500,
        batch_size=50,
        num_workers=0,
        image_size=4,
    )
    seen = [i for batch in epoch_ids(dm.train_dataloader(), read_ids) for i in batch]
    assert len(seen) == 1500
    share_b = sum(i >= 1000 for i in seen) / len(seen)
    # Unweighted, each source (4 samples each) would supply half.
    assert 0.70 < share_b < 0.80


def test_resampled_batches_mix_more_shards_than_the_buffer_holds_whole(make_tiny_shards, tiny_tokenizer, read_ids):
    # Shards of 12 and a buffer of 24: a batch cut from blocks of 24 consecutive samples would come
    # from at most 2 shards. A rolling buffer keeps samples of earlier shards for longer.
    spec, _ = make_tiny_shards([12] * 8)
    dm = datamodule(
        spec, tiny_tokenizer, mode="resampled", shuffle_buffer=24, samples_per_epoch=480, num_workers=0, image_size=4
    )
    shards_per_batch = [len({i // 12 for i in batch}) for batch in epoch_ids(dm.train_dataloader(), read_ids)]
    assert len(shards_per_batch) == 120
    assert sum(shards_per_batch) / len(shards_per_batch) > 2.3


def test_same_seed_gives_the_same_stream(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, _ = make_tiny_shards([10, 30, 20])

    def stream(seed, global_seed):
        # The crops must not depend on the main process's generators, which the workers inherit.
        random.seed(global_seed)
        torch.manual_seed(global_seed)
        loader = datamodule(
            spec, tiny_tokenizer, mode="resampled", samples_per_epoch=40, seed=seed, image_size=6, crop_scale=(0.3, 1.0)
        ).train_dataloader()
        return [(read_ids(tokens), images) for images, tokens in loader]

    first, again, other = stream(1, global_seed=0), stream(1, global_seed=1), stream(2, global_seed=0)
    assert [ids for ids, _ in first] == [ids for ids, _ in again]
    # Augmentations too: the crops are seeded per worker.
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))
    assert [ids for ids, _ in first] != [ids for ids, _ in other]


def _image(mode: str, size: int = 8, fmt: str = "PNG", **save) -> bytes:
    colour = {"RGB": (10, 20, 30), "L": 128, "CMYK": (0, 0, 0, 0), "LA": (0, 0), "RGBA": (0, 0, 0, 0)}
    image = Image.new(mode, (size, size), colour.get(mode, 0))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_image("RGB"), (10, 20, 30)),
        (_image("RGB", fmt="JPEG"), (10, 20, 30)),
        (_image("L"), (128, 128, 128)),
        (_image("L", fmt="JPEG"), (128, 128, 128)),
        (_image("CMYK", fmt="JPEG"), (255, 255, 255)),
        (_image("LA"), (255, 255, 255)),
        (_image("RGBA"), (255, 255, 255)),
        (_image("P", transparency=0), (255, 255, 255)),
    ],
)
def test_images_become_rgb_with_transparency_on_white(data, expected):
    image = decode_image(data)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int) - expected).max() <= 2
    # The training path's tensor decoder (torchvision's for JPEG) gives the very same pixels.
    pixels = decode_pixels(data)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 8, 8)
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), np.asarray(image))


def test_tensor_decoder_matches_pil_on_a_detailed_jpeg():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    pixels = decode_pixels(buf.getvalue()).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, np.asarray(decode_image(buf.getvalue())))


@pytest.mark.parametrize(
    "mode,options",
    [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}), ("RGB", {"exif": b"Exif\0\0" + bytes(300)})],
)
def test_jpeg_frame_reads_the_size_pil_reads(mode, options):
    rng = np.random.default_rng(1)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (45, 70, channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="JPEG", quality=90, icc_profile=bytes(2000), **options)
    data = buf.getvalue()
    marker, height, width, components = jpeg_frame(data)
    assert (height, width, components) == (45, 70, channels)
    assert marker == (0xC2 if options.get("progressive") else 0xC0)
    # Whichever decoder serves it, the pixels are PIL's.
    assert np.array_equal(decode_pixels(data).permute(1, 2, 0).numpy(), np.asarray(decode_image(data)))
    assert jpeg_frame(data[:20]) is None and jpeg_frame(b"\x89PNG" + data[4:]) is None


def test_16_bit_greyscale_keeps_its_brightness():
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(buf, format="PNG")
    assert np.asarray(decode_image(buf.getvalue())).tolist()[0][0] == [128, 128, 128]


@pytest.mark.parametrize("decode", [decode_image, decode_pixels])
def test_undecodable_and_oversized_images_are_skip_reasons(decode):
    with pytest.raises(SkipSample) as bad:
        decode(b"not an image")
    assert bad.value.kind == "bad_image"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    for cut_at in (300, len(buf.getvalue()) // 2):  # inside the header, inside the scan
        with pytest.raises(SkipSample) as cut:
            decode(buf.getvalue()[:cut_at])
        assert cut.value.kind == "bad_image"
    with pytest.raises(SkipSample) as bomb:
        decode(_image("RGB", 200, "JPEG"), max_pixels=10_000)
    assert bomb.value.kind == "too_large"


def _broken_shards(make_tiny_shards) -> tuple[str, list[int]]:
    """Three shards with every kind of breakage; returns the spec and the ids of the good samples."""
    record, directory = make_tiny_shards.record, make_tiny_shards.root / "broken"
    directory.mkdir()
    no_caption, no_image = record(8), record(9)
    del no_caption["txt"], no_image["png"]
    first = (
        [record(i) for i in range(6)]
        + [
            record(6, image=b"not an image"),
            record(7, caption="   "),
            no_caption,
            no_image,
            record(10, image=_image("RGB", 200)),  # a "decompression bomb" under max_image_pixels=10_000
            record(11, image=_image("RGB", 64, "JPEG")[:300]),  # truncated JPEG
            record(12, image=_image("CMYK", fmt="JPEG")),
            record(13, image=_image("L")),
            record(14, image=_image("P", transparency=0)),
            record(15, image=_image("LA")),
        ]
    )
    make_tiny_shards.write_tar(directory / "00000.tar", first)
    make_tiny_shards.write_tar(directory / "00001.tar", [record(i) for i in range(16, 26)])
    data = (directory / "00001.tar").read_bytes()
    # Cut inside sample 21's image: 16..20 survive, 21 keeps only its .json.
    cut = data.index(b"000000021.png") + 512 + 40
    (directory / "00001.tar").write_bytes(data[:cut])
    make_tiny_shards.write_tar(directory / "00002.tar", [record(i) for i in range(26, 32)])
    (directory / "sizes.json").write_text(json.dumps({"00000.tar": 16, "00001.tar": 10, "00002.tar": 6}))
    return str(directory / "{00000..00002}.tar"), [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def test_broken_samples_are_skipped_and_counted(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, good = _broken_shards(make_tiny_shards)
    dm = datamodule(spec, tiny_tokenizer, val_shards=spec, max_image_pixels=10_000)
    loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
    # A shard that disappears after start-up counts as unreadable too.
    os.remove(make_tiny_shards.root / "broken" / "00002.tar")
    expected = {"unreadable_shard": 2, "missing_image": 2, "missing_caption": 2, "bad_image": 2, "too_large": 1}

    batches = epoch_ids(loader, read_ids)
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)
    seen = Counter(i for b in batches for i in b)
    # Broken samples are replaced by repeats of good ones, so the batch count holds.
    assert set(seen) == set(good) and sum(seen.values()) == 32
    assert dm.skipped_counts() == expected

    val_seen = [i for b in epoch_ids(val_loader, read_ids) for i in b]
    assert sorted(val_seen) == good
    assert dm.skipped_counts("val") == expected
    # Counts are totals since the start: a second epoch adds the same again.
    epoch_ids(loader, read_ids)
    assert dm.skipped_counts() == {k: 2 * v for k, v in expected.items()}


def test_wrong_caption_key_fails_fast_naming_the_keys_found(make_tiny_shards, tiny_tokenizer):
    spec, _ = make_tiny_shards([1001])
    start = time.monotonic()
    # On construction: train.py builds the datamodule before the trainer prints anything.
    with pytest.raises(ValueError) as error:
        datamodule(spec, tiny_tokenizer, caption_key="json:text")
    message = str(error.value)
    assert "caption_key='json:text'" in message and "first 1000 samples" in message
    assert "json (1000), png (1000), txt (1000)" in message and "JSON fields are: caption, key" in message
    with pytest.raises(ValueError, match="image file with extension jpg; the samples contain: json"):
        datamodule(spec, tiny_tokenizer, image_keys=["jpg"])
    assert time.monotonic() - start < 20


def test_missing_shards_fail_on_construction_and_pipe_sources_wait_for_the_loader(make_tiny_shards, tiny_tokenizer):
    spec, _ = make_tiny_shards([4])
    with pytest.raises(ValueError, match="1 of the 1 shards of '/nonexistent/val.tar' do not exist"):
        datamodule(spec, tiny_tokenizer, val_shards="/nonexistent/val.tar")
    # A pipe: command (here one that fails) is only run by the train loader, never by the constructor.
    dm = datamodule("pipe:false", tiny_tokenizer, mode="resampled", samples_per_epoch=8)
    with pytest.raises(ValueError, match="no readable sample in the first shards of source 'pipe:false'"):
        dm.train_dataloader()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_worker_that_only_meets_unusable_samples_stops_with_a_message(
    num_workers, monkeypatch, capsys, make_tiny_shards, tiny_tokenizer
):
    # The first shard passes the start-up check; every later sample lacks its caption.
    spec, _ = make_tiny_shards([4, 30, 30])
    directory = make_tiny_shards.root / "shards"
    for shard, start in ((1, 4), (2, 34)):
        records = [make_tiny_shards.record(i) for i in range(start, start + 30)]
        for r in records:
            del r["txt"]
        make_tiny_shards.write_tar(directory / f"{shard:05d}.tar", records)
    monkeypatch.setattr(pipeline, "_MAX_FAILURES_IN_A_ROW", 20)
    dm = datamodule(spec, tiny_tokenizer, mode="resampled", num_workers=num_workers, samples_per_epoch=400, seed=1)
    with pytest.raises(ValueError) as error:
        for _ in dm.train_dataloader():
            pass
    # What train.py and the other tools print for it: the message alone, without the worker's traceback.
    assert report_user_error(error.value) == 2
    printed = capsys.readouterr().err
    assert printed.startswith("error: 20 samples in a row were unusable (missing_caption=20; last error: SkipSample(")
    assert printed.count("\n") == 1 and printed.endswith(
        "check caption_key, image_keys and the shards" + (" (in a DataLoader worker)\n" if num_workers else "\n")
    )


def test_reads_img2dataset_layout(tmp_path, make_tiny_shards, tiny_tokenizer, read_ids):
    directory = tmp_path / "laion"
    directory.mkdir()
    ids = []
    for shard, present in enumerate([[0, 1, 3, 4, 6], [2, 5, 7]]):
        records = []
        for index in present:
            key = f"{shard:05d}{index:04d}"
            i = len(ids)
            ids.append(i)
            buf = io.BytesIO()
            Image.new("RGB", (12, 9), (i, 0, 0)).save(buf, format="JPEG")
            meta = {
                "url": f"http://x/{key}.jpg",
                "caption": f"photo {i}",
                "key": key,
                "status": "success",
                "error_message": None,
                "width": 12,
                "height": 9,
                "original_width": 640,
                "original_height": 480,
                "exif": "{}",
                "sha256": "0" * 64,
            }
            records.append(
                {"__key__": key, "jpg": buf.getvalue(), "txt": f"photo {i}".encode(), "json": json.dumps(meta).encode()}
            )
        make_tiny_shards.write_tar(directory / f"{shard:05d}.tar", records)
        (directory / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by the pipeline PAR1")
        (directory / f"{shard:05d}_stats.json").write_text(
            json.dumps({"count": 10, "successes": len(present), "failed_to_download": 10 - len(present)})
        )
    spec = str(directory / "{00000..00001}.tar")
    for key in ("txt", "json:caption"):
        dm = datamodule(spec, tiny_tokenizer, caption_key=key, batch_size=2, num_workers=0)
        assert dm.batches_per_epoch == 4
        assert sorted(i for b in epoch_ids(dm.train_dataloader(), read_ids) for i in b) == ids
        assert dm.skipped_counts() == dict.fromkeys(dm.skipped_counts(), 0)


def test_batches_are_uint8_pixels_that_the_module_normalizes(make_tiny_shards, tiny_tokenizer):
    spec, _ = make_tiny_shards([4])
    dm = datamodule(spec, tiny_tokenizer, val_shards=spec, num_workers=0, image_size=5, interpolation="bilinear")
    images, _ = next(iter(dm.val_dataloader()))
    # Sample 0 is the constant colour (0, 7, 200); resizing a constant image keeps it exactly.
    assert images.shape == (4, 3, 5, 5) and images.dtype == torch.uint8
    assert images[0].flatten(1).unique(dim=1).tolist() == [[0], [7], [200]]
    config = PreprocessConfig(5, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), interpolation="bilinear")
    normalized = NormalizeImages(config)(images)
    expected = torch.tensor([(0 / 255 - 0.5) / 0.25, (7 / 255 - 0.5) / 0.5, (200 / 255 - 0.5) / 1.0])
    assert normalized.dtype == torch.float32
    assert torch.allclose(normalized[0].mean(dim=(1, 2)), expected, atol=1e-6)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        datamodule(spec, tiny_tokenizer, interpolation="cubic")
    with pytest.raises(ValueError, match="crop_scale"):
        datamodule(spec, tiny_tokenizer, crop_scale=(0.9, 1.5))


def test_reads_http_and_pipe_sources(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, ids = make_tiny_shards([5, 7])
    directory = make_tiny_shards.root / "shards"
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00001}}.tar"
        # sizes.json is fetched from the server, so epoch mode knows how to split.
        dm = datamodule(url, tiny_tokenizer, batch_size=3, num_workers=2)
        assert dm.batches_per_epoch == 4
        assert sorted(i for b in epoch_ids(dm.train_dataloader(), read_ids) for i in b) == ids
    finally:
        server.shutdown()
    piped = datamodule(
        f"pipe:cat {directory}/{{00000..00001}}.tar",
        tiny_tokenizer,
        mode="resampled",
        samples_per_epoch=24,
        num_workers=0,
    )
    seen = [i for b in epoch_ids(piped.train_dataloader(), read_ids) for i in b]
    assert len(seen) == 24 and set(seen) <= set(ids)
