"""gitfast._C's fp32 Linear for few rows (linear_fp32, csrc/cpu/linear_fp32.cpp) against an fp64 oracle,
F.linear and its own fused epilogue, and the layers that take it at decode rows (ops.Linear, ops.Logits,
ops.feed_forward) through the measured decision of gitfast.fp32_backends.

Odd shapes on purpose: output counts that are not a whole number of 4-column tiles, inner sizes with a
tail past the last whole vector (8 floats AVX2, 16 AVX-512), row counts across the tiles' 3 / 4 rows.
The tolerance is the summation bound: each output sums at most K + 2 rounded terms (K products, the
lanes' horizontal sum, the bias), so |error| <= (K + 2) 2^-24 (|x| @ |w|^T + |b|), per element. The
other ISA paths (AVX2 on an AVX-512 CPU, the portable C++) run in subprocesses with GITFAST_CPU_ISA
capping the kernels; the AVX-512 path is the default where the CPU has it.
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F

from gitfast import backend_choice as BC, fp32_backends, ops
from forced_isa import run_with_isa

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="gitfast._C not built")
g = torch.ops.gitfast
U = 2.0 ** -24  # fp32's unit roundoff


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bound(x, w, b):
    """Per-element bound on fp32 summation error for x @ w^T + b, and the fp64 product."""
    xd, wd = x.double().reshape(-1, x.shape[-1]), w.double()
    gold = xd @ wd.T + (0 if b is None else b.double())
    scale = xd.abs() @ wd.abs().T + (0 if b is None else b.double().abs())
    return gold, (x.shape[-1] + 2) * U * scale


def _check(y, x, w, b):
    gold, tol = _bound(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], w.shape[0])
    err = (y.double().reshape(gold.shape) - gold).abs()
    assert (err <= tol).all(), f"worst excess {(err - tol).max().item():.3g} at {divmod(int((err - tol).argmax()), gold.shape[1])}"
    against_mkl = (y.double() - F.linear(x, w, b).double()).abs().reshape(gold.shape)
    assert (against_mkl <= 2 * tol).all()  # both sums are within the bound of the exact one


@pytest.mark.parametrize("n,k", [(1, 1), (37, 17), (5, 7), (100, 768), (1000, 80), (13, 3072)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 33])
def test_against_fp64(n, k, m):
    w, x, b = _randn(n, k, seed=1), _randn(m, k, seed=2), _randn(n, seed=3)
    _check(g.linear_fp32(x, w, b), x, w, b)
    _check(g.linear_fp32(x, w, None), x, w, None)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_fused_activation_is_the_bias_act_pass(activation):
    """The epilogue is norm_act.cpp's bias_act on the same sums: equal to the unfused pass bit for bit,
    and close to the fp64 product's activation."""
    w, x, b = _randn(70, 45, seed=4), _randn(6, 45, seed=5), _randn(70, seed=6)
    y = g.linear_fp32(x, w, b, activation)
    assert torch.equal(y, g.bias_act(g.linear_fp32(x, w, b), None, activation))
    gold, tol = _bound(x, w, b)
    want = ops.activation_reference(gold, activation)
    assert ((y.double() - want).abs() <= 1.2 * tol + 4 * U * want.abs() + 1e-7).all()


def test_leading_dims_and_empty():
    w, b = _randn(50, 32, seed=7), _randn(50, seed=8)
    x = _randn(2, 3, 32, seed=9)
    y = g.linear_fp32(x, w, b)
    assert y.shape == (2, 3, 50)
    _check(y, x, w, b)
    assert g.linear_fp32(_randn(0, 32), w, b).shape == (0, 50)
    empty_k = g.linear_fp32(torch.randn(3, 0), torch.randn(5, 0), b[:5])
    assert torch.equal(empty_k, b[:5].expand(3, 5))


