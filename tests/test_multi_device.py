"""Several devices: `--devices cpu,cpu` runs two spawned CPU ranks over disjoint halves of the inputs
(what `--devices 0,1` does with GPUs); the output must equal a single-device run's, each source
once — also after a rank dies, and after the whole run is killed and resumed."""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import numpy as np
import pytest

from gitfast import Captioner
from gitfast.tools import cli
from gitfast.captioning import cli as caption_cli
from gitfast.captioning import cli_run
from gitfast.captioning import multi_device
from gitfast.captioning import sources
from image_factory import broken_files, small_images, webdataset_samples, write_files, write_tar

ARGS = ["--max-new-tokens", "6", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    images = small_images(60)
    write_files(str(root / "files"), {**images, **broken_files()})
    write_tar(str(root / "00000.tar"), webdataset_samples(dict(list(images.items())[:9])))
    return root


@pytest.fixture(scope="module")
def reference(checkpoint, inputs):
    """Single-device captions of every input, by the Python API."""
    srcs = list(sources.expand([inputs / "files", inputs / "00000.tar"]))
    results = Captioner(checkpoint, device="cpu").caption(srcs, max_new_tokens=6)
    return {r.source: (r.text, r.error) for r in results}


def caption(checkpoint, *argv):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    return caption_cli.run(parser.parse_args([str(a) for a in argv] + ["--model", str(checkpoint)] + ARGS))


def test_parse_devices(monkeypatch):
    assert multi_device.parse_devices("cpu,cpu") == ["cpu", "cpu"]
    monkeypatch.setattr(multi_device, "_cuda_count", lambda: 0)
    for text, message in [("all", "no CUDA GPU is visible"), ("0", "GPU 0 asked for, but 0 CUDA GPU"),
                          ("tpu", "unknown device 'tpu'"), ("0,,1", "empty entry")]:
        with pytest.raises(ValueError, match=message):
            multi_device.parse_devices(text)
    monkeypatch.setattr(multi_device, "_cuda_count", lambda: 2)
    assert multi_device.parse_devices("all") == ["cuda:0", "cuda:1"]
    assert multi_device.parse_devices("1,cuda:0") == ["cuda:1", "cuda:0"]
    with pytest.raises(ValueError, match="names a GPU twice"):
        multi_device.parse_devices("0,cuda:0")
    with pytest.raises(ValueError, match="GPU 2 asked for, but 2"):
        multi_device.parse_devices("0,2")


def test_a_model_that_cannot_load_is_a_usage_error_before_any_rank_starts(inputs, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert caption(inputs / "files", inputs / "files", "--devices", "cpu,cpu", "--out", out) == 2
    assert f"no config.json in {inputs / 'files'}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GITFAST_SLOW"), reason="slow: set GITFAST_SLOW=1 to run")
def test_a_rank_that_cannot_start_is_a_usage_error(checkpoint, inputs, tmp_path, capsys):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    for name in os.listdir(broken):
        if name.endswith((".safetensors", ".bin")):
            os.remove(broken / name)
    out = tmp_path / "o.jsonl"
    assert caption(broken, inputs / "files", "--devices", "cpu,cpu", "--out", out) == 2
    assert "device cpu: CheckpointError" in capsys.readouterr().err
    assert not out.exists()


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return []
    ranks = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    ranks.append(kid)
        except OSError:
            pass
    return ranks


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _lines(path):
    try:
        data = open(path, "rb").read()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(") ")[1][0] != "Z"


