"""gitfast._C's int8_mm_u7_packed (csrc/cpu/int8_gemm_u7.cpp: the "outer product" tile over a weight
packed once by pack_u7_weight): int32 results equal to an int64 matmul of (q - zero) and w, bit for bit,
on shapes that leave partial tiles (rows not a multiple of 4, columns not of 16, K not of 4), q at 0 and
127 with varied zero points, empty inputs, and rows past one L2 pass; the packed layout itself; bad
inputs refused by name. Every ISA path: the CPU's own here, the others in a subprocess with
GITFAST_CPU_ISA capping the kernels.
"""
import os
import subprocess
import sys

import pytest
import torch

from gitfast import ops
from forced_isa import run_with_isa

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="gitfast._C not built")
g = torch.ops.gitfast


def _case(m, k, n, seed, q_low=0, q_high=128):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(q_low, q_high, (m, k), generator=gen, dtype=torch.uint8)
    zero = torch.randint(0, 128, (m,), generator=gen, dtype=torch.int32)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return q, zero, w


def _reference(q, zero, w):
    return ((q.long() - zero.long()[:, None]) @ w.long().t()).int()


def _packed_mm(q, zero, w):
    return g.int8_mm_u7_packed(q, zero, g.pack_u7_weight(w), w.sum(1, dtype=torch.int32))


def test_pack_layout():
    w = torch.randint(-128, 128, (17, 6), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    packed = g.pack_u7_weight(w)
    assert packed.shape == (2, 2, 16, 4) and packed.dtype == torch.int8
    want = torch.zeros(32, 8, dtype=torch.int8)  # zeros past N = 17 and K = 6
    want[:17, :6] = w
    assert torch.equal(packed, want.view(2, 16, 2, 4).permute(0, 2, 1, 3))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 37])
def test_packed_is_exact_on_odd_shapes(m):
    for k in (1, 3, 4, 5, 31, 33, 64, 100):
        for n in (1, 7, 8, 9, 17, 70):
            q, zero, w = _case(m, k, n, seed=m * 10007 + k * 101 + n)
            got = _packed_mm(q, zero, w)
            assert got.dtype == torch.int32 and got.shape == (m, n)
            assert torch.equal(got, _reference(q, zero, w)), (m, k, n)


@pytest.mark.parametrize("m,k,n", [(1, 768, 3072), (700, 200, 9), (13, 3072, 33)])
def test_packed_is_exact_on_model_and_multi_pass_shapes(m, k, n):
    q, zero, w = _case(m, k, n, seed=m + k + n)
    assert torch.equal(_packed_mm(q, zero, w), _reference(q, zero, w))


def test_packed_extremes_and_empty():
    # the largest pair sums VPMADDUBSW sees (127 * 127 * 2, 127 * -128 * 2), and q = 0 rows
    for value in (127, 0):
        q = torch.full((5, 1001), value, dtype=torch.uint8)
        zero = torch.tensor([0, 127, 64, 1, 126], dtype=torch.int32)
        w = torch.cat([torch.full((2, 1001), -128, dtype=torch.int8), torch.full((19, 1001), 127, dtype=torch.int8)])
        assert torch.equal(_packed_mm(q, zero, w), _reference(q, zero, w)), value
    q, zero, w = _case(5, 0, 3, seed=1)
    assert torch.equal(_packed_mm(q, zero, w), torch.zeros(5, 3, dtype=torch.int32))
    for m, n in ((0, 3), (4, 0)):
        q, zero, w = _case(m, 8, n, seed=2)
        assert _packed_mm(q, zero, w).shape == (m, n)


def test_one_byte_above_127_anywhere_is_refused():
    """The 7-bit check reads q 8 bytes at a time, then the tail: a single 128 (or 255) at any place, in
    a whole word or the tail, is found; 127 everywhere passes."""
    _, zero, w = _case(3, 13, 4, seed=3)
    packed, cs = g.pack_u7_weight(w), w.sum(1, dtype=torch.int32)
    ok = torch.full((3, 13), 127, dtype=torch.uint8)
    assert g.int8_mm_u7_packed(ok, zero, packed, cs).shape == (3, 4)
    for place in range(ok.numel()):  # 39 bytes: four whole words and a 7-byte tail
        for value in (128, 255):
            bad = ok.clone()
            bad.view(-1)[place] = value
            with pytest.raises(RuntimeError, match="q holds values above 127"):
                g.int8_mm_u7_packed(bad, zero, packed, cs)


def test_packed_bad_inputs_are_named():
    q, zero, w = _case(2, 6, 4, seed=0)
    packed, cs = g.pack_u7_weight(w), w.sum(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q holds values above 127"):
        g.int8_mm_u7_packed(q + 128, zero, packed, cs)  # would saturate the int16 pair sums: refused
    with pytest.raises(RuntimeError, match="q must be a contiguous 2-D uint8"):
        g.int8_mm_u7_packed(q.to(torch.int8), zero, packed, cs)
    with pytest.raises(RuntimeError, match=r"zero must be a contiguous \[2\] int32"):
        g.int8_mm_u7_packed(q, zero[:1], packed, cs)
    with pytest.raises(RuntimeError, match="colsum must be a contiguous 1-D int32"):
        g.int8_mm_u7_packed(q, zero, packed, cs.long())
    with pytest.raises(RuntimeError, match=r"packed must be pack_u7_weight's contiguous \[2, 2, 16, 4\]"):
        g.int8_mm_u7_packed(q, zero, packed, torch.zeros(17, dtype=torch.int32))  # N = 17: two blocks
    with pytest.raises(RuntimeError, match=r"packed must be pack_u7_weight's contiguous \[1, 3, 16, 4\]"):
        g.int8_mm_u7_packed(torch.zeros(2, 9, dtype=torch.uint8), zero, packed, cs)  # K = 9: three quads
    with pytest.raises(RuntimeError, match="w must be a contiguous 2-D int8"):
        g.pack_u7_weight(w.float())


def test_packed_opcheck():
    q, zero, w = _case(5, 41, 19, seed=4)
    torch.library.opcheck(g.pack_u7_weight, (w,))
    torch.library.opcheck(g.int8_mm_u7_packed, (q, zero, g.pack_u7_weight(w), w.sum(1, dtype=torch.int32)))


@pytest.mark.skipif(os.environ.get("GITFAST_CPU_ISA") is not None, reason="already a forced-ISA run")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_isa_paths(isa):
    if isa == g.int8_u7_isa():
        pytest.skip(f"{isa} is this CPU's own path, tested above")
    done = run_with_isa(__file__, isa, "exact or extremes")
    env = {**os.environ, "GITFAST_CPU_ISA": isa}
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"isa={isa}" in subprocess.run(
        [sys.executable, "-c", "import torch; from gitfast import ops; ops.extension_loaded(); "
         "print('isa=' + torch.ops.gitfast.int8_u7_isa())"], env=env, capture_output=True, text=True).stdout
