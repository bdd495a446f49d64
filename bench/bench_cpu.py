"""The CPU story end to end: gitfast's generate against transformers' in fp32, bf16 and INT8, with the
agreement of greedy captions with the fp32 reference, plus a captioning row on a folder of JPEGs.

Models: git-base and git-large shapes with random weights (speed does not depend on them); the LM head
is sharpened and the image projection amplified so greedy captions are decisive and depend on the
image (agreement is then meaningful). Every call decodes exactly 20 new tokens.

Providers per precision:
- fp32: ``gitfast`` and ``transformers`` (tokens identical by contract);
- bf16: ``gitfast`` (its measured bf16 GEMMs: oneDNN pre-packed, or MKL fp32 on widened values where the CPU has no
  bf16 arithmetic) and ``transformers`` in bf16;
- int8: ``gitfast`` with ``quantization_config="dynamic"`` (gitfast.quantization) and
  ``transformers`` + PyTorch dynamic INT8 of every Linear (``torch.ao.quantization.quantize_dynamic``).
``agree`` is the share of captions identical to transformers' fp32 captions of the same images.

The runner (``gitfast bench --device cpu --only cpu``) times each case on its own. Ratios on a
shared, drifting CPU need the providers interleaved, which ``main`` does: each round runs every
provider once, the ratio of a pair is taken per round and the median over rounds reported, with the
load average beside it::

    python -m gitfast.bench.bench_cpu --sizes git-base --batches 1 8 --rounds 3
    python -m gitfast.bench.bench_cpu --caption --rounds 3   # gitfast caption vs the transformers loop
    python -m gitfast.bench.bench_cpu --caption --workdir DIR # ... its checkpoint and JPEGs made in DIR
    python -m gitfast.bench.bench_cpu --agreement 32          # captions identical to fp32, 32 images
    python -m gitfast.bench.bench_cpu --repeat 8 --batches 8  # spread of repeated runs
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Iterable

import torch

from .common import Case

SUITE = "cpu"
NEW_TOKENS = 20
# name -> (vision hidden, layers, heads, MLP, patch)
SIZES = {"git-base": (768, 12, 12, 3072, 16), "git-large": (1024, 24, 16, 4096, 14), "tiny": (64, 2, 2, 128, 16)}
PRECISIONS = ("fp32", "bf16", "int8")


def _config(size: str, vocab: int = 30522, image: int = 224):
    from transformers import GitConfig

    vh, vl, vheads, vmlp, patch = SIZES[size]
    tiny = size == "tiny"
    return GitConfig(
        vision_config=dict(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vheads, intermediate_size=vmlp,
                           patch_size=patch, image_size=64 if tiny else image),
        hidden_size=64 if tiny else 768, num_hidden_layers=2 if tiny else 6, num_attention_heads=2 if tiny else 12,
        intermediate_size=128 if tiny else 3072, vocab_size=1000 if tiny else vocab,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )


def _sharpened(hf):
    with torch.no_grad():
        hf.output.weight.mul_(8.0)
        hf.git.visual_projection.visual_projection[1].weight.mul_(4.0)
    return hf


@functools.lru_cache(maxsize=1)
def models(size: str) -> dict:
    """provider key (precision, who) -> a model with `generate`; all from one set of random weights."""
    import transformers

    import gitfast
    from gitfast import quantization

    torch.manual_seed(0)
    hf = _sharpened(transformers.GitForCausalLM(_config(size)).eval())
    out = {("fp32", "transformers"): hf, ("fp32", "gitfast"): gitfast.GitForCausalLM.from_transformers(hf)}
    hf_bf16 = transformers.GitForCausalLM(_config(size)).eval()
    hf_bf16.load_state_dict(hf.state_dict())
    out["bf16", "transformers"] = hf_bf16.to(torch.bfloat16)
    out["bf16", "gitfast"] = gitfast.GitForCausalLM.from_transformers(hf, dtype=torch.bfloat16)
    hf_int8 = transformers.GitForCausalLM(_config(size)).eval()
    hf_int8.load_state_dict(hf.state_dict())
    out["int8", "transformers"] = torch.ao.quantization.quantize_dynamic(hf_int8, {torch.nn.Linear}, dtype=torch.qint8)
    out["int8", "gitfast"] = gitfast.GitForCausalLM.from_transformers(hf)
    quantization.quantize(out["int8", "gitfast"].model, "dynamic")  # what quantization_config="dynamic" does
    return out


def pixels(size: str, batch: int) -> torch.Tensor:
    image = 64 if size == "tiny" else 224
    return torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def generate(model, px: torch.Tensor) -> torch.Tensor:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return model.generate(pixel_values=px.to(dtype), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    """For the runner: one case per (size, batch, precision, provider); `dtype` is ignored (each
    case names its own precision), and only the CPU is this suite's."""
    if device != "cpu" or dtype != torch.float32:
        return
    for size, batch in ([("tiny", 2)] if quick else [(s, b) for s in ("git-base", "git-large") for b in (1, 8)]):
        ms, px = models(size), pixels(size, batch)
        for (precision, who), model in ms.items():
            yield Case(SUITE, {"model": size, "batch": batch, "new_tokens": NEW_TOKENS}, who, precision,
                       functools.partial(generate, model, px), label=f"{size} B{batch} {precision}",
                       extra={"images": batch})


