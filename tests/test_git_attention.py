"""git_attention (Triton) vs a spec-built fp64 oracle and the plain-torch reference.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
CPU shapes are tiny but odd: lengths that are not tile multiples, one-token sequences, sequences of
only image or only text tokens. The `cuda` tests use GIT's real sizes.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gitfast.kernels.api import git_attention
from gitfast.kernels._triton_utils import exp2
from gitfast.kernels.reference import git_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [37, 5, 20, 1, 16]          # odd lengths around the 16-row interpreter tiles


def _cu(lens, device=DEVICE):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _spec_mask(length, n_img):
    """GIT's mask written from the model card: image rows see the image block only; text rows see
    the whole image block and text up to and including themselves."""
    p = min(max(n_img, 0), length)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    image_row = (i < p) & (j < p)
    text_row = (i >= p) & ((j < p) | (j <= i))
    return image_row | text_row


def _spec_attention(q, k, v, lens, counts, dtype=torch.float64, scale=None):
    """Per-sequence SDPA with the spec mask, inputs cast to `dtype` (fp64: the gold standard;
    fp16/bf16: torch's own low-precision error, the yardstick for the kernel's)."""
    cu = _cu(lens, "cpu").tolist()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for b, n_img in enumerate(counts):
        s, e = cu[b], cu[b + 1]
        mask = _spec_mask(e - s, n_img).to(q.device)
        qs, ks, vs = (x[s:e].to(dtype).transpose(0, 1) for x in (q, k, v))
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


def _qkv(total, heads, head_dim, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(total, heads, head_dim, generator=g, dtype=torch.float64) * scale)
            .to(device=DEVICE, dtype=dtype) for _ in range(3)]


IMAGE_CASES = {
    "shared_int": (9, [9] * len(LENS)),
    "per_seq_tensor": (torch.tensor([20, 0, 30, 1, 16], dtype=torch.int32), [20, 0, 30, 1, 16]),
    "causal_only": (0, [0] * len(LENS)),
    "image_only": (10_000, LENS),                       # clamped to each length: vision encoder
    "int64_tensor": (torch.tensor([3, 5, 0, 0, 7]), [3, 5, 0, 0, 7]),
}


def test_spec_mask_shapes():
    m = _spec_mask(5, 2)
    assert m[0].tolist() == [True, True, False, False, False]      # image row: image only
    assert m[3].tolist() == [True, True, True, True, False]        # text row: image + causal
    assert _spec_mask(4, 4).all()                                  # all image: bidirectional
    assert torch.equal(_spec_mask(4, 0), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_fp32_matches_oracle(case):
    n_img, counts = IMAGE_CASES[case]
    q, k, v = _qkv(sum(LENS), 2, 64, torch.float32)
    if isinstance(n_img, torch.Tensor):
        n_img = n_img.to(DEVICE)
    out = git_attention(q, k, v, _cu(LENS), n_img)
    gold = _spec_attention(q, k, v, LENS, counts)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)
    # the plain-torch reference follows the same contract
    ref = git_attention_reference(q, k, v, _cu(LENS), n_img)
    torch.testing.assert_close(ref.double(), gold, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [32, 80, 128])
def test_fp32_head_dims(head_dim):
    lens = [19, 3]
    q, k, v = _qkv(sum(lens), 2, head_dim, torch.float32, seed=head_dim)
    out = git_attention(q, k, v, _cu(lens), 7, max_seqlen=19)
    torch.testing.assert_close(out.double(), _spec_attention(q, k, v, lens, [7, 3]),
                               rtol=1e-5, atol=1e-5)


def test_strided_views_and_scale():
    """q/k/v as views of one fused QKV projection (the model's layout) and a custom sm_scale."""
    lens = [23, 9]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lens), 3, 2, 64, generator=g).to(DEVICE)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    out = git_attention(q, k, v, _cu(lens), 11, sm_scale=0.3)
    torch.testing.assert_close(out.double(), _spec_attention(q, k, v, lens, [11, 9], scale=0.3),
                               rtol=1e-5, atol=1e-5)


def test_strided_index_tensors():
    """cu_seqlens and per-sequence image counts as views with stride 2 (every other element)."""
    q, k, v = _qkv(sum(LENS), 2, 64, torch.float32, seed=6)
    n_img = torch.tensor([20, 0, 30, 1, 16], dtype=torch.int32, device=DEVICE)
    wide_cu = _cu(LENS).repeat_interleave(2)
    wide_img = n_img.repeat_interleave(2)
    assert wide_cu[::2].stride(0) == 2
    out = git_attention(q, k, v, wide_cu[::2], wide_img[::2])
    gold = _spec_attention(q, k, v, LENS, n_img.tolist())
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)


