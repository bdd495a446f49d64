"""gitfast._C's int8_mm_vnni (csrc/cpu/int8_gemm_vnni.cpp: VPDPBUSD on q + 128 over a weight packed
once by pack_u7_weight): int32 results equal to an int64 matmul of q and w, bit for bit, on shapes
that leave partial tiles (rows not a multiple of any path's tile, columns not of 8, 16 or 32, K not of
4), q and w at their extremes (-128 and 127: u = 0 and 255, the largest products), K at the int32
bound, empty inputs and rows past one L2 pass; bad inputs refused by name. Every ISA path: the CPU's
own here, the others in a subprocess with GITFAST_CPU_ISA capping the kernels (a CPU without VNNI
runs the "avx2" path, VPDPBUSD's products done in AVX2, and "generic"; one with VNNI runs
"avx512vnni" or "avxvnni" here).
"""
import os
import subprocess
import sys

import pytest
import torch

from gitfast import int8_backends, ops
from forced_isa import run_with_isa

# skipped only without the extension: a build that lacks the op fails here rather than skipping
pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="gitfast._C not built")
g = torch.ops.gitfast


def _case(m, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return q, w


def _reference(q, w):
    return (q.long() @ w.long().t()).int()


def _mm(q, w):
    return g.int8_mm_vnni(q, g.pack_u7_weight(w), w.sum(1, dtype=torch.int32))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 8, 9, 13, 37])
def test_exact_on_odd_shapes(m):
    for k in (1, 3, 4, 5, 31, 33, 64, 100):
        for n in (1, 7, 8, 9, 16, 17, 31, 32, 33, 48, 70):
            q, w = _case(m, k, n, seed=m * 10007 + k * 101 + n)
            got = _mm(q, w)
            assert got.dtype == torch.int32 and got.shape == (m, n)
            assert torch.equal(got, _reference(q, w)), (m, k, n)


@pytest.mark.parametrize("m,k,n", [(1, 768, 3072), (1500, 200, 9), (13, 3072, 33), (197, 768, 80)])
def test_exact_on_model_and_multi_pass_shapes(m, k, n):
    q, w = _case(m, k, n, seed=m + k + n)
    assert torch.equal(_mm(q, w), _reference(q, w))


def test_extremes_and_empty():
    # q = -128 and 127 are u = 0 and 255 in the kernel; w at -128 and 127: the largest products
    for value in (-128, 127, 0):
        q = torch.full((9, 1001), value, dtype=torch.int8)
        q[1::2] = -value if value != -128 else 127
        w = torch.cat([torch.full((3, 1001), -128, dtype=torch.int8), torch.full((30, 1001), 127, dtype=torch.int8)])
        assert torch.equal(_mm(q, w), _reference(q, w)), value
    q, w = _case(5, 0, 3, seed=1)
    assert torch.equal(_mm(q, w), torch.zeros(5, 3, dtype=torch.int32))
    for m, n in ((0, 3), (4, 0)):
        q, w = _case(m, 8, n, seed=2)
        assert _mm(q, w).shape == (m, n)


def test_int32_bound():
    """K = 65536 is the largest K whose sums of (q + 128) * w fit int32: 255 * -128 * 65536 >= -2^31."""
    q = torch.full((2, 65536), 127, dtype=torch.int8)
    q[1] = -128
    w = torch.full((17, 65536), -128, dtype=torch.int8)
    w[3] = 127
    assert torch.equal(_mm(q, w), _reference(q, w))
    with pytest.raises(RuntimeError, match="K = 65537 is above 65536"):
        _mm(torch.zeros(1, 65537, dtype=torch.int8), torch.zeros(1, 65537, dtype=torch.int8))


def test_bad_inputs_are_named():
    q, w = _case(2, 6, 4, seed=0)
    packed, cs = g.pack_u7_weight(w), w.sum(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must be a contiguous 2-D int8"):
        g.int8_mm_vnni(q.to(torch.uint8), packed, cs)
    with pytest.raises(RuntimeError, match="q must be a contiguous 2-D int8"):
        g.int8_mm_vnni(q.t(), packed, cs)
    with pytest.raises(RuntimeError, match="colsum must be a contiguous 1-D int32"):
        g.int8_mm_vnni(q, packed, cs.long())
    with pytest.raises(RuntimeError, match=r"packed must be pack_u7_weight's contiguous \[2, 2, 16, 4\]"):
        g.int8_mm_vnni(q, packed, torch.zeros(17, dtype=torch.int32))  # N = 17: two blocks
    with pytest.raises(RuntimeError, match=r"packed must be pack_u7_weight's contiguous \[1, 3, 16, 4\]"):
        g.int8_mm_vnni(torch.zeros(2, 9, dtype=torch.int8), packed, cs)  # K = 9: three quads


def test_opcheck():
    q, w = _case(5, 41, 19, seed=4)
    torch.library.opcheck(g.int8_mm_vnni, (q, g.pack_u7_weight(w), w.sum(1, dtype=torch.int32)))


def test_is_an_eight_bit_backend_with_the_exact_integers():
    """As the backend "cpu ext vnni": the same integers as the reference, so the same captions as every
    other 8-bit backend; it takes int8 rows (no zero points) and may serve text rows."""
    assert "cpu ext vnni" in int8_backends.EIGHT_BIT and int8_backends.activation_bits("cpu ext vnni") == 8
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (40, 72), generator=gen, dtype=torch.int8)
    q, zero = int8_backends.check_rows("cpu ext vnni", 11, 72, gen)
    assert zero is None and q.dtype == torch.int8
    got = int8_backends.gemm_for("cpu ext vnni", w)(q)
    assert torch.equal(got.double(), int8_backends.reference_products(q, None, w))


@pytest.mark.skipif(os.environ.get("GITFAST_CPU_ISA") is not None, reason="already a forced-ISA run")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_isa_paths(isa):
    env = {**os.environ, "GITFAST_CPU_ISA": isa}
    chosen = subprocess.run(
        [sys.executable, "-c", "import torch; from gitfast import ops; ops.extension_loaded(); "
         "print('isa=' + torch.ops.gitfast.int8_vnni_isa())"], env=env, capture_output=True, text=True).stdout
    # capped at avx2, a CPU with AVX-VNNI keeps it (a 256-bit ISA); one without runs the AVX2 products
    assert chosen.strip() in ({"isa=avx2", "isa=avxvnni"} if isa == "avx2" else {"isa=generic"}), chosen
    if chosen.strip() == f"isa={g.int8_vnni_isa()}":
        pytest.skip(f"{isa} gives this CPU's own path, tested above")
    done = run_with_isa(__file__, isa, "exact or extremes or bound")
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
