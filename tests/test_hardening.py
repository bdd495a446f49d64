"""Issue #15: the captioning path under inputs and outputs that used to abort, hang, lose records or
touch files it should not. Runs on the embedded default model (no --model)."""
import csv
import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest

from gitfast import cli
from gitfast.captioning import cli as caption_cli
from image_factory import small_images, write_files


def caption(*argv):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    extra = ["--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu", "--quiet"]
    return caption_cli.run(parser.parse_args([str(a) for a in argv] + extra))


def jsonl(path):
    data = open(path, "rb").read()
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]  # strict UTF-8


def _tar(path, members):
    """members: (name, bytes) or (name, kind, target) with kind "hard"/"sym"; names may hold surrogates."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if isinstance(rest[0], bytes):
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
            else:
                info.type = tarfile.LNKTYPE if rest[0] == "hard" else tarfile.SYMTYPE
                info.linkname = rest[1]
                tar.addfile(info)
    return path


# --- 1. text that is not valid UTF-8 --------------------------------------------------------------
def test_undecodable_names_are_escaped_captioned_and_resumed(tmp_path, capsys):
    images = list(small_images(4).values())
    folder = tmp_path / "in"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"a\xff.png"), "wb") as f:
        f.write(images[0])
    (folder / "z.png").write_bytes(images[1])
    _tar(str(folder / "s.tar"), [("k\udcff.png", images[2]), ("k\udcff.json", b'{"x": "\\udcff"}'),
                                 ("m.png", images[3])])
    out = tmp_path / "o.jsonl"
    assert caption(folder, "--out", out) == 0, capsys.readouterr().err
    recs = jsonl(out)
    assert [r["source"] for r in recs] == [f"{folder}/a\\xff.png", f"{folder}/s.tar::k\\xff", f"{folder}/s.tar::m",
                                           f"{folder}/z.png"]
    assert all(r["caption"] is not None for r in recs)
    assert caption(folder, "--out", out, "--resume") == 0
    assert "0 captioned, 0 failed, 4 skipped" in capsys.readouterr().err
    assert len(jsonl(out)) == 4

    assert caption(folder, "--out-dir", tmp_path / "d") == 0
    rows = pq.read_table(tmp_path / "d" / "s.parquet").to_pylist()
    assert rows[0]["key"] == "k\\xff" and rows[0]["x"] == "\\xff"  # U+DCFF is how Python holds the byte 0xFF


# --- 7. CSV fields holding line breaks --------------------------------------------------------------
def test_csv_round_trips_every_character_a_path_can_hold(tmp_path, capsys):
    names = ["a\rb.png", "c\nd.png", 'e,f"g.png', "h\r\ni .png", "tab\tq.png"]
    data = list(small_images(len(names)).values())
    folder = tmp_path / "in"
    write_files(str(folder), dict(zip(names, data)))
    out = tmp_path / "o.csv"
    assert caption(folder, "--out", out) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["source"] for r in rows) == sorted(str(folder / n) for n in names)
    assert caption(folder, "--out", out, "--resume") == 0
    assert f"0 captioned, 0 failed, {len(names)} skipped" in capsys.readouterr().err
