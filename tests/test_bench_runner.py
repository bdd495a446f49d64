"""`gitfast bench` end to end on the CPU with stand-in suites (independent of the real suites)."""
import json
import logging
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
import textwrap
from pathlib import Path

import pytest
import torch

from gitfast.tools import cli
from gitfast.bench import ceilings, report, runner, timing

STANDIN = '''
import torch
from gitfast.bench.common import Case


def cases(quick, device, dtype):
    name = str(dtype).replace("torch.", "")
    for n in ((64, 128) if quick else (64, 128, 256)):
        x = torch.randn(n, n, device=device, dtype=dtype)
        shape = {"n": n}
        yield Case("toy_matmul", shape, "gitfast", name, lambda x=x: x @ x,
                   flops=2 * n ** 3, bytes=3 * n * n * x.element_size(), label=f"n{n}",
                   extra={"note": "stand-in"})
        yield Case("toy_matmul", shape, "torch", name, lambda x=x: torch.mm(x, x),
                   flops=2 * n ** 3, bytes=3 * n * n * x.element_size(), label=f"n{n}")
        yield Case("toy_matmul", shape, "flex", name, None, skip_reason="needs a GPU", label=f"n{n}")
    yield Case("toy_caption", {"b": 4}, "gitfast", name, lambda: torch.ones(4).sum(), label="B4",
               extra={"images": 4}, memory_fn=lambda: torch.ones(4))
    y = torch.randn(1000)
    yield Case("toy_scale", {"n": 1000}, "gitfast", name, lambda: y * 2, bytes=8000, label="n1000")
    yield Case("toy_scale", {"n": 1000}, "torch", name, lambda: (_ for _ in ()).throw(RuntimeError("boom")),
               label="n1000")
'''

BROKEN_IMPORT = "raise ImportError('half-written suite')\n"

BROKEN_CASES = '''
from gitfast.bench.common import Case


def cases(quick, device, dtype):
    yield Case("half", {"n": 1}, "gitfast", "float32", lambda: None, label="n1")
    raise ValueError("cases() blew up")
'''


