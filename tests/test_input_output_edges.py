"""Issue #27 items 3, 4, 7 and 9: every input gets exactly one record of its own (names that differ
never share a `source`, also after a resume; tar members without data and compressed shards are
recorded, table cells that are not paths too), and an output that cannot be written, or a usage
error found while loading, is exit 2 with nothing created. Runs on the embedded default model."""
import io
import itertools
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gitfast.tools import cli
from gitfast.captioning import cli as caption_cli
from gitfast.captioning.records import Source
from image_factory import small_images, write_files
from test_hardening import jsonl


def caption(*argv):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    extra = ["--batch-size", "4", "--quiet", "--device", "cpu"]
    if "--max-new-tokens" not in argv:
        extra += ["--max-new-tokens", "4"]
    return caption_cli.run(parser.parse_args([str(a) for a in argv] + extra))


# --- 3. sources that differ stay apart ----------------------------------------------------------------
def test_every_short_name_has_an_id_of_its_own():
    alphabet = ["\\", "x", "u", "f", "d", "\udcff", "\ud800"]
    names = ["".join(p) for n in range(1, 5) for p in itertools.product(alphabet, repeat=n)]
    ids = {Source(name, None).id for name in names}
    assert len(ids) == len(names)
    assert all(i.encode("utf-8") for i in ids)


