"""Tar shards (webdataset / img2dataset layout) as inputs, read in place; per-shard outputs (--out-dir);
file lists and tables of paths as inputs."""
import gzip
import json
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gitfast import Captioner
from gitfast.tools import cli
from gitfast.captioning import cli as caption_cli
from gitfast.captioning import shards
from gitfast.captioning import records, sources
from image_factory import (broken_files, mode_images, small_images, webdataset_samples, write_files,
                           write_tar)


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return Captioner(checkpoint, device="cpu")


def caption(checkpoint, *argv):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    extra = ["--model", checkpoint, "--max-new-tokens", "5", "--batch-size", "4", "--quiet"]
    return caption_cli.run(parser.parse_args([str(a) for a in argv] + extra))


def ids(srcs):
    return [s.id for s in srcs]


def test_samples_become_sources_with_ids_keys_and_carried_fields(tmp_path):
    images = small_images(3)
    members = webdataset_samples(images) + [
        ("sub/dir/x1.webp", mode_images()["rgb.png"]),   # any image field; keys keep their folder
        ("000000007.json", b'{"key": "000000007"}'),        # a sample without an image
        ("._000000000.jpg", b"macOS resource fork"),        # hidden: ignored
        ("README", b"no field: not a sample"),
    ]
    path = write_tar(str(tmp_path / "00000.tar"), members)
    srcs = list(shards.shard_sources(path))
    assert ids(srcs) == [f"{path}::{k}" for k in ("000000000", "000000001", "000000002", "sub/dir/x1", "000000007")]
    assert [s.key for s in srcs][:2] == ["000000000", "000000001"] and {s.group for s in srcs} == {path}
    assert [s.open_bytes() for s in srcs[:3]] == list(images.values())
    assert srcs[0].meta() == {"key": "000000000", "caption": "alt text 0", "url": "http://x/0", "width": 24,
                              "status": "success", "txt": "alt text 0"}
    with pytest.raises(records.SourceReadError, match=r"no image member \(it has: json\)"):
        srcs[4].open_bytes()
    # picklable, for worker processes: a partial over the shard path, offset and size
    clone = pickle.loads(pickle.dumps(srcs[1]))
    assert clone.open_bytes() == srcs[1].open_bytes() and clone.meta() == srcs[1].meta()


def test_member_names_are_only_keys_never_paths(tmp_path, captioner):
    jpg = small_images(1)["img000.jpg"]
    inside = tmp_path / "data"
    path = write_tar(str(inside / "evil.tar"), [("../escaped.jpg", jpg), ("/abs/olute.jpg", jpg),
                                                 ("../../etc/x.json", b"{}")])
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(inside))
    results = captioner.caption(list(shards.shard_sources(path)), max_new_tokens=4)
    assert [r.source for r in results] == [f"{path}::../escaped", f"{path}::/abs/olute", f"{path}::../../etc/x"]
    assert results[0].ok and results[1].ok and "no image member" in results[2].error
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(inside))) == before  # nothing extracted anywhere


def test_shard_captions_equal_the_same_images_as_files(tmp_path, captioner):
    images = {**mode_images(), **broken_files()}
    path = write_tar(str(tmp_path / "s.tar"), webdataset_samples(images, meta=False))
    files = write_files(str(tmp_path / "files"), images)
    from_shard = captioner.caption(list(sources.expand([path])), max_new_tokens=5)
    from_files = captioner.caption(files, max_new_tokens=5)
    assert len(from_shard) == len(images)
    assert [(r.text, r.error) for r in from_shard] == [(r.text, r.error) for r in from_files]


def _shard_bytes(tmp_path, n=4):
    path = write_tar(str(tmp_path / "whole.tar"), webdataset_samples(small_images(n), meta=False))
    with open(path, "rb") as f:
        return f.read(), [m.offset for m in shards.index(path)[0]]


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path, captioner):
    data, offsets = _shard_bytes(tmp_path)
    cuts = {"inside member 2's data": offsets[2] + 10, "inside member 3's header": offsets[3] - 512 + 100,
            "right after member 1": offsets[2] - 512, "inside member 0": offsets[0] + 1}
    for where, cut in cuts.items():
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(data[:cut])
        results = captioner.caption(list(sources.expand([path])), max_new_tokens=4)
        whole = sum(off + 100 <= cut for off in offsets)  # members entirely before the cut (images are >100 bytes)
        assert all(r.ok for r in results[:-1]) and len(results) == whole + 1, where
        damage = results[-1]
        assert damage.source.startswith(f"{path}::@") and "tar damaged at byte" in damage.error, where
        assert f"the {whole} samples before it were read" in damage.error, where
    # a cut inside the end-of-archive zero blocks loses nothing: not damage
    path = tmp_path / "zeros_cut.tar"
    path.write_bytes(data[: len(data) - 600])
    assert all(r.ok for r in captioner.caption(list(sources.expand([path])), max_new_tokens=4))


