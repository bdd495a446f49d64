"""`gitfast caption`: inputs (folders, globs, files), records and their order, exit statuses, outputs
(stdout JSONL, JSONL, CSV, Parquet) and --resume after a killed run."""
import csv
import importlib.util
import io
import json
import os
import sys

import pytest

from gitfast import Captioner
from gitfast.tools import cli
from gitfast.captioning import cli as caption_cli
from image_factory import broken_files, mode_images, write_files

GOOD = sorted(mode_images())
BAD = sorted(broken_files())


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """photos/: good images of every mode and broken ones, a nested folder, a skipped .txt and hidden file."""
    root = tmp_path_factory.mktemp("tree")
    photos = root / "photos"
    write_files(str(photos), {**mode_images(), **broken_files()})
    write_files(str(photos / "nested" / "deeper"), {"inner.png": mode_images()["rgb.png"]})
    write_files(str(photos), {"notes.txt": b"not an image extension: skipped in folders",
                              ".hidden.png": mode_images()["rgb.png"]})
    expected = [str(photos / n) for n in sorted(GOOD + BAD)] + [str(photos / "nested" / "deeper" / "inner.png")]
    return root, photos, expected


@pytest.fixture(scope="module")
def captions(checkpoint, tree):
    """What the Python API says for every image in the tree: the CLI must write exactly this."""
    _, _, expected = tree
    return {r.source: r for r in Captioner(checkpoint, device="cpu").caption(expected, max_new_tokens=6)}


def caption(checkpoint, *argv, model=True):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    extra = ["--model", checkpoint, "--max-new-tokens", "6", "--batch-size", "4"] if model else []
    return caption_cli.run(parser.parse_args([str(a) for a in argv] + extra))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_records(records, expected_sources, captions):
    assert [r["source"] for r in records] == expected_sources
    for r in records:
        want = captions[r["source"]]
        assert (r["caption"], r["error"]) == (want.text, want.error), r["source"]


def test_folder_to_jsonl_with_error_records_and_exit_1(checkpoint, tree, captions, tmp_path, capsys):
    _, photos, expected = tree
    out = tmp_path / "out.jsonl"
    assert caption(checkpoint, photos, "--out", out, "--quiet") == 1
    records = read_jsonl(out)
    check_records(records, expected, captions)
    failed = {os.path.basename(r["source"]): r["error"] for r in records if r["error"]}
    assert sorted(failed) == BAD
    assert "empty" in failed["empty.png"] and "not an image" in failed["text_renamed.jpg"]
    assert "decode" in failed["truncated.jpg"]
    assert all(isinstance(r["caption"], str) for r in records if not r["error"])
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith(f"gitfast caption: {len(GOOD) + 1} captioned, {len(BAD)} failed, 0 skipped")
    assert "images/s" in summary


def test_stdout_jsonl_without_out_and_exit_0(checkpoint, tree, captions, capsys):
    _, photos, _ = tree
    good = [str(photos / n) for n in GOOD[:3]]
    assert caption(checkpoint, *good) == 0
    captured = capsys.readouterr()
    check_records([json.loads(line) for line in captured.out.splitlines()], good, captions)
    assert "3 captioned, 0 failed" in captured.err


def test_globs_and_explicit_files(checkpoint, tree, captions, tmp_path):
    root, photos, _ = tree
    out = tmp_path / "g.jsonl"
    # a glob takes image files only; a file named explicitly is taken whatever its extension
    assert caption(checkpoint, f"{photos}/*.png", photos / "notes.txt", f"{root}/**/inner.png", "--out", out) == 1
    records = read_jsonl(out)
    pngs = [str(photos / n) for n in sorted(GOOD + BAD) if n.endswith(".png")]
    assert [r["source"] for r in records] == pngs + [str(photos / "notes.txt"), str(photos / "nested/deeper/inner.png")]
    assert records[-2]["error"] and records[-1]["caption"] == captions[records[-1]["source"]].text


