"""gitfast._C's CPU attention (gitfast.attention.cpu_backend) vs fp64 oracles: kernels/reference.py run in
float64 on the same inputs.

Shapes are odd on purpose: one-token sequences, 17 tokens (half a key tile), 197 image + 20 text
tokens; head dims 32, 64 and 80 (80 is not a power of two). Paged caches are NaN-poisoned wherever
no sequence wrote (unused blocks and the unused tail slots of used blocks), block tables are shuffled
and padded with out-of-range garbage: a read past a context or through an unused entry shows up as
NaN. fp32 is held to 1e-5; bf16/fp16 to twice the error of the plain-torch reference computed in that
dtype. The vector ISA paths the CPU lacks or does not pick are run in subprocesses with
GITFAST_CPU_ISA capping them (the choice among the ISAs left is measured once per process).
"""
import os
import time

import pytest
import torch

from gitfast.attention import cpu_backend as ca
from gitfast import ops
from gitfast.kernels.reference import (
    git_attention_reference,
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)
from forced_isa import run_with_isa

# skipped only without the extension: a build of it that lacks these ops fails here
pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="gitfast._C not built")
F64 = torch.float64
LOW = (torch.bfloat16, torch.float16)
LENS = [1, 17, 217]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_low(out, gold, torch_low):
    """bf16/fp16: the kernel's error at most twice that of torch's reference in the same dtype."""
    err, torch_err = _err(out, gold), _err(torch_low, gold)
    assert err <= 2 * torch_err, (err, torch_err)


def test_built_extension_has_the_cpu_attention_ops():
    assert ca.available(), "gitfast._C is built without its CPU attention ops"


# -- git_attention --------------------------------------------------------------------------------

IMAGE_CASES = {
    "int": (9, [9, 9, 9]),
    "per_seq": (torch.tensor([1, 5, 197], dtype=torch.int32), None),
    "int64_per_seq": (torch.tensor([0, 17, 150]), None),
    "zero_dim": (torch.tensor(197), None),
    "causal": (0, None),
    "clamped_image_only": (10_000, None),  # every token an image token: the vision encoder's attention
}


@pytest.mark.parametrize("head_dim", [32, 64, 80])
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_git_attention_fp32(case, head_dim):
    n_img, _ = IMAGE_CASES[case]
    q, k, v = (_randn(sum(LENS), 3, head_dim, seed=s) for s in range(3))
    out = ca.git_attention(q.float(), k.float(), v.float(), _cu(LENS), n_img)
    gold = git_attention_reference(q, k, v, _cu(LENS), n_img, compute_dtype=F64)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)


def test_git_attention_empty_sequences_and_scale():
    lens = [0, 5, 0, 3]
    q, k, v = (_randn(8, 2, 64, seed=s).float() for s in range(3))
    out = ca.git_attention(q, k, v, _cu(lens), 2, max_seqlen=5, sm_scale=0.3)
    gold = git_attention_reference(q.double(), k.double(), v.double(), _cu(lens), 2, sm_scale=0.3, compute_dtype=F64)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)


def test_git_attention_strided_views():
    """q, k, v as views of one fused [N, 3, H, D] projection, cu_seqlens a strided int64 view."""
    qkv = _randn(sum(LENS), 3, 2, 64, seed=4).float()
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    cu = torch.stack([_cu(LENS).long(), torch.full((4,), -7)], 1)[:, 0]  # stride 2, int64
    out = ca.git_attention(q, k, v, cu, torch.tensor([3, 9, 197])[::1])
    gold = git_attention_reference(q.double(), k.double(), v.double(), _cu(LENS), torch.tensor([3, 9, 197]),
                                   compute_dtype=F64)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)
    # a head dim that is not dense is copied, not misread
    wide = _randn(sum(LENS), 2, 128, seed=5).float()[..., ::2]
    out = ca.git_attention(wide, wide, wide, _cu(LENS), 5)
    gold = git_attention_reference(*(wide.double(),) * 3, _cu(LENS), 5, compute_dtype=F64)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW)
