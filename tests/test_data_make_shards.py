"""make_shards: folder and table inputs round-trip into img2dataset-layout shards."""

from __future__ import annotations

import csv
import json
import os
import tarfile

import pytest
from PIL import Image

from data_pipelines.make_shards import main, pairs_from_folder, pairs_from_table, write_shards
from data_pipelines.samples import SampleKey, decode_image, image_bytes, read_samples


def read_back(directory) -> dict[str, dict]:
    """caption -> {key, extensions, json, size} of every written sample."""
    out = {}

    def fail(exn):
        raise exn

    for sample in read_samples(sorted(str(p) for p in directory.glob("*.tar")), fail):
        meta = json.loads(sample["json"])
        image = decode_image(image_bytes(sample))
        extensions = sorted(k for k in sample if not k.startswith("__"))
        out[SampleKey.parse("txt").caption(sample)] = {
            "key": sample["__key__"],
            "ext": extensions,
            "json": meta,
            "size": image.size,
        }
    return out


@pytest.fixture
def photo_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = {
        "a.jpg": Image.new("RGB", (40, 20), "red"),
        "sub/b.png": Image.new("RGBA", (10, 30), (0, 0, 255, 128)),
        "c.bmp": Image.new("RGB", (12, 12), "green"),
        "d.webp": Image.new("RGB", (8, 8), "white"),
        "e.jpeg": Image.new("L", (16, 8), 100),
    }
    for name, image in images.items():
        image.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"caption {name}\n", encoding="utf-8")
    Image.new("RGB", (4, 4)).save(folder / "no_caption.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "broken.txt").write_text("caption broken.jpg")
    return folder


def test_folder_round_trips_into_img2dataset_layout(photo_folder, tmp_path):
    out = tmp_path / "shards"
    summary = write_shards(
        pairs_from_folder(photo_folder), out, samples_per_shard=2, max_size=16, processes=2, progress=False
    )
    assert (summary.shards, summary.samples, summary.failures) == (3, 5, {"bad_image": 1})
    assert sorted(os.listdir(out)) == [
        "00000.tar",
        "00000_stats.json",
        "00001.tar",
        "00001_stats.json",
        "00002.tar",
        "00002_stats.json",
        "sizes.json",
    ]
    # Pairs in sorted path order: [a, broken], [c, d], [e, sub/b]; the broken image is left out.
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 1, "00001.tar": 2, "00002.tar": 2}
    stats = json.loads((out / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_resize"]) == (2, 1, 1)

    samples = read_back(out)
    keys = {caption.removeprefix("caption "): s["key"] for caption, s in samples.items()}
    # img2dataset keys: 5-digit shard number, then the 4-digit index in the shard.
    assert keys == {
        "a.jpg": "000000000",
        "c.bmp": "000010000",
        "d.webp": "000010001",
        "e.jpeg": "000020000",
        "sub/b.png": "000020001",
    }
    # Resized keeping the aspect ratio, and re-encoded as JPEG; small images keep their bytes and format.
    assert samples["caption a.jpg"]["size"] == (16, 8) and samples["caption a.jpg"]["ext"] == ["jpg", "json", "txt"]
    assert samples["caption sub/b.png"]["size"] == (5, 16)
    assert samples["caption d.webp"]["ext"] == ["json", "txt", "webp"]
    assert samples["caption c.bmp"]["ext"] == ["jpg", "json", "txt"]  # bmp is not a training format
    meta = samples["caption a.jpg"]["json"]
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (16, 8, 40, 20)
    assert meta["caption"] == "caption a.jpg" and meta["source"] == "a.jpg"
    # Plain ustar members: no PAX header per file (1 KiB each with a fractional mtime).
    with tarfile.open(out / "00001.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 6 and not any(m.pax_headers for m in members)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_table_round_trips_with_extra_columns(tmp_path, fmt):
    images = tmp_path / "img"
    images.mkdir()
    rows = []
    for i in range(5):
        Image.new("RGB", (6, 6), (i * 40, 0, 0)).save(images / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "text": f"пример {i}" if i % 2 else f"example {i}", "license": f"cc-{i}"})
    rows.append({"path": "img/missing.png", "text": "gone", "license": "x"})
    rows.append({"path": "img/0.png", "text": "", "license": "x"})
    table = tmp_path / f"pairs.{fmt}"
    if fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    else:
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "text", "license"], delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    summary = write_shards(pairs_from_table(table, "path", "text"), tmp_path / "out", processes=1, progress=False)
    assert summary.samples == 5
    assert summary.failures == {"unreadable file: No such file or directory": 1, "empty caption": 1}
    samples = read_back(tmp_path / "out")
    assert sorted(samples) == sorted(r["text"] for r in rows[:5])
    assert samples["пример 1"]["json"]["license"] == "cc-1" and samples["пример 1"]["json"]["source"] == "img/1.png"


def test_cli_writes_shards_and_reports_errors_in_one_line(photo_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(photo_folder), str(out), "--samples-per-shard", "4", "--reencode", "--processes", "1"]) == 0
    assert "wrote 5 samples in 2 shards" in capsys.readouterr().out
    assert all(s["ext"] == ["jpg", "json", "txt"] for s in read_back(out).values())
    assert main([str(photo_folder), str(out)]) == 2
    assert "already holds shards" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    table.write_text("file,caption\nx.png,hello\n")
    assert main([str(table), str(tmp_path / "t")]) == 2
    assert "has no column 'image' (columns: file, caption); set --image-column" in capsys.readouterr().err
    assert main([str(tmp_path / "photos_typo"), str(tmp_path / "t")]) == 2
    assert "photos_typo' not found: give a folder of name.jpg + name.txt pairs or a .csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0 and "--max-size" in capsys.readouterr().out
