"""gitfast.attention's backends behind one interface: each implements it, `selection.backend_for`
picks one by the rules its docstring states, and the plain-torch backend (the fallback everywhere)
matches the fp64 references of `gitfast.kernels.reference` on shuffled block tables."""
import pytest
import torch

from gitfast import attention, ops
from gitfast.attention import cpu_backend, interface, torch_backend, triton_backend
from gitfast.kernels.reference import (
    git_attention_reference,
    git_mask,
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)

F64 = torch.float64
BACKENDS = [torch_backend.BACKEND, cpu_backend.BACKEND, triton_backend.BACKEND]


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_every_backend_implements_the_interface(backend):
    assert isinstance(backend, interface.AttentionBackend)
    for op in interface.OPS:  # every operation has an answer, and plain torch serves them all
        assert isinstance(backend.serves(op, torch.zeros(1, 2, 64), torch.zeros(2, 4, 2, 64)), bool)
    assert all(torch_backend.BACKEND.serves(op, torch.zeros(1, 2, 40)) for op in interface.OPS)


def test_kernel_backends_refuse_what_they_do_not_run():
    q64, q40 = torch.zeros(2, 2, 64), torch.zeros(2, 2, 40)
    pool = torch.zeros(4, 4, 2, 64)
    for backend in (cpu_backend.BACKEND, triton_backend.BACKEND):
        assert backend.serves(interface.DECODE, q64) and not backend.serves(interface.DECODE, q40)
        assert not backend.serves(interface.DENSE_PADDED, q64)
    assert triton_backend.BACKEND.serves(interface.VISION, q64)
    # the CPU's all-keys path serves image tokens as measured against SDPA, never an unbuilt head size
    assert cpu_backend.BACKEND.serves(interface.VISION, q64) == (cpu_backend.vision_decision().chosen == "cpu ext")
    assert not cpu_backend.BACKEND.serves(interface.VISION, q40)
    assert cpu_backend.BACKEND.serves(interface.WRITE_KV, q64, pool)
    assert not cpu_backend.BACKEND.serves(interface.WRITE_KV, q64, pool.transpose(0, 1))


@pytest.mark.skipif(not ops.extension_loaded(), reason="gitfast._C not built")
def test_selection_on_the_cpu():
    q = torch.zeros(2, 2, 64)
    plain = torch_backend.BACKEND
    assert attention.backend_for(interface.DECODE, q) is cpu_backend.BACKEND
    assert attention.backend_for(interface.DECODE, q.requires_grad_()) is plain   # kernels have no backward
    assert attention.backend_for(interface.PREFILL, torch.zeros(3, 2, 40)) is plain  # head size not built
    vision = cpu_backend.BACKEND if cpu_backend.vision_decision().chosen == "cpu ext" else plain  # measured
    assert attention.backend_for(interface.VISION, torch.zeros(1, 5, 2, 64)) is vision
    assert attention.backend_for(interface.VISION, torch.zeros(1, 5, 2, 64, requires_grad=True)) is plain
    assert attention.backend_for(interface.DENSE_PADDED, torch.zeros(1, 5, 2, 64)) is plain
    k, v = torch.zeros(3, 2, 64), torch.zeros(3, 2, 64, requires_grad=True)
    assert attention.backend_for(interface.WRITE_KV, k, v, cache=torch.zeros(4, 4, 2, 64)) is plain


def _pool(lens, heads, dim, block_size, seed):
    """K/V pools holding each sequence's tokens through a shuffled block table (padded with real
    block ids, as the engine pads), and each sequence's dense K/V in fp64."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in lens]
    perm = torch.randperm(sum(blocks) + 2, generator=g)
    pools = [torch.randn(len(perm), block_size, heads, dim, generator=g) for _ in range(2)]
    tables = torch.zeros(len(lens), max(blocks) + 1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[start:start + n]
        start += n
    return pools, tables


def test_torch_paged_decode_and_prefill_match_the_references():
    lens, new, n_img, block_size = [7, 30, 13], [2, 5, 1], 6, 4
    (kp, vp), tables = _pool(lens, 2, 16, block_size, seed=1)
    ctx = torch.tensor(lens, dtype=torch.int32)
    cu = torch.tensor([0, 2, 7, 8], dtype=torch.int32)
    q = _randn(sum(new), 2, 16, seed=2)
    meta = interface.AttentionMetadata(interface.PREFILL, torch.full((8,), -1), tables, ctx, cu, n_img,
                                       max_q=max(new), max_context=max(lens))
    got = torch_backend.BACKEND.prefill(q, kp, vp, meta)
    want = paged_prefill_attention_reference(q, kp, vp, tables, cu, ctx, n_img, compute_dtype=F64)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
    qd = _randn(3, 2, 16, seed=3)
    meta = interface.AttentionMetadata(interface.DECODE, torch.full((3,), -1), tables, ctx, max_context=max(lens))
    got = torch_backend.BACKEND.decode(qd, kp, vp, meta)
    want = paged_decode_attention_reference(qd, kp, vp, tables, ctx, compute_dtype=F64)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_image", [None, 0, 4, 9])  # None: the vision encoder (all image tokens)
def test_dense_matches_the_reference_and_the_kernels(num_image):
    b, t = 2, 9
    q, k, v = (_randn(b, t, 2, 32, seed=s) for s in range(3))
    cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32)
    flat = [x.reshape(b * t, 2, 32) for x in (q, k, v)]
    want = git_attention_reference(*flat, cu, t if num_image is None else num_image, compute_dtype=F64).view(q.shape)
    got = torch_backend.BACKEND.dense(q, k, v, num_image)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if ops.extension_loaded():
        torch.testing.assert_close(cpu_backend.BACKEND.dense(q, k, v, num_image), want, rtol=1e-5, atol=1e-5)


def test_probabilities_are_the_eager_softmax_under_the_mask():
    q, k, v = (_randn(1, 2, 5, 8, seed=s, dtype=F64) for s in range(3))  # [B, H, T, D]
    mask = git_mask(3, 5, 5)
    out, p = attention.probabilities(q, k, v, mask)
    scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(p, scores.softmax(-1))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    assert (p[0, :, :3, 3:] == 0).all() and (p[0, :, 3, 4] == 0).all()  # image sees no text; text is causal
