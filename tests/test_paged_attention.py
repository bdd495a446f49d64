"""paged_decode_attention and paged_prefill_attention (Triton) vs fp64 oracles over a paged cache.

Caches are NaN-poisoned everywhere no sequence has written, block tables are random permutations
of the pool padded with garbage entries, and context lengths are not block multiples: any read past
a context, or through an unused table entry, turns the output NaN.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from gitfast.kernels.api import git_attention, paged_decode_attention, paged_prefill_attention
from gitfast.kernels.reference import (
    git_attention_reference,
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Error floors for the low-precision checks: an eighth of an ulp at 1.0 (fp16 2^-10, bf16 2^-7).
FLOOR = {torch.float16: 2.0 ** -13, torch.bfloat16: 2.0 ** -10}


def _paged(context_lens, heads, head_dim, block_size, dtype, seed=0, shared_prefix=0,
           table_width=None, device=DEVICE):
    """A poisoned pool holding each sequence's K/V through a shuffled block table.

    With shared_prefix > 0 (a block multiple), every sequence maps its first shared_prefix tokens
    to the same physical blocks, as prompts sharing one cached image do.
    Returns k_cache, v_cache, block_tables, and the dense per-sequence K/V [(L, H, D)] in fp64.
    """
    g = torch.Generator().manual_seed(seed)
    assert shared_prefix % block_size == 0
    n_shared = shared_prefix // block_size
    own = [-(-(L - shared_prefix) // block_size) for L in context_lens]
    num_blocks = n_shared + sum(own) + 3                        # a few never-used blocks
    width = table_width or max(n_shared + o for o in own) + 2    # trailing garbage entries
    perm = torch.randperm(num_blocks, generator=g)
    shape = (num_blocks, block_size, heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=torch.float64)
    v_cache = torch.full(shape, float("nan"), dtype=torch.float64)
    tables = torch.randint(-5, num_blocks + 5, (len(context_lens), width), generator=g)
    shared_blocks, next_free = perm[:n_shared], n_shared
    prefix_k = torch.randn(shared_prefix, heads, head_dim, generator=g, dtype=torch.float64)
    prefix_v = torch.randn(shared_prefix, heads, head_dim, generator=g, dtype=torch.float64)
    dense = []
    for b, L in enumerate(context_lens):
        blocks = torch.cat([shared_blocks, perm[next_free:next_free + own[b]]])
        next_free += own[b]
        tables[b, :len(blocks)] = blocks
        kk = torch.cat([prefix_k, torch.randn(L - shared_prefix, heads, head_dim, generator=g,
                                              dtype=torch.float64)])
        vv = torch.cat([prefix_v, torch.randn(L - shared_prefix, heads, head_dim, generator=g,
                                              dtype=torch.float64)])
        t = torch.arange(L)
        k_cache[blocks[t // block_size], t % block_size] = kk
        v_cache[blocks[t // block_size], t % block_size] = vv
        dense.append((kk.to(dtype).double(), vv.to(dtype).double()))
    return (k_cache.to(device, dtype), v_cache.to(device, dtype),
            tables.to(device=device, dtype=torch.int32), dense)


def _decode_oracle(q, dense, dtype=torch.float64):
    out = torch.empty(q.shape, dtype=dtype)
    for b, (kk, vv) in enumerate(dense):
        qb = q[b].cpu().to(dtype)[:, None]                             # [H, 1, D]
        out[b] = F.scaled_dot_product_attention(qb, kk.to(dtype).transpose(0, 1),
                                                vv.to(dtype).transpose(0, 1))[:, 0]
    return out


def _lens(xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEVICE)


# -- paged decode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_fp32(num_splits, block_size):
    lens = [1, 17, 50, 33]
    kc, vc, tables, dense = _paged(lens, 2, 64, block_size, torch.float32, seed=block_size)
    q = torch.randn(len(lens), 2, 64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out = paged_decode_attention(q, kc, vc, tables, _lens(lens), num_splits=num_splits)
    torch.testing.assert_close(out.cpu().double(), _decode_oracle(q, dense), rtol=1e-5, atol=1e-5)
    ref = paged_decode_attention_reference(q, kc, vc, tables, _lens(lens))
    torch.testing.assert_close(ref.cpu().double(), _decode_oracle(q, dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [32, 80, 128])
def test_decode_head_dims(head_dim):
    lens = [9, 40]
    kc, vc, tables, dense = _paged(lens, 2, head_dim, 8, torch.float32, seed=head_dim)
    q = torch.randn(2, 2, head_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = paged_decode_attention(q, kc, vc, tables, _lens(lens), sm_scale=0.2)
    gold = _decode_oracle(q * 0.2 * head_dim ** 0.5, dense)   # SDPA's default scale is 1/sqrt(d)
    torch.testing.assert_close(out.cpu().double(), gold, rtol=1e-5, atol=1e-5)


def test_decode_split_plan_shapes_only():
    from gitfast.kernels import paged_decode

    cpu = torch.device("cpu")
    assert paged_decode._plan(batch_heads=2, max_tokens=100, block_n=16, device=cpu) == 4
    assert paged_decode._plan(2, 20, 16, cpu) == 2             # at most one split per key tile
    assert paged_decode._plan(64, 100, 16, cpu) == 1


@pytest.mark.parametrize("num_splits", [None, 2, 5, 13])
def test_decode_contexts_far_below_the_bound(num_splits):
    """A CUDA-graph decode plans splits for the table's whole width; each sequence spreads its own
    (much shorter) context over them and splits left without keys must merge away (13 splits over
    contexts of 1..4 key tiles)."""
    lens = [1, 16, 17, 50, 64]
    kc, vc, tables, dense = _paged(lens, 2, 64, 8, torch.float32, seed=11, table_width=40)
    q = torch.randn(len(lens), 2, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = paged_decode_attention(q, kc, vc, tables, _lens(lens), num_splits=num_splits)
    torch.testing.assert_close(out.cpu().double(), _decode_oracle(q, dense), rtol=1e-5, atol=1e-5)


def test_decode_rejects_split_counts_past_the_merge():
    kc, vc, tables, _ = _paged([5], 1, 64, 4, torch.float32)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(torch.zeros(1, 1, 64, device=DEVICE), kc, vc, tables, _lens([5]),
                               num_splits=33)


def test_decode_empty_context_gives_zeros():
    lens = [0, 5]
    kc, vc, tables, _ = _paged([1, 5], 2, 64, 4, torch.float32)
    q = torch.randn(2, 2, 64).to(DEVICE)
    for splits in (1, 2):
        out = paged_decode_attention(q, kc, vc, tables, _lens(lens), num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_low_precision(dtype):
    lens = [3, 45, 29]
    kc, vc, tables, dense = _paged(lens, 2, 64, 8, dtype, seed=3)
    q = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    out = paged_decode_attention(q, kc, vc, tables, _lens(lens), num_splits=2)
    gold = _decode_oracle(q, dense)
    torch_err = (_decode_oracle(q, dense, dtype).double() - gold).abs().max()
    err = (out.cpu().double() - gold).abs().max()
    assert err <= 2 * torch_err + FLOOR[dtype], (err.item(), torch_err.item())


def _strided(t, dtype=torch.int32):
    """t's values in a view with no unit stride: every other column of a twice-as-wide tensor
    (1-D: every other element), so a kernel that assumes packed indices reads the gaps."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), -7, dtype=dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def test_decode_strided_index_tensors():
    lens = [5, 40, 17]
    kc, vc, tables, dense = _paged(lens, 2, 64, 4, torch.float32, seed=8)
    q = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    tables_s, lens_s = _strided(tables), _strided(_lens(lens))
    assert tables_s.stride(-1) == 2 and lens_s.stride(0) == 2
    for splits in (1, 3):
        out = paged_decode_attention(q, kc, vc, tables_s, lens_s, num_splits=splits)
        torch.testing.assert_close(out.cpu().double(), _decode_oracle(q, dense), rtol=1e-5, atol=1e-5)


