"""fp32 Linear layers at decode rows on the CPU: gitfast._C's linear_fp32 against F.linear (MKL).

One call is y = x W^T + b at git-base's decoder shapes (QKV 768 -> 2304, MLP 768 -> 3072 and
3072 -> 768) for 1 to 32 rows: a decode step of that many sequences reads each weight once, so the
weights rotate through copies larger than the last-level cache (as a step's 25 layers find them) and
bytes are the weight's. Quick mode: two shapes with odd sizes.

Providers: ``gitfast`` (``torch.ops.gitfast.linear_fp32``, the kernel ops.Linear takes at up to
``fp32_backends.NARROW_MAX_ROWS`` rows where it measured faster) and ``torch`` (``F.linear``).
The runner times each case on its own; ratios on a shared CPU need the two interleaved, which
``main`` does (thread CPU time unless ``--wall``)::

    python -m gitfast.bench.bench_linear_fp32 --threads 1 --rounds 21 --head
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Iterable

import torch
import torch.nn.functional as F

from .common import Case
from .timing import copies_for, rotating

SUITE = "linear_fp32"


def _shapes(quick: bool):
    if quick:
        return [(1, 37, 70), (8, 77, 130)]
    return [(rows, k, n) for k, n in ((768, 3072), (3072, 768), (768, 2304)) for rows in (1, 2, 4, 8, 16, 32)]


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    from gitfast import ops

    dt = str(dtype).replace("torch.", "")
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        yield Case(SUITE, {}, "gitfast", dt, None, skip_reason="the fp32 kernel is a CPU fp32 op")
        return
    kernel = ops.extension_loaded() and hasattr(torch.ops.gitfast, "linear_fp32")
    for rows, k, n in _shapes(quick):
        shape = {"rows": rows, "in": k, "out": n}
        torch.manual_seed(rows + k)
        sets = rotating(lambda: (torch.randn(rows, k), torch.randn(n, k), torch.randn(n)),
                        copies_for(4.0 * n * k, device))

        def case(provider, fn, reason=None):
            return Case(SUITE, shape, provider, dt, fn if reason is None else None, flops=2.0 * rows * k * n,
                        bytes=4.0 * (n * k + rows * (k + n) + n), skip_reason=reason, label=f"{rows}x{k}->{n}")

        yield case("gitfast", lambda: torch.ops.gitfast.linear_fp32(*sets.next()),
                   None if kernel else "gitfast._C is not built with linear_fp32")
        yield case("torch", lambda: F.linear(*sets.next()))


# -- interleaved pairs and a decode step's share (python -m gitfast.bench.bench_linear_fp32) ---------

def _clock(cpu_time: bool):
    # thread CPU time: on a core time-sliced with other jobs, the wall clock counts their turns too
    return time.thread_time if cpu_time else time.perf_counter


def pairs(rounds: int, cpu_time: bool, head: bool) -> list:
    """Kernel and F.linear called in turn (A B A B ...), weights rotated through 100 MB of copies;
    per (shape, rows) the median times and the median of the per-round ratios."""
    clock, rows_out = _clock(cpu_time), []
    for k, n in ((768, 3072), (3072, 768), (768, 2304)) + (((768, 30522),) if head else ()):
        copies = max(2, int(100e6 // (4 * n * k)))
        ws, b = [torch.randn(n, k) for _ in range(copies)], torch.randn(n)
        for rows in (1, 2, 4, 8, 16, 32):
            x, ta, tb = torch.randn(rows, k), [], []
            for i in range(rounds):
                for fn, w, out in ((torch.ops.gitfast.linear_fp32, ws[i % copies], ta),
                                   (F.linear, ws[(i + copies // 2) % copies], tb)):
                    t0 = clock()
                    fn(x, w, b)
                    out.append(clock() - t0)
            rows_out.append(dict(shape=f"{k}->{n}", rows=rows, kernel_ms=statistics.median(ta) * 1e3,
                                 torch_ms=statistics.median(tb) * 1e3, gb=4.0 * n * k / 1e9,
                                 speedup=statistics.median(b_ / a_ for a_, b_ in zip(ta, tb))))
    return rows_out


def _gen_seconds(model, px, tokens: int) -> float:
    t0 = time.thread_time()
    with torch.inference_mode():
        model.generate(pixel_values=px, max_new_tokens=tokens, min_new_tokens=tokens)
    return time.thread_time() - t0


def step_share(size: str, batch: int) -> dict:
    """A decode step of gitfast fp32 generate (`bench_cpu`'s model: (20 new tokens - 1) / 19, thread CPU
    time) and its Linear GEMMs run alone at `batch` rows on the model's own decoder and head weights,
    in model order (median of 5), with F.linear and with the kernel."""
    from . import bench_cpu

    model = bench_cpu.models(size)["fp32", "gitfast"]
    layers = [m for n, m in model.model.named_modules() if type(m).__name__ in ("Linear", "Logits")
              and (n.startswith("layers.") or n == "lm_head")]
    px = bench_cpu.pixels(size, batch)
    _gen_seconds(model, px, 2)
    step = (statistics.median(_gen_seconds(model, px, 20) for _ in range(2))
            - statistics.median(_gen_seconds(model, px, 1) for _ in range(2))) / 19
    xs = {m.in_features: torch.randn(batch, m.in_features) for m in layers}

    def gemms(fn):
        times = []
        for _ in range(5):
            t0 = time.thread_time()
            for m in layers:
                fn(xs[m.in_features], m.weight.detach(), m.bias.detach())
            times.append(time.thread_time() - t0)
        return statistics.median(times)
    return dict(batch=batch, step=step, torch=gemms(F.linear), kernel=gemms(torch.ops.gitfast.linear_fp32),
                gb=sum(m.weight.numel() * 4 for m in layers) / 1e9, layers=len(layers))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--wall", action="store_true", help="wall clock instead of thread CPU time")
    p.add_argument("--head", action="store_true", help="also git-base's LM head, 768 -> 30522")
    p.add_argument("--step", type=int, nargs="+", metavar="BATCH",
                   help="instead: a decode step's time and its GEMMs' share at these batches (one thread)")
    p.add_argument("--size", default="git-base", help="bench_cpu's model size for --step")
    args = p.parse_args(argv)
    from gitfast import ops

    ops.extension_loaded()
    if args.threads or args.step:
        torch.set_num_threads(1 if args.step else args.threads)
    if args.step:
        print("| batch | step ms | GEMMs, F.linear ms (share, GB/s) | GEMMs, linear_fp32 ms (GB/s) |")
        print("|---|---|---|---|")
        for batch in args.step:
            r = step_share(args.size, batch)
            print(f"| {batch} | {r['step'] * 1e3:.1f} | {r['torch'] * 1e3:.1f} ({r['torch'] / r['step']:.0%}, "
                  f"{r['gb'] / r['torch']:.1f}) | {r['kernel'] * 1e3:.1f} ({r['gb'] / r['kernel']:.1f}) |", flush=True)
        return
    print(f"| shape | rows | linear_fp32 ms (GB/s) | F.linear ms (GB/s) | speed-up (median of {args.rounds} pairs) |")
    print("|---|---|---|---|---|")
    for r in pairs(args.rounds, not args.wall, args.head):
        print(f"| {r['shape']} | {r['rows']} | {r['kernel_ms']:.3f} ({r['gb'] / r['kernel_ms'] * 1e3:.1f}) | "
              f"{r['torch_ms']:.3f} ({r['gb'] / r['torch_ms'] * 1e3:.1f}) | {r['speedup']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
