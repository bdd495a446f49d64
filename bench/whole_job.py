"""The whole captioning job on a CPU (issue #25 item 2): `gitfast caption FOLDER` against the plain
transformers loop (AutoProcessor + GitForCausalLM.generate in batches), as whole processes in turn.

Inputs, made once under --workdir (default: `gitfast-bench-whole-job` in the temporary directory):
`--images` photo-like 640x480 JPEGs (bench_pipeline's maker) and a git-base-shaped checkpoint with
random weights (bench_pipeline's `checkpoint("git-base")`: vocab 30522, 224 px). Then:

1. the transformers loop's batch size: one process times each of `--hf-batches` over the first
   `--sweep-images` files, in turn, `--sweep-rounds` times (after a warm-up), and keeps the one with the
   least CPU time per image (the steadier measure on a shared machine);
2. whole processes, A B A B: `gitfast caption FOLDER --dtype X --out F.jsonl` and the loop at that
   batch size, `--rounds` pairs; the median of the per-pair ratios (loop seconds / gitfast seconds), of
   wall time and of the processes' CPU time (user + system);
3. gitfast's captions against gitfast's own `GitForCausalLM.generate` on the same pixels
   (transformers' processor, batches of 8) and against the transformers loop's captions.

Every process gets OMP_WAIT_POLICY=PASSIVE (gitfast sets it on import; the loop gets it too, as a
user who shares the machine would want). Both write one JSONL record per image.

    python -m gitfast.bench.whole_job --images 256 --dtype float32 --rounds 2
    python -m gitfast.bench.whole_job --images 8 --dtype bfloat16 --rounds 3 --batch 8
    python -m gitfast.bench.whole_job --images 64 --dtype int8 --rounds 2   # --quantize dynamic vs torch.ao INT8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .bench_pipeline import checkpoint, photo_folder

# The plain transformers loop a user would write: argv = checkpoint, list of files, dtype (or "int8":
# fp32 weights through torch's dynamic INT8 of every Linear, torch.ao's quantize_dynamic), new tokens, then either `run BATCH OUT` (caption every file into OUT.jsonl) or `sweep N ROUNDS B1 B2 ...` (print
# the CPU seconds per image of each batch size over the first N files, in turn, as JSON).
_HF_LOOP = r"""
import json, sys, time, torch, transformers
from PIL import Image
folder, listing, new = sys.argv[1], sys.argv[2], int(sys.argv[4])
dtype = torch.float32 if sys.argv[3] == "int8" else getattr(torch, sys.argv[3])
paths = open(listing).read().split("\n")
processor = transformers.AutoProcessor.from_pretrained(folder)
model = transformers.GitForCausalLM.from_pretrained(folder, dtype=dtype).eval()
if sys.argv[3] == "int8":
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

def captions(batch):
    images = [Image.open(p).convert("RGB") for p in batch]
    px = processor(images=images, return_tensors="pt").pixel_values.to(dtype)
    with torch.inference_mode():
        out = model.generate(pixel_values=px, max_new_tokens=new)
    return processor.batch_decode(out, skip_special_tokens=True)

if sys.argv[5] == "run":
    size = int(sys.argv[6])
    with open(sys.argv[7], "w") as f:
        for i in range(0, len(paths), size):
            batch = paths[i:i + size]
            for p, text in zip(batch, captions(batch)):
                f.write(json.dumps({"source": p, "caption": text}) + "\n")
else:
    n, rounds, sizes = int(sys.argv[6]), int(sys.argv[7]), [int(s) for s in sys.argv[8:]]
    captions(paths[:sizes[0]])  # warm-up
    per_image = {s: [] for s in sizes}
    for _ in range(rounds):
        for s in sizes:
            t = time.process_time()  # CPU seconds of the process: steadier than wall on a shared machine
            for i in range(0, n, s):
                captions(paths[i:i + s])
            per_image[s].append((time.process_time() - t) / n)
    print(json.dumps(per_image))