# -- interleaved comparison (python bench/bench_cpu.py) --------------------------------------------

def _agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    return (tokens == reference).all(dim=1).float().mean().item()


def compare(size: str, batch: int, rounds: int, precisions=PRECISIONS) -> list:
    ms, px = models(size), pixels(size, batch)
    keys = [k for k in ms if k[0] in precisions]
    reference = generate(ms["fp32", "transformers"], px)
    agree = {k: _agreement(generate(ms[k], px), reference) for k in keys}  # also the warm-up call
    times = {k: [] for k in keys}
    loads = []
    for _ in range(rounds):
        for k in keys:
            t0 = time.perf_counter()
            generate(ms[k], px)
            times[k].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    rows = []
    for precision in dict.fromkeys(p for p, _ in keys):
        g, t = times[precision, "gitfast"], times[precision, "transformers"]
        rows.append(dict(size=size, batch=batch, precision=precision, gitfast_s=statistics.median(g),
                         transformers_s=statistics.median(t), ratio=statistics.median(b / a for a, b in zip(g, t)),
                         agree_gitfast=agree[precision, "gitfast"], agree_transformers=agree[precision, "transformers"],
                         vs_fp32=statistics.median(b / a for a, b in zip(g, times["fp32", "transformers"]))
                         if ("fp32", "transformers") in times else None,
                         load=f"{min(loads):.1f}-{max(loads):.1f}"))
    return rows


