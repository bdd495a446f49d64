"""gitfast._C's exact int8 GEMMs: int8_mm (csrc/cpu/int8_gemm.cpp, dynamic INT8's "cpu ext" backend)
and int8_mm_u7 (csrc/cpu/int8_gemm_u7.cpp, 7-bit activations with zero points, "cpu ext u7"):
int32 results equal to an int64 matmul, bit for bit, on shapes that leave partial register tiles
(rows not a multiple of 2, columns not of 4, K not of a vector), extremes (-128 .. 127), empty
and one-row inputs, and rows past one L2 pass. Every ISA path: the CPU's own here, the others in a
subprocess with GITFAST_CPU_ISA capping the kernels.
"""
import os
import subprocess
import sys

import pytest
import torch

from gitfast import ops

# skipped only without the extension: a build of it that lacks int8_mm fails here
pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="gitfast._C not built")
g = torch.ops.gitfast


def _int8(*shape, seed=0, low=-128, high=128):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("m,k,n", [(1, 768, 3072), (2, 16, 4), (3, 17, 5), (7, 100, 13), (33, 300, 129),
                                   (1, 1, 1), (5, 31, 7), (9, 33, 4), (700, 200, 9), (0, 8, 3), (4, 8, 0)])
def test_int8_mm_is_exact(m, k, n):
    q, w = _int8(m, k, seed=m + k), _int8(n, k, seed=n + 7)
    got = g.int8_mm(q, w)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    want = (q.long() @ w.long().t()).int()
    assert torch.equal(got, want), (got - want).abs().max()


def test_extremes_and_no_k():
    q = torch.full((3, 1000), -128, dtype=torch.int8)
    w = torch.cat([torch.full((2, 1000), -128, dtype=torch.int8), torch.full((3, 1000), 127, dtype=torch.int8)])
    assert torch.equal(g.int8_mm(q, w), (q.long() @ w.long().t()).int())  # |sum| = 16.4M: int16 pairs exact
    for rows in (3, 40):  # a few rows (weights widened in registers) and many (widened into a buffer)
        assert torch.equal(g.int8_mm(_int8(rows, 0), _int8(2, 0)), torch.zeros(rows, 2, dtype=torch.int32))


def test_bad_inputs_are_named():
    with pytest.raises(RuntimeError, match="q must be a contiguous 2-D int8"):
        g.int8_mm(torch.zeros(2, 3), _int8(4, 3))
    with pytest.raises(RuntimeError, match=r"w must be a contiguous \[N, 3\] int8"):
        g.int8_mm(_int8(2, 3), _int8(4, 5))
    with pytest.raises(RuntimeError, match="q must be a contiguous"):
        g.int8_mm(_int8(3, 4).t(), _int8(4, 3))


def test_opcheck():
    torch.library.opcheck(g.int8_mm, (_int8(5, 40), _int8(9, 40)))


def test_isa_reported():
    isa = g.int8_isa()
    assert isa == g.cpu_isas()[0] and isa in ("avx512", "avx2", "generic")  # the widest, never the measured switch
    assert g.int8_u7_isa() == ("generic" if isa == "generic" else "avx2")  # AVX-512 CPUs run its AVX2 tile


def _u7(m, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 128, (m, k), generator=gen, dtype=torch.uint8),
            torch.randint(0, 128, (m,), generator=gen, dtype=torch.int32))


def _u7_reference(q, zero, w):
    return ((q.long() - zero.long()[:, None]) @ w.long().t()).int()


@pytest.mark.parametrize("m,k,n", [(1, 768, 3072), (2, 32, 4), (3, 17, 5), (7, 100, 13), (33, 300, 129),
                                   (1, 1, 1), (5, 63, 7), (9, 65, 4), (700, 200, 9), (0, 8, 3), (4, 8, 0)])
def test_int8_mm_u7_is_exact(m, k, n):
    (q, zero), w = _u7(m, k, seed=m + k), _int8(n, k, seed=n + 7)
    got = g.int8_mm_u7(q, zero, w, w.sum(1, dtype=torch.int32))
    assert got.dtype == torch.int32 and got.shape == (m, n)
    want = _u7_reference(q, zero, w)
    assert torch.equal(got, want), (got - want).abs().max()


def test_u7_extremes_and_no_k():
    # the largest pair sums VPMADDUBSW sees: 127 * 127 + 127 * 127 and 127 * -128 + 127 * -128 (int16: exact)
    q, zero = torch.full((3, 1000), 127, dtype=torch.uint8), torch.tensor([0, 127, 64], dtype=torch.int32)
    w = torch.cat([torch.full((2, 1000), -128, dtype=torch.int8), torch.full((3, 1000), 127, dtype=torch.int8)])
    assert torch.equal(g.int8_mm_u7(q, zero, w, w.sum(1, dtype=torch.int32)), _u7_reference(q, zero, w))
    q0, z0 = _u7(5, 0, seed=1)
    w0 = _int8(2, 0)
    assert torch.equal(g.int8_mm_u7(q0, z0, w0, w0.sum(1, dtype=torch.int32)), torch.zeros(5, 2, dtype=torch.int32))


def test_u7_bad_inputs_are_named():
    (q, zero), w = _u7(2, 3, seed=0), _int8(4, 3)
    cs = w.sum(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q holds values above 127"):
        g.int8_mm_u7(q + 128, zero, w, cs)  # would saturate the int16 pair sums: refused, not wrong
    with pytest.raises(RuntimeError, match="q must be a contiguous 2-D uint8"):
        g.int8_mm_u7(q.to(torch.int8), zero, w, cs)
    with pytest.raises(RuntimeError, match=r"zero must be a contiguous \[2\] int32"):
        g.int8_mm_u7(q, zero[:1], w, cs)
    with pytest.raises(RuntimeError, match=r"colsum must be a contiguous \[4\] int32"):
        g.int8_mm_u7(q, zero, w, cs.long())
    torch.library.opcheck(g.int8_mm_u7, (*_u7(5, 40, seed=2), _int8(9, 40), _int8(9, 40).sum(1, dtype=torch.int32)))


@pytest.mark.skipif(os.environ.get("GITFAST_CPU_ISA") is not None, reason="already a forced-ISA run")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_isa_paths(isa):
    if isa == g.int8_isa():
        pytest.skip(f"{isa} is this CPU's own path, tested above")
    env = {**os.environ, "GITFAST_CPU_ISA": isa}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "exact or extremes or isa_reported"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