"""


def _env() -> dict:
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _loop_cmd(model: str, listing: Path, dtype: str, new_tokens: int, *tail) -> List[str]:
    return [sys.executable, "-c", _HF_LOOP, model, str(listing), dtype, str(new_tokens), *map(str, tail)]


def best_hf_batch(model: str, listing: Path, dtype: str, new_tokens: int, sizes: List[int], images: int,
                  rounds: int, workdir: Path) -> tuple:
    """(fastest batch size, {size: median seconds per image}) of the transformers loop, in one process."""
    n = min(images, len(listing.read_text().split("\n")))
    sizes = [s for s in sizes if s <= n] or [n]  # a batch larger than the files times the same as n
    out = subprocess.run(_loop_cmd(model, listing, dtype, new_tokens, "sweep", n, rounds, *sizes), env=_env(),
                         cwd=workdir, check=True, capture_output=True, text=True).stdout
    per_image = {int(k): statistics.median(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    return min(per_image, key=per_image.get), per_image


def gitfast_cmd(model: str, folder: Path, dtype: str, new_tokens: int, out: Path, batch: Optional[int],
                workers: Optional[int]) -> List[str]:
    cmd = [sys.executable, "-m", "gitfast.tools.cli", "caption", str(folder), "--model", model, "--out", str(out),
           "--overwrite", "--quiet", "--max-new-tokens", str(new_tokens), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--quantize", "dynamic"] if dtype == "int8" else ["--dtype", dtype]
    cmd += ["--batch-size", str(batch)] if batch else []
    return cmd + (["--workers", str(workers)] if workers is not None else [])


def pin_int8_backends() -> str:
    """Decide dynamic INT8's GEMM backends once, here, and hand them to every process this run starts
    (GITFAST_INT8_BACKEND / GITFAST_INT8_IMAGE_BACKEND, unless set): image rows may take 7 or 8 bits by
    measurement, and two processes that measured differently would caption differently."""
    from gitfast import int8_backends

    os.environ.setdefault("GITFAST_INT8_BACKEND", int8_backends.backend())
    os.environ.setdefault("GITFAST_INT8_IMAGE_BACKEND", int8_backends.image_backend())
    return f"INT8 backends: text rows {os.environ['GITFAST_INT8_BACKEND']}, " \
           f"image rows {os.environ['GITFAST_INT8_IMAGE_BACKEND']}"


def timed(cmd: List[str], cwd: Path) -> tuple:
    """(wall seconds, CPU seconds user+system) of one whole process: the wall time is what a user waits,
    the CPU time the steadier measure on a shared machine (passive OpenMP waiting spends little)."""
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{cmd[:5]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def in_turn(runs: Dict[str, List[str]], rounds: int, cwd: Path) -> tuple:
    """Each command once per round, in turn; ({name: [(wall, cpu)]}, [load average after each round])."""
    times: Dict[str, List[tuple]] = {k: [] for k in runs}
    loads = []
    for _ in range(rounds):
        for name, cmd in runs.items():
            times[name].append(timed(cmd, cwd))
            print(f"  {name}: wall {times[name][-1][0]:.1f} s, CPU {times[name][-1][1]:.1f} s", flush=True)
        loads.append(os.getloadavg()[0])
    return times, loads


def pair_ratios(ours: List[tuple], theirs: List[tuple], which: int) -> List[float]:
    """theirs / ours per pair, of wall (which=0) or CPU (which=1) seconds."""
    return [b[which] / a[which] for a, b in zip(ours, theirs)]


def read_captions(path: Path) -> Dict[str, str]:
    with open(path) as f:
        return {r["source"]: r["caption"] for r in map(json.loads, f)}


def cli_batch() -> int:
    """`gitfast caption`'s --batch-size default, from its own parser."""
    from gitfast.captioning.cli import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.get_default("batch_size")


