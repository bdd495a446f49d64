"""GPU checks of the extension's CUDA ops where fp32 must be transformers' arithmetic, bit for bit.

transformers computes GIT's MLPs as `Linear` (addmm: the bias inside cuBLASLt's epilogue), then the
activation (`x * torch.sigmoid(1.702 * x)` for quick-GELU, erf GELU), then `Linear`. gitfast's fp32
CUDA MLP runs the same addmm for fc1 and the activation with precise `expf`, so the outputs are
identical, not merely close: a last-bit difference flips near-tie tokens in fp32 captions.
"""
import pytest
import torch
import torch.nn.functional as F

from gitfast import ops

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("rows,width,hidden", [(197, 768, 3072), (7, 80, 160), (33, 1030, 2060)])
def test_fp32_mlp_is_bitwise_transformers(activation, rows, width, hidden):
    assert ops.backend("mlp", torch.device("cuda")) == "cuda ext", "gitfast._C has no CUDA kernels"
    g = torch.Generator(device="cuda").manual_seed(rows * width)
    x = torch.randn(2, rows, width, device="cuda", generator=g)
    w1 = torch.randn(hidden, width, device="cuda", generator=g) / width ** 0.5
    b1 = torch.randn(hidden, device="cuda", generator=g)
    w2 = torch.randn(width, hidden, device="cuda", generator=g) / hidden ** 0.5
    b2 = torch.randn(width, device="cuda", generator=g)
    h = F.linear(x, w1, b1)
    act = h * torch.sigmoid(1.702 * h) if activation == "quick_gelu" else F.gelu(h)
    ref = F.linear(act, w2, b2)
    out = ops.mlp(x, w1, b1, w2, b2, activation)
    assert torch.equal(out, ref), (out - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_mlp_keeps_the_fused_bias_and_stays_close(dtype):
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(197, 768, device="cuda", generator=g)
    w1 = torch.randn(3072, 768, device="cuda", generator=g) / 768 ** 0.5
    b1 = torch.randn(3072, device="cuda", generator=g)
    w2 = torch.randn(768, 3072, device="cuda", generator=g) / 3072 ** 0.5
    b2 = torch.randn(768, device="cuda", generator=g)
    ref = ops.mlp_reference(x, w1, b1, w2, b2, "quick_gelu")
    low = [t.to(dtype) for t in (x, w1, b1, w2, b2)]
    out = ops.mlp(*low, "quick_gelu").float()
    torch_err = (ops.mlp_reference(*low, "quick_gelu").float() - ref).norm() / ref.norm()
    assert (out - ref).norm() / ref.norm() <= 2 * torch_err + 1e-6
