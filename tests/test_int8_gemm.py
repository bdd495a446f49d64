"""gitfast._C's exact int8 GEMM int8_mm (csrc/cpu/int8_gemm.cpp, dynamic INT8's "cpu ext" backend; the
7-bit "cpu ext u7" GEMM has tests/test_int8_gemm_u7_packed.py):
int32 results equal to an int64 matmul, bit for bit, on shapes that leave partial register tiles
(rows not a multiple of 2, columns not of 4, K not of a vector), extremes (-128 .. 127), empty
and one-row inputs, and rows past one L2 pass. Every ISA path: the CPU's own here, the others in a
subprocess with GITFAST_CPU_ISA capping the kernels.
"""
import os

import pytest
import torch

from gitfast import ops
from forced_isa import run_with_isa

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


@pytest.mark.skipif(os.environ.get("GITFAST_CPU_ISA") is not None, reason="already a forced-ISA run")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_isa_paths(isa):
    if isa == g.int8_isa():
        pytest.skip(f"{isa} is this CPU's own path, tested above")
    done = run_with_isa(__file__, isa, "exact or extremes or isa_reported")
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