def gitfast_generate_captions(model: str, paths: List[str], dtype: str, new_tokens: int,
                              batch: int) -> Dict[str, str]:
    """gitfast's own generate (the drop-in) on transformers' processor's pixels, in batches of the caption
    run's size: the same row counts pick the same GEMM backends (fp32 rows at decode may go to gitfast's
    kernel or MKL, equal to rounding, not bitwise; fp32_backends.py)."""
    import torch
    import transformers

    import gitfast

    processor = transformers.AutoProcessor.from_pretrained(model)
    torch_dtype = torch.float32 if dtype == "int8" else getattr(torch, dtype)
    net = gitfast.GitForCausalLM.from_pretrained(model, dtype=torch_dtype,
                                                 quantization_config="dynamic" if dtype == "int8" else None).eval()
    from PIL import Image

    out = {}
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        px = processor(images=[Image.open(p).convert("RGB") for p in chunk], return_tensors="pt").pixel_values
        with torch.inference_mode():
            ids = net.generate(pixel_values=px.to(torch_dtype), max_new_tokens=new_tokens)
        out.update(zip(chunk, processor.batch_decode(ids, skip_special_tokens=True)))
    return out


# where a `gitfast caption` process's time goes: (label, file suffix, function) summed from cProfile
STAGES = (("load the checkpoint (Captioner())", "captioning/captioner.py", "__init__"),
          ("read + decode + preprocess", "captioning/workers.py", "__call__"),
          ("vision encoder + projection", "gitfast/model.py", "encode_images"),
          ("decoder over image tokens (prefixes)", "serving/paged_runner.py", "encode_prefixes"),
          ("prompt prefill", "serving/paged_runner.py", "prefill"),
          ("decode steps", "serving/executor.py", "_decode"),
          ("detokenize", "gitfast/checkpoint/bert_tokenizer.py", "decode"),
          ("write records", "captioning/resumable.py", "write"),
          ("finish the output", "captioning/resumable.py", "close"))


def profile(cmd: List[str], cwd: Path, out: Path) -> None:
    """One gitfast caption process under cProfile: seconds per stage, the rest (imports, start-up,
    Python between stages) as what is left of the process's wall time."""
    t = time.perf_counter()
    subprocess.run([cmd[0], "-m", "cProfile", "-o", str(out), *cmd[1:]], env=_env(), cwd=cwd, check=True,
                   capture_output=True)
    print_profile(out, time.perf_counter() - t)


def print_profile(stats_file: Path, wall: float) -> None:
    import pstats

    stats = pstats.Stats(str(stats_file)).stats
    print(f"gitfast caption under cProfile (its overhead included): {wall:.1f} s wall")
    counted = 0.0
    for label, suffix, name in STAGES:
        secs = sum(v[3] for (f, _, fn), v in stats.items() if fn == name and f.endswith(suffix))
        counted += secs
        print(f"  {label:40s} {secs:7.2f} s {100 * secs / wall:5.1f}%")
    print(f"  {'the rest (imports, start-up, glue)':40s} {wall - counted:7.2f} s {100 * (wall - counted) / wall:5.1f}%")


def inputs(workdir: Path, images: int) -> tuple:
    """(checkpoint folder, folder of exactly `images` JPEGs, their sorted paths, a file listing them), made
    once under `workdir` and reused."""
    model = checkpoint("git-base", str(workdir / "models"))
    paths = photo_folder(images, root=str(workdir / "photos"))
    folder = workdir / f"jpegs-{images}"  # exactly these files, linked (the photo cache may hold more)
    folder.mkdir(exist_ok=True)
    for path in paths:
        if not (folder / Path(path).name).exists():
            os.symlink(path, folder / Path(path).name)
    files = sorted(str(folder / Path(p).name) for p in paths)
    listing = workdir / f"files-{images}.txt"
    listing.write_text("\n".join(files))
    return model, folder, files, listing


