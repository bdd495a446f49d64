"""Start-up time of captioning (issue #25 item 1): `import torch` alone, `Captioner()` on the embedded model,
and `gitfast caption` of one example picture, each a fresh process, timed wall to wall.

The commands run in turn, round after round (A B C ... A B C ...), so that a change of machine load hits
every command alike; the medians and the median of each round's ratio to `import torch` are printed.
With `--baseline PATH`, the Captioner and CLI commands also run with PATH first on PYTHONPATH (another
checkout of gitfast, e.g. the commit before a change), in the same rounds.

    python bench/startup.py --rounds 5 [--baseline /path/to/other/checkout]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPTIONER = "from gitfast import Captioner; Captioner()"


def commands(checkout: Path, picture: str, tag: str) -> dict:
    cli = [sys.executable, "-m", "gitfast.tools.cli", "caption", picture, "--quiet", "--out", os.devnull]
    return {f"Captioner() {tag}": ([sys.executable, "-c", CAPTIONER], checkout),
            f"gitfast caption one.png {tag}": (cli, checkout)}


def timed(argv, checkout: Path) -> tuple:
    """(wall seconds, CPU seconds user+system) of one fresh process; CPU time is the steadier one on a
    shared machine, wall time what a user waits."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="another gitfast checkout, timed alongside")
    args = parser.parse_args(argv)
    picture = str(sorted((ROOT / "gitfast" / "assets" / "examples").iterdir())[0])
    runs = {"import torch": ([sys.executable, "-c", "import torch"], ROOT), **commands(ROOT, picture, "(this)")}
    if args.baseline is not None:
        runs.update(commands(args.baseline.resolve(), picture, "(baseline)"))
    times, load_before = {name: [] for name in runs}, os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, (command, checkout) in runs.items():
            times[name].append(timed(command, checkout))
    print(f"1-min load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}; rounds: {args.rounds}")
    for name, values in times.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        print(f"{name:36s} wall median {statistics.median(walls):5.2f} s, CPU median {statistics.median(cpus):5.2f} s"
              f"  (walls {', '.join(f'{w:.2f}' for w in walls)})")
    if args.baseline is not None:
        for what in ("Captioner()", "gitfast caption one.png"):
            this, base = times[f"{what} (this)"], times[f"{what} (baseline)"]
            pairs = [(b[0] / t[0], b[1] / t[1]) for t, b in zip(this, base)]
            print(f"{what}: baseline / this, median of per-round ratios: wall "
                  f"{statistics.median(p[0] for p in pairs):.2f}x, CPU {statistics.median(p[1] for p in pairs):.2f}x")


if __name__ == "__main__":
    main()