def _print(rows) -> None:
    print("| model | batch | precision | gitfast s | transformers s | gitfast / transformers (same precision) "
          "| gitfast / transformers fp32 | agree gitfast | agree transformers | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_fp32']:.2f}x" if r["vs_fp32"] else "-"
        print(f"| {r['size']} | {r['batch']} | {r['precision']} | {r['gitfast_s']:.2f} | {r['transformers_s']:.2f} | "
              f"{r['ratio']:.2f}x | {vs} | {r['agree_gitfast']:.0%} | {r['agree_transformers']:.0%} | {r['load']} |",
              flush=True)


# -- captioning a folder: `gitfast caption` vs the plain transformers loop, whole processes ----------

_HF_LOOP = """
import sys, glob, torch, transformers
from PIL import Image
folder, images, dtype = sys.argv[1], sorted(glob.glob(sys.argv[2] + "/*.jpg")), getattr(torch, sys.argv[3])
processor = transformers.AutoProcessor.from_pretrained(folder)
model = transformers.GitForCausalLM.from_pretrained(folder, dtype=dtype).eval()
with torch.inference_mode():
    for i in range(0, len(images), 8):
        batch = [Image.open(p).convert("RGB") for p in images[i:i + 8]]
        px = processor(images=batch, return_tensors="pt").pixel_values.to(dtype)
        out = model.generate(pixel_values=px, max_new_tokens=20)
        processor.batch_decode(out, skip_special_tokens=True)
"""


def caption_checkpoint(root, images: int = 32) -> tuple:
    """A git-base-shaped random checkpoint at 224 px with the embedded model's tokenizer (its vocab),
    and a folder of `images` JPEGs (320 x 240, the examples' shapes at varied crops)."""
    import json
    import shutil
    from pathlib import Path

    import transformers
    from PIL import Image

    from gitfast.defaults import EMBEDDED_MODEL, EXAMPLES

    root = Path(root)
    folder, pictures = root / "git-base-224-random", root / ("jpegs" if images == 32 else f"jpegs-{images}")
    if not folder.is_dir():
        torch.manual_seed(0)
        shapes = json.loads((EMBEDDED_MODEL / "config.json").read_text())
        cfg = _config("git-base", vocab=shapes["vocab_size"])
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (shapes[k] for k in ("bos_token_id", "eos_token_id",
                                                                                    "pad_token_id"))
        _sharpened(transformers.GitForCausalLM(cfg).eval()).save_pretrained(folder)
        for f in EMBEDDED_MODEL.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, folder / f.name)
        pre = json.loads((EMBEDDED_MODEL / "preprocessor_config.json").read_text())
        pre["size"], pre["crop_size"] = {"shortest_edge": 224}, {"height": 224, "width": 224}
        (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    if not pictures.is_dir():
        pictures.mkdir(parents=True)
        examples = sorted(EXAMPLES.glob("*.png"))
        for i in range(images):
            j = i % 32  # crops repeat after 32; the files differ by name only
            im = Image.open(examples[i % len(examples)]).convert("RGB").resize((400 + 10 * j, 300 + 5 * j))
            im.crop((j, j, j + 320, j + 240)).save(pictures / f"{i:03d}.jpg", quality=90)
    return folder, pictures


def caption_rows(rounds: int, root=None, images: int = 32) -> list:
    """The --caption rows; the checkpoint and JPEGs are made once under `root` (default: a
    `gitfast-bench-cpu` folder in the system's temporary directory) and reused."""
    import subprocess
    import sys
    import tempfile

    root = root or os.path.join(tempfile.gettempdir(), "gitfast-bench-cpu")
    folder, pictures = caption_checkpoint(root, images)
    out = f"{root}/captions.jsonl"
    runs = {
        "transformers fp32 loop": [sys.executable, "-c", _HF_LOOP, str(folder), str(pictures), "float32"],
        "transformers bf16 loop": [sys.executable, "-c", _HF_LOOP, str(folder), str(pictures), "bfloat16"],
    }
    for dtype in ("float32", "bfloat16"):
        runs[f"gitfast caption --dtype {dtype}"] = [
            sys.executable, "-m", "gitfast.tools.cli", "caption", str(pictures), "--model", str(folder), "--out", out,
            "--overwrite", "--quiet", "--batch-size", "8", "--max-new-tokens", "20", "--device", "cpu", "--dtype", dtype]
    times = {k: [] for k in runs}
    loads = []
    for _ in range(rounds):
        for name, cmd in runs.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    base = times["transformers fp32 loop"]

    def same_dtype(name):  # gitfast's row against the transformers loop in its dtype, pair by pair
        if not name.startswith("gitfast"):
            return None
        theirs = times[f"transformers {'fp32' if name.endswith('float32') else 'bf16'} loop"]
        return statistics.median(b / a for a, b in zip(times[name], theirs))

    return [dict(name=k, s=statistics.median(v), ratio=statistics.median(b / a for a, b in zip(v, base)),
                 same=same_dtype(k), load=f"{min(loads):.1f}-{max(loads):.1f}") for k, v in times.items()]


def agreement(size: str, images: int) -> dict:
    """Greedy captions identical to transformers' fp32 ones, per provider, over `images` images (batches
    of 8, each with its own pixels): the coarse per-row `agree` column, measured wide enough to compare."""
    ms, counts = models(size), {}
    for i in range(0, images, 8):
        px = torch.randn(min(8, images - i), 3, 224, 224, generator=torch.Generator().manual_seed(100 + i))
        reference = generate(ms["fp32", "transformers"], px)
        for (precision, who), model in ms.items():
            same = (generate(model, px) == reference).all(dim=1).sum().item()
            counts[f"{who} {precision}"] = counts.get(f"{who} {precision}", 0) + int(same)
    return counts


def repeated(size: str, batch: int, runs: int, precisions=PRECISIONS) -> list:
    """gitfast's generate `runs` times in a row per precision after one warm-up call: the spread of
    repeated runs (each time's deviation from their median), with the load average around them."""
    ms, px, rows = models(size), pixels(size, batch), []
    for precision in precisions:
        model = ms[precision, "gitfast"]
        generate(model, px)
        load0, times = os.getloadavg()[0], []
        for _ in range(runs):
            t0 = time.perf_counter()
            generate(model, px)
            times.append(time.perf_counter() - t0)
        mid = statistics.median(times)
        rows.append(dict(size=size, batch=batch, precision=precision, times=times,
                         spread=max(abs(t / mid - 1) for t in times), load=f"{load0:.1f}-{os.getloadavg()[0]:.1f}"))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["git-base"], choices=list(SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--caption", action="store_true", help="only the captioning rows (whole processes)")
    p.add_argument("--images", type=int, default=32, help="JPEGs in the --caption folder")
    p.add_argument("--workdir", metavar="DIR", help="where --caption makes its checkpoint and JPEGs once "
                                                   "(default: gitfast-bench-cpu in the temporary directory)")
    p.add_argument("--agreement", type=int, metavar="N", help="only agreement with fp32, over N images")
    p.add_argument("--repeat", type=int, metavar="N", help="only gitfast's spread over N runs in a row")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat:
        print("| model | batch | precision | seconds, run by run | largest deviation from the median | load |")
        print("|---|---|---|---|---|---|")
        for size in args.sizes:
            for batch in args.batches:
                for r in repeated(size, batch, args.repeat, args.precisions):
                    runs = ", ".join(f"{t:.2f}" for t in r["times"])
                    print(f"| {r['size']} | {r['batch']} | {r['precision']} | {runs} | {r['spread']:.0%} | {r['load']} |",
                          flush=True)
        return
    if args.agreement:
        for size in args.sizes:
            print(f"| {size}, {args.agreement} images | greedy captions identical to transformers fp32 |")
            print("|---|---|")
            for name, same in agreement(size, args.agreement).items():
                print(f"| {name} | {same}/{args.agreement} |", flush=True)
        return
    if args.caption:
        print(f"| {args.images} JPEGs, batch 8, 20 new tokens, whole process | seconds | speed vs transformers fp32 "
              "loop | vs the transformers loop in the same dtype | load |")
        print("|---|---|---|---|---|")
        for r in caption_rows(args.rounds, root=args.workdir, images=args.images):
            same = f"{r['same']:.2f}x" if r["same"] else "-"
            print(f"| {r['name']} | {r['s']:.1f} | {r['ratio']:.2f}x | {same} | {r['load']} |", flush=True)
        return
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            rows += compare(size, batch, args.rounds, args.precisions)
            _print(rows[-len(args.precisions):])
    print()
    _print(rows)


if __name__ == "__main__":
    main()