def report(args, times: Dict[str, List[tuple]], load0: float, loads: List[float]) -> None:
    print(f"{args.images} JPEGs 640x480, {args.dtype}, {args.max_new_tokens} new tokens, {args.rounds} pairs, "
          f"load {load0:.1f} then {', '.join(f'{x:.1f}' for x in loads)}, {os.cpu_count()} CPUs")
    for name, secs in times.items():
        walls, cpus = [w for w, _ in secs], [c for _, c in secs]
        print(f"  {name:28s} wall {', '.join(f'{s:.1f}' for s in walls)} s (median {statistics.median(walls):.1f}), "
              f"CPU {', '.join(f'{s:.1f}' for s in cpus)} s (median {statistics.median(cpus):.1f})")
    g, t = times.values()
    for which, what in ((0, "wall"), (1, "CPU")):
        pairs = pair_ratios(g, t, which)
        print(f"  transformers / gitfast, {what}, median of pair ratios: {statistics.median(pairs):.2f}x "
              f"(pairs {', '.join(f'{r:.2f}' for r in pairs)})")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "int8"),
                   help="int8: gitfast caption --quantize dynamic against the loop with torch's dynamic INT8")
    p.add_argument("--rounds", type=int, default=2, help="pairs of whole processes")
    p.add_argument("--batch", type=int, default=None, help="gitfast caption --batch-size (default: the CLI's)")
    p.add_argument("--workers", type=int, default=None, help="gitfast caption --workers (default: the CLI's)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--hf-batches", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="the transformers loop's batch sizes to sweep (one value: no sweep)")
    p.add_argument("--sweep-images", type=int, default=32)
    p.add_argument("--sweep-rounds", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gitfast-bench-whole-job")
    p.add_argument("--no-check", action="store_true", help="skip the captions check against gitfast's generate")
    p.add_argument("--profile", action="store_true", help="instead: where one gitfast caption process's time goes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, folder, files, listing = inputs(args.workdir, args.images)
    load0 = os.getloadavg()[0]
    if args.dtype == "int8":
        print(pin_int8_backends(), flush=True)
    if args.profile:
        out = args.workdir / f"profile-{args.images}-{args.dtype}.jsonl"
        profile(gitfast_cmd(model, folder, args.dtype, args.max_new_tokens, out, args.batch, args.workers),
                args.workdir, out.with_suffix(".pstats"))
        return 0
    hf_batch = args.hf_batches[0]
    if len(args.hf_batches) > 1:
        hf_batch, sweep = best_hf_batch(model, listing, args.dtype, args.max_new_tokens, args.hf_batches,
                                        args.sweep_images, args.sweep_rounds, args.workdir)
        print("transformers loop, CPU seconds per image by batch size: "
              + ", ".join(f"{b}: {s:.3f}" for b, s in sweep.items()) + f" -> batch {hf_batch}", flush=True)
    tag = f"{args.images}-{args.dtype}"  # runs of other sizes may share the workdir
    ours, theirs = args.workdir / f"gitfast-{tag}.jsonl", args.workdir / f"transformers-{tag}.jsonl"
    runs = {"gitfast caption": gitfast_cmd(model, folder, args.dtype, args.max_new_tokens, ours, args.batch,
                                           args.workers),
            f"transformers loop B{hf_batch}": _loop_cmd(model, listing, args.dtype, args.max_new_tokens, "run",
                                                        hf_batch, theirs)}
    times, loads = in_turn(runs, args.rounds, args.workdir)
    report(args, times, load0, loads)
    ours_c, theirs_c = read_captions(ours), read_captions(theirs)
    print(f"  gitfast captions equal to the transformers loop's: "
          f"{sum(ours_c.get(f) == theirs_c.get(f) for f in files)}/{len(files)}")
    if args.no_check:
        return 0
    own = gitfast_generate_captions(model, files, args.dtype, args.max_new_tokens, args.batch or cli_batch())
    same = sum(ours_c.get(f) == own[f] for f in files)
    print(f"  gitfast captions equal to gitfast's own generate: {same}/{len(files)}")
    return 0 if same == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
