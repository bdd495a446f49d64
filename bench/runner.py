"""`gitfast bench`: run the benchmark suites, write JSON rows, a markdown table and PNG plots.

Suites are the modules ``gitfast.bench.bench_<name>``; each exposes
``cases(quick, device, dtype) -> Iterable[Case]`` (see ``gitfast.bench.common``). The runner measures
the device ceilings first, then times every case with ``gitfast.bench.timing.measure`` and writes one
row per case. A suite that fails to import or raises while yielding cases becomes an ``error`` row
and the run goes on; the exit status is 1 when any row is an error.

Rows are kept as they end: ``--jsonl FILE`` appends each row as one JSON line (flushed), and the
``--out`` JSON is rewritten after every row, so a run cut short still leaves what it measured.
``torch.compile`` baselines (Inductor, FlexAttention) compile once per shape: the runner raises
Dynamo's recompile limit for the run, and a case during which Dynamo still hit a limit (and so ran
eagerly under a compiled label) is relabelled ``<provider> (eager fallback)`` with the reason.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from gitfast.bench import ceilings as ceilings_mod
from gitfast.bench import environment, timing
from gitfast.bench.compile_guard import DynamoLimitWatch, mark_fallback, watch_dynamo
from gitfast.bench.common import Case

FORMAT = "gitfast-bench/1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SUITE_PREFIX = "bench_"
# Core row keys; a suite's `extra` field that collides with one is stored as "extra_<key>".
ROW_KEYS = (
    "benchmark", "label", "shape", "provider", "dtype", "device", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "min_ms", "samples", "calls_per_sample", "timing",
    "flops", "bytes", "tflops", "tbps", "intensity", "pct_of_peak", "bound", "suite",
    "images_per_s", "peak_mem_gb",
)


# -- discovery ------------------------------------------------------------------------------------

def suite_modules() -> list[tuple[str, str]]:
    """(suite name, module name) of every ``gitfast.bench.bench_*`` module, sorted by name.

    ``GITFAST_BENCH_SUITES=pkg.bench_a,pkg.bench_b`` replaces the discovery with those modules
    (suites kept outside gitfast, or stand-ins in tests).
    """
    override = os.environ.get("GITFAST_BENCH_SUITES")
    if override:
        modules = [m.strip() for m in override.split(",") if m.strip()]
        return [(_bare(m.rsplit(".", 1)[-1]), m) for m in modules]
    pkg = importlib.import_module("gitfast.bench")
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith(SUITE_PREFIX))
    return [(n[len(SUITE_PREFIX):], f"gitfast.bench.{n}") for n in names]


@dataclass
class Suite:
    name: str
    module: Any = None          # the imported module, or None when importing failed
    error: Optional[str] = None


def load_suites() -> list[Suite]:
    suites = []
    for name, module_name in suite_modules():
        try:
            module = importlib.import_module(module_name)
            if not callable(getattr(module, "cases", None)):
                raise AttributeError(f"{module_name} has no cases(quick, device, dtype) function")
            suites.append(Suite(name, module))
        except Exception as exc:  # a broken suite must not take the others down
            suites.append(Suite(name, error=_describe(exc)))
    return suites


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def iter_cases(suite: Suite, quick: bool, device: str, dtype: str) -> Iterator[Case | dict]:
    """The suite's cases; an import or generation failure is yielded as an error row (a dict)."""
    if suite.error is not None:
        yield error_row(suite.name, suite.name, dtype, device, f"import failed: {suite.error}")
        return
    try:
        for case in suite.module.cases(quick, device, DTYPES[dtype]):
            yield case
    except Exception as exc:
        yield error_row(suite.name, suite.name, dtype, device, f"cases() raised: {_describe(exc)}")


def _bare(name: str) -> str:
    return name[len(SUITE_PREFIX):] if name.startswith(SUITE_PREFIX) else name


def matching(only: Optional[list[str]], suite: str, benchmark: Optional[str] = None) -> set[str]:
    """The ``--only`` names that select this suite (or this benchmark of it)."""
    return {n for n in only or () if _bare(n) in (suite, benchmark)}


# -- rows -----------------------------------------------------------------------------------------

def error_row(suite: str, benchmark: str, dtype: str, device: str, reason: str, **fields) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(benchmark=benchmark, label="", shape={}, provider="-", dtype=dtype, device=device,
               suite=suite, status="error", reason=reason)
    row.update(fields)
    return row


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}{v}" for k, v in shape.items())