def test_prompt_flag(checkpoint, tree, tmp_path):
    _, photos, _ = tree
    good = [str(photos / n) for n in GOOD[:4]]
    out = tmp_path / "vqa.jsonl"
    assert caption(checkpoint, *good, "--prompt", "what color is it?", "--out", out) == 0
    want = Captioner(checkpoint, device="cpu").caption(good, "what color is it?", max_new_tokens=6)
    assert [r["caption"] for r in read_jsonl(out)] == [w.text for w in want]


@pytest.mark.parametrize("name,flags", [("out.csv", []), ("table.txt", ["--format", "csv"])])
def test_csv_output(checkpoint, tree, captions, tmp_path, name, flags):
    _, photos, expected = tree
    out = tmp_path / name
    assert caption(checkpoint, photos, "--out", out, *flags) == 1
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    records = [{"source": r["source"], "caption": r["caption"] if not r["error"] else None, "error": r["error"] or None}
               for r in rows]
    check_records(records, expected, captions)


def test_parquet_output_and_resume(checkpoint, tree, captions, tmp_path):
    import pyarrow.parquet as pq

    _, photos, expected = tree
    out = tmp_path / "out.parquet"
    first = expected[2:7]  # a failure (empty.png) in the middle: on resume it is retried, so it moves back
    assert not captions[first[2]].ok
    assert caption(checkpoint, *first, "--out", out) == 1
    check_records(pq.read_table(out).to_pylist(), first, captions)
    assert sorted(os.listdir(tmp_path)) == ["out.parquet", "out.parquet.settings.json"]  # no journal or temporary file left behind
    # a killed resumed run leaves its journal (whole lines, then a torn one) beside the untouched Parquet file
    journaled = expected[0]
    (tmp_path / "out.parquet.partial.jsonl").write_text(
        json.dumps({"source": journaled, "caption": "from the journal", "error": None}) + '\n{"source": "x", "capt')
    assert caption(checkpoint, photos, "--out", out, "--resume") == 1
    records = pq.read_table(out).to_pylist()
    assert sorted(r["source"] for r in records) == sorted(expected)  # each once; failures retried, not duplicated
    assert records[len(first) - 1] == {"source": journaled, "caption": "from the journal", "error": None}
    del records[len(first) - 1]
    check_records(records, [s for s in first if captions[s].ok]
                  + [s for s in expected if s != journaled and (s not in first or not captions[s].ok)], captions)
    assert sorted(os.listdir(tmp_path)) == ["out.parquet", "out.parquet.settings.json"]


def test_resume_after_a_killed_run(checkpoint, tree, captions, tmp_path, capsys):
    _, photos, expected = tree
    out = tmp_path / "out.jsonl"
    assert caption(checkpoint, photos, "--out", out) == 1
    full = out.read_text().splitlines(keepends=True)
    ok = [line for line in full if json.loads(line)["error"] is None]
    failed = [line for line in full if json.loads(line)["error"] is not None]
    lost = json.loads(ok[1])
    lost["caption"], lost["error"] = None, "RuntimeError: out of memory"  # a failure worth retrying
    # a killed run: some successes, one failed record, one real failure, and a torn last line
    out.write_text(ok[0] + json.dumps(lost) + "\n" + failed[0] + ok[2] + ok[3][: len(ok[3]) // 2])
    capsys.readouterr()
    assert caption(checkpoint, photos, "--out", out, "--resume", "--quiet") == 1
    records = read_jsonl(out)
    sources = [r["source"] for r in records]
    assert sorted(sources) == sorted(expected) and len(set(sources)) == len(sources)
    kept = [json.loads(ok[0])["source"], json.loads(ok[2])["source"]]
    assert sources[:2] == kept  # earlier successes stay first, untouched
    check_records(records, kept + [s for s in expected if s not in kept], captions)
    assert "captioned" in capsys.readouterr().err
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))

    # everything already done: nothing to do, exit 0, file unchanged
    good_only = tmp_path / "good.jsonl"
    good_paths = [str(photos / n) for n in GOOD[:3]]
    assert caption(checkpoint, *good_paths, "--out", good_only) == 0
    before = good_only.read_bytes()
    assert caption(checkpoint, *good_paths, "--out", good_only, "--resume") == 0
    assert good_only.read_bytes() == before
    assert "0 captioned, 0 failed, 3 skipped" in capsys.readouterr().err