def test_bad_inputs_are_refused_by_name():
    w = _randn(40, 16)
    with pytest.raises(RuntimeError, match="linear_fp32: x must be"):
        g.linear_fp32(_randn(2, 16).double(), w, None)
    with pytest.raises(RuntimeError, match="linear_fp32: w must be"):
        g.linear_fp32(_randn(2, 16), w.t().contiguous().t(), None)
    with pytest.raises(RuntimeError, match="linear_fp32: w must be"):
        g.linear_fp32(_randn(2, 18), w, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        g.linear_fp32(_randn(2, 16), w, torch.zeros(39))
    with pytest.raises(ValueError, match="unsupported activation"):
        g.linear_fp32(_randn(2, 16), w, None, "relu")


def test_opcheck():
    torch.library.opcheck(g.linear_fp32, (_randn(3, 16), _randn(40, 16), _randn(40)))
    torch.library.opcheck(g.linear_fp32, (_randn(3, 16), _randn(40, 16), None, "gelu"))


def test_isa_reported():
    isa = g.linear_fp32_isa()
    assert isa == g.cpu_isas()[0]  # widest_isa: the CPU's widest, capped by GITFAST_CPU_ISA
    forced = os.environ.get("GITFAST_CPU_ISA")
    if forced:
        assert isa == forced


@pytest.mark.skipif(os.environ.get("GITFAST_CPU_ISA") is not None, reason="already a forced-ISA run")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_isa_paths(isa):
    """Each narrower path runs the fp64 and activation tests in its own process (the path is chosen once)."""
    if ops.extension_loaded() and g.linear_fp32_isa() == isa:
        pytest.skip(f"{isa} is this CPU's path: the tests above ran it")
    if isa not in g.cpu_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    done = run_with_isa(__file__, isa, "fp64 or activation or isa_reported or leading")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-500:]


# -- the layers and the decision --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 53), (2, 3, 53), (33, 53)])
@pytest.mark.parametrize("bias", [True, False])
def test_swapped_linear_against_fp64(shape, bias):
    """The "torch swapped" backend, (w @ x^T + b)^T: within the summation bound of the exact product,
    contiguous and shaped like F.linear's output."""
    w, x = _randn(37, 53, seed=10), _randn(*shape, seed=11)
    b = _randn(37, seed=12) if bias else None
    y = fp32_backends.swapped_linear(x, w, b)
    assert y.is_contiguous()
    _check(y, x, w, b)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Row shapes given to the extension's kernel ("ext", shape) and to the swapped GEMM ("swapped", shape)."""
    calls = []
    real, swapped = g.linear_fp32, fp32_backends.swapped_linear
    monkeypatch.setattr(torch.ops.gitfast, "linear_fp32", lambda *a: calls.append(("ext", tuple(a[0].shape))) or real(*a))
    monkeypatch.setattr(fp32_backends, "swapped_linear",
                        lambda *a: calls.append(("swapped", tuple(a[0].shape))) or swapped(*a))
    return calls


@pytest.mark.parametrize("band", fp32_backends.BANDS, ids=lambda band: band.name)
@pytest.mark.parametrize("backend", ["cpu ext", "torch swapped", "torch"])
def test_linear_takes_the_chosen_backend_at_decode_rows(forced_fp32, kernel_calls, band, backend):
    """Rows in the band go to its forced backend (the other band to plain F.linear here), rows past
    both bands to F.linear; the results match F.linear (with the activation) to fp32 rounding. The
    middle band serves weights of at least MIDDLE_MIN_WEIGHT elements only."""
    for other in fp32_backends.BANDS:
        forced_fp32(backend if other is band else "torch", other)
    kernel_calls.clear()  # the forced candidates' own checks
    k = 48 if band is fp32_backends.NARROW else 512  # 512 x 520 >= MIDDLE_MIN_WEIGHT
    lin, head, small = ops.Linear(k, 520), ops.Logits(k, 601), ops.Linear(48, 70)
    low = 1 if band is fp32_backends.NARROW else fp32_backends.NARROW_MAX_ROWS + 1
    inside = [(low, k), (2, low, k) if low > 1 else (2, 3, k), (band.most_rows, k)]
    outside = [(fp32_backends.MIDDLE_MAX_ROWS + 1, k)] + ([(low - 1, k)] if low > 1 else [])
    with torch.inference_mode():
        for shape in inside + outside:
            x = _randn(*shape, seed=len(shape))
            for activation in (None, "gelu"):
                want = F.linear(x, lin.weight, lin.bias)
                want = want if activation is None else ops.activation_reference(want, activation)
                torch.testing.assert_close(lin(x, activation), want, rtol=1e-5, atol=1e-5)
            _check(head(x), x, head.weight, head.bias)
        x = _randn(band.most_rows, 48)
        _check(small(x), x, small.weight, small.bias)
    tag = {"cpu ext": "ext", "torch swapped": "swapped"}.get(backend)
    served = [(tag, shape) for shape in inside for _ in range(3)]
    if band is fp32_backends.NARROW:  # the small layer too
        served.append((tag, (band.most_rows, 48)))
    assert kernel_calls == (served if tag else [])


