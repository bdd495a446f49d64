"""Issue #15: the captioning path under inputs and outputs that used to abort, hang, lose records or
touch files it should not. Runs on the embedded default model (no --model)."""
import csv
import errno
import io
import json
import os
import stat
import tarfile

import pyarrow.parquet as pq
import pytest

from gitfast.tools import cli
from gitfast.captioning import cli as caption_cli
from image_factory import small_images, write_files


def caption(*argv):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    extra = ["--max-new-tokens", "4", "--batch-size", "4", "--quiet"] + ([] if "--device" in argv else ["--device", "cpu"])
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


# --- 2. paths other than the chosen output ---------------------------------------------------------
@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    write_files(str(folder), small_images(3))
    return folder


def test_a_symlinked_output_writes_its_target_and_keeps_the_link(photos, tmp_path):
    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert caption(photos, "--out", link) == 0
    assert link.is_symlink() and len(jsonl(target)) == 3
    assert caption(photos, "--out", link, "--resume") == 0
    assert link.is_symlink() and len(jsonl(target)) == 3


def test_a_users_tmp_file_beside_the_output_is_never_touched(photos, tmp_path):
    mine = tmp_path / "o.jsonl.tmp"
    mine.write_text("mine")
    for fmt in ("jsonl", "parquet"):
        assert caption(photos, "--out", tmp_path / f"o.{fmt}") == 0
        assert caption(photos, "--out", tmp_path / f"o.{fmt}", "--resume") == 0
    assert mine.read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") and n != "o.jsonl.tmp"]


def test_a_killed_runs_temporaries_are_removed_on_resume_also_the_journals(photos, tmp_path):
    # kill -9 between mkstemp and the rename leaves `.<out>.XXXXXXXX.tmp`, and for a journaled output
    # `.<out>.partial.jsonl.XXXXXXXX.tmp` (seen after a killed two-device run): resume removes both
    out = tmp_path / "o.parquet"
    assert caption(photos, "--out", out) == 0
    left = [tmp_path / ".o.parquet.abcd1234.tmp", tmp_path / ".o.parquet.partial.jsonl.s1nze2j1.tmp"]
    for path in left:
        path.write_text("partial")
    assert caption(photos, "--out", out, "--resume") == 0
    assert not any(path.exists() for path in left), os.listdir(tmp_path)


