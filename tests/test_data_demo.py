"""The generated demo dataset: shards, tokenizer, cache, labels that match captions and pixels."""

from __future__ import annotations

import json
import os

import numpy as np

from data_pipelines.datamodule import ShardDataModule
from data_pipelines.demo import COLOURS, DEMO_TASKS, POSITIONS, demo_eval_set, prepare_demo_data, zero_shot_tasks
from data_pipelines.samples import SampleKey, decode_image, read_samples
from data_pipelines.shards import parse_shard_spec
from data_pipelines.tokenizer import UNK_ID, Tokenizer
from data_pipelines.transforms import PreprocessConfig, image_transform


def test_demo_is_generated_once_and_reused(tmp_path):
    data = prepare_demo_data(tmp_path, num_train=40, num_val=20, image_size=32)
    assert os.path.isfile(data.tokenizer_path)
    train_urls = parse_shard_spec(data.train_shards)[0].urls
    assert json.loads((tmp_path / "train" / "sizes.json").read_text()) == {"00000.tar": 40}
    assert json.loads((tmp_path / "val" / "sizes.json").read_text()) == {"00000.tar": 20}
    stamp = os.stat(train_urls[0]).st_mtime_ns
    assert prepare_demo_data(tmp_path, num_train=40, num_val=20, image_size=32) == data
    assert os.stat(train_urls[0]).st_mtime_ns == stamp
    # Other arguments: regenerated.
    prepare_demo_data(tmp_path, num_train=40, num_val=30, image_size=32)
    assert json.loads((tmp_path / "val" / "sizes.json").read_text()) == {"00000.tar": 30}


def test_demo_captions_and_pixels_match_the_labels(tmp_path):
    data = prepare_demo_data(tmp_path, num_train=30, num_val=60, image_size=32, seed=3)
    count = 0

    def fail(exn):
        raise exn

    for sample in read_samples(parse_shard_spec(data.val_shards)[0].urls, fail):
        meta = json.loads(sample["json"])
        caption = SampleKey.parse("txt").caption(sample)
        assert f"{meta['colour']} {meta['shape']}" in caption
        assert DEMO_TASKS["colour"][meta["colour_id"]] == meta["colour"]
        assert DEMO_TASKS["shape"][meta["shape_id"]] == meta["shape"]
        assert meta["position"] in POSITIONS
        pixels = np.asarray(decode_image(sample["png"]), dtype=int).reshape(-1, 3)
        shape_pixels = pixels[np.abs(pixels - pixels[0]).sum(axis=1) > 60]
        assert len(shape_pixels) > 0.05 * len(pixels)
        assert np.abs(np.median(shape_pixels, axis=0) - COLOURS[meta["colour"]]).max() <= 16
        count += 1
    assert count == 60


def test_demo_zero_shot_tasks_and_eval_set(tmp_path):
    data = prepare_demo_data(tmp_path, num_train=60, num_val=24, image_size=16)
    tokenizer = Tokenizer.from_file(data.tokenizer_path, context_length=16)
    tasks = {t["name"]: t for t in zero_shot_tasks(data)}
    assert sorted(tasks) == ["demo_colour", "demo_shape"]
    colour = tasks["demo_colour"]
    assert colour["classnames"] == DEMO_TASKS["colour"] and colour["label_key"] == "json:colour_id"
    prompts = [template.format(name) for t in tasks.values() for template in t["templates"] for name in t["classnames"]]
    assert "a red circle" in prompts and "a green star" in prompts
    assert UNK_ID not in tokenizer(prompts).flatten().tolist()
    images, labels = demo_eval_set(data, "shape", image_transform(PreprocessConfig(16, (0.5,) * 3, (0.5,) * 3, "bicubic")))
    assert images.shape == (24, 3, 16, 16) and labels.shape == (24,)
    assert 0 <= labels.min() and labels.max() < len(DEMO_TASKS["shape"])


def test_demo_shards_feed_the_datamodule(tmp_path):
    data = prepare_demo_data(tmp_path, num_train=64, num_val=24, image_size=16)
    tokenizer = Tokenizer.from_file(data.tokenizer_path, context_length=16)
    dm = ShardDataModule(
        data.train_shards,
        tokenizer,
        batch_size=8,
        val_shards=data.val_shards,
        num_workers=0,
        image_size=16,
        mode="epoch",
    )
    assert dm.batches_per_epoch == 8
    images, tokens = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and tokens.shape == (8, 16)
    assert sum(len(t) for _, t in dm.val_dataloader()) == 24