def test_matches_unpacked_sequences():
    """Packing must not couple sequences: each sequence alone gives the same rows."""
    q, k, v = _qkv(sum(LENS), 2, 64, torch.float32, seed=5)
    packed = git_attention(q, k, v, _cu(LENS), 6)
    cu = _cu(LENS, "cpu").tolist()
    for b in (0, 3):
        s, e = cu[b], cu[b + 1]
        alone = git_attention(q[s:e], k[s:e], v[s:e], _cu([e - s]), 6)
        torch.testing.assert_close(packed[s:e], alone, rtol=1e-6, atol=1e-6)


# Error floors for the low-precision checks: an eighth of an ulp at 1.0 (fp16 2^-10, bf16 2^-7).
FLOOR = {torch.float16: 2.0 ** -13, torch.bfloat16: 2.0 ** -10}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 3.0)])
def test_low_precision_vs_torch_sdpa(dtype, seed, scale):
    counts = [9, 0, 30, 1, 16]
    q, k, v = _qkv(sum(LENS), 2, 64, dtype, seed=seed, scale=scale)
    out = git_attention(q, k, v, _cu(LENS), torch.tensor(counts, dtype=torch.int32, device=DEVICE))
    assert torch.isfinite(out).all()
    gold = _spec_attention(q, k, v, LENS, counts)
    torch_err = (_spec_attention(q, k, v, LENS, counts, dtype=dtype).double() - gold).abs().max()
    err = (out.double() - gold).abs().max()
    assert err <= 2 * torch_err + FLOOR[dtype], (err.item(), torch_err.item())


@pytest.mark.parametrize("head_dim", [48, 256, 8])
def test_unsupported_head_dim_raises(head_dim):
    q, k, v = _qkv(4, 1, head_dim, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        git_attention(q, k, v, _cu([4]), 2)


def test_bad_arguments_raise():
    q, k, v = _qkv(4, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        git_attention(q, k.half(), v, _cu([4]), 2)
    with pytest.raises(ValueError, match="num_image_tokens"):
        git_attention(q, k, v, _cu([4]), torch.tensor([1, 2], device=DEVICE))


def test_autotune_pruning_keeps_valid_configs():
    from gitfast.kernels import attention

    configs = attention._gpu_configs()
    q32 = torch.empty(1, dtype=torch.float32)
    q16 = torch.empty(1, dtype=torch.float16)
    fp32 = attention._prune(configs, {"Q": q32}, HEAD_DIM=64)
    assert len(fp32) == 1 and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 for c in fp32)
    hd64 = attention._prune(configs, {"Q": q16}, HEAD_DIM=64)
    assert hd64 and not set(map(id, hd64)) & set(map(id, fp32))
    hd128 = attention._prune(configs, {"Q": q16}, HEAD_DIM=128)
    assert hd128 and all(c.num_warps == 8 or c.kwargs["BLOCK_M"] == 64 for c in hd128)
    # fp32 past head_dim 64: only the small unpipelined tiles (larger ones spill, see _gpu_configs)
    fp32_wide = attention._prune(configs, {"Q": q32}, HEAD_DIM=128)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in fp32_wide] == [(32, 16, 1)]


# -- GPU, real sizes ------------------------------------------------------------------------------

def test_launches_on_the_tensors_device(monkeypatch):
    """Every launch (the interpreter's kernel or the autotuned one) runs inside launch_device(q's
    device), which makes that GPU and its stream current (tested in test_paged_attention.py)."""
    from gitfast.kernels import attention

    from launch_spy import spy_launches

    devices, launches = spy_launches(monkeypatch, attention, ["_git_attention_kernel", "_git_attention_tuned"])
    q, k, v = _qkv(sum(LENS), 2, 64, torch.float32)
    git_attention(q, k, v, _cu(LENS), 3)
    assert devices == [q.device] and len(launches) == 1 and launches[0][1]


def _dense_git_mask(length, n_img, device):
    return _spec_mask(length, n_img).to(device)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("image,text,heads", [(197, 20, 12), (257, 20, 12), (901, 20, 12)])