def test_out_dash_is_stdout(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert caption(photos, "--out", "-") == 0
    assert not os.path.exists(tmp_path / "-")
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert caption(photos, "--out", "-", "--resume") == 2


def test_a_fifo_output_is_streamed_to_not_replaced(photos, tmp_path, capsys):
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    assert caption(photos, "--out", fifo) == 0
    reader.join(30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert len(got[0].decode().splitlines()) == 3
    assert caption(photos, "--out", fifo, "--resume") == 2
    assert "cannot be resumed" in capsys.readouterr().err


def test_a_character_device_output_is_streamed_to(photos, tmp_path):
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here ({exc}); the FIFO test covers streaming")
    assert caption(photos, "--out", null) == 0
    assert stat.S_ISCHR(os.stat(null).st_mode)


def test_a_full_disk_while_resuming_a_complete_output_leaves_no_temporary_file(photos, tmp_path, monkeypatch,
                                                                               capsys):
    from gitfast.captioning import formats

    out = tmp_path / "o.jsonl"
    assert caption(photos, "--out", out) == 0
    before = out.read_bytes()

    def full(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(formats.JsonlWriter, "write", full)
    assert caption(photos, "--out", out, "--resume") == 3
    assert out.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# --- 3. two runs on one output -------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--out", "--out-dir"])
def test_a_second_run_on_a_locked_output_is_refused(photos, tmp_path, capsys, flag):
    from gitfast.captioning import locking

    out = tmp_path / ("o.jsonl" if flag == "--out" else "d")
    lock = locking.lock_for(**({"out": str(out)} if flag == "--out" else {"out_dir": str(out)}))
    with lock:
        assert caption(photos, flag, out) == 2
        assert "another gitfast run is writing" in capsys.readouterr().err
        assert not out.exists() or not os.listdir(out) or os.listdir(out) == [".gitfast-lock"]
    assert caption(photos, flag, out) == 0
    assert not [n for n in os.listdir(tmp_path if flag == "--out" else out) if "lock" in n]


# --- 10. settings that shape captions ---------------------------------------------------------------
def test_resume_refuses_changed_settings_by_name(photos, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert caption(photos, "--out", out, "--num-beams", "1") == 0
    capsys.readouterr()
    assert caption(photos, "--out", out, "--resume", "--prompt", "a photo of", "--num-beams", "2") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "num_beams 2 (was 1)" in err and "prompt 'a photo of' (was None)" in err
    assert caption(photos, "--out", out, "--resume", "--dtype", "float32") == 0  # the default, spelt out
    assert caption(photos, "--out", out, "--resume", "--quantize", "dynamic") == 2
    assert "quantize 'dynamic' (was None)" in capsys.readouterr().err
    assert caption(photos, "--out", out, "--resume", "--prompt", "a photo of", "--force") == 0


# --- 4. only regular files are read, and only so much of them ---------------------------------------
@pytest.fixture
def alarm():
    """Fails a test that blocks (a FIFO read waits for a writer forever) instead of hanging the suite."""
    import signal

    def timeout(*_):
        raise TimeoutError("blocked reading an input")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifos_and_devices_are_error_records_not_reads(photos, tmp_path, alarm):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    tar_fifo = tmp_path / "s.tar"
    os.mkfifo(tar_fifo)
    out = tmp_path / "o.jsonl"
    good = sorted(str(p) for p in photos.iterdir())
    assert caption(fifo, "/dev/zero", tar_fifo, *good, "--out", out) == 1
    recs = {r["source"]: r for r in jsonl(out)}
    assert "not a regular file (a FIFO)" in recs[str(fifo)]["error"]
    assert "not a regular file (a character device)" in recs["/dev/zero"]["error"]
    assert "not a regular file" in recs[f"{tar_fifo}::@0"]["error"]
    assert all(recs[p]["caption"] for p in good)


def test_inputs_over_the_size_limit_are_error_records(photos, tmp_path, monkeypatch):
    from gitfast import Captioner

    names = sorted(os.listdir(photos))
    shard = _tar(str(tmp_path / "s.tar"), [("k.png", (photos / names[0]).read_bytes())])
    sizes = [os.path.getsize(photos / n) for n in names]
    monkeypatch.setenv("GITFAST_MAX_INPUT_BYTES", str(min(sizes) - 1))
    out = tmp_path / "o.jsonl"
    assert caption(photos, shard, "--out", out) == 1
    recs = jsonl(out)
    assert len(recs) == 4 and all("over the input size limit" in r["error"] for r in recs)
    results = Captioner(device="cpu").caption([str(photos / names[0])], max_new_tokens=2)
    assert "over the input size limit" in results[0].error


# --- 8. one image-like object is one input ----------------------------------------------------------
def test_one_array_or_bytes_object_is_one_input():
    import numpy as np
    from PIL import Image

    from gitfast import Captioner
    from image_factory import encode, rgb_array

    pixels = rgb_array(3, size=(40, 48))
    data = encode(Image.fromarray(pixels), "PNG")
    captioner = Captioner(device="cpu")
    from_pil = captioner.caption(Image.fromarray(pixels), max_new_tokens=4)
    for one in (pixels, data, bytearray(data)):
        results = captioner.caption(one, max_new_tokens=4)
        assert len(results) == 1 and results[0].ok, results[0].error
        assert results[0].token_ids == from_pil[0].token_ids
    assert len(captioner.caption([pixels, data], max_new_tokens=4)) == 2
    bad = captioner.caption(np.zeros((4, 4), dtype=np.float64), max_new_tokens=4)
    assert len(bad) == 1 and "must be uint8" in bad[0].error


# --- 9. link members in a tar shard -----------------------------------------------------------------
def test_hard_linked_images_are_read_and_symlinked_ones_are_error_records(tmp_path):
    data = list(small_images(2).values())
    shard = _tar(str(tmp_path / "s.tar"), [("a.jpg", data[0]), ("b.jpg", "hard", "a.jpg"), ("c.jpg", "sym", "a.jpg"),
                                           ("d.jpg", "sym", "/etc/passwd"), ("e.png", data[1])])
    out = tmp_path / "o.jsonl"
    assert caption(shard, "--out", out) == 1
    recs = {r["source"].split("::")[1]: r for r in jsonl(out)}
    assert sorted(recs) == ["a", "b", "c", "d", "e"]
    assert recs["b"]["caption"] == recs["a"]["caption"] is not None and recs["e"]["caption"] is not None
    assert "is a symbolic link to 'a.jpg'" in recs["c"]["error"] and "symbolic link" in recs["d"]["error"]


# --- 6. a processor that does not belong to the model ------------------------------------------------
def test_a_checkpoint_without_its_tokenizer_or_with_another_image_size_is_refused(tmp_path, capsys):
    import shutil

    from gitfast import Captioner
    from gitfast.defaults import EMBEDDED_MODEL
    from gitfast.checkpoint.loading import CheckpointError

    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "generation_config.json"):
        shutil.copy(EMBEDDED_MODEL / name, bare)
    with pytest.raises(CheckpointError, match="its tokenizer has 5 tokens, the model's vocabulary 31"):
        Captioner(str(bare), device="cpu")
    other = tmp_path / "other-size"
    shutil.copytree(EMBEDDED_MODEL, other)
    pre = json.loads((other / "preprocessor_config.json").read_text())
    pre["crop_size"] = {"height": 64, "width": 64}
    (other / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match="makes 64x64 pictures, the vision encoder takes 80x80"):
        Captioner(str(other), device="cpu")


# --- 5. memory follows the input, not --batch-size ----------------------------------------------------
def test_the_engine_is_sized_by_what_is_queued_not_the_batch_size(photos, tmp_path, monkeypatch):
    from gitfast.serving import engine as engine_module

    asked = []
    real = engine_module.Engine

    def spy(model, *, max_batch_size, **kw):
        asked.append(max_batch_size)
        return real(model, max_batch_size=min(max_batch_size, 8), **kw)  # never the huge one, fix or not

    monkeypatch.setattr(engine_module, "Engine", spy)
    one = sorted(photos.iterdir())[0]
    assert caption(one, "--out", tmp_path / "a.jsonl", "--batch-size", "1000000000") == 0
    assert caption(photos, "--out", tmp_path / "b.jsonl", "--batch-size", "10000") == 0
    assert asked == [1, 3]


# --- 11. the minor ones ------------------------------------------------------------------------------------
def test_urls_are_not_fetched_and_kept_verbatim(photos, tmp_path, capsys):
    good = sorted(str(p) for p in photos.iterdir())[0]
    table = tmp_path / "t.csv"
    table.write_text(f"path\nhttp://example.com/a.jpg\ns3://bucket/b.png\n{good}\n")
    listing = tmp_path / "l.txt"
    listing.write_text("https://example.com/c.jpg\n")
    out = tmp_path / "o.jsonl"
    assert caption(table, "--files-from", listing, "--out", out) == 1
    recs = jsonl(out)
    assert [r["source"] for r in recs] == ["http://example.com/a.jpg", "s3://bucket/b.png", good,
                                           "https://example.com/c.jpg"]
    assert all("URLs are not fetched; download first" in recs[i]["error"] for i in (0, 1, 3))
    assert caption("http://example.com/a.jpg", "--out", tmp_path / "p.jsonl") == 2
    assert "URLs are not fetched" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_unsupported_devices_are_usage_errors(photos, tmp_path, capsys, device):
    assert caption(photos, "--out", tmp_path / "o.jsonl", "--device", device) == 2
    assert f"device {device!r} is not supported" in capsys.readouterr().err


def test_a_file_named_like_a_shard_sample_is_refused(tmp_path, capsys):
    data = list(small_images(2).values())
    _tar(str(tmp_path / "s.tar"), [("k.png", data[0])])
    (tmp_path / "s.tar::k").write_bytes(data[1])
    assert caption(tmp_path / "s.tar", tmp_path / "s.tar::k", "--out", tmp_path / "o.jsonl") == 2
    assert "names both a file and a sample of the shard" in capsys.readouterr().err


def test_ctrl_c_while_the_model_loads_exits_130(photos, tmp_path, monkeypatch, capsys):
    from gitfast.captioning import captioner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(captioner.Captioner, "__init__", interrupted)
    assert caption(photos, "--out", tmp_path / "o.jsonl") == 130
    assert "interrupted while loading the model" in capsys.readouterr().err


def test_a_prompt_too_long_for_the_model_is_refused_once(photos, tmp_path, capsys):
    assert caption(photos, "--out", tmp_path / "o.jsonl", "--prompt", "red " * 200) == 2
    err = capsys.readouterr().err
    assert err.count("exceeds the model's 128 text positions") == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_a_symlinked_folder_is_followed_once(photos, tmp_path):
    (photos / "again").symlink_to(photos)  # a loop
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "linked").symlink_to(photos)
    out = tmp_path / "o.jsonl"
    assert caption(tmp_path / "top", "--out", out) == 0
    assert len(jsonl(out)) == 3


def test_an_impossible_request_is_refused_up_front(tmp_path, capsys, monkeypatch):
    """#15.5: when not even one image's KV cache fits the memory the engine may use, the run stops
    with a usage error before any output exists (it used to fail mid-run, or be killed for memory)."""
    from gitfast.serving.engine import Engine

    write_files(str(tmp_path / "in"), small_images(2))
    monkeypatch.setattr(Engine, "_available_bytes", lambda self: 1000)
    assert caption(tmp_path / "in", "--out", tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert "one request needs" in err and "KV cache" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_prompt_too_long_is_refused_once_with_several_devices(photos, tmp_path, capsys):
    """The same up-front refusal when ranks would start (each rank used to fail on its own, exit 1)."""
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    argv = [str(photos), "--out", str(tmp_path / "o.jsonl"), "--prompt", "red " * 200, "--devices", "cpu,cpu",
            "--max-new-tokens", "4", "--quiet"]
    assert caption_cli.run(parser.parse_args(argv)) == 2
    assert capsys.readouterr().err.count("exceeds the model's 128 text positions") == 1
    assert not (tmp_path / "o.jsonl").exists()
