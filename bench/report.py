"""Results → a markdown table and PNG plots.

Table: one per (benchmark, dtype), a line per shape with each provider's median time, the speed-up of
gitfast over the best other provider measured in the same run (``best other median / gitfast median``,
so > 1 means gitfast is faster) and gitfast's % of the measured ceiling that binds it.
Plots: time vs shape per provider for each benchmark, and a roofline of the gitfast rows.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from gitfast.bench.ceilings import Ceilings


def is_gitfast(provider: str) -> bool:
    return provider == "gitfast" or provider.startswith("gitfast")


def _ms(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return ""
    if row["status"] == "ok":
        return _ms(row["median_ms"])
    return "skip" if row["status"] == "skipped" else "**error**"


def _groups(rows: list[dict]) -> "OrderedDict[tuple[str, str], list[dict]]":
    groups: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
    for row in rows:
        if row["provider"] == "-":          # suite-level error rows: listed separately
            continue
        groups.setdefault((row["benchmark"], row["dtype"]), []).append(row)
    return groups


def _providers(rows: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["provider"] for r in rows))
    return [p for p in seen if is_gitfast(p)] + [p for p in seen if not is_gitfast(p)]


def _best(rows: list[dict], want_gitfast: bool) -> Optional[dict]:
    ok = [r for r in rows if r["status"] == "ok" and is_gitfast(r["provider"]) == want_gitfast]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def table(rows: list[dict]) -> str:
    """The per-benchmark markdown tables (no header)."""
    parts = []
    for (benchmark, dtype), group in _groups(rows).items():
        providers = _providers(group)
        by_label: OrderedDict[str, dict[str, dict]] = OrderedDict()
        for r in group:
            by_label.setdefault(r["label"], {})[r["provider"]] = r
        head = ["shape", *providers, "gitfast speed-up", "% of peak"]
        lines = [f"### {benchmark} ({dtype}, median ms)", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, cells in by_label.items():
            mine = _best(list(cells.values()), True)
            other = _best(list(cells.values()), False)
            ratio = f"{other['median_ms'] / mine['median_ms']:.2f}× vs {other['provider']}" if mine and other else ""
            pct = ""
            if mine and mine.get("pct_of_peak") is not None:
                pct = f"{mine['pct_of_peak']:.0f}% {mine['bound']}"
            lines.append("| " + " | ".join([label, *(_cell(cells.get(p)) for p in providers), ratio, pct]) + " |")
        parts.append("\n".join(lines))
        if any(r.get("images_per_s") for r in group):
            parts.append(_throughput(benchmark, dtype, by_label, providers))
    return "\n\n".join(parts)


def _throughput(benchmark: str, dtype: str, by_label, providers) -> str:
    """Images/s per provider, and peak memory above the resident weights where it was measured."""
    def cell(r):
        if not r or not r.get("images_per_s"):
            return "skip" if r and r["status"] == "skipped" else ""
        mem = f", {r['peak_mem_gb']:.2f} GB" if r.get("peak_mem_gb") is not None else ""
        return f"{r['images_per_s']:.4g}{mem}"

    lines = [f"### {benchmark} ({dtype}, images/s; peak GB above the weights where measured)", "",
             "| " + " | ".join(["shape", *providers]) + " |", "|" + "---|" * (len(providers) + 1)]
    for label, cells in by_label.items():
        lines.append("| " + " | ".join([label, *(cell(cells.get(p)) for p in providers)]) + " |")
    return "\n".join(lines)


def problems(rows: list[dict]) -> str:
    """Bullet list of error (and skipped) rows with their reasons."""
    lines = []
    for r in rows:
        if r["status"] == "ok":
            continue
        where = r["benchmark"] if r["provider"] == "-" else f"{r['benchmark']} [{r['label']}] {r['provider']}"
        lines.append(f"- {r['status']}: {where} ({r['dtype']}): {r['reason']}")
    return "\n".join(lines)


def header(results: dict) -> str:
    env, c = results.get("environment", {}), results.get("ceilings")
    device = env.get("gpu") or (f"CPU {env.get('cpu')} ({env.get('cpu_count')} cores visible, torch threads: "
                                f"{env.get('torch_threads')}; allocator: {env.get('cpu_allocator', 'default')})")
    lines = [
        f"- device: {device}" + (f", driver {env['driver']}, CUDA {env.get('cuda')}" if env.get("driver") else ""),
        f"- date: {env.get('date')}; commit {env.get('commit')}" + (" (uncommitted changes)" if env.get("dirty") else ""),
        f"- torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
        f"python {env.get('python')}",
        f"- command: `{results.get('command')}`",
    ]
    if c:
        mm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in c["matmul_tflops"].items())
        lines.append(f"- measured ceilings: copy {c['bandwidth_tbps']:.3g} TB/s (read + written); matmul {mm}")
    return "\n".join(lines)


def markdown(results: dict, short: bool = False) -> str:
    rows = results.get("rows", [])
    body = table(rows) or "(no rows)"
    issues = problems(rows)
    if short:
        errors = "\n".join(l for l in issues.splitlines() if l.startswith("- error"))
        return body + ("\n\nErrors:\n" + errors if errors else "") + "\n"
    text = "# gitfast benchmark results\n\n" + header(results) + "\n\n" + body + "\n"
    if issues:
        text += "\n### Skipped and failed\n\n" + issues + "\n"
    return text


# -- plots ----------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "bench"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot global state

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_times(benchmark: str, dtype: str, rows: list[dict], path: Path) -> bool:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig = _figure(max(6.0, 0.6 * len(labels) + 3), 4.2)
    ax = fig.add_subplot()
    for provider in _providers(rows):
        mine = [r for r in ok if r["provider"] == provider]
        if not mine:
            continue
        ys = [r["median_ms"] for r in mine]
        spread = [[y - r["p20_ms"] for y, r in zip(ys, mine)], [r["p80_ms"] - y for y, r in zip(ys, mine)]]
        ax.errorbar([labels.index(r["label"]) for r in mine], ys, yerr=spread, marker="o", capsize=3,
                    linewidth=2.2 if is_gitfast(provider) else 1.2, label=provider)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time per call (ms): median, p20-p80")
    ax.set_title(f"{benchmark} ({dtype}) on {rows[0]['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def plot_roofline(results: dict, path: Path) -> bool:
    c = results.get("ceilings")
    if not c:
        return False
    ceil = Ceilings.from_dict(c)
    mine = [r for r in results.get("rows", []) if r["status"] == "ok" and is_gitfast(r["provider"])]
    fig = _figure(11, 4.8)
    roof, bars = fig.subplots(1, 2, width_ratios=[3, 2])
    # -- roofline: rows with both flops and bytes --
    points = [r for r in mine if r.get("tflops") and r.get("tbps")]
    lo = min([0.1] + [r["intensity"] for r in points]) / 2
    hi = max([1000.0] + [r["intensity"] for r in points]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for dtype, peak in ceil.matmul_tflops.items():
        roof.plot(xs, [min(peak, x * ceil.bandwidth_tbps) for x in xs], linewidth=1,
                  label=f"ceiling: copy {ceil.bandwidth_tbps:.3g} TB/s, {dtype} matmul {peak:.3g} TFLOP/s")
    for benchmark in dict.fromkeys(r["benchmark"] for r in points):
        pts = [r for r in points if r["benchmark"] == benchmark]
        roof.scatter([r["intensity"] for r in pts], [r["tflops"] for r in pts], s=22, zorder=3, label=benchmark)
    roof.set_xscale("log")
    roof.set_yscale("log")
    roof.set_xlabel("arithmetic intensity (FLOP / byte)")
    roof.set_ylabel("achieved TFLOP/s")
    roof.set_title(f"gitfast kernels vs measured ceilings ({ceil.device})")
    roof.grid(True, which="both", alpha=0.3)
    roof.legend(fontsize=7)
    if not points:
        roof.text(0.5, 0.5, "no gitfast rows with both FLOPs and bytes", transform=roof.transAxes,
                  ha="center", fontsize=9)
    # -- % of the binding ceiling, every gitfast row that has one --
    pct = [r for r in mine if r.get("pct_of_peak") is not None][:40]
    names = [f"{r['benchmark']} {r['label']} {r['dtype']}" for r in pct]
    bars.barh(range(len(pct)), [r["pct_of_peak"] for r in pct],
              color=["tab:blue" if r["bound"] == "memory" else "tab:orange" for r in pct])
    bars.set_yticks(range(len(pct)), names, fontsize=6)
    bars.invert_yaxis()
    bars.set_xlim(0, max([100.0] + [1.1 * r["pct_of_peak"] for r in pct]))
    if not pct:
        bars.text(0.5, 0.5, "no timed gitfast rows with FLOPs or bytes", transform=bars.transAxes,
                  ha="center", fontsize=9)
    bars.set_xlabel("% of binding ceiling\n(blue: bandwidth, orange: compute)")
    bars.set_title("gitfast: % of peak")
    bars.grid(True, axis="x", alpha=0.3)
    fig.savefig(path)
    return True


def plots(results: dict, out_dir: str | Path) -> list[Path]:
    """Write ``<benchmark>_<dtype>.png`` per benchmark and ``roofline.png``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (benchmark, dtype), rows in _groups(results.get("rows", [])).items():
        path = out / f"{_slug(benchmark)}_{dtype}.png"
        if plot_times(benchmark, dtype, rows, path):
            written.append(path)
    path = out / "roofline.png"
    if plot_roofline(results, path):
        written.append(path)
    return written