def test_git_attention_low_precision(dtype):
    q, k, v = (_randn(sum(LENS), 2, 64, seed=s).to(dtype) for s in range(3))
    n_img = torch.tensor([1, 5, 197])
    out = ca.git_attention(q, k, v, _cu(LENS), n_img)
    assert out.dtype == dtype
    gold = git_attention_reference(q.double(), k.double(), v.double(), _cu(LENS), n_img, compute_dtype=F64)
    _check_low(out, gold, git_attention_reference(q, k, v, _cu(LENS), n_img, compute_dtype=dtype))


# every query sees every key (image tokens only): the all-keys path, blocks of 6 (AVX2) or 8 rows over
# panels of 16 or 32 keys. Lengths around both, several images packed, head dims across the panels
# (10: fp32 keys go into their panels 4 keys x 4 dims at a time, and 10 leaves 2 dims over).
ALL_KEYS_LENS = [1, 2, 6, 7, 13, 16, 33, 197]


@pytest.mark.parametrize("head_dim", [10, 16, 40, 64, 80, 128])
def test_all_keys_path_fp32(head_dim):
    q, k, v = (_randn(sum(ALL_KEYS_LENS), 3, head_dim, seed=s) for s in range(3))
    out = ca.git_attention(q.float(), k.float(), v.float(), _cu(ALL_KEYS_LENS), 10_000)
    gold = git_attention_reference(q, k, v, _cu(ALL_KEYS_LENS), 10_000, compute_dtype=F64)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW)
def test_all_keys_path_low_precision(dtype):
    q, k, v = (_randn(sum(ALL_KEYS_LENS), 2, 64, seed=s).to(dtype) for s in range(3))
    out = ca.git_attention(q, k, v, _cu(ALL_KEYS_LENS), 10_000)
    assert out.dtype == dtype
    gold = git_attention_reference(q.double(), k.double(), v.double(), _cu(ALL_KEYS_LENS), 10_000, compute_dtype=F64)
    _check_low(out, gold, git_attention_reference(q, k, v, _cu(ALL_KEYS_LENS), 10_000, compute_dtype=dtype))


