"""Host syncs per decode step of a captioning pass, counted under torch.cuda.set_sync_debug_mode("warn").

A git-base-shaped random model captions `--images` images through the engine with `--batch` slots;
captions end at EOS after varied lengths (bench_e2e's natural rows), so sequences retire and new ones
are admitted on most steps: where host work used to wait for the device. Every warning the sync
debug mode raises is counted, per decode step, and grouped by the line that raised it. One JSON line
goes to --out (appended) and a short summary to stdout. The engine's only intended wait is the lagged
readback's event (slots.Readback.finish; if the debug mode counts it, `where` names that line, about
one per step); anything else counted is a host sync to remove.
On the CPU (the GPU script's dry run) the same pass runs and nothing is counted.

    python -m gitfast.bench.sync_check --device cuda --dtype float16 --out results.jsonl
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import warnings

import torch


def run(device: str, dtype: torch.dtype, size: str, images: int, batch: int, new_tokens: int) -> dict:
    import transformers

    import gitfast
    from gitfast.serving.engine import Engine, Request
    from gitfast.serving.generation import resolve_settings

    from .bench_e2e import SIZES, _config, _varied_eos

    torch.manual_seed(0)
    hf = transformers.GitForCausalLM(_config(size)).eval().to(device, dtype)
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    del hf
    image = SIZES[size][5]
    px = torch.randn(images, 3, image, image, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    reqs = [Request(px[i], [fm.config.bos_token_id]) for i in range(images)]
    engine = Engine(fm.model, max_batch_size=batch)
    forced = resolve_settings(fm.generation_config, 1, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    runs = [o.token_ids for o in engine.generate(reqs, forced)]  # also warms up graphs and kernels
    eos = _varied_eos(runs, new_tokens) + [fm.config.eos_token_id]
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=new_tokens, eos_token_id=eos)
    engine.generate(reqs, s)  # graphs of every bucket this pass uses

    steps = [0]
    step = engine.runner.step

    def counted_step(*args, **kwargs):
        steps[0] += 1
        return step(*args, **kwargs)

    engine.runner.step = counted_step
    cuda = device == "cuda"
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            outs = engine.generate(reqs, s)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    elapsed = time.perf_counter() - start
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = collections.Counter(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in syncs)
    lengths = [len(o.token_ids) for o in outs]
    return {
        "check": "sync_debug", "device": device, "dtype": str(dtype).replace("torch.", ""), "model": size,
        "images": images, "batch": batch, "new_tokens": new_tokens, "mean_tokens": round(sum(lengths) / images, 2),
        "distinct_lengths": len(set(lengths)), "decode_steps": steps[0], "sync_warnings": len(syncs),
        "syncs_per_step": round(len(syncs) / max(steps[0], 1), 3), "seconds": round(elapsed, 3),
        "where": dict(where.most_common(8)), "measured": cuda,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on the CPU")
    p.add_argument("--model", default=None, help="bench_e2e size; default git-base on CUDA, tiny on the CPU")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="engine slots; default a quarter of the images")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--out", default=None, help="append the JSON row to this file")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    dtype = getattr(torch, a.dtype or ("float16" if cuda else "float32"))
    images = a.images or (64 if cuda else 12)
    row = run(a.device, dtype, a.model or ("git-base" if cuda else "tiny"), images, a.batch or max(1, images // 4),
              a.new_tokens)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"sync check ({row['device']}, {row['model']}, {row['dtype']}): {row['decode_steps']} decode steps, "
          f"{row['distinct_lengths']} caption lengths, {row['sync_warnings']} sync warnings "
          f"({row['syncs_per_step']}/step){'' if row['measured'] else ' [not measured on the CPU]'}")
    for where, n in row["where"].items():
        print(f"  {n:6d}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