def case_row(case: Case, suite: str, device: str) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(benchmark=case.benchmark, label=case.label or shape_label(case.shape),
               shape=dict(case.shape), provider=case.provider, dtype=case.dtype, device=device,
               suite=suite, flops=case.flops, bytes=case.bytes)
    if case.flops and case.bytes:
        row["intensity"] = case.flops / case.bytes
    for key, value in case.extra.items():
        row[f"extra_{key}" if key in ROW_KEYS else key] = value
    return row


def time_case(case: Case, suite: str, device: str, budget: dict,
              ceilings: Optional[ceilings_mod.Ceilings]) -> dict:
    row = case_row(case, suite, device)
    if case.fn is None:
        row.update(status="skipped", reason=case.skip_reason or "no reason given")
        return row
    try:
        t = timing.measure(case.fn, device, **budget)
    except Exception as exc:
        row.update(status="error", reason=_describe(exc))
        if timing.is_cuda(device):
            try:                                 # drain the stream; a sticky CUDA error raises again
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as again:
                row["reason"] += f" (then: {_describe(again)})"
        return row
    row.update(status="ok", median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, min_ms=t.min_ms,
               samples=t.samples, calls_per_sample=t.calls_per_sample, timing=t.method)
    if t.note:
        row["reason"] = t.note
    seconds = t.median_ms * 1e-3
    if case.flops:
        row["tflops"] = case.flops / seconds / 1e12
    if case.bytes:
        row["tbps"] = case.bytes / seconds / 1e12
    row["pct_of_peak"], row["bound"] = ceilings_mod.pct_of_peak(ceilings, case.dtype, row["tflops"], row["tbps"])
    if isinstance(row.get("images"), (int, float)):
        row["images_per_s"] = row["images"] / seconds
    if case.memory_fn is not None and timing.is_cuda(device):
        try:
            row["peak_mem_gb"] = timing.peak_memory_bytes(case.memory_fn, device) / 1e9
        except Exception as exc:
            row["reason"] = (row.get("reason") or "") + f" peak memory not measured: {_describe(exc)}"
    return row


# -- the command ----------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and short timing budgets (what CI runs on the CPU)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these suites (e.g. attention or bench_attention) or benchmarks")
    parser.add_argument("--out", default="bench-results.json", metavar="FILE",
                        help="JSON results file (default: %(default)s), rewritten after every row")
    parser.add_argument("--jsonl", metavar="FILE",
                        help="also append every row to FILE as one JSON line the moment it ends")
    parser.add_argument("--skip-provider", nargs="+", metavar="NAME", default=[],
                        help="do not run these providers (e.g. flex torch.compile); their rows say skipped")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="dtypes to run (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the results as a markdown table")
    parser.add_argument("--plots", metavar="DIR", help="also write PNG plots (time vs size, roofline)")
    parser.add_argument("--rep-ms", type=float, metavar="MS",
                        help="timing budget per case in ms (default: 100 cuda, 50 cpu --quick, 300 cpu)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (torch.set_num_threads); 1 is steadier on a shared machine")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")