@pytest.mark.parametrize("backend", ["torch", "cpu ext"])
def test_vision_attention_takes_the_decided_backend(fresh_decision, monkeypatch, backend):
    """attention.bidirectional (the vision encoder, image prefixes) runs the backend the decision names,
    forced here both ways; both give the fp64 softmax's answer on [B, T, H, D] views of a fused QKV."""
    from gitfast import attention
    from gitfast.attention import torch_backend

    fresh_decision(ca.VISION_KIND, ca.VISION_ENV)
    monkeypatch.setenv(ca.VISION_ENV, backend)
    calls = []
    real = ca.git_attention
    monkeypatch.setattr(ca, "git_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    q, k, v = _randn(3, 45, 3, 4, 64, seed=7).float().unbind(2)
    want = git_attention_reference(*(t.double().flatten(0, 1) for t in (q, k, v)), _cu([45] * 3), 45,
                                   compute_dtype=F64).view(q.shape)
    expected = ca.BACKEND if backend == "cpu ext" else torch_backend.BACKEND
    assert attention.backend_for(attention.VISION, q) is expected
    calls.clear()  # the forced candidate's own check
    got = attention.bidirectional(q, k, v)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert calls == ([(135, 4, 64)] if backend == "cpu ext" else [])
    assert ca.vision_decision().how.startswith("forced")


def test_vision_attention_is_measured(fresh_decision):
    fresh_decision(ca.VISION_KIND, ca.VISION_ENV)
    d = ca.vision_decision()
    assert d.chosen in ("torch", "cpu ext") and d.how == "measured" and set(d.seconds) == {"torch", "cpu ext"}, d


# -- paged caches ---------------------------------------------------------------------------------


def _paged(lens, heads, head_dim, block_size, seed=0, shared_prefix=0):
    """A NaN-poisoned fp64 pool holding each sequence's K/V through a shuffled block table; sequences
    share their first `shared_prefix` tokens' blocks (one cached image, several prompts)."""
    g = torch.Generator().manual_seed(seed)
    n_shared = shared_prefix // block_size
    own = [-(-(L - shared_prefix) // block_size) for L in lens]
    num_blocks = n_shared + sum(own) + 3                         # a few blocks nobody uses
    width = max(n_shared + o for o in own) + 2                   # garbage entries past the used ones
    perm = torch.randperm(num_blocks, generator=g)
    k_cache = torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=F64)
    v_cache = k_cache.clone()
    tables = torch.randint(-5, num_blocks + 5, (len(lens), width), generator=g)
    prefix = [torch.randn(shared_prefix, heads, head_dim, generator=g, dtype=F64) for _ in range(2)]
    nxt = n_shared
    for b, L in enumerate(lens):
        blocks = torch.cat([perm[:n_shared], perm[nxt:nxt + own[b]]])
        nxt += own[b]
        tables[b, :len(blocks)] = blocks
        t = torch.arange(L)
        for cache, pre in ((k_cache, prefix[0]), (v_cache, prefix[1])):
            fresh = torch.randn(L - shared_prefix, heads, head_dim, generator=g, dtype=F64)
            cache[blocks[t // block_size], t % block_size] = torch.cat([pre, fresh])
    return k_cache, v_cache, tables.to(torch.int32)


def _i32(xs):
    return torch.tensor(xs, dtype=torch.int32)


@pytest.mark.parametrize("head_dim", [32, 40, 64, 80])  # 40: a whole number of AVX2 vectors, padded to 48
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_fp32(block_size, head_dim):
    lens = [1, 17, 217, 0]                                        # 0: no context, zeros out
    kc, vc, tables = _paged([max(L, 1) for L in lens], 3, head_dim, block_size, seed=head_dim)
    q = _randn(len(lens), 3, head_dim, seed=1)
    out = ca.paged_decode_attention(q.float(), kc.float(), vc.float(), tables, _i32(lens))
    gold = paged_decode_attention_reference(q, kc, vc, tables, _i32(lens), compute_dtype=F64)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("dtype", LOW)
def test_decode_low_precision(dtype):
    lens = [3, 45, 217]
    kc, vc, tables = _paged(lens, 2, 64, 8, seed=3)
    kc, vc = kc.to(dtype), vc.to(dtype)
    q = _randn(3, 2, 64, seed=2).to(dtype)
    out = ca.paged_decode_attention(q, kc, vc, tables, _i32(lens))
    gold = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), tables, _i32(lens),
                                            compute_dtype=F64)
    _check_low(out, gold, paged_decode_attention_reference(q, kc, vc, tables, _i32(lens), compute_dtype=dtype))


def _decode_both_paths(lens, heads, head_dim, dtype, threads, seed):
    """One decode step with every context non-empty (the kernel's by-sequence path: a sequence's heads
    read together, in groups of heads at small batches) and the same step with one empty context more
    (the per-head path), at `threads` threads; the oracle of the first."""
    kc, vc, tables = _paged(lens + [1], heads, head_dim, 16, seed=seed)
    kc, vc = kc.to(dtype), vc.to(dtype)
    q = _randn(len(lens) + 1, heads, head_dim, seed=seed + 1).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        by_sequence = ca.paged_decode_attention(q[:-1], kc, vc, tables[:-1], _i32(lens))
        per_head = ca.paged_decode_attention(q, kc, vc, tables, _i32(lens + [0]))
    finally:
        torch.set_num_threads(before)
    gold = paged_decode_attention_reference(q[:-1].double(), kc.double(), vc.double(), tables[:-1], _i32(lens),
                                            compute_dtype=F64)
    return by_sequence, per_head[:-1], gold, (q[:-1], kc, vc, tables[:-1])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads", [5, 12])
@pytest.mark.parametrize("head_dim", [32, 40, 80])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_by_sequence_fp32(batch, head_dim, heads, threads):
    lens = [217, 1, 40][:batch]
    got, per_head, gold, _ = _decode_both_paths(lens, heads, head_dim, torch.float32, threads, seed=head_dim + heads)
    torch.testing.assert_close(got.double(), gold, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, per_head)  # the same arithmetic in the same order per head


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_by_sequence_low_precision(batch):
    lens = [217, 1, 40][:batch]
    got, per_head, gold, (q, kc, vc, tables) = _decode_both_paths(lens, 12, 64, torch.bfloat16, 2, seed=batch)
    _check_low(got, gold, paged_decode_attention_reference(q, kc, vc, tables, _i32(lens), compute_dtype=torch.bfloat16))
    assert torch.equal(got, per_head)


PREFILL_CASES = {
    # (new tokens per sequence, image tokens, shared cached prefix)
    "text_after_image": ([20, 1, 7], 197, 200),
    "per_seq_images": ([17, 1, 20], torch.tensor([0, 4, 197], dtype=torch.int32), 200),
    "whole_prompt": ([217, 17, 1], torch.tensor([197, 40, 0]), 0),  # nothing cached before
}


@pytest.mark.parametrize("head_dim", [32, 80])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_fp32(case, head_dim):
    n_new, n_img, prefix = PREFILL_CASES[case]
    lens = [prefix + n for n in n_new] if prefix else list(n_new)
    kc, vc, tables = _paged(lens, 2, head_dim, 16, seed=len(case), shared_prefix=prefix)
    q = _randn(sum(n_new), 2, head_dim, seed=6)
    out = ca.paged_prefill_attention(q.float(), kc.float(), vc.float(), tables, _cu(n_new), _i32(lens), n_img)
    gold = paged_prefill_attention_reference(q, kc, vc, tables, _cu(n_new), _i32(lens), n_img, compute_dtype=F64)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)


def test_prefill_equals_git_attention_without_prefix():
    lens = [21, 6]
    kc, vc, tables = _paged(lens, 2, 64, 4, seed=9)
    t = [torch.arange(L) for L in lens]
    k = torch.cat([kc[tables[b, t[b] // 4].long(), t[b] % 4] for b in range(2)]).float()
    v = torch.cat([vc[tables[b, t[b] // 4].long(), t[b] % 4] for b in range(2)]).float()
    q = _randn(27, 2, 64, seed=4).float()
    paged = ca.paged_prefill_attention(q, kc.float(), vc.float(), tables, _cu(lens), _i32(lens), 8)
    torch.testing.assert_close(paged, ca.git_attention(q, k, v, _cu(lens), 8), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW)
def test_prefill_low_precision(dtype):
    n_new, lens = [9, 20], [205, 217]
    kc, vc, tables = _paged(lens, 2, 64, 8, seed=5, shared_prefix=192)
    kc, vc = kc.to(dtype), vc.to(dtype)
    q = _randn(29, 2, 64, seed=7).to(dtype)
    out = ca.paged_prefill_attention(q, kc, vc, tables, _cu(n_new), _i32(lens), 197)
    gold = paged_prefill_attention_reference(q.double(), kc.double(), vc.double(), tables, _cu(n_new), _i32(lens),
                                             197, compute_dtype=F64)
    _check_low(out, gold, paged_prefill_attention_reference(q, kc, vc, tables, _cu(n_new), _i32(lens), 197,
                                                            compute_dtype=dtype))


# -- errors, tracing, ISA ---------------------------------------------------------------------------


def test_bad_inputs_are_refused_by_name():
    kc, vc, tables = _paged([5], 2, 64, 4)
    kc, vc, q = kc.float(), vc.float(), torch.zeros(1, 2, 64)
    bad = tables.clone()
    bad[0, 1] = 10_000                                            # an entry the context reaches
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 1\] = 10000 is not a block"):
        ca.paged_decode_attention(q, kc, vc, bad, _i32([5]))
    with pytest.raises(RuntimeError, match="context_lens"):
        ca.paged_decode_attention(q, kc, vc, tables, _i32([10_000]))
    with pytest.raises(RuntimeError, match="new tokens but context_lens"):
        ca.paged_prefill_attention(torch.zeros(6, 2, 64), kc, vc, tables, _cu([6]), _i32([5]), 0)
    with pytest.raises(RuntimeError, match="head_dim 300"):
        ca.git_attention(*(torch.zeros(3, 1, 300),) * 3, _cu([3]), 0)
    with pytest.raises(RuntimeError, match="k has dtype"):
        ca.git_attention(q, q.double(), q, _cu([1]), 0)
    with pytest.raises(RuntimeError, match="cu_seqlens spans"):
        ca.git_attention(q, q, q, _cu([2]), 0)


def test_opcheck():
    kc, vc, tables = _paged([5, 9], 2, 32, 4)
    kc, vc = kc.float(), vc.float()
    q = torch.randn(14, 2, 32)
    g = torch.ops.gitfast
    for op, args in (
        (g.git_attention, (q, q.clone(), q.clone(), _cu([5, 9]), None, 3, None)),
        (g.git_attention, (q, q.clone(), q.clone(), _cu([5, 9]), _i32([1, 9]), 0, 0.2)),
        (g.paged_decode_attention, (q[:2].clone(), kc, vc, tables, _i32([5, 9]), None)),
        (g.paged_prefill_attention, (q, kc, vc, tables, _cu([5, 9]), _i32([5, 9]), None, 4, None)),
    ):
        torch.library.opcheck(op, args)


def test_isa_reported():
    forced = os.environ.get("GITFAST_CPU_ISA")
    assert ca.isa() in ("avx512", "avx2", "generic")
    if forced:
        assert ca.isa() == forced


@pytest.fixture
def fresh_isa_choice(fresh_decision):
    """The attention ISA decided anew in the test; afterwards the widest again, as a new process has."""
    fresh_decision("cpu_attention_isa", "GITFAST_ATTENTION_ISA")
    yield
    torch.ops.gitfast.set_cpu_isa(torch.ops.gitfast.cpu_isas()[0])


def test_the_isa_is_measured_and_set(fresh_isa_choice):
    isas = list(torch.ops.gitfast.cpu_isas())
    assert isas[-1] == "generic" and len(set(isas)) == len(isas)
    d = ca.decision()
    assert d.chosen in isas and ca.isa() == d.chosen == torch.ops.gitfast.cpu_isa()
    assert d.how == ("measured" if len(isas) > 1 else "only one fit")


def test_a_slow_isa_is_not_chosen(fresh_isa_choice, monkeypatch):
    isas = list(torch.ops.gitfast.cpu_isas())
    if len(isas) < 2:
        pytest.skip("this CPU runs one ISA only")
    real = ca._prepare

    def prepare(name):  # the widest ISA, made 250 ms slower per call: the measurement must pass it over
        calls = real(name)  # (50 ms was within reach of the other ISA's wall time at load 8 on 2 cores)
        if name != isas[0]:
            return calls
        return [lambda call=call: (time.sleep(0.25), call()) for call in calls]
    monkeypatch.setattr(ca, "_prepare", prepare)
    d = ca.decision()
    assert d.chosen != isas[0] and torch.ops.gitfast.cpu_isa() == d.chosen, d


def test_an_isa_can_be_forced_and_unknown_ones_are_refused(fresh_isa_choice, monkeypatch):
    monkeypatch.setenv("GITFAST_ATTENTION_ISA", "generic")
    assert ca.isa() == "generic" == torch.ops.gitfast.cpu_isa() and "forced" in ca.decision().how
    with pytest.raises(RuntimeError, match="is not one of this CPU's ISAs"):
        torch.ops.gitfast.set_cpu_isa("sse9")


@pytest.mark.skipif(os.environ.get("GITFAST_CPU_ISA") is not None, reason="already a forced-ISA run")
@pytest.mark.parametrize("forced", ["avx2", "generic"])
def test_forced_isa_paths(forced):
    """The fallback paths this CPU does not pick, forced by GITFAST_CPU_ISA in a fresh process."""
    if forced == "avx2" and not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("no AVX2 on this CPU")
    done = run_with_isa(__file__, forced, "isa_reported or fp32 or low_precision or vision_attention_takes")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_model_attention_on_the_cpu_runs_these_kernels(monkeypatch):
    """gitfast.attention's paged decode and prefill take the C++ kernels on the CPU, with the plain-torch
    answers (the vision encoder's attention: the measured choice, tested above)."""
    from gitfast import attention
    from gitfast.attention import torch_backend

    calls = []
    for name in ("paged_decode_attention", "paged_prefill_attention", "git_attention"):
        real = getattr(ca, name)
        monkeypatch.setattr(ca, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.randn(2, 8, 4, 2, 32, generator=g)  # 8 blocks of 4 slots, 2 heads
    tables, lens = torch.tensor([[5, 2, 0], [7, 1, 3]], dtype=torch.int32), [5, 9]
    q = torch.randn(2, 2, 32, generator=g)
    meta = attention.AttentionMetadata(attention.DECODE, torch.tensor([-1, -1]), tables, _i32(lens),
                                       max_context=max(lens))
    assert attention.backend_for(attention.DECODE, q) is ca.BACKEND
    got = attention.paged(q, q, q, kc, vc, meta)  # slots -1: nothing written
    want = torch_backend.BACKEND.decode(q, kc, vc, meta)
    assert calls == ["paged_decode_attention"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- write_kv_cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 700])  # a decode step's rows inline; a prefix's split over threads
def test_write_kv_cache_writes_exactly_the_slots(dtype, n):
    g = torch.Generator().manual_seed(n)
    qkv = torch.randn(n, 3, 2, 32, generator=g).to(dtype)
    k, v = qkv[:, 1], qkv[:, 2]  # strided views of a fused projection, as the model hands them
    kc = torch.full((60, 16, 2, 32), float("nan"), dtype=dtype)
    vc = kc.clone()
    slots = torch.randperm(60 * 16, generator=g)[:n]
    slots[::4] = -1  # skipped
    want_k, want_v = kc.clone(), vc.clone()
    keep = slots >= 0
    want_k.view(-1, 2, 32)[slots[keep]] = k[keep]
    want_v.view(-1, 2, 32)[slots[keep]] = v[keep]
    ca.write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), want_v.nan_to_num(7.0))


def test_write_kv_cache_refuses_a_slot_past_the_cache():
    k = torch.randn(2, 2, 32)
    kc = torch.zeros(4, 4, 2, 32)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 16 is past the cache's 16 slots"):
        ca.write_kv_cache(k, k, kc, kc.clone(), torch.tensor([0, 16]))
    torch.library.opcheck(torch.ops.gitfast.write_kv_cache, (k, k.clone(), kc, kc.clone(), torch.tensor([3, -1])))


def test_model_kv_writes_on_the_cpu_take_the_extension(monkeypatch):
    from gitfast import attention

    calls = []
    real = ca.write_kv_cache
    monkeypatch.setattr(ca, "write_kv_cache", lambda *a: calls.append(1) or real(*a))
    k = torch.randn(3, 2, 32)
    kc = torch.zeros(4, 4, 2, 32)
    attention.write_kv(k, k, kc, kc.clone(), torch.tensor([5, -1, 0]))
    assert calls == [1] and torch.equal(kc[1, 1], k[0]) and torch.equal(kc[0, 0], k[2])
