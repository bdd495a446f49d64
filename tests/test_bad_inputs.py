"""Bad input matrix for `gitfast caption`: every case gives a clear error (an error record, or a message
and an exit status) and loses nothing already written.

Covered elsewhere, not repeated here:
- corrupt / truncated / 0-byte / not-an-image files, and CMYK, 16-bit, palette, alpha, grey, bilevel
  and EXIF-rotated images: decoding rules in test_images.py, error records in place in
  test_captioner.py, and through the CLI (records equal to the Python API's, exit 1) in
  test_caption_cli.py::test_folder_to_jsonl_with_error_records_and_exit_1; the same bytes inside a
  tar shard in test_shards.py::test_shard_captions_equal_the_same_images_as_files;
- damaged shards (cut anywhere, a corrupt header, a corrupt member, not a tar, compressed) at the
  Source level in test_shards.py; killed runs in test_resume_kill.py and test_multi_device.py;
- bad flags, missing paths and models, an existing output without --resume: test_caption_cli.py.
"""
import errno
import json
import os
import struct
import zlib

import pyarrow.parquet as pq
import pytest

from gitfast import Captioner
from gitfast.tools import cli
from gitfast.captioning import cli as caption_cli
from gitfast.captioning import shards
from gitfast.captioning import sources
from gitfast.captioning import formats, resumable
from image_factory import mode_images, small_images, webdataset_samples, write_files, write_tar


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_files(str(root), small_images(12))
    return root


@pytest.fixture(scope="module")
def reference(checkpoint, photos):
    results = Captioner(checkpoint, device="cpu").caption(list(sources.expand([photos])), max_new_tokens=5)
    return {r.source: r.text for r in results}


def caption(checkpoint, *argv):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    extra = ["--model", checkpoint, "--max-new-tokens", "5", "--batch-size", "4", "--quiet"]
    return caption_cli.run(parser.parse_args([str(a) for a in argv] + extra))