def run(args: argparse.Namespace) -> int:
    from gitfast.bench import report

    if args.list:
        for suite in load_suites():
            if suite.error is None:
                doc = (suite.module.__doc__ or "").strip().splitlines()
                print(f"{suite.name:16s} {doc[0] if doc else ''}")
            else:
                print(f"{suite.name:16s} import error: {suite.error}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gitfast bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtypes = args.dtype or (["float16"] if device == "cuda" else ["float32"])
    allocator = timing.steady_cpu_allocator() if device == "cpu" else "default"
    if args.threads is not None:
        if args.threads < 1:
            print("gitfast bench: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    budget = timing.default_budget(device, args.quick)
    if args.rep_ms is not None:
        budget["rep_ms"] = args.rep_ms
        budget["warmup_ms"] = min(budget["warmup_ms"], args.rep_ms)

    # a suite that failed to import is only reported when it was asked for (or nothing was named)
    suites = [s for s in load_suites() if not args.only or s.error is None or matching(args.only, s.name)]
    if args.only and all(any(matching([n], s.name) for s in suites) for n in args.only):
        # only suite names: leave the other suites alone (building their cases can load models and
        # allocate caches; e2e at full size holds gigabytes)
        suites = [s for s in suites if matching(args.only, s.name)]
    for s in suites:
        if s.error is not None:
            _log(f"suite {s.name}: import failed: {s.error}")

    started = time.perf_counter()
    _log(f"measuring ceilings on {device} ...")
    ceilings = ceilings_mod.measure(device, dtypes, quick=args.quick)
    _log(f"ceilings: copy {ceilings.bandwidth_tbps * 1e3:.1f} GB/s, matmul "
         + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in ceilings.matmul_tflops.items()))
    results = {
        "format": FORMAT,
        "command": _command(args, device, dtypes),
        "quick": bool(args.quick),
        "environment": {**environment.collect(device), "cpu_allocator": allocator},
        "ceilings": ceilings.as_dict(),
        "suites": [s.name for s in suites],
        "rows": [],
    }
    out = Path(args.out)
    jsonl = open(args.jsonl, "a") if args.jsonl else None
    watch = watch_dynamo()
    matched: set[str] = set()
    for suite in suites:
        for dtype in dtypes:
            for row in _run_suite(suite, args.only, args.quick, device, dtype, budget, ceilings, matched,
                                  set(args.skip_provider), watch):
                results["rows"].append(row)
                _log(_progress(row))
                _write_json(out, results)
                if jsonl is not None:
                    jsonl.write(json.dumps(row, default=str) + "\n")
                    jsonl.flush()
        if device == "cuda":
            torch.cuda.empty_cache()
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    _write_json(out, results)
    if jsonl is not None:
        jsonl.close()
    if watch is not None:
        logging.getLogger("torch._dynamo").removeHandler(watch)

    rows = results["rows"]
    if args.only:
        unmatched = [n for n in args.only if n not in matched]
        for name in unmatched:
            _log(f"--only {name}: no suite or benchmark by that name")
        if len(unmatched) == len(args.only):
            return 2
    if args.markdown:
        Path(args.markdown).write_text(report.markdown(results))
    if args.plots:
        for path in report.plots(results, args.plots):
            _log(f"wrote {path}")
    print(report.markdown(results, short=True))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    _log(f"{len(rows)} rows ({counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} error) "
         f"in {results['elapsed_s']} s -> {out}")
    return 1 if counts["error"] else 0


def _run_suite(suite: Suite, only, quick: bool, device: str, dtype: str, budget: dict,
               ceilings, matched: set, skip: frozenset = frozenset(),
               watch: Optional[DynamoLimitWatch] = None) -> Iterable[dict]:
    whole = matching(only, suite.name)
    for item in iter_cases(suite, quick, device, dtype):
        if isinstance(item, dict):           # the suite itself failed
            if only and not whole:
                _log(f"suite {suite.name} ({dtype}): {item['reason']}")
                return
            matched.update(whole)
            yield item
            return
        names = whole | matching(only, suite.name, item.benchmark)
        if only and not names:
            continue
        matched.update(names)
        if item.provider in skip:
            row = case_row(item, suite.name, device)
            row.update(status="skipped", reason="--skip-provider")
            yield row
            continue
        if watch is not None:
            watch.hits.clear()
        row = time_case(item, suite.name, device, budget, ceilings)
        yield mark_fallback(row, watch.hits if watch is not None else [])


def _command(args: argparse.Namespace, device: str, dtypes: list[str]) -> str:
    """The `gitfast bench` command that reproduces the run. Output files are named by their file name
    alone: where one machine put them is no part of the measurement."""
    parts = ["gitfast", "bench"] + (["--quick"] if args.quick else [])
    if args.only:
        parts += ["--only", *args.only]
    parts += ["--device", device, "--dtype", *dtypes, "--out", _file_name(args.out)]
    if args.jsonl:
        parts += ["--jsonl", _file_name(args.jsonl)]
    if args.skip_provider:
        parts += ["--skip-provider", *args.skip_provider]
    if args.rep_ms is not None:
        parts += ["--rep-ms", f"{args.rep_ms:g}"]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.markdown:
        parts += ["--markdown", _file_name(args.markdown)]
    if args.plots:
        parts += ["--plots", _file_name(args.plots)]
    return " ".join(shlex.quote(p) for p in parts)


def _file_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


def _progress(row: dict) -> str:
    head = f"{row['benchmark']} [{row['label']}] {row['provider']} {row['dtype']}"
    if row["status"] == "ok":
        extra = f" ({row['pct_of_peak']:.0f}% of {row['bound']} ceiling)" if row["pct_of_peak"] else ""
        return f"{head}: {row['median_ms']:.4g} ms{extra}"
    return f"{head}: {row['status']}: {row['reason']}"


def _write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(path)


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m gitfast.bench.runner`` (same as ``gitfast bench``)."""
    parser = argparse.ArgumentParser(prog="gitfast bench")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
