"""gitfast._C's bf16 x bf16 kernel (linear_bf16 on pack_bf16_cols weights): the bf16 LM head's fp32
logits (ops.Logits) and bf16 Linear layers at decode rows (ops.Linear), vs an fp64 oracle on the
same bf16 values; the fp32 upcast that serves wider bf16 calls on CPUs without bf16 arithmetic.

Odd shapes on purpose: an odd hidden size (a zero-padded k pair), vocabularies that are not a whole
number of 16-column tiles (or of tile pairs), row counts across the kernel's 8-row chunks, 1-row
decode and 3-D inputs. Products of bf16 values are exact in fp32, so the only error is fp32
summation: held to 1e-5 of the oracle's scale. The portable path (CPUs without AVX512-BF16) runs in
a subprocess with GITFAST_CPU_ISA capping the kernels.
"""
import os

import pytest
import torch

from gitfast import backend_choice as BC, bf16_backends, ops
from forced_isa import run_with_isa

# skipped only without the extension: a build of it that lacks these ops fails here
pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="gitfast._C not built")
g = torch.ops.gitfast


def _bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _check(y, x, w, b):
    gold = x.double() @ w.double().T + (0 if b is None else b.double())
    assert y.dtype == torch.float32 and y.shape == gold.shape
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    assert (y.double() - gold).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("n,k", [(1, 2), (37, 17), (48, 64), (100, 768), (1000, 80)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 21])
def test_against_fp64(n, k, m):
    w, x, b = _bf16(n, k, seed=1), _bf16(m, k, seed=2), torch.randn(n)
    packed = g.pack_bf16_cols(w)
    assert packed.shape == ((n + 31) // 32 * 2, (k + 1) // 2, 16, 2)
    _check(g.linear_bf16(x, packed, n, b), x, w, b)
    _check(g.linear_bf16(x, packed, n, None), x, w, None)


def test_packing_poisoned_padding_never_read():
    """Padding is zero-filled by the packer: NaN in the unused columns of a reused buffer cannot leak."""
    w, x = _bf16(37, 17, seed=3), _bf16(5, 17, seed=4)
    packed = g.pack_bf16_cols(w)
    _check(g.linear_bf16(x, packed, 37, None), x, w, None)
    assert torch.isfinite(packed.float()).all()


def test_leading_dims_and_empty():
    w, x = _bf16(50, 32, seed=5), _bf16(2, 3, 32, seed=6)
    y = g.linear_bf16(x, g.pack_bf16_cols(w), 50, None)
    assert y.shape == (2, 3, 50)
    _check(y.reshape(6, 50), x.reshape(6, 32), w, None)
    assert g.linear_bf16(_bf16(0, 32), g.pack_bf16_cols(w), 50, None).shape == (0, 50)
    b = torch.randn(50)  # K = 0: every output is the bias (an empty sum), as in F.linear
    y = g.linear_bf16(_bf16(2, 3, 0), g.pack_bf16_cols(_bf16(50, 0)), 50, b)
    assert torch.equal(y, b.expand(2, 3, 50))


def test_bad_inputs_are_refused_by_name():
    w = _bf16(40, 16)
    packed = g.pack_bf16_cols(w)
    with pytest.raises(RuntimeError, match="pack_bf16_cols: w must be"):
        g.pack_bf16_cols(w.float())
    with pytest.raises(RuntimeError, match="linear_bf16: x must be"):
        g.linear_bf16(_bf16(2, 16).float(), packed, 40, None)
    with pytest.raises(RuntimeError, match="packed must come from pack_bf16_cols"):
        g.linear_bf16(_bf16(2, 18), packed, 40, None)
    with pytest.raises(RuntimeError, match="n = 70"):
        g.linear_bf16(_bf16(2, 16), packed, 70, None)
    with pytest.raises(RuntimeError, match=r"linear_bf16: bias must be a contiguous float32 CPU tensor of 40 entries, "
                                           r"got Float \[39\]"):
        g.linear_bf16(_bf16(2, 16), packed, 40, torch.zeros(39))


def test_opcheck():
    w, x = _bf16(40, 16), _bf16(3, 16)
    packed = g.pack_bf16_cols(w)
    torch.library.opcheck(g.pack_bf16_cols, (w,))
    torch.library.opcheck(g.linear_bf16, (x, packed, 40, torch.randn(40)))


@pytest.fixture
def forced(monkeypatch):
    """force(kind, name): the bf16 backend decision for `kind` made as GITFAST_*_BACKEND=name does;
    skips where `name` cannot run on this CPU, unless `everywhere` (a backend every CPU runs: then it
    fails). The process's own decisions come back afterwards."""
    def force(kind, name, everywhere=False):
        monkeypatch.setenv(bf16_backends._ENV[kind], name)
        BC.forget(kind)
        try:
            bf16_backends.decide(kind)
        except ValueError as exc:
            if everywhere:
                raise
            pytest.skip(str(exc))
    yield force
    for kind in bf16_backends._ENV:
        BC.forget(kind)


@pytest.mark.parametrize("backend", ["cpu ext", "torch fp32"])
def test_logits_module_uses_the_chosen_backend_up_to_32_rows(monkeypatch, forced, backend):
    """ops.Logits on bf16: fp32 logits from the bf16 weight's values, through the kernel for decode-sized
    inputs where it is the logits backend, and an fp32 GEMM beyond; a changed weight is repacked."""
    forced("logits_bf16", backend)
    head = ops.Logits(32, 70).bfloat16()
    calls = []
    real = g.linear_bf16
    monkeypatch.setattr(torch.ops.gitfast, "linear_bf16", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        for rows in (1, 16, 32, 33, 40):
            x = _bf16(rows, 32, seed=rows)
            y = head(x)
            _check(y, x, head.weight, head.bias)
        assert len(calls) == (3 if backend == "cpu ext" else 0)  # else MKL's fp32 GEMM serves
        head.weight.mul_(2)
        x = _bf16(4, 32, seed=9)
        _check(head(x), x, head.weight, head.bias)


def test_bf16_output_rounds_once():
    """fp32_out=False: the fp32 result rounded to bf16 (nearest even) once, at the end."""
    w, x, b = _bf16(70, 48, seed=7), _bf16(3, 48, seed=8), torch.randn(70)
    packed = g.pack_bf16_cols(w)
    y = g.linear_bf16(x, packed, 70, b, False)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, g.linear_bf16(x, packed, 70, b).bfloat16())


def test_bf16_linear_takes_the_kernel_at_up_to_4_rows(monkeypatch, forced):
    forced("linear_bf16", "onednn packed")  # the kernel serves packed layers' narrow calls
    forced("linear_bf16_narrow", "cpu ext")
    lin = ops.Linear(48, 70).bfloat16()
    calls = []
    real = g.linear_bf16
    monkeypatch.setattr(torch.ops.gitfast, "linear_bf16", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.inference_mode():
        for shape in ((1, 48), (2, 2, 48), (5, 48)):
            x = _bf16(*shape, seed=len(shape))
            for activation in (None, "gelu"):
                y = lin(x, activation)
                ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
                ref = ref if activation is None else ops.activation_reference(ref, activation)
                assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 70)
                torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
        with torch.no_grad():
            lin.weight.mul_(-1)  # a changed weight is repacked
        x = _bf16(1, 48, seed=11)
        torch.testing.assert_close(lin(x).float(), torch.nn.functional.linear(x.float(), lin.weight.float(),
                                                                             lin.bias.float()), rtol=2e-2, atol=2e-2)
    assert [tuple(s) for s in calls] == [(1, 48), (1, 48), (2, 2, 48), (2, 2, 48), (1, 48)]


def test_bf16_linear_upcast_takes_the_kernel_at_up_to_32_rows(monkeypatch, forced):
    """"fp32 upcast" (CPUs without bf16 arithmetic): up to 32 rows the kernel, beyond an fp32 GEMM on
    the widened values with the activation in fp32 and one rounding to bf16."""
    forced("linear_bf16", "fp32 upcast", everywhere=True)
    forced("linear_bf16_narrow", "cpu ext", everywhere=True)
    assert bf16_backends.narrow_rows() == 32
    lin = ops.Linear(48, 70).bfloat16()
    calls = []
    real = g.linear_bf16
    monkeypatch.setattr(torch.ops.gitfast, "linear_bf16", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.inference_mode():
        for rows in (1, 32, 33, 40):
            x = _bf16(rows, 48, seed=rows)
            for activation in (None, "gelu", "quick_gelu"):
                y = lin(x, activation)
                ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
                ref = ref if activation is None else ops.activation_reference(ref, activation)
                assert y.dtype == torch.bfloat16 and y.shape == (rows, 70)
                if rows > 32:  # the same fp32 GEMM, rounded once: within one bf16 step of the fp32 result
                    torch.testing.assert_close(y.float(), ref, rtol=2.0**-8, atol=1e-6)
                else:
                    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert calls == [1, 1, 1, 32, 32, 32]
    assert ops.linear_backend("cpu", torch.bfloat16) == "fp32 upcast; cpu ext at <= 32 rows"


def test_patch_conv_widens_with_the_upcast(forced):
    x, w = _bf16(2, 3, 32, 32, seed=3), _bf16(24, 3, 16, 16, seed=4)
    forced("linear_bf16", "fp32 upcast", everywhere=True)
    widened = torch.nn.functional.conv2d(x.float(), w.float(), stride=16)
    assert torch.equal(ops.patch_conv(x, w, 16), widened.bfloat16())
    forced("linear_bf16", "torch", everywhere=True)
    y = ops.patch_conv(x, w, 16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), widened, rtol=2e-2, atol=2e-2)


def test_isa_reported():
    isa = g.logits_isa()
    assert isa in ("avx512bf16", "portable")
    if os.environ.get("GITFAST_CPU_ISA") in ("avx2", "generic"):
        assert isa == "portable"


@pytest.mark.skipif(os.environ.get("GITFAST_CPU_ISA") is not None, reason="already a forced-ISA run")
@pytest.mark.skipif(ops.extension_loaded() and g.logits_isa() != "avx512bf16", reason="the portable path is this CPU's")
def test_portable_path():
    done = run_with_isa(__file__, "avx2", "fp64 or isa_reported")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