def test_decode_bad_head_dim():
    kc = torch.zeros(2, 4, 1, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.zeros(1, 1, 48, device=DEVICE), kc, kc,
                               torch.zeros(1, 2, dtype=torch.int32, device=DEVICE), _lens([3]))


# -- launch device ----------------------------------------------------------------------------------

def test_launch_device_makes_the_tensors_gpu_current(monkeypatch):
    """Triton launches on the current device and stream: a cuda:1 tensor must make GPU 1 current."""
    from gitfast.kernels import _common

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with _common.launch_device(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.launch_device(torch.device("cpu")):
        pass
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    with _common.launch_device(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]             # CPU tensors, interpreter: no CUDA call


def test_paged_kernels_launch_on_the_tensors_device(monkeypatch):
    from launch_spy import spy_launches
    from gitfast.kernels import paged_decode, paged_prefill

    devices, launches = spy_launches(monkeypatch, paged_decode,
                                     ["_paged_decode_kernel", "_paged_decode_merge_kernel"])
    kc, vc, tables, _ = _paged([40, 9], 2, 64, 8, torch.float32)
    q = torch.zeros(2, 2, 64, device=DEVICE)
    paged_decode_attention(q, kc, vc, tables, _lens([40, 9]), num_splits=2)
    assert devices == [q.device]
    assert launches == [("_paged_decode_kernel", True), ("_paged_decode_merge_kernel", True)]

    devices, launches = spy_launches(monkeypatch, paged_prefill, ["_paged_prefill_kernel"])
    q, kc, vc, tables, cu, lens, _ = _prefill_case([3, 2], 4, torch.float32)
    paged_prefill_attention(q, kc, vc, tables, cu, lens, 4, max_seqlen_q=3)
    assert devices == [q.device] and launches == [("_paged_prefill_kernel", True)]


# -- paged prefill --------------------------------------------------------------------------------

def _prefill_case(n_new, n_img, dtype, block_size=8, seed=0, shared_prefix=0, heads=2, head_dim=64):
    """Sequences of (cached prefix + n_new[b] new tokens); returns inputs and the fp64 oracle."""
    lens = [shared_prefix + n for n in n_new] if shared_prefix else \
        [max(n, 1) + 3 * (b + 1) for b, n in enumerate(n_new)]
    kc, vc, tables, dense = _paged(lens, heads, head_dim, block_size, dtype, seed=seed,
                                   shared_prefix=shared_prefix)
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(sum(n_new), heads, head_dim, generator=g).to(DEVICE, dtype)
    cu = torch.tensor([0] + torch.tensor(n_new).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    counts = n_img.tolist() if isinstance(n_img, torch.Tensor) else [n_img] * len(n_new)

    def oracle(compute=torch.float64):
        out = torch.empty(q.shape, dtype=compute)
        start = 0
        for b, (kk, vv) in enumerate(dense):
            L, n = kk.shape[0], n_new[b]
            P = min(max(counts[b], 0), L)
            pos = torch.arange(L - n, L)[:, None]
            j = torch.arange(L)[None, :]
            mask = (j < P) | (j <= pos)                       # new tokens: image + causal text
            qs = q[start:start + n].cpu().to(compute).transpose(0, 1)
            out[start:start + n] = F.scaled_dot_product_attention(
                qs, kk.to(compute).transpose(0, 1), vv.to(compute).transpose(0, 1),
                attn_mask=mask).transpose(0, 1)
            start += n
        return out

    return q, kc, vc, tables, cu, _lens(lens), oracle


@pytest.mark.parametrize("n_img", [10, "tensor", 0])
def test_prefill_fp32(n_img):
    n_new = [7, 1, 20]
    if n_img == "tensor":
        n_img = torch.tensor([4, 0, 25], dtype=torch.int32)
    q, kc, vc, tables, cu, lens, oracle = _prefill_case(n_new, n_img, torch.float32)
    nimg = n_img.to(DEVICE) if isinstance(n_img, torch.Tensor) else n_img
    out = paged_prefill_attention(q, kc, vc, tables, cu, lens, nimg)
    torch.testing.assert_close(out.cpu().double(), oracle(), rtol=1e-5, atol=1e-5)
    ref = paged_prefill_attention_reference(q, kc, vc, tables, cu, lens, nimg)
    torch.testing.assert_close(ref.cpu().double(), oracle(), rtol=1e-5, atol=1e-5)


def test_prefill_strided_index_tensors():
    n_img = torch.tensor([4, 0, 25], dtype=torch.int32, device=DEVICE)
    q, kc, vc, tables, cu, lens, oracle = _prefill_case([7, 1, 20], n_img.cpu(), torch.float32, seed=2)
    out = paged_prefill_attention(q, kc, vc, _strided(tables), _strided(cu), _strided(lens),
                                  _strided(n_img))
    torch.testing.assert_close(out.cpu().double(), oracle(), rtol=1e-5, atol=1e-5)


def test_prefill_shared_image_prefix():
    """Three prompts over one cached 24-token image prefix (the same physical blocks)."""
    q, kc, vc, tables, cu, lens, oracle = _prefill_case([5, 12, 1], 24, torch.float32, shared_prefix=24)
    assert torch.equal(tables[0, :3], tables[1, :3])
    out = paged_prefill_attention(q, kc, vc, tables, cu, lens, 24, max_seqlen_q=12)
    torch.testing.assert_close(out.cpu().double(), oracle(), rtol=1e-5, atol=1e-5)


def test_prefill_equals_git_attention_without_prefix():
    """With nothing cached before the new tokens, the paged prefill is git_attention itself."""
    lens = [21, 6]
    kc, vc, tables, dense = _paged(lens, 2, 64, 4, torch.float32, seed=9)
    q = torch.randn(sum(lens), 2, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    cu = torch.tensor([0, 21, 27], dtype=torch.int32, device=DEVICE)
    k = torch.cat([d[0] for d in dense]).float().to(DEVICE)
    v = torch.cat([d[1] for d in dense]).float().to(DEVICE)
    paged = paged_prefill_attention(q, kc, vc, tables, cu, _lens(lens), 8)
    torch.testing.assert_close(paged, git_attention(q, k, v, cu, 8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paged, git_attention_reference(q, k, v, cu, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_low_precision(dtype):
    q, kc, vc, tables, cu, lens, oracle = _prefill_case([9, 18], 12, dtype, seed=5)
    out = paged_prefill_attention(q, kc, vc, tables, cu, lens, 12)
    gold = oracle()
    torch_err = (oracle(dtype).double() - gold).abs().max()
    err = (out.cpu().double() - gold).abs().max()
    assert err <= 2 * torch_err + FLOOR[dtype], (err.item(), torch_err.item())


# -- GPU, real sizes ------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("context", [217, 901])
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_decode_real_sizes(context, batch, dtype):
    lens = [context - (b % 7) for b in range(batch)]          # mixed, not block multiples
    kc, vc, tables, dense = _paged(lens, 12, 64, 16, dtype, seed=context, device="cuda")
    q = torch.randn(batch, 12, 64, device="cuda", dtype=dtype)
    out = paged_decode_attention(q, kc, vc, tables, _lens(lens))
    k = torch.nn.utils.rnn.pad_sequence([d[0] for d in dense], batch_first=True).cuda()
    v = torch.nn.utils.rnn.pad_sequence([d[1] for d in dense], batch_first=True).cuda()
    mask = (torch.arange(k.shape[1], device="cuda")[None, :] < _lens(lens)[:, None].cuda())
    mask = mask[:, None, None, :]                             # [B, 1, 1, L]

    def sdpa(dt):
        return F.scaled_dot_product_attention(q.to(dt)[:, :, None], k.transpose(1, 2).to(dt),
                                              v.transpose(1, 2).to(dt), attn_mask=mask)[:, :, 0]
    gold = sdpa(torch.float32)
    torch_err = (sdpa(dtype).float() - gold).abs().max()
    err = (out.float() - gold).abs().max()
    assert err <= 2 * torch_err + FLOOR[dtype], (err.item(), torch_err.item())


@pytest.mark.cuda
def test_cuda_decode_under_cuda_graph():
    lens = [217] * 64
    kc, vc, tables, dense = _paged(lens, 12, 64, 16, torch.float16, device="cuda")
    q = torch.randn(64, 12, 64, device="cuda", dtype=torch.float16)
    ctx = _lens(lens).cuda()
    eager = paged_decode_attention(q, kc, vc, tables, ctx)    # also compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = paged_decode_attention(q, kc, vc, tables, ctx)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.cuda
def test_cuda_prefill_vqa_size():
    q, kc, vc, tables, cu, lens, oracle = _prefill_case(
        [20] * 32, 896, torch.float16, block_size=16, shared_prefix=896, heads=12)
    out = paged_prefill_attention(q, kc, vc, tables, cu, lens, 896, max_seqlen_q=20)
    gold = oracle(torch.float64)
    torch_err = (oracle(torch.float16).double() - gold).abs().max()
    assert (out.cpu().double() - gold).abs().max() <= 2 * torch_err + FLOOR[torch.float16]