def test_corrupt_header_and_corrupt_member_data(tmp_path, captioner):
    data, offsets = _shard_bytes(tmp_path)
    bad_header = bytearray(data)
    bad_header[offsets[2] - 512: offsets[2] - 512 + 20] = b"\xff" * 20  # member 2's name and checksum
    (tmp_path / "header.tar").write_bytes(bytes(bad_header))
    results = captioner.caption(list(sources.expand([tmp_path / "header.tar"])), max_new_tokens=4)
    assert [r.ok for r in results] == [True, True, False]
    assert results[2].source == f"{tmp_path / 'header.tar'}::@{offsets[2] - 512}"
    assert "unreadable tar member header" in results[2].error

    bad_data = bytearray(data)
    bad_data[offsets[1] + 2: offsets[1] + 200] = os.urandom(198)  # the image itself is garbage; the tar is sound
    (tmp_path / "data.tar").write_bytes(bytes(bad_data))
    results = captioner.caption(list(sources.expand([tmp_path / "data.tar"])), max_new_tokens=4)
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].source.endswith("::000000001")


@pytest.mark.parametrize("content,reason", [
    (b"", "not a readable tar file"),
    (b"this is not a tar archive at all, just some text" * 20, "not a readable tar file"),
    ("gzip", "gzip-compressed tar"),
])
def test_not_a_tar_or_compressed_is_one_error_record(tmp_path, captioner, content, reason):
    if content == "gzip":
        data, _ = _shard_bytes(tmp_path, n=1)
        content = gzip.compress(data)
    path = tmp_path / "x.tar"
    path.write_bytes(content)
    [result] = captioner.caption(list(sources.expand([path])))
    assert result.source == f"{path}::@0" and reason in result.error


def test_folders_and_globs_take_shards_and_lists_take_anything(tmp_path, monkeypatch):
    jpg = small_images(1)["img000.jpg"]
    write_tar(str(tmp_path / "d" / "00000.tar"), [("k.jpg", jpg)])
    write_files(str(tmp_path / "d"), {"a.jpg": jpg, "meta.parquet": b"skipped in folders"})
    assert ids(sources.expand([tmp_path / "d"])) == [f"{tmp_path}/d/00000.tar::k", f"{tmp_path}/d/a.jpg"]
    assert ids(sources.expand([f"{tmp_path}/d/*"])) == [f"{tmp_path}/d/00000.tar::k", f"{tmp_path}/d/a.jpg"]
    # a list: one path per line, relative to the current folder; blank lines skipped; a missing path is
    # an error record in its place, not a usage error
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("d/a.jpg\n\nd/00000.tar\nd/missing.png\n")
    listed = list(sources.expand([], files_from="list.txt"))
    assert ids(listed) == ["d/a.jpg", "d/00000.tar::k", "d/missing.png"]
    with pytest.raises(OSError):
        listed[2].open_bytes()
    with pytest.raises(sources.SourceError, match="cannot read --files-from"):
        sources.expand([], files_from="nope.txt")


