"""The tar reader against Python's tarfile, on every tar format a shard may come in."""

from __future__ import annotations

import bz2
import gzip
import io
import random
import tarfile

import pytest
import webdataset as wds

from data_pipelines.samples import read_samples
from data_pipelines.tar_reader import _number, _pax_records, iter_tar


def _tar(fmt: int, files: list[tuple[str, bytes]], extras: bool = True, float_mtime: bool = False) -> bytes:
    long = 120 if fmt != tarfile.USTAR_FORMAT else 10
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extras:
            directory = tarfile.TarInfo("a_directory")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
        for i, (name, data) in enumerate(files):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000.25 if float_mtime else 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
            if extras and i == 0:
                link = tarfile.TarInfo("a_link_" + "x" * long)
                link.type, link.linkname = tarfile.SYMTYPE, "target_" + "y" * long
                tar.addfile(link)
    return buf.getvalue()


def _files(rng: random.Random) -> list[tuple[str, bytes]]:
    long_dir = "/".join(["nested_directory"] * 8)  # 135 characters: USTAR splits it into prefix + name
    return [
        ("000000000.jpg", rng.randbytes(1000)),
        ("000000000.txt", "a caption".encode()),
        ("000000001.jpg", b""),
        ("000000001.txt", rng.randbytes(512)),
        (f"{long_dir}/000000002.jpg", rng.randbytes(513)),
        ("légende/000000003.txt", "une légende".encode()),
        ("n" * 180 + ".json", b"{}"),
    ]


def _tarfile_regular(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


class _Pipe:
    """A stream that cannot seek and returns at most a few bytes per read, like a pipe."""

    def __init__(self, data: bytes, seed: int = 0):
        self.data, self.pos, self.rng = data, 0, random.Random(seed)

    def read(self, size: int = -1) -> bytes:
        n = min(size, self.rng.randint(1, 700))
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_reads_in_every_format(fmt):
    files = _files(random.Random(fmt))
    if fmt == tarfile.USTAR_FORMAT:
        files = [f for f in files if len(f[0].rsplit("/", 1)[-1]) <= 100]  # USTAR cannot store longer names
    data = _tar(fmt, files, float_mtime=fmt == tarfile.PAX_FORMAT)
    expected = _tarfile_regular(data)
    assert expected == files
    assert list(iter_tar(io.BytesIO(data))) == expected
    assert list(iter_tar(_Pipe(data))) == expected
    assert list(iter_tar(io.BytesIO(gzip.compress(data)))) == expected
    wanted = [f for f in files if f[0].endswith(".txt")]
    assert list(iter_tar(io.BytesIO(data), lambda name: name.endswith(".txt"))) == wanted
    assert list(iter_tar(_Pipe(data, seed=1), lambda name: name.endswith(".txt"))) == wanted


def test_reads_webdataset_shards_like_webdataset(tmp_path):
    # TarWriter gives every member a PAX header (float mtime): the img2dataset layout.
    rng = random.Random(0)
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        for i in range(20):
            writer.write({"__key__": f"{i:09d}", "jpg": rng.randbytes(rng.randint(0, 3000)), "txt": b"caption"})
    with tarfile.open(path) as tar:
        assert all(m.pax_headers for m in tar.getmembers())
    mine = list(read_samples([str(path)], lambda exn: False))
    theirs = list(wds.tarfile_to_samples()([{"url": str(path)}]))
    assert len(mine) == 20 and mine == theirs


def test_broken_tars_raise_read_errors_where_tarfile_would_stop_silently():
    files = _files(random.Random(0))
    data = _tar(tarfile.PAX_FORMAT, files, extras=False, float_mtime=True)
    # Each file is a PAX header and its records, the file's header, then its data.
    second = 3 * 512 + 1024
    assert data[second + 1024 : second + 1024 + 13] == b"000000000.txt"

    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(iter_tar(io.BytesIO(b"")))
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(iter_tar(io.BytesIO(data[: 3 * 512 + 100])))  # inside the first file's data
    with pytest.raises(tarfile.ReadError, match="truncated header"):
        list(iter_tar(io.BytesIO(data[: second + 1024 + 100])))
    damaged = {}
    for where in (second + 20, second + 1024 + 20):  # a flipped bit in the second file's PAX or own header
        damaged[where] = bytearray(data)
        damaged[where][where] ^= 0x01
        with pytest.raises(tarfile.ReadError, match="bad checksum"):
            list(iter_tar(io.BytesIO(bytes(damaged[where]))))
    # tarfile's stream mode takes a damaged header after a complete file for the end of the archive:
    assert _tarfile_regular(bytes(damaged[second + 20])) == files[:1]
    # Cut inside a file that select_files skips: a seek past the end is caught too.
    for stream in (io.BytesIO(data[: 3 * 512 + 100]), io.BytesIO(gzip.compress(data[: 3 * 512 + 100]))):
        with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
            list(iter_tar(stream, lambda name: name.endswith(".txt")))
    # Cut exactly between two files, a tar looks complete (the pipeline checks shard sizes for it).
    assert list(iter_tar(io.BytesIO(data[:second]))) == files[:1]
    with pytest.raises(tarfile.ReadError, match="bzip2-compressed tars are not supported"):
        list(iter_tar(io.BytesIO(bz2.compress(data))))


def test_damaged_pax_records_raise_read_errors():
    for records in (b"abc path=x\n", b"3 p\n", b"30 path=x\n"[:5] + b"x" * 3):
        with pytest.raises(tarfile.ReadError, match="invalid record in a PAX header"):
            _pax_records(records)
    assert _pax_records(b"12 path=a/b\n9 size=7\n") == {"path": "a/b", "size": "7"}


def test_numeric_fields_octal_and_base_256():
    assert _number(b"0000644\0") == 0o644
    assert _number(b"       \0") == 0
    big = (1 << 40) + 5
    assert _number(bytes([0x80]) + big.to_bytes(11, "big")) == big
    with pytest.raises(tarfile.ReadError, match="invalid number"):
        _number(b"12x4\0\0\0\0")
