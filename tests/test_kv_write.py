"""write_kv_cache (Triton) vs the plain-torch reference: exact copies, skipped slots, no stray writes."""

import pytest
import torch

from gitfast.kernels.api import write_kv_cache
from gitfast.kernels.reference import write_kv_cache_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(num_tokens, heads, head_dim, num_blocks, block_size, dtype, cache_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, heads, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(num_tokens, heads, head_dim, generator=g).to(DEVICE, dtype)
    shape = (num_blocks, block_size, heads, head_dim)
    cache_dtype = cache_dtype or dtype
    # poison: any slot the kernel must not touch stays NaN
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1                                       # padding / already-cached tokens
    return k, v, k_cache, v_cache, slots.to(DEVICE)


def _same(a, b):
    """Bitwise equality that treats NaN == NaN (untouched poisoned slots)."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim,block_size", [(12, 64, 16), (3, 80, 4), (2, 32, 1)])
def test_matches_reference(dtype, heads, head_dim, block_size):
    k, v, kc, vc, slots = _setup(13, heads, head_dim, 32 // block_size, block_size, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv_cache(k, v, kc, vc, slots)
    write_kv_cache_reference(k, v, kc_ref, vc_ref, slots)
    assert _same(kc, kc_ref) and _same(vc, vc_ref)
    # written slots hold the tokens exactly; skipped tokens wrote nothing
    keep = slots >= 0
    s = slots[keep]
    assert torch.equal(kc[s // block_size, s % block_size], k[keep])
    assert torch.isnan(kc).sum() == kc.numel() - keep.sum() * heads * head_dim


def test_strided_inputs_and_casting_store():
    """k/v as views of a fused QKV output; fp32 values stored into a bf16 cache (rounded to nearest)."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(7, 3, 2, 64, generator=g).to(DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]
    kc = torch.full((4, 4, 2, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    vc = kc.clone()
    slots = torch.tensor([5, -1, 0, 15, 9, -3, 2], device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv_cache(k, v, kc, vc, slots)
    write_kv_cache_reference(k, v, kc_ref, vc_ref, slots)
    assert _same(kc, kc_ref) and _same(vc, vc_ref)


def test_strided_slot_mapping():
    """slot_mapping as every other element of a wider tensor (e.g. a column of per-token metadata)."""
    k, v, kc, vc, slots = _setup(9, 2, 64, 4, 4, torch.float32, seed=4)
    wide = torch.stack([slots, torch.zeros_like(slots)], dim=1)     # [tokens, 2]: slot, other
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv_cache(k, v, kc, vc, wide[:, 0])
    write_kv_cache_reference(k, v, kc_ref, vc_ref, slots)
    assert wide[:, 0].stride(0) == 2
    assert _same(kc, kc_ref) and _same(vc, vc_ref)


def test_all_skipped_and_empty():
    k, v, kc, vc, _ = _setup(4, 2, 64, 2, 4, torch.float16)
    before = kc.clone()
    write_kv_cache(k, v, kc, vc, torch.full((4,), -1, device=DEVICE))
    write_kv_cache(k[:0], v[:0], kc, vc, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert _same(kc, before)


def test_bad_arguments_raise():
    k, v, kc, vc, slots = _setup(4, 2, 64, 2, 4, torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        write_kv_cache(k[..., :48], v[..., :48], kc[..., :48], vc[..., :48], slots)
    with pytest.raises(ValueError, match="caches"):
        write_kv_cache(k, v, kc[:, :, :1], vc[:, :, :1], slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, v, kc, vc, slots[:2])


def test_launches_on_the_tensors_device(monkeypatch):
    """The launch runs inside launch_device(k's device), which makes that GPU and its stream
    current (tested in test_paged_attention.py)."""
    from gitfast.kernels import kv_write

    from launch_spy import spy_launches

    devices, launches = spy_launches(monkeypatch, kv_write, ["_write_kv_kernel"])
    k, v, kc, vc, slots = _setup(4, 2, 64, 2, 4, torch.float32)
    write_kv_cache(k, v, kc, vc, slots)
    assert devices == [k.device] and launches == [("_write_kv_kernel", True)]


@pytest.mark.cuda
def test_cuda_pool_past_int32():
    """A pool of > 2^31 elements: slots in its last blocks must land where the reference puts them."""
    heads, head_dim, block_size = 12, 64, 16
    num_blocks = (2 ** 31) // (block_size * heads * head_dim) + 64
    try:
        kc = torch.zeros(num_blocks, block_size, heads, head_dim, dtype=torch.float16, device="cuda")
        vc = torch.zeros_like(kc)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a >2^31-element pool")
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(256, heads, head_dim, generator=g, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    top = num_blocks * block_size
    slots = torch.arange(top - 256, top, device="cuda").flip(0)
    write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc[slots // block_size, slots % block_size], k)
    assert torch.equal(vc[slots // block_size, slots % block_size], v)
    assert kc[: num_blocks - 64].abs().sum() == 0     # nothing wrapped around to low addresses


def test_an_interpreter_too_old_for_the_kernels_is_refused_by_name(monkeypatch):
    import triton

    from gitfast.kernels import _common

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    _common._check_interpreter_version.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0's CPU interpreter .* needs triton>=3\.8"):
            _common.interpreting()
    finally:
        _common._check_interpreter_version.cache_clear()