def test_a_name_spelling_an_escape_and_the_byte_it_spells_get_two_records(tmp_path, capsys):
    images = list(small_images(5).values())
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(folder)
    for name, data in ((b"\xff.png", images[0]), (b"\\xff.png", images[1]), (b"a\\b.png", images[2])):
        with open(os.path.join(raw, name), "wb") as f:
            f.write(data)
    with tarfile.open(folder / "s.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in (("k\udcff.png", images[3]), ("k\\xff.png", images[4])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "o.jsonl"
    assert caption(folder, "--out", out) == 0
    assert "5 captioned" in capsys.readouterr().err
    sources = [r["source"] for r in jsonl(out)]
    # an ordinary backslash keeps the id older versions wrote, so their outputs still resume
    assert sorted(sources) == sorted([f"{folder}/\\xff.png", f"{folder}/\\\\xff.png", f"{folder}/a\\b.png",
                                      f"{folder}/s.tar::k\\xff", f"{folder}/s.tar::k\\\\xff"])
    assert caption(folder, "--out", out, "--resume") == 0
    assert "0 captioned, 0 failed, 5 skipped" in capsys.readouterr().err
    assert len(jsonl(out)) == 5


# --- 4. an output that cannot be written -------------------------------------------------------------
@pytest.mark.parametrize("flag, target", [("--out", "/proc/version"), ("--out", "/proc/gitfast-no-such/o.jsonl"),
                                          ("--out-dir", "/proc/gitfast-no-such")])
def test_an_output_under_proc_is_a_usage_error_before_any_work(tmp_path, capsys, monkeypatch, flag, target):
    from gitfast.captioning import captioner

    monkeypatch.setattr(captioner.Captioner, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    write_files(str(tmp_path / "in"), small_images(1))
    assert caption(tmp_path / "in", flag, target) == 2
    err = capsys.readouterr().err
    assert err.startswith("gitfast caption: error: cannot ") and "/proc/" in err


@pytest.mark.parametrize("flag", ["--out", "--out-dir"])
def test_a_read_only_folder_for_the_lock_is_a_usage_error(tmp_path, capsys, monkeypatch, flag):
    # tests run as root, whom a read-only folder does not stop: the refusal to create the lock file is faked
    from gitfast.captioning import locking

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".gitfast-lock") and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(locking.os, "open", read_only)
    write_files(str(tmp_path / "in"), small_images(1))
    out = tmp_path / "ro" / ("o.jsonl" if flag == "--out" else "d")
    assert caption(tmp_path / "in", flag, out) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: its lock file" in err and "Permission denied" in err
    assert not (tmp_path / "ro").exists()


# --- 7. usage errors found while loading leave nothing behind ---------------------------------------
@pytest.mark.parametrize("flag", ["--out", "--out-dir"])
@pytest.mark.parametrize("problem", [["--max-new-tokens", "1000000000"], ["--model", "EMPTY"]])
def test_a_usage_error_found_while_loading_creates_no_folders(tmp_path, capsys, flag, problem):
    write_files(str(tmp_path / "in"), small_images(1))
    (tmp_path / "empty").mkdir()
    problem = [str(tmp_path / "empty") if p == "EMPTY" else p for p in problem]
    target = tmp_path / "a" / "b" / ("o.jsonl" if flag == "--out" else "d")
    assert caption(tmp_path / "in", flag, target, *problem) == 2
    assert capsys.readouterr().err.startswith("gitfast caption: error: ")
    assert sorted(os.listdir(tmp_path)) == ["empty", "in"]


# --- 9. inputs that used to vanish or be misread ----------------------------------------------------
def test_tar_members_without_data_named_as_images_get_error_records(tmp_path):
    image = next(iter(small_images(1).values()))
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, kind in (("part.2024", tarfile.DIRTYPE), ("part.2024/f.jpg", tarfile.FIFOTYPE),
                           ("part.2024/c.jpg", tarfile.CHRTYPE), ("part.2024/d.jpg", tarfile.DIRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
        info = tarfile.TarInfo("part.2024/g.png")
        info.size = len(image)
        tar.addfile(info, io.BytesIO(image))
    out = tmp_path / "o.jsonl"
    assert caption(shard, "--out", out) == 1
    recs = {r["source"].split("::")[1]: r for r in jsonl(out)}
    assert sorted(recs) == ["part.2024/c", "part.2024/d", "part.2024/f", "part.2024/g"]  # the folder is no sample
    assert "'part.2024/f.jpg' is a FIFO" in recs["part.2024/f"]["error"]
    assert "is a character device" in recs["part.2024/c"]["error"]
    assert "'part.2024/d.jpg' is a directory" in recs["part.2024/d"]["error"]
    assert recs["part.2024/g"]["caption"] is not None


def test_a_compressed_shard_says_to_decompress_it_named_or_in_a_folder(tmp_path):
    folder = tmp_path / "in"
    write_files(str(folder), small_images(1))
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(next(folder.iterdir()), arcname="0.png")
    packed = folder / "s.tar.gz"
    with tarfile.open(packed, "w:gz") as tar:
        tar.add(plain, arcname="0.tar")
    for named in (packed, folder):
        out = tmp_path / f"{named.name}.jsonl"
        assert caption(named, "--out", out) == 1
        recs = {r["source"]: r for r in jsonl(out)}
        assert "decompress it first" in recs[f"{packed}::@0"]["error"]
        assert len(recs) == (1 if named == packed else 2)


def test_table_cells_holding_bytes_are_paths_and_lists_are_error_records(tmp_path):
    folder = tmp_path / "in"
    names = sorted(write_files(str(folder), small_images(2)))
    names = [os.path.basename(n) for n in names]
    binary = folder / "binary.parquet"
    pq.write_table(pa.table({"path": pa.array([os.fsencode(n) for n in names], pa.binary())}), binary)
    listed = folder / "listed.parquet"
    pq.write_table(pa.table({"path": pa.array([[n] for n in names], pa.list_(pa.string()))}), listed)
    out = tmp_path / "o.jsonl"
    assert caption(binary, listed, "--out", out) == 1
    recs = {r["source"]: r for r in jsonl(out)}
    assert sorted(recs) == sorted([str(folder / n) for n in names] + [f"{listed}::row 1", f"{listed}::row 2"])
    assert all(recs[str(folder / n)]["caption"] is not None for n in names)
    assert "has no path in 'path': it holds a value of type list" in recs[f"{listed}::row 1"]["error"]