@pytest.fixture
def suites(tmp_path, monkeypatch):
    pkg = tmp_path / "standin_suites"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bench_toy.py").write_text(textwrap.dedent(STANDIN))
    (pkg / "bench_broken.py").write_text(BROKEN_IMPORT)
    (pkg / "bench_halfway.py").write_text(BROKEN_CASES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(runner, "suite_modules", lambda: [
        ("broken", "standin_suites.bench_broken"),
        ("halfway", "standin_suites.bench_halfway"),
        ("toy", "standin_suites.bench_toy"),
    ])
    # tiny ceilings: the real measurement is tested on its own below
    fixed = ceilings.Ceilings("cpu", 0.01, {"float32": 0.05}, "float32")
    monkeypatch.setattr(runner.ceilings_mod, "measure", lambda device, dtypes, quick=False: fixed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # small BLAS calls stall for ms in OpenMP barriers on a busy CPU
    yield tmp_path
    torch.set_num_threads(threads)


def _bench(tmp_path, *extra):
    out = tmp_path / "out.json"
    code = cli.main(["bench", "--quick", "--device", "cpu", "--rep-ms", "5", "--out", str(out), *extra])
    return code, (json.loads(out.read_text()) if out.exists() else None)


REQUIRED = {"benchmark", "shape", "label", "provider", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
            "tflops", "tbps", "pct_of_peak", "status", "reason"}


def test_end_to_end(suites, capsys):
    md, plots = suites / "table.md", suites / "plots"
    code, res = _bench(suites, "--markdown", str(md), "--plots", str(plots))
    assert code == 1                                    # error rows present, but no crash
    assert res["format"] == runner.FORMAT
    env = res["environment"]
    for key in ("date", "torch", "triton", "transformers", "cpu", "commit", "gpu", "driver", "cpu_allocator"):
        assert key in env
    if platform.libc_ver()[0] == "glibc":  # CPU runs keep freed heap memory (see steady_cpu_allocator)
        assert env["cpu_allocator"].startswith("glibc mallopt")
    rows = res["rows"]
    assert all(REQUIRED <= set(r) for r in rows)
    by = {(r["benchmark"], r["label"], r["provider"]): r for r in rows}

    ok = by[("toy_matmul", "n64", "gitfast")]
    assert ok["status"] == "ok" and ok["shape"] == {"n": 64} and ok["device"] == "cpu"
    assert ok["dtype"] == "float32" and ok["note"] == "stand-in"
    assert 0 < ok["p20_ms"] <= ok["median_ms"] <= ok["p80_ms"]
    assert ok["tflops"] > 0 and ok["tbps"] > 0 and ok["pct_of_peak"] > 0 and ok["bound"] in ("compute", "memory")
    assert ok["intensity"] == pytest.approx(2 * 64 ** 3 / (3 * 64 * 64 * 4))
    assert by[("toy_scale", "n1000", "gitfast")]["tflops"] is None
    assert by[("toy_scale", "n1000", "gitfast")]["bound"] == "memory"

    cap = by[("toy_caption", "B4", "gitfast")]
    assert cap["images_per_s"] == pytest.approx(4 / (cap["median_ms"] * 1e-3))
    assert cap["peak_mem_gb"] is None                   # measured on CUDA only
    assert ok["images_per_s"] is None and "peak_mem_gb" in ok

    skipped = by[("toy_matmul", "n128", "flex")]
    assert skipped["status"] == "skipped" and skipped["reason"] == "needs a GPU" and skipped["median_ms"] is None
    failed = by[("toy_scale", "n1000", "torch")]
    assert failed["status"] == "error" and "boom" in failed["reason"]
    broken = [r for r in rows if r["suite"] == "broken"]
    assert len(broken) == 1 and broken[0]["status"] == "error" and "half-written suite" in broken[0]["reason"]
    halfway = [r for r in rows if r["suite"] == "halfway"]
    assert [r["status"] for r in halfway] == ["ok", "error"] and "blew up" in halfway[1]["reason"]

    text = md.read_text()
    assert "### toy_matmul (float32, median ms)" in text and "| n64 |" in text and "vs torch" in text
    assert "commit" in text and "skip" in text
    assert "### toy_caption (float32, images/s" in text
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert "roofline.png" in pngs and "toy_matmul_float32.png" in pngs
    assert (plots / "roofline.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr()
    assert "toy_matmul" in printed.out and "Errors:" in printed.out


def test_only_filters_by_suite_and_benchmark(suites, capsys):
    code, res = _bench(suites, "--only", "bench_toy")
    assert code == 1                                    # toy_scale/torch raises
    assert {r["suite"] for r in res["rows"]} == {"toy"}
    # named suites only: the others' cases are never built (they may load models)
    assert "blew up" not in capsys.readouterr().err
    code, res = _bench(suites, "--only", "toy_matmul")
    assert code == 0
    assert {r["benchmark"] for r in res["rows"]} == {"toy_matmul"}
    code, _ = _bench(suites, "--only", "no_such_suite")
    assert code == 2


@pytest.mark.parametrize("argv", [["bench", "--no-such-flag"], ["bench", "--dtype", "float64"],
                                  ["bench", "--device", "tpu"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_without_gpu_exits_2(tmp_path):
    assert cli.main(["bench", "--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2


def test_pytest_benchmark_runs_the_same_cases(suites, tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "path", list(sys.path))         # the nested session may prepend the repo
    out, junit = tmp_path / "pb.json", tmp_path / "junit.xml"
    code = pytest.main([str(repo / "bench"), "--benchmark-only", "-p", "no:cacheprovider", "-q",
                        "--benchmark-min-time=0.0001", "--benchmark-max-time=0.001", "--benchmark-min-rounds=2",
                        f"--benchmark-json={out}", f"--junitxml={junit}", f"--rootdir={repo}"])
    assert code == pytest.ExitCode.TESTS_FAILED
    suite = ET.parse(junit).getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    # toy: 6 timed, 2 flex skipped, 1 raising (failure); broken: import error; halfway: 1 timed + error
    assert counts == {"tests": 12, "failures": 1, "errors": 2, "skipped": 2}
    data = json.loads(out.read_text())
    info = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
    mm = info["test_case[toy_matmul-n64-gitfast-float32]"]
    assert mm["provider"] == "gitfast" and mm["shape"] == {"n": 64} and mm["tflops"] > 0


def test_quick_run_of_the_real_suites(tmp_path):
    """What CI runs: every suite's --quick cases on the CPU, no error rows (a subprocess without
    TRITON_INTERPRET, so gitfast's Triton providers are skipped rather than interpreted)."""
    suites = [n for n, _ in runner.suite_modules()]
    if not suites:
        pytest.skip("no bench_*.py suites yet")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GITFAST_BENCH_SUITES")}
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gitfast.bench.runner", "--quick", "--device", "cpu", "--threads", "1",
         "--rep-ms", "5", "--out", str(out), "--markdown", str(tmp_path / "q.md"), "--plots", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    errors = [f"{r['benchmark']} {r['label']} {r['provider']}: {r['reason']}" for r in rows if r["status"] == "error"]
    assert proc.returncode == 0 and not errors, "\n".join(errors) or proc.stderr[-3000:]
    assert {r["suite"] for r in rows} == set(suites)
    assert any(r["status"] == "ok" for r in rows) and (tmp_path / "roofline.png").exists()


def test_suite_discovery(monkeypatch):
    names = [n for n, _ in runner.suite_modules()]
    assert all(m.startswith("gitfast.bench.bench_") for _, m in runner.suite_modules())
    assert names == sorted(names)
    monkeypatch.setenv("GITFAST_BENCH_SUITES", "pkg.bench_one, other.two")
    assert runner.suite_modules() == [("one", "pkg.bench_one"), ("two", "other.two")]


def test_ceilings_measured_on_cpu():
    c = ceilings.measure("cpu", ["float32"], quick=True)
    assert c.bandwidth_tbps > 0 and c.matmul_tflops["float32"] > 0 and c.compute_dtype == "float32"
    pct, bound = ceilings.pct_of_peak(c, "float32", None, c.bandwidth_tbps / 2)
    assert pct == pytest.approx(50.0) and bound == "memory"
    assert ceilings.Ceilings.from_dict(c.as_dict()) == c


def test_timing_median_is_sane():
    t = timing.measure(lambda: __import__("time").sleep(0.002), "cpu", warmup_ms=2, rep_ms=20)
    assert t.method == "perf_counter" and t.samples >= 5
    assert 1.9 <= t.median_ms < 20 and t.p20_ms <= t.median_ms <= t.p80_ms
    fast = timing.measure(lambda: None, "cpu", warmup_ms=1, rep_ms=5)
    assert fast.calls_per_sample > 1 and 0 < fast.median_ms < 0.1
    assert timing.quantile([1, 2, 3, 4, 5], 0.5) == 3 and timing.quantile([0, 10], 0.2) == pytest.approx(2)


def test_rotating_cycles_through_input_sets():
    made = iter(range(100))
    r = timing.rotating(lambda: next(made), 3)
    assert len(r) == 3 and [r.next() for _ in range(5)] == [0, 1, 2, 0, 1]
    assert timing.copies_for(1, "cpu") == 64 and timing.copies_for(1 << 40, "cpu") == 1


def test_markdown_ratio():
    rows = [
        {**dict.fromkeys(runner.ROW_KEYS), "benchmark": "b", "label": "s", "provider": p, "dtype": "float32",
         "device": "cpu", "status": "ok", "median_ms": ms, "pct_of_peak": pct, "bound": "memory"}
        for p, ms, pct in (("gitfast", 1.0, 50.0), ("torch", 3.0, None), ("sdpa", 2.0, None))
    ]
    text = report.table(rows)
    assert "| s | 1.00 | 3.00 | 2.00 | 2.00× vs sdpa | 50% memory |" in text


# -- rows kept as they end, --skip-provider, torch.compile fallbacks (issue #18) ----------------------

def test_rows_are_written_as_each_ends_so_a_cut_run_keeps_them(suites, tmp_path, monkeypatch):
    real, timed = runner.time_case, []

    def cut_after_three(*args, **kwargs):
        if len(timed) == 3:
            raise KeyboardInterrupt  # the GPU script's `timeout` cutting the stage
        timed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "time_case", cut_after_three)
    out, lines = tmp_path / "out.json", tmp_path / "rows.jsonl"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["bench", "--quick", "--device", "cpu", "--rep-ms", "5", "--only", "toy", "--out", str(out),
                  "--jsonl", str(lines)])
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(rows) >= 3 and [r["provider"] for r in rows[:2]] == ["gitfast", "torch"]
    assert json.loads(out.read_text())["rows"] == rows


def test_skip_provider_leaves_a_provider_out(suites, tmp_path):
    code, res = _bench(tmp_path, "--only", "toy_matmul", "--skip-provider", "torch", "flex")
    by = {}
    for r in res["rows"]:
        by.setdefault(r["provider"], set()).add((r["status"], r["reason"]))
    assert by["torch"] == {("skipped", "--skip-provider")} and by["flex"] == {("skipped", "--skip-provider")}
    assert {s for s, _ in by["gitfast"]} == {"ok"} and code == 0
    assert "--skip-provider torch flex" in res["command"]


def test_recorded_command_names_output_files_without_their_folders(suites, tmp_path):
    """The command in the results reproduces the run on any machine: no scratch folder of the one it ran on."""
    code, res = _bench(tmp_path, "--only", "toy_matmul", "--markdown", str(tmp_path / "t.md"),
                       "--jsonl", str(tmp_path / "rows.jsonl"))
    assert code == 0
    assert "--out out.json" in res["command"] and "--markdown t.md" in res["command"]
    assert "--jsonl rows.jsonl" in res["command"] and str(tmp_path) not in res["command"]


def test_a_compiled_provider_that_ran_eagerly_is_labelled_so(suites, tmp_path, monkeypatch):
    real = runner.time_case

    def dynamo_gives_up(case, *args, **kwargs):
        if case.provider == "torch":  # what Dynamo logs when a function passes its recompile limit
            logging.getLogger("torch._dynamo.convert_frame").warning(
                "torch._dynamo hit config.recompile_limit (8)\n   function: 'f'")
        return real(case, *args, **kwargs)

    monkeypatch.setattr(runner, "time_case", dynamo_gives_up)
    _, res = _bench(tmp_path, "--only", "toy_matmul")
    providers = {r["provider"] for r in res["rows"]}
    assert "torch (eager fallback)" in providers and "torch" not in providers and "gitfast" in providers
    row = next(r for r in res["rows"] if r["provider"] == "torch (eager fallback)")
    assert "hit config.recompile_limit" in row["reason"]


def test_dynamo_limits_are_raised_and_a_real_limit_hit_is_seen():
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    from gitfast.bench import compile_guard

    # saved and put back by hand, not with monkeypatch: Dynamo's config values are not in the module's
    # __dict__, and pytest 9.2's monkeypatch deletes such an attribute on undo (every later
    # torch.compile then failed: "torch._dynamo.config.recompile_limit does not exist")
    names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
    saved = {name: getattr(dynamo_config, name) for name in names if hasattr(dynamo_config, name)}
    watch = None
    try:
        dynamo_config.recompile_limit = 8
        watch = compile_guard.watch_dynamo()
        assert dynamo_config.recompile_limit >= compile_guard.RECOMPILE_LIMIT
        dynamo_config.recompile_limit = 1  # now make Dynamo give up, as 20 cold compiles did at 8
        torch._dynamo.reset()
        f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
        for n in (3, 4, 5):
            f(torch.ones(n))
        assert watch.hits and "recompile_limit" in watch.hits[0]
        row = compile_guard.mark_fallback({"provider": "torch.compile", "status": "ok", "reason": None}, watch.hits)
        assert row["provider"] == "torch.compile (eager fallback)"
    finally:
        if watch is not None:
            logging.getLogger("torch._dynamo").removeHandler(watch)
        for name, value in saved.items():
            setattr(dynamo_config, name, value)
        torch._dynamo.reset()


def test_the_dynamo_limits_test_leaves_dynamo_usable_for_later_tests():
    """The test above, then a torch.compile test, in one pytest session (a fresh process): Dynamo's
    limits must still exist afterwards. Under pytest 9.2, monkeypatching them had deleted
    recompile_limit on undo, and every later torch.compile failed."""
    from gitfast import ops

    if not ops.extension_loaded():
        pytest.skip("the torch.compile test it runs after needs gitfast._C")
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{here}/test_bench_runner.py::test_dynamo_limits_are_raised_and_a_real_limit_hit_is_seen",
         f"{here}/test_ops.py::test_torch_compile_traces_the_ops"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_pipeline_rows_run_in_their_dtype_on_a_git_base_shape_on_gpus(monkeypatch):
    from gitfast.bench import bench_pipeline

    made = []

    class Stop(Exception):
        pass

    def stages(model, paths, new_tokens, batch, device, dtype=None):
        made.append((model, device, dtype))
        raise Stop

    monkeypatch.setattr(bench_pipeline, "Stages", stages)
    monkeypatch.setattr(bench_pipeline, "photo_folder", lambda n: [f"{i}.jpg" for i in range(n)])
    for device, dtype in (("cuda", torch.float16), ("cuda", torch.bfloat16), ("cpu", torch.float32)):
        with pytest.raises(Stop):
            list(bench_pipeline.cases(False, device, dtype))
    assert made == [("git-base", "cuda", torch.float16), ("git-base", "cuda", torch.bfloat16),
                    ("tiny", "cpu", torch.float32)]


def test_gpu_session_script_reports_every_stage_even_with_no_time_left(tmp_path):
    """The plumbing of bench/gpu_session.sh all (its full dry run takes minutes: GITFAST_DRY_RUN=1):
    with the session's time spent, every stage is reported skipped, in $OUT's few files and the table."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path), GITFAST_DRY_RUN="1", GITFAST_SESSION_S="5", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_session.sh"), "all"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = ["install", "build", "cuda_ext", "info", "cuda_tests", "sync", "fidelity", "e2e", "kernels"]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == stages and {r["status"] for r in rows} == {"skipped"}
    table = proc.stdout[proc.stdout.index("== gpu_session all"):]
    assert all(f"{s} " in table for s in stages)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "summary.txt" in files and "session.log" in files