def test_cuda_decoder_prefill_real_sizes(dtype, image, text, heads):
    batch = 256 if image < 900 else 32
    length = image + text
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch * length, heads, 64, generator=g, device="cuda", dtype=dtype)
               for _ in range(3))
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * length
    out = git_attention(q, k, v, cu, image, max_seqlen=length)
    mask = _dense_git_mask(length, image, "cuda")

    def dense(x, dt):
        return x.view(batch, length, heads, 64).transpose(1, 2).to(dt)

    gold = F.scaled_dot_product_attention(dense(q, torch.float32), dense(k, torch.float32),
                                          dense(v, torch.float32), attn_mask=mask)
    low = F.scaled_dot_product_attention(dense(q, dtype), dense(k, dtype), dense(v, dtype),
                                         attn_mask=mask)
    out = out.view(batch, length, heads, 64).transpose(1, 2).float()
    torch_err = (low.float() - gold).abs().max()
    err = (out - gold).abs().max()
    assert err <= 2 * torch_err + FLOOR[dtype], (err.item(), torch_err.item())


@pytest.mark.cuda
def test_cuda_vision_encoder_matches_sdpa():
    batch, length, heads = 256, 257, 16
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch, length, heads, 64, generator=g, device="cuda", dtype=torch.float16)
               for _ in range(3))
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * length
    out = git_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, length,
                        max_seqlen=length).view(batch, length, heads, 64)
    gold = F.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)))
    low = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    err = (out.transpose(1, 2).float() - gold).abs().max()
    assert err <= 2 * (low.float() - gold).abs().max() + FLOOR[torch.float16]


@pytest.mark.cuda
def test_cuda_mixed_lengths_fp32():
    g = torch.Generator().manual_seed(2)
    lens = torch.randint(1, 300, (64,), generator=g).tolist()
    counts = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in lens]
    q, k, v = _qkv(sum(lens), 12, 64, torch.float32, seed=4)
    out = git_attention(q, k, v, _cu(lens), torch.tensor(counts, dtype=torch.int32, device="cuda"))
    gold = _spec_attention(q, k, v, lens, counts)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_int64_offsets():
    """A packed tensor past 2^31 elements: rows near the end must be addressed correctly."""
    heads, head_dim, length = 16, 128, 4096
    total = (2 ** 31) // (heads * head_dim) + length           # > 2^31 elements per tensor
    try:
        q = torch.empty(total, heads, head_dim, device="cuda", dtype=torch.float16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a >2^31-element tensor")
    k, v = torch.empty_like(q), torch.empty_like(q)
    for x in (q, k, v):
        x[-length:].normal_()
    # cu_seqlens need not start at 0: one sequence holding the last `length` rows
    cu = torch.tensor([total - length, total], dtype=torch.int32, device="cuda")
    tail = git_attention(q, k, v, cu, 100, max_seqlen=length)[-length:]
    alone = git_attention(*(x[-length:].contiguous() for x in (q, k, v)), _cu([length], "cuda"), 100)
    assert math.isfinite(tail.float().abs().max().item())
    torch.testing.assert_close(tail, alone, rtol=0, atol=0)


@triton.jit
def _exp2_kernel(X, Y, n, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, exp2(x, PRECISE), mask=offs < n)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 2^inf, by numpy
def test_precise_exp2_within_one_ulp():
    """The fp32 kernels' software exp2 (PRECISE) against exp2 in fp64: under 1 ulp with fma on a
    GPU (the interpreter rounds its fma twice: 1.13), subnormal results kept (not flushed), -inf -> 0,
    NaN -> NaN. (CUDA's own exp2f and Triton's tl.exp2 allow 2 ulp.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-160.0, 130.0, 20011), -torch.rand(20000, generator=g) * 30,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, -126.0, -126.5, -149.0,
                                 -149.5, -150.5, 127.9, 128.0, float("-inf"), float("inf"),
                                 float("nan")])]).to(DEVICE)
    y = torch.empty_like(x)
    _exp2_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), PRECISE=True, BLOCK=1024)
    exact = torch.exp2(x.double())
    assert torch.isnan(y[-1]) and y[-3] == 0 and y[-2] == float("inf")
    ok = torch.isfinite(exact) & (exact.float().abs() < float("inf"))
    ulp = torch.nextafter(exact[ok].float().abs(), torch.tensor(float("inf"), device=DEVICE)) \
        - exact[ok].float().abs()
    err = ((y[ok].double() - exact[ok]).abs() / ulp.double())
    assert err.max() <= (1.0 if DEVICE == "cuda" else 1.25), (err.max().item(), x[ok][err.argmax()].item())
    subnormal = (exact.float() > 0) & (exact.float() < 2.0 ** -126)
    assert (y[subnormal] > 0).all()                           # not flushed to zero
