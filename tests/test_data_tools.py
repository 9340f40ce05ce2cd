"""Command-line tools: inspect and train_tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_pipelines import inspect_shards as inspect_tool, train_tokenizer
from data_pipelines.tokenizer import UNK_ID, Tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_inspect_reports_counts_extensions_captions_and_broken_share(make_tiny_shards, capsys):
    spec, _ = make_tiny_shards([6, 4])
    directory = make_tiny_shards.root / "shards"
    broken = [make_tiny_shards.record(100, image=b"junk"), make_tiny_shards.record(101, caption="")]
    make_tiny_shards.write_tar(directory / "00001.tar", [make_tiny_shards.record(i) for i in range(6, 8)] + broken)
    assert inspect_tool.main([spec, "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "shards:     2 in 1 source(s)" in out and "samples:    10 (from sizes.json" in out
    assert "checked:    10 samples" in out and "extensions: json 10, png 10, txt 10" in out
    assert "'photo 0'\n  'photo 1'\n  'photo 2'\n" in out
    assert "broken:     20.00% of checked samples" in out
    assert "bad_image: 1" in out and "missing_caption: 1" in out

    os.remove(directory / "sizes.json")
    assert inspect_tool.main([spec, "--max-samples", "3"]) == 0
    assert "samples:    unknown" in capsys.readouterr().out
    assert inspect_tool.main([spec, "--max-samples", "3", "--write-sizes"]) == 0
    assert "samples:    10 (counted)" in capsys.readouterr().out
    assert json.loads((directory / "sizes.json").read_text()) == {"00000.tar": 6, "00001.tar": 4}


def test_inspect_runs_as_a_module(make_tiny_shards):
    spec, _ = make_tiny_shards([3])
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.inspect_shards", spec, "--caption-key", "json:caption"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "shards:     1 in 1 source(s)" in result.stdout and "'photo 2'" in result.stdout


def test_inspect_errors_are_one_line(capsys):
    assert inspect_tool.main(["/nonexistent/{0..1}.tar"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of the 2 shards of '/nonexistent/{0..1}.tar' do not exist" in err


def test_train_tokenizer_on_shard_captions(make_tiny_shards, tmp_path, capsys):
    spec, _ = make_tiny_shards([30, 20])
    output = tmp_path / "tok.model"
    args = [
        "--shards",
        spec,
        "--output",
        str(output),
        "--vocab-size",
        "30",
        "--no-byte-fallback",
        "--caption-key",
        "json:caption",
        "--model-type",
        "bpe",
    ]
    assert train_tokenizer.main(args) == 0
    assert "(50 captions)" in capsys.readouterr().out
    tokenizer = Tokenizer.from_file(output)
    assert tokenizer.decode(tokenizer(["photo 42"])[0]) == "photo 42"
    assert 4 < tokenizer.vocab_size <= 30


def test_train_tokenizer_on_english_and_russian_text(tmp_path, capsys):
    text = tmp_path / "captions.txt"
    lines = [
        "a red cat sleeps on the mat",
        "красная кошка спит на ковре",
        "two dogs run in the park",
        "две собаки бегут в парке",
        "",
        "a photo of a city at night",
        "фотография города ночью",
    ] * 5
    text.write_text("\n".join(lines), encoding="utf-8")
    output = tmp_path / "ru_en.model"
    assert (
        train_tokenizer.main(
            ["--text", str(text), "--output", str(output), "--vocab-size", "320", "--sample-size", "12"]
        )
        == 0
    )
    assert "(12 captions)" in capsys.readouterr().out
    tokenizer = Tokenizer.from_file(output)
    for sentence in ("кошка в парке ночью", "a cat in the park", "ёжик"):  # ё never appeared: byte fallback
        tokens = tokenizer([sentence])[0]
        assert UNK_ID not in tokens.tolist()
        assert tokenizer.decode(tokens) == sentence
    assert train_tokenizer.main(["--text", str(tmp_path / "missing.txt"), "--output", str(output)]) == 2
    assert "not found" in capsys.readouterr().err