def _records(out):
    """Every record in an --out-dir so far: finished Parquet files and journals (a torn last line dropped)."""
    recs = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if name.endswith(".parquet"):
            recs += pq.read_table(out / name).to_pylist()
        elif name.endswith(".partial.jsonl"):
            recs += _lines(out / name)
    return recs


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the ranks through Linux's /proc")
def test_two_ranks_equal_one_device_after_a_dead_rank_and_a_killed_run(checkpoint, inputs, reference, tmp_path):
    """Three runs over one --out-dir: a rank is killed (the other finishes; the parent says what is
    missing); the next run is killed whole (its ranks die with it); the last completes it.

    Rank 0's first inputs are 48-megapixel JPEGs (about a second each to decode and resize): when the
    first record is written, rank 0 is still on them, and is stopped there (SIGSTOP; found by its
    process name, gitfast-rank0). How far rank 0 got is a race (the ranks get ready at different
    times, and the parent writes only once both are), so the parent's count is checked against the
    records actually written, not against a number fixed in advance."""
    from PIL import Image

    slow = tmp_path / "slow"  # sorted: big, small, big, small, ... so every big one is rank 0's
    slow.mkdir()
    ramp = np.add.outer(np.arange(6000) % 256, np.arange(8000) % 256).astype(np.uint8)
    Image.fromarray(ramp).convert("RGB").save(slow / "0-big.jpg", quality=95)
    bigs = [slow / f"{2 * i}-big.jpg" for i in range(4)]
    for big in bigs[1:]:
        shutil.copyfile(bigs[0], big)
    small = inputs / "files" / "img000.jpg"
    for i in range(4):
        shutil.copyfile(small, slow / f"{2 * i + 1}-small.jpg")
    paths = [slow, inputs / "files", inputs / "00000.tar"]
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "gitfast.tools.cli", "caption", *paths, "--out-dir", out, "--devices", "cpu,cpu",
            "--model", checkpoint, *ARGS]
    argv = [str(a) for a in argv]
    every = [s.id for s in sources.expand(paths)]
    rank0, rank1 = every[0::2], every[1::2]
    assert rank0[:4] == [str(b) for b in bigs]

    def start(*extra):
        return subprocess.Popen(argv + list(extra), stderr=subprocess.PIPE, text=True)

    def stop_rank0(proc):
        rank0 = [r for r in _children(proc.pid) if _comm(r) == "gitfast-rank0"]
        assert len(rank0) == 1
        os.kill(rank0[0], signal.SIGSTOP)

    def wait_for_records(proc, n, ok_only=False):
        deadline = time.monotonic() + 120
        while len([r for r in _records(out) if r["error"] is None or not ok_only]) < n:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)

    # 1. rank 1 finishes its half; rank 0, stopped, is killed (an OOM kill, say): the
    #    parent says what is missing and exits 1
    run = start()
    wait_for_records(run, 1)  # both ranks are ready: rank 0 is on its big pictures
    stop_rank0(run)
    wait_for_records(run, len(rank1))
    deadline = time.monotonic() + 60
    while len(alive := [r for r in _children(run.pid) if _alive(r)]) != 1:  # rank 1 exits when done
        assert time.monotonic() < deadline, alive
        time.sleep(0.05)
    os.kill(alive[0], signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    first = _records(out)
    got = sorted(r["source"] for r in first)
    finished0 = len(got) - len(rank1)
    assert got == sorted(rank1 + rank0[:finished0])  # a rank's results come in its input order
    assert f"device cpu stopped (exit code -9) with {len(rank0) - finished0} of its {len(rank0)} inputs" in err
    assert "rerun with --resume" in err

    # 2. the whole run is killed while it writes: its ranks die with it, nothing is left running
    run = start("--resume")
    before = sum(r["error"] is None for r in first)
    wait_for_records(run, before + 1, ok_only=True)
    ranks = _children(run.pid)
    assert len(ranks) == 2
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 10
    while any(_alive(r) for r in ranks):
        assert time.monotonic() < deadline, "a rank outlived its killed parent"
        time.sleep(0.05)

    # 3. the big pictures become small ones; resumed to the end: each source once, with one device's captions
    for big in bigs:
        shutil.copyfile(small, big)
    assert caption(checkpoint, *paths, "--out-dir", out, "--devices", "cpu,cpu", "--resume") == 1
    assert sorted(os.listdir(out)) == ["00000.parquet", "captions.parquet", "gitfast-settings.json"]
    shard = pq.read_table(out / "00000.parquet").to_pylist()
    plain = pq.read_table(out / "captions.parquet").to_pylist()
    want = dict(reference, **{str(p): reference[str(small)] for p in sorted(slow.iterdir())})
    assert sorted(r["source"] for r in shard + plain) == sorted(want)
    assert {r["source"]: (r["caption"], r["error"]) for r in shard + plain} == want
    # ranks finish in any interleaving; a finished shard is in its own order all the same
    assert [r["key"] for r in shard] == [f"{n:09d}" for n in range(9)] and shard[0]["json_caption"] == "alt text 0"


def test_workers_and_jpeg_draft_reach_the_captioner(checkpoint, inputs, tmp_path, monkeypatch):
    import gitfast.captioning.captioner as captioner_module

    seen = []
    real = captioner_module.Captioner

    class Spy(real):
        @functools.wraps(real.__init__)
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            raise ValueError("spy: stop here")

    monkeypatch.setattr(captioner_module, "Captioner", Spy)
    files = [inputs / "files" / "img000.jpg"]
    assert caption(checkpoint, *files, "--device", "cpu", "--workers", "3", "--jpeg-draft") == 2
    assert caption(checkpoint, *files, "--device", "cpu") == 2
    assert seen[0]["num_workers"] == 3 and seen[0]["jpeg_draft"] is True
    assert seen[1]["num_workers"] == 0 and seen[1]["jpeg_draft"] is False  # CPU default: decode in-process
    # on a GPU the default is min(8, cores - 1), split between the ranks sharing the machine
    monkeypatch.setattr(os, "cpu_count", lambda: 13)
    assert (cli_run.default_workers("cuda:0", 2), cli_run.default_workers("cuda:0", 1)) == (6, 8)
    assert cli_run.default_workers("cpu", 1) == 0