def test_resume_refuses_a_file_that_is_not_its_output(checkpoint, tree, tmp_path, capsys):
    _, photos, _ = tree
    out = tmp_path / "other.jsonl"
    out.write_text('{"source": "a", "caption": "x", "error": null}\nnot json\n{"source": "b"}\n')
    assert caption(checkpoint, photos, "--out", out, "--resume") == 2
    assert "other.jsonl:2 is not a JSON record" in capsys.readouterr().err
    assert out.read_text().count("\n") == 3  # untouched


@pytest.mark.parametrize("argv,message", [
    (["{missing}"], "no such file or folder"),
    (["{empty}"], "no images found"),
    (["{photos}/*.nothing"], "matches nothing"),
    (["{photos}", "--model", "{missing}"], "neither a local folder nor a model"),
    (["{photos}", "--format", "parquet"], "parquet output needs --out"),
    (["{photos}", "--resume"], "--resume needs --out"),
    (["{photos}", "--out", "{existing}"], "exists; pass --resume"),
    (["{photos}", "--device", "tpu9"], "device"),
])
def test_usage_errors_exit_2_before_any_work(checkpoint, tree, tmp_path, capsys, argv, message):
    _, photos, _ = tree
    (tmp_path / "empty").mkdir()
    (tmp_path / "existing.jsonl").write_text('{"source": "x", "caption": "y", "error": null}\n')
    names = dict(missing=tmp_path / "missing", empty=tmp_path / "empty", photos=photos,
                 existing=tmp_path / "existing.jsonl")
    argv = [a.format(**names) for a in argv]
    if "--model" not in argv:
        argv += ["--model", checkpoint]
    assert caption(checkpoint, *argv, model=False) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("gitfast caption: error:")
    assert (tmp_path / "existing.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("argv", [["--bogus"], ["--format", "xml"], ["--batch-size", "0"], ["--workers", "-1"],
                                  ["--out", "a.jsonl", "--out-dir", "d"], ["--device", "cpu", "--devices", "cpu,cpu"]])
def test_bad_flags_exit_2(checkpoint, tree, capsys, argv):
    _, photos, _ = tree
    with pytest.raises(SystemExit) as exc:
        caption(checkpoint, photos, *argv, model=False)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_no_inputs_at_all_exit_2(checkpoint, capsys):
    assert caption(checkpoint) == 2
    assert "nothing to caption: give PATHs, or --files-from" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gitfast.tools.info") is None,
                    reason="gitfast/tools/cli.py imports every subcommand and gitfast.tools.info does not exist yet")
def test_dispatched_by_the_gitfast_command(checkpoint, tree, captions, capsys):
    _, photos, _ = tree
    good = str(photos / GOOD[0])
    assert cli.main(["caption", good, "--model", checkpoint, "--max-new-tokens", "6"]) == 0
    assert json.loads(capsys.readouterr().out) == {"source": good, "caption": captions[good].text, "error": None}


def test_csv_on_stdout(checkpoint, tree, captions, capsys):
    _, photos, _ = tree
    paths = [str(photos / n) for n in (GOOD[0], BAD[0])]
    assert caption(checkpoint, *paths, "--format", "csv") == 1
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows == [["source", "caption", "error"], [paths[0], captions[paths[0]].text, ""],
                    [paths[1], "", captions[paths[1]].error]]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal_unless_quiet(checkpoint, tree, monkeypatch, quiet):
    _, photos, _ = tree
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert caption(checkpoint, photos / GOOD[0], photos / GOOD[1], *(["--quiet"] if quiet else [])) == 0
    assert ("img/s" in err.getvalue()) != quiet
    assert "2 captioned, 0 failed" in err.getvalue().splitlines()[-1]
