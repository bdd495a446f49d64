"""The correctness contract at git-base size, one JSON row: fp32 identity and half-precision agreement.

A git-base-shaped random model (both implementations, same weights) captions `--images` images:
- fp32: the share of gitfast's captions identical to transformers' (the contract says all);
- each half dtype: how often gitfast's captions equal the fp32 reference against how often
  transformers' do in the same dtype (gitfast must agree at least as often), and
  `gitfast.tools.fidelity.compare_greedy`'s near-tie check of every divergence from transformers.
transformers' own generate is the reference, so it must be 5.18 or newer (gitfast/checkpoint/compat.py: 5.24).

    python -m gitfast.bench.fidelity_check --device cuda --out rows.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def run(device: str, size: str, images: int, new_tokens: int, dtypes) -> dict:
    import transformers

    import gitfast
    from gitfast.checkpoint.compat import check_transformers
    from gitfast.tools.fidelity import compare_greedy

    from .bench_e2e import SIZES, _config

    check_transformers()
    start = time.perf_counter()
    torch.manual_seed(0)
    hf32 = transformers.GitForCausalLM(_config(size)).eval().to(device)
    image = SIZES[size][5]
    px = torch.randn(images, 3, image, image, generator=torch.Generator().manual_seed(2)).to(device)

    def captions(model, pixels):
        out = model.generate(pixel_values=pixels, max_new_tokens=new_tokens).cpu()
        return [row[1:].tolist() for row in out]

    def trimmed(rows):  # transformers pads finished rows; compare up to the pad
        return [r[:next((i for i, t in enumerate(r) if t == 0), len(r))] for r in rows]

    with torch.inference_mode():
        ref = trimmed(captions(hf32, px))
        ours32 = trimmed(captions(gitfast.GitForCausalLM.from_transformers(hf32), px))
    row = {"check": "fidelity", "device": device, "model": size, "images": images, "new_tokens": new_tokens,
           "transformers": transformers.__version__,
           "fp32_identical": sum(a == b for a, b in zip(ours32, ref)) / images}
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        hf = transformers.GitForCausalLM(_config(size)).eval()
        hf.load_state_dict(hf32.state_dict())
        hf = hf.to(device, dtype)
        fm = gitfast.GitForCausalLM.from_transformers(hf)
        pixels = px.to(dtype)
        with torch.inference_mode():
            ours, theirs = trimmed(captions(fm, pixels)), trimmed(captions(hf, pixels))
        report = compare_greedy(fm, hf, pixels, max_new_tokens=new_tokens)
        row[name] = {"gitfast_agrees_with_fp32": sum(a == b for a, b in zip(ours, ref)) / images,
                     "transformers_agrees_with_fp32": sum(a == b for a, b in zip(theirs, ref)) / images,
                     "identical_to_transformers": report.identical / report.rows,
                     "divergences": len(report.divergences),
                     "all_divergences_near_ties": all(d.near_tie for d in report.divergences)}
        row[name]["contract_ok"] = (row[name]["gitfast_agrees_with_fp32"] >= row[name]["transformers_agrees_with_fp32"]
                                    and row[name]["all_divergences_near_ties"])
        del hf, fm
    row["fp32_ok"] = row["fp32_identical"] == 1.0
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="bench_e2e size; default git-base on CUDA, tiny on the CPU")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--dtype", nargs="*", default=None, help="half dtypes (default float16 bfloat16 on CUDA, none on CPU)")
    p.add_argument("--out", default=None, help="append the JSON row to this file")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    dtypes = [getattr(torch, d) for d in (a.dtype if a.dtype is not None else (["float16", "bfloat16"] if cuda else []))]
    row = run(a.device, a.model or ("git-base" if cuda else "tiny"), a.images, a.new_tokens, dtypes)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    ok = row["fp32_ok"] and all(row[str(d).replace("torch.", "")]["contract_ok"] for d in dtypes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