def _png_header_only(width, height):
    """A PNG that declares width x height pixels (1-bit grey) but holds almost no data: what a
    decompression bomb looks like to the check made before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_image_over_pillows_pixel_limit_is_refused_not_decoded(checkpoint, photos, reference, tmp_path, capsys):
    from PIL import Image

    side = int((Image.MAX_IMAGE_PIXELS or 89_478_485) ** 0.5) + 100  # over the default limit, not over 2x
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(side, side))
    good = sorted(reference)[0]
    out = tmp_path / "o.jsonl"
    assert caption(checkpoint, good, bomb, "--out", out) == 1
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0] == {"source": good, "caption": reference[good], "error": None}
    assert recs[1]["source"] == str(bomb) and "refused as a possible decompression bomb" in recs[1]["error"]
    assert "1 captioned, 1 failed" in capsys.readouterr().err


def test_a_damaged_shard_through_the_cli_keeps_what_precedes_the_damage(checkpoint, tmp_path, capsys):
    path = write_tar(str(tmp_path / "00000.tar"), webdataset_samples(small_images(4), meta=False))
    cut_at = shards.index(path)[0][2].offset + 50  # inside the third sample's image
    with open(path, "r+b") as f:
        f.truncate(cut_at)
    out = tmp_path / "o.jsonl"
    assert caption(checkpoint, path, "--out", out) == 1
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in recs] == [f"{path}::000000000", f"{path}::000000001", f"{path}::@{cut_at - 50 - 512}"]
    assert recs[0]["caption"] and recs[1]["caption"]
    assert "tar damaged at byte" in recs[2]["error"] and "shard truncated inside member '000000002.jpg'" in recs[2]["error"]
    assert "2 captioned, 1 failed" in capsys.readouterr().err


# --- outputs that cannot be written -------------------------------------------------------------
class _FullDisk:
    """A file stream that accepts `room` more bytes, writes part of the next write, then fails as a
    full disk does."""

    def __init__(self, stream, room):
        self.stream, self.room = stream, room

    def write(self, text):
        if len(text) > self.room:
            self.stream.write(text[: self.room])
            self.stream.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_full_disk_stops_with_exit_3_and_keeps_every_record_written(checkpoint, photos, reference, tmp_path,
                                                                       monkeypatch, capsys, fmt):
    out = tmp_path / f"o.{fmt}"
    real_init = formats.StreamWriter.__init__
    written = []

    def init(self, stream, owns=True):
        if owns and "a" in getattr(stream, "mode", ""):
            stream = _FullDisk(stream, room=10**9)
            written.append(stream)
        real_init(self, stream, owns)

    monkeypatch.setattr(formats.StreamWriter, "__init__", init)
    real_write = formats.JsonlWriter.write
    count = [0]

    def write(self, rec):
        count[0] += 1
        if count[0] == 6 and written:
            written[-1].room = 25  # the disk fills up in the middle of the sixth record
        real_write(self, rec)

    monkeypatch.setattr(formats.JsonlWriter, "write", write)
    assert caption(checkpoint, photos, "--out", out) == 3
    err = capsys.readouterr().err
    assert "cannot write the output: [Errno 28] No space left on device" in err
    assert "the 5 records written before it are kept" in err and "--resume" in err
    journal = out if fmt == "jsonl" else tmp_path / f"o.{fmt}.partial.jsonl"
    data = journal.read_bytes()
    assert data.count(b"\n") == 5 and not data.endswith(b"\n")  # five whole records and a torn one
    if fmt == "parquet":
        assert not out.exists()  # never finished from an incomplete journal

    monkeypatch.undo()
    assert caption(checkpoint, photos, "--out", out, "--resume") == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()] if fmt == "jsonl" \
        else pq.read_table(out).to_pylist()
    assert sorted(r["source"] for r in recs) == sorted(reference)
    assert {r["source"]: r["caption"] for r in recs} == reference
    assert "5 skipped" in capsys.readouterr().err


def test_a_full_disk_while_finishing_a_shard_keeps_its_journal(checkpoint, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pqm

    for n in range(2):
        write_tar(str(tmp_path / "in" / f"{n:05d}.tar"), webdataset_samples(small_images(3, seed=10 * n), start=10 * n))
    out = tmp_path / "out"
    real = pqm.write_table

    def full(table, where, **kw):
        if "000000010" in table.column("key").to_pylist():  # shard 00001
            where.write(b"PAR1 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(table, where, **kw)

    monkeypatch.setattr(pqm, "write_table", full)
    assert caption(checkpoint, tmp_path / "in", "--out-dir", out) == 3
    assert "No space left on device" in capsys.readouterr().err
    # the half-written temporary file is gitfast's own: removed
    assert sorted(os.listdir(out)) == ["00000.parquet", "00001.parquet.partial.jsonl", "gitfast-settings.json"]
    assert len(pq.read_table(out / "00000.parquet")) == 3 and len((out / "00001.parquet.partial.jsonl").read_text().splitlines()) == 3

    monkeypatch.undo()
    assert caption(checkpoint, tmp_path / "in", "--out-dir", out, "--resume") == 0
    assert sorted(os.listdir(out)) == ["00000.parquet", "00001.parquet", "gitfast-settings.json"]
    assert [r["key"] for r in pq.read_table(out / "00001.parquet").to_pylist()] == [f"{n:09d}" for n in (10, 11, 12)]
    assert "0 captioned, 0 failed, 6 skipped" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--out-dir"])
def test_an_output_under_a_file_is_a_usage_error_before_any_work(checkpoint, photos, tmp_path, capsys, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file")
    target = blocker / "sub" / ("o.jsonl" if flag == "--out" else "dir")
    assert caption(checkpoint, photos, flag, target) == 2
    err = capsys.readouterr().err
    assert err.startswith("gitfast caption: error: cannot write under") and "is a file, not a folder" in err
    assert blocker.read_text() == "I am a file"


def test_a_read_only_folder_is_a_usage_error(checkpoint, photos, tmp_path, monkeypatch, capsys):
    # tests run as root, whom chmod does not stop: the permission check is what is exercised here
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    assert caption(checkpoint, photos, "--out", tmp_path / "o.jsonl") == 2
    assert f"{str(tmp_path)!r} is not writable" in capsys.readouterr().err


def test_an_output_that_fails_to_open_keeps_the_previous_file(checkpoint, photos, reference, tmp_path, monkeypatch,
                                                              capsys):
    out = tmp_path / "o.jsonl"
    first = sorted(reference)[:3]
    assert caption(checkpoint, *first, "--out", out) == 0
    before = out.read_bytes()

    def refuse(path, fill):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path + ".tmp")

    monkeypatch.setattr(resumable, "replace_with", refuse)
    assert caption(checkpoint, photos, "--out", out, "--resume") == 3
    assert "cannot write the output: [Errno 13] Permission denied" in capsys.readouterr().err
    assert out.read_bytes() == before
