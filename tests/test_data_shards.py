"""Shard specs, sources, weights and sizes (data_pipelines.shards, load_shard_set)."""

from __future__ import annotations

import json
import os

import pytest

from data_pipelines.pipeline import load_shard_set, select_val_shards
from data_pipelines.shards import parse_shard_spec, shard_sizes


def test_spec_syntax_expands_braces_lists_sources_and_directories(make_tiny_shards):
    spec_a, _ = make_tiny_shards([2, 2, 2], name="a")
    spec_b, _ = make_tiny_shards([3], name="b")
    directory_b = os.path.dirname(spec_b)

    joined = parse_shard_spec(f"{spec_a}::{directory_b}")
    assert [len(s.urls) for s in joined] == [3, 1]
    assert joined[0].urls[2].endswith("a/00002.tar") and joined[1].urls == (os.path.join(directory_b, "00000.tar"),)
    listed = parse_shard_spec([spec_a, directory_b])
    assert [s.urls for s in listed] == [s.urls for s in joined]
    assert [s.weight for s in parse_shard_spec([spec_a, spec_b], weights=[1, 3])] == [1.0, 3.0]
    pipes = parse_shard_spec("pipe:cat /x/{0..2}.tar::https://host/{00..01}.tar")
    assert pipes[0].urls == ("pipe:cat /x/0.tar", "pipe:cat /x/1.tar", "pipe:cat /x/2.tar")
    assert pipes[1].urls == ("https://host/00.tar", "https://host/01.tar")


@pytest.mark.parametrize(
    ("spec", "weights", "message"),
    [
        ("", None, "empty shard spec"),
        ("{a}::{b}", [1.0], "got 1 weights for 2 shard sources"),
        ("{a}::{b}", [1.0, 0.0], "must be positive"),
        ("{a}/{{00000..00003}}.tar", None, "2 of the 4 shards"),
    ],
)
def test_spec_errors_say_what_to_change(make_tiny_shards, spec, weights, message):
    spec_a, _ = make_tiny_shards([1, 1], name="a")
    spec_b, _ = make_tiny_shards([1], name="b")
    a, b = os.path.dirname(spec_a), os.path.dirname(spec_b)
    with pytest.raises(ValueError, match=message):
        parse_shard_spec(spec.format(a=a, b=b), weights)


def test_sizes_come_from_sizes_json_then_img2dataset_stats(make_tiny_shards):
    spec, _ = make_tiny_shards([4, 6, 5], sizes_json=False)
    urls = parse_shard_spec(spec)[0].urls
    assert shard_sizes(urls) == [None, None, None]
    directory = os.path.dirname(urls[0])
    with open(os.path.join(directory, "00001_stats.json"), "w") as f:
        json.dump({"count": 10, "successes": 6, "failed_to_download": 4}, f)
    with open(os.path.join(directory, "sizes.json"), "w") as f:
        json.dump({"00000.tar": 4}, f)
    assert shard_sizes(urls) == [4, 6, None]


def test_epoch_size_defaults_to_sum_of_sizes_and_can_be_overridden(make_tiny_shards):
    spec, _ = make_tiny_shards([4, 6, 5])
    assert load_shard_set(spec).samples_per_epoch == 15
    assert load_shard_set(spec, samples_per_epoch=1000).samples_per_epoch == 1000
    unsized, _ = make_tiny_shards([3], name="unsized", sizes_json=False)
    with pytest.raises(ValueError, match="unknown.*--write-sizes`, or pass samples_per_epoch"):
        load_shard_set(unsized)
    assert load_shard_set(unsized, samples_per_epoch=7).samples_per_epoch == 7
    with pytest.raises(ValueError, match="epoch mode splits epochs by sample counts"):
        load_shard_set(unsized, samples_per_epoch=3, mode="epoch")
    with pytest.raises(ValueError, match="exceeds the 15 samples"):
        load_shard_set(spec, samples_per_epoch=16, mode="epoch")
    with pytest.raises(ValueError, match="resampled"):
        load_shard_set(spec, weights=[1.0], mode="epoch")


def test_draw_weights_give_each_source_its_share_and_each_sample_equal_odds(make_tiny_shards):
    spec_a, _ = make_tiny_shards([10, 30], name="a")
    spec_b, _ = make_tiny_shards([5, 5, 10], name="b")
    weighted = load_shard_set([spec_a, spec_b], weights=[1, 3]).draw_weights()
    total = sum(weighted)
    # A draw yields a whole shard: source a supplies (10 + 30) x 0.05 = 1/4 of the samples.
    assert [round(w / total, 4) for w in weighted] == [0.05, 0.05, 0.3, 0.3, 0.3]
    # Without weights every shard, hence every sample, is equally frequent.
    assert load_shard_set([spec_a, spec_b]).draw_weights() == [1, 1, 1, 1, 1]


def test_val_samples_selects_whole_leading_shards(make_tiny_shards):
    spec, _ = make_tiny_shards([4, 6, 5])
    assert len(select_val_shards(spec)) == 3
    assert [os.path.basename(u) for u in select_val_shards(spec, val_samples=5)] == ["00000.tar", "00001.tar"]
    assert len(select_val_shards(spec, val_samples=4)) == 1