def test_feed_forward_at_decode_rows_goes_through_the_kernel(forced_fp32, kernel_calls, monkeypatch):
    """fp32 decode rows of either band: fc1 with the activation fused, then fc2, in the kernel; wider
    inputs keep the fused mlp op (MKL), as before."""
    for band in fp32_backends.BANDS:
        forced_fp32("cpu ext", band)
    kernel_calls.clear()
    fc1, fc2 = ops.Linear(512, 520), ops.Linear(520, 512)
    mlp_calls = []
    real_mlp = g.mlp
    monkeypatch.setattr(torch.ops.gitfast, "mlp", lambda *a: mlp_calls.append(a[0].shape) or real_mlp(*a))
    with torch.no_grad():
        for rows in (3, 40, 70):
            x = _randn(rows, 512, seed=rows)
            want = ops.mlp_reference(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "gelu")
            torch.testing.assert_close(ops.feed_forward(x, fc1, fc2, "gelu"), want, rtol=1e-4, atol=1e-5)
    assert kernel_calls == [("ext", (3, 512)), ("ext", (3, 520)), ("ext", (40, 512)), ("ext", (40, 520))]
    assert [tuple(s) for s in mlp_calls] == [(70, 512)]


def test_training_keeps_autograd(forced_fp32, kernel_calls):
    forced_fp32("cpu ext")
    kernel_calls.clear()
    lin = ops.Linear(16, 8)
    x = _randn(2, 16)
    lin(x).sum().backward()
    assert lin.weight.grad is not None and kernel_calls == []


def _slow_kernel(w):
    run = fp32_backends._kernel(w)

    def slow(x):
        time.sleep(0.3)
        return run(x)
    return slow


@pytest.mark.parametrize("band", fp32_backends.BANDS, ids=lambda band: band.name)
def test_a_slow_kernel_is_not_chosen(monkeypatch, band):
    """The decision times every candidate: a kernel that is right but pathologically slow loses after
    one call, and a wrong one is ruled out by the check before it is timed."""
    monkeypatch.delenv(band.env, raising=False)
    monkeypatch.setitem(fp32_backends._MAKERS, "cpu ext", _slow_kernel)
    BC.forget(band.kind)
    try:
        made = fp32_backends.decision(band)
        assert made.chosen != "cpu ext" and made.seconds["cpu ext"] == float("inf"), made
        BC.forget(band.kind)
        monkeypatch.setitem(fp32_backends._MAKERS, "cpu ext", lambda w: (lambda x: F.linear(x, w) * (1 + 1e-4)))
        made = fp32_backends.decision(band)
        assert made.chosen != "cpu ext" and "wrong results" in made.unfit["cpu ext"], made
    finally:
        BC.forget(band.kind)


@pytest.mark.parametrize("backend", ["cpu ext", "torch swapped"])
def test_decode_batches_of_the_middle_band_give_transformers_tokens(forced_fp32, kernel_calls, backend):
    """A batch of 24 sequences decodes through the middle band's backend (greedy, fp32; decoder weights
    of at least MIDDLE_MIN_WEIGHT elements): the same tokens as transformers, as at every other batch size."""
    import gitfast
    from git_factory import make_hf_model, pixels

    forced_fp32(backend, fp32_backends.MIDDLE)
    hf = make_hf_model("hd512")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("hd512", 24, seed=5)
    kernel_calls.clear()
    with torch.inference_mode():
        want = hf.generate(pixel_values=px, max_new_tokens=8)
        got = fm.generate(pixel_values=px, max_new_tokens=8)
    assert torch.equal(got, want)
    assert any(rows == (24, 512) for _, rows in kernel_calls), kernel_calls[:5]