def test_tables_of_paths(tmp_path):
    jpg = small_images(1)["img000.jpg"]
    write_files(str(tmp_path / "t" / "imgs"), {"a.jpg": jpg})
    pq.write_table(pa.table({"file": ["imgs/a.jpg", None, "/abs/b.png"], "n": [1, 2, 3]}), tmp_path / "t" / "x.parquet")
    (tmp_path / "t" / "y.csv").write_text("id,path\n1,imgs/a.jpg\n2,\n")
    got = list(sources.expand([tmp_path / "t" / "x.parquet"], path_column="file"))
    assert ids(got) == [f"{tmp_path}/t/imgs/a.jpg", f"{tmp_path}/t/x.parquet::row 2", "/abs/b.png"]
    assert got[0].open_bytes() == jpg
    with pytest.raises(OSError, match="empty 'file'"):
        got[1].open_bytes()
    assert ids(sources.expand([tmp_path / "t" / "y.csv"])) == [f"{tmp_path}/t/imgs/a.jpg", f"{tmp_path}/t/y.csv::row 2"]
    with pytest.raises(sources.SourceError, match=r"has no column 'path' \(it has \['file', 'n'\]\)"):
        sources.expand([tmp_path / "t" / "x.parquet"])
    (tmp_path / "t" / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(sources.SourceError, match="cannot read table"):
        sources.expand([tmp_path / "t" / "bad.parquet"])


# --- the CLI: --out-dir, lists and tables -------------------------------------------------------
@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """Two img2dataset-style shards (a broken image in the first), a sample without an image, plain files."""
    root = tmp_path_factory.mktemp("shards")
    imgs = small_images(7)
    first = dict(list(imgs.items())[:4])
    first["broken.jpg"] = broken_files()["truncated.jpg"]
    write_tar(str(root / "00000.tar"), webdataset_samples(first) + [("000000099.json", b'{"key": "000000099"}')])
    write_tar(str(root / "00001.tar"), webdataset_samples(dict(list(imgs.items())[4:]), start=10))
    write_files(str(root / "plain"), {"p.png": mode_images()["rgb.png"]})
    return root


def test_out_dir_one_parquet_per_shard_with_carried_fields(checkpoint, captioner, shard_set, tmp_path):
    out = tmp_path / "out"
    assert caption(checkpoint, f"{shard_set}/*.tar", shard_set / "plain", "--out-dir", out) == 1
    assert sorted(os.listdir(out)) == ["00000.parquet", "00001.parquet", "captions.parquet", "gitfast-settings.json"]  # no temporary files
    want = {r.source: r for r in captioner.caption(list(sources.expand([f"{shard_set}/*.tar", shard_set / "plain"])),
                                                   max_new_tokens=5)}
    first = pq.read_table(out / "00000.parquet")
    assert first.column_names == ["key", "source", "caption", "error", "json_key", "json_caption", "url", "width",
                                  "status", "txt"]
    rows = first.to_pylist()
    assert [r["key"] for r in rows] == [f"{n:09d}" for n in range(5)] + ["000000099"]
    for r in rows:
        assert r["source"] == f"{shard_set}/00000.tar::{r['key']}"
        assert (r["caption"], r["error"]) == (want[r["source"]].text, want[r["source"]].error)
    assert rows[0]["json_caption"] == rows[0]["txt"] == "alt text 0" and rows[0]["width"] == 24
    assert rows[4]["error"] and rows[5]["error"] and "no image member" in rows[5]["error"]
    assert [r["key"] for r in pq.read_table(out / "00001.parquet").to_pylist()] == [f"{n:09d}" for n in (10, 11, 12)]
    plain = pq.read_table(out / "captions.parquet").to_pylist()
    assert plain == [{"key": None, "source": str(shard_set / "plain" / "p.png"),
                      "caption": want[str(shard_set / "plain" / "p.png")].text, "error": None}]

    # resume: the broken sample and the one without an image are retried (and fail again), each once
    assert caption(checkpoint, f"{shard_set}/*.tar", shard_set / "plain", "--out-dir", out, "--resume") == 1
    again = pq.read_table(out / "00000.parquet").to_pylist()
    assert sorted(r["source"] for r in again) == sorted(r["source"] for r in rows)
    assert again == rows  # sorted back into the shard's order when finished


def test_out_dir_jsonl_and_its_errors(checkpoint, shard_set, tmp_path, capsys):
    out = tmp_path / "j"
    assert caption(checkpoint, shard_set / "00001.tar", "--out-dir", out, "--format", "jsonl") == 0
    lines = [json.loads(line) for line in (out / "00001.jsonl").read_text().splitlines()]
    assert [(r["key"], r["json_key"]) for r in lines] == [(f"{n:09d}",) * 2 for n in (10, 11, 12)]
    capsys.readouterr()
    assert caption(checkpoint, shard_set / "00001.tar", "--out-dir", out, "--format", "jsonl") == 2
    assert "00001.jsonl' exists; pass --resume" in capsys.readouterr().err
    assert caption(checkpoint, shard_set / "00001.tar", "--out-dir", out, "--format", "csv") == 2
    assert "--out-dir writes parquet or jsonl, not csv" in capsys.readouterr().err
    other = tmp_path / "elsewhere"
    write_tar(str(other / "00001.tar"), webdataset_samples(small_images(1)))
    assert caption(checkpoint, shard_set / "00001.tar", other / "00001.tar", "--out-dir", tmp_path / "k") == 2
    assert "would both write" in capsys.readouterr().err


def test_cli_files_from_stdin_and_tables(checkpoint, captioner, shard_set, tmp_path, monkeypatch):
    import io

    listed = [str(shard_set / "plain" / "p.png"), str(shard_set / "00001.tar")]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(listed) + "\n"))
    out = tmp_path / "l.jsonl"
    assert caption(checkpoint, "--files-from", "-", "--out", out) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = captioner.caption(list(sources.expand(listed)), max_new_tokens=5)
    assert [(r["source"], r["caption"]) for r in got] == [(w.source, w.text) for w in want]

    (tmp_path / "t.csv").write_text(f"name,file\nx,{shard_set}/plain/p.png\ny,{shard_set}/nope.jpg\n")
    out = tmp_path / "t.jsonl"
    assert caption(checkpoint, tmp_path / "t.csv", "--path-column", "file", "--out", out) == 1
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[0]["caption"] == want[0].text and "No such file" in got[1]["error"]
