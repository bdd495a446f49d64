"""What word maps cost over captioning alone on the CPU: `Captioner.caption(..., return_maps=True)` against
`Captioner.caption(...)` on drawn pictures (`gitfast.training.pointing.held_out`) with the embedded model.

Each measurement is its own process (1 torch thread by default): it loads the model, draws the
pictures, warms both calls up, then times plain and with-maps captioning alternately `--pairs` times
and reports the median of the per-pair ratios. With `--base REV` the same runs are made on that
commit's `gitfast` (copied out with `git archive`, plus this tree's compiled `_C` extension), the two
trees taking turns (order alternating per round), for an A/B on a shared CPU whose speed drifts:
per round, the ratio new/base of the with-maps time, then the median over rounds::

    python bench/maps_overhead.py --n 100 --rounds 6 --base 6bc0e03
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(n: int, pairs: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from gitfast.captioning.captioner import Captioner
    from gitfast.training import pointing

    captioner = Captioner(device="cpu")
    pictures = [p[0] for p in pointing.held_out(n)]
    captioner.caption(pictures)
    captioner.caption(pictures, return_maps=True)
    plain, with_maps = [], []
    for _ in range(pairs):
        t = time.perf_counter()
        captioner.caption(pictures)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        captioner.caption(pictures, return_maps=True)
        with_maps.append(time.perf_counter() - t)
    return {"plain": plain, "maps": with_maps,
            "ratio": statistics.median(m / p for p, m in zip(plain, with_maps)),
            "gitfast": os.path.dirname(__import__("gitfast").__file__)}


def _run(tree: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", "--n", str(args.n),
                          "--pairs", str(args.pairs), "--threads", str(args.threads)],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert os.path.realpath(report["gitfast"]) == os.path.realpath(os.path.join(tree, "gitfast")), report["gitfast"]
    return report


def _base_tree(rev: str) -> str:
    tree = tempfile.mkdtemp(prefix="gitfast-base-")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "gitfast"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    for so in glob.glob(os.path.join(ROOT, "gitfast", "_C*.so")):
        shutil.copy(so, os.path.join(tree, "gitfast"))
    return tree


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="drawn pictures per call")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=4, help="plain/maps pairs timed per process")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base", default=None, help="a commit to compare with (A/B, interleaved)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.n, args.pairs, args.threads)))
        return
    trees = {"new": ROOT}
    if args.base:
        trees = {"base": _base_tree(args.base), "new": ROOT}
    runs = {name: [] for name in trees}
    try:
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                rep = _run(trees[name], args)
                runs[name].append(rep)
                print(f"round {r} {name:4s}: plain {statistics.median(rep['plain']):.3f} s, maps "
                      f"{statistics.median(rep['maps']):.3f} s, maps/plain {rep['ratio']:.3f}  "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        if args.base:
            shutil.rmtree(trees["base"], ignore_errors=True)
    per100 = 100 / args.n
    for name, reps in runs.items():
        plain = statistics.median(statistics.median(x["plain"]) for x in reps) * per100
        maps = statistics.median(statistics.median(x["maps"]) for x in reps) * per100
        overhead = statistics.median(x["ratio"] for x in reps) - 1
        print(f"{name}: maps overhead {overhead:+.0%} (median over {len(reps)} processes of each one's median "
              f"maps/plain pair ratio); per 100 pictures plain {plain:.3f} s, with maps {maps:.3f} s")
    if args.base:
        pair = [statistics.median(n["maps"]) / statistics.median(b["maps"]) for b, n in zip(runs["base"], runs["new"])]
        plain = [statistics.median(n["plain"]) / statistics.median(b["plain"]) for b, n in zip(runs["base"], runs["new"])]
        print(f"new/base with maps: {statistics.median(pair):.3f} (median of {len(pair)} round pair ratios; "
              f"plain captioning new/base {statistics.median(plain):.3f})")


if __name__ == "__main__":
    main()
