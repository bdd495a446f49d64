"""gitfast._C's CPU attention vs what runs on the CPU without it, at git-base shapes.

Providers per case:
- ``gitfast``: gitfast.attention.cpu_backend (csrc/cpu/attention.cpp);
- ``sdpa``: torch SDPA with a boolean mask on [B, H, T, D] views (the decode/prefill cases gather the
  paged cache first), as gitfast's plain-torch attention backend does;
- ``matmul``: q k^T, additive mask, softmax, @ v (transformers' eager attention).

Cases (12 heads, head_dim 64, batch 8 or `--batch`): decoder prefill over 197 image + 20 text tokens; one
decode step over 217 cached tokens (block size 16; at batch 32, the Captioner's, a layer's cache is 43 MB,
past a 32 MiB last-level cache, as in a caption run); the vision encoder's 197 x 197 bidirectional attention.
Timing: providers are run in turn, `--rounds` times, each round the median of `--iters` calls; the
reported number is the median over rounds (the CPU's clock drifts, so A/B are measured interleaved).

    python bench/bench_cpu_attention.py --threads 2 --dtype float32 bfloat16
    python bench/bench_cpu_attention.py --batch 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gitfast.attention import cpu_backend

HEADS, HEAD_DIM, BATCH, IMAGE, TEXT, BLOCK = 12, 64, 8, 197, 20, 16


def _mask_to_bias(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def _matmul_attention(q, k, v, bias):
    """[B, H, T, D] eager attention, as transformers' GIT computes it."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _git_mask(t, n_img):
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    return j < torch.clamp(torch.maximum(i + 1, torch.tensor(n_img)), max=t)


def prefill_case(dtype, batch=BATCH):
    t = IMAGE + TEXT
    q, k, v = (torch.randn(batch, t, HEADS, HEAD_DIM).to(dtype) for _ in range(3))
    cu = torch.arange(0, (batch + 1) * t, t, dtype=torch.int32)
    mask = _git_mask(t, IMAGE)
    bias = _mask_to_bias(mask, dtype)
    flat = [x.reshape(batch * t, HEADS, HEAD_DIM) for x in (q, k, v)]
    tr = [x.transpose(1, 2) for x in (q, k, v)]
    return {
        "gitfast": lambda: cpu_backend.git_attention(*flat, cu, IMAGE, max_seqlen=t),
        "sdpa": lambda: F.scaled_dot_product_attention(*tr, attn_mask=mask).transpose(1, 2),
        "matmul": lambda: _matmul_attention(*tr, bias).transpose(1, 2),
    }


def vision_case(dtype, batch=BATCH):
    t = IMAGE
    q, k, v = (torch.randn(batch, t, HEADS, HEAD_DIM).to(dtype) for _ in range(3))
    cu = torch.arange(0, (batch + 1) * t, t, dtype=torch.int32)
    flat = [x.reshape(batch * t, HEADS, HEAD_DIM) for x in (q, k, v)]
    tr = [x.transpose(1, 2) for x in (q, k, v)]
    return {
        "gitfast": lambda: cpu_backend.git_attention(*flat, cu, t, max_seqlen=t),
        "sdpa": lambda: F.scaled_dot_product_attention(*tr).transpose(1, 2),
        "matmul": lambda: _matmul_attention(*tr, None).transpose(1, 2),
    }


def decode_case(dtype, batch=BATCH):
    ctx = IMAGE + TEXT
    per_seq = -(-ctx // BLOCK)
    num_blocks = batch * per_seq
    k_cache, v_cache = (torch.randn(num_blocks, BLOCK, HEADS, HEAD_DIM).to(dtype) for _ in range(2))
    tables = torch.randperm(num_blocks).view(batch, per_seq).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, HEADS, HEAD_DIM).to(dtype)

    def gathered():
        pos = torch.arange(ctx)
        idx = tables[:, pos // BLOCK].long(), pos % BLOCK
        return k_cache[idx], v_cache[idx]                    # [B, ctx, H, D]

    def sdpa():
        k, v = gathered()
        mask = torch.arange(ctx)[None, :] < lens[:, None]
        return F.scaled_dot_product_attention(q[:, None].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask[:, None, None, :])[:, :, 0]

    def matmul():
        k, v = gathered()
        bias = _mask_to_bias(torch.arange(ctx)[None, :] < lens[:, None], dtype)[:, None, None, :]
        return _matmul_attention(q[:, None].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias)[:, :, 0]

    return {
        "gitfast": lambda: cpu_backend.paged_decode_attention(q, k_cache, v_cache, tables, lens),
        "sdpa": sdpa,
        "matmul": matmul,
    }


CASES = {"prefill 197+20": prefill_case, "decode ctx 217": decode_case, "vision 197x197": vision_case}


def _median_ms(fn, iters):
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(dtypes, rounds, iters, batch=BATCH):
    rows = []
    for dtype in dtypes:
        for name, make in CASES.items():
            providers = make(dtype, batch)
            with torch.inference_mode():
                for fn in providers.values():
                    fn()                                        # warm up (allocator, oneDNN)
                per = {p: [] for p in providers}
                for _ in range(rounds):                        # interleaved: A, B, C, A, B, C, ...
                    for p, fn in providers.items():
                        per[p].append(_median_ms(fn, iters))
            med = {p: statistics.median(ts) for p, ts in per.items()}
            rows.append((name, str(dtype).replace("torch.", ""), med, {p: (min(t), max(t)) for p, t in per.items()}))
    return rows


def cases(quick: bool, device: str, dtype: torch.dtype):
    """For `gitfast bench --only cpu_attention`: every provider of every case (the runner times
    each on its own; `main` interleaves them for ratios)."""
    from gitfast.bench.common import Case

    if device != "cpu" or not cpu_backend.available():
        return
    dt = str(dtype).replace("torch.", "")
    for label, build in (("prefill 197+20", prefill_case), ("decode ctx 217", decode_case),
                         ("vision 197x197", vision_case)):
        shape = {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "image": IMAGE, "text": TEXT}
        for provider, fn in build(dtype).items():
            yield Case("cpu_attention", shape, provider, dt, fn, label=label)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=BATCH, help="sequences (images) per call")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be at least 1, got {args.batch}")
    if not cpu_backend.available():
        raise SystemExit("gitfast._C has no CPU attention ops: build it (pip install --no-build-isolation -e .)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, ISA {cpu_backend.isa()}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'case':<16} {'dtype':<9} {'gitfast ms':>10} {'sdpa ms':>9} {'matmul ms':>10} "
          f"{'vs sdpa':>8} {'vs matmul':>9}")
    for name, dt, med, _span in run([getattr(torch, d) for d in args.dtype], args.rounds, args.iters, args.batch):
        print(f"{name:<16} {dt:<9} {med['gitfast']:>10.3f} {med['sdpa']:>9.3f} {med['matmul']:>10.3f} "
              f"{med['sdpa'] / med['gitfast']:>7.2f}x {med['matmul'] / med['gitfast']:>8.2f}x")


if __name__ == "__main__":
    main()
