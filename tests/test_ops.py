"""gitfast.ops (the gitfast._C extension) against the plain-torch references.

fp32 is held to 1e-5. fp16/bf16 are judged against an fp32 reference, relative to the error that
torch's own composition makes in that dtype (at most 2x, as flash-attention judges its kernels).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from gitfast import fp32_backends, ops

EXT = ops.extension_loaded()
needs_ext = pytest.mark.skipif(not EXT, reason="gitfast._C is not built")
LOW = (torch.float16, torch.bfloat16)
WIDTHS = (80, 768, 1030, 3072)
LEADING = ((1,), (7,), (2, 3))


def _randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _assert_close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{m}\nshape {tuple(actual.shape)}")


def _ln_inputs(lead, width, dtype, device="cpu"):
    g = torch.Generator().manual_seed(width + len(lead))
    x = torch.randn(*lead, width, generator=g).to(device, dtype)
    r = torch.randn(*lead, width, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(device, dtype)
    b = (0.1 * torch.randn(width, generator=g)).to(device, dtype)
    return x, r, w, b


def _mlp_inputs(lead, width, hidden, dtype, device="cpu"):
    g = torch.Generator().manual_seed(hidden + width)
    x = torch.randn(*lead, width, generator=g).to(device, dtype)
    w1 = (torch.randn(hidden, width, generator=g) / width**0.5).to(device, dtype)
    b1 = (0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    w2 = (torch.randn(width, hidden, generator=g) / hidden**0.5).to(device, dtype)
    b2 = (0.1 * torch.randn(width, generator=g)).to(device, dtype)
    return x, w1, b1, w2, b2


def _f32(*ts):
    return [None if t is None else t.float() for t in ts]


# -- dispatch --------------------------------------------------------------------------------------


@needs_ext
def test_cpu_calls_take_the_extension(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran although the extension serves this call")

    for name in ("add_layer_norm_reference", "bias_act_reference", "mlp_reference"):
        monkeypatch.setattr(ops, name, refuse)
    assert all(ops.backend(op, "cpu") == "cpu ext" for op in ops.OPS)
    x, r, w, b = _ln_inputs((3,), 80, torch.float32)
    ops.add_layer_norm(x, r, w, b, 1e-5)
    ops.add_layer_norm(x, None, w, b, 1e-5)
    ops.bias_act(x, b, "gelu")
    ops.mlp(*_mlp_inputs((3,), 80, 96, torch.float32), "quick_gelu")


def test_backend_selector_forces_reference(monkeypatch):
    calls = []
    for name in ("add_layer_norm_reference", "bias_act_reference", "mlp_reference"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    monkeypatch.setattr(ops, "backend", lambda op, device: "reference")
    x, r, w, b = _ln_inputs((3,), 80, torch.float32)
    ops.add_layer_norm(x, r, w, b, 1e-5)
    ops.bias_act(x, b, "quick_gelu")
    ops.mlp(*_mlp_inputs((3,), 80, 96, torch.float32), "gelu")
    assert calls == ["add_layer_norm_reference", "bias_act_reference", "mlp_reference"]


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    def no_extension():
        raise ImportError("simulated: no gitfast._C")

    monkeypatch.setattr(ops, "_import_extension", no_extension)
    monkeypatch.setattr(ops, "_extension_state", None)
    x, r, w, b = _ln_inputs((4,), 80, torch.float32)
    with pytest.warns(RuntimeWarning, match="gitfast._C is not available") as record:
        normed, summed = ops.add_layer_norm(x, r, w, b, 1e-5)
        ops.bias_act(x, b, "gelu")
        ops.mlp(*_mlp_inputs((3,), 80, 96, torch.float32), "gelu")
    assert len([w_ for w_ in record if "gitfast._C" in str(w_.message)]) == 1
    assert ops.backend("mlp", "cpu") == "reference"
    ref_n, ref_s = ops.add_layer_norm_reference(x, r, w, b, 1e-5)
    torch.testing.assert_close(normed, ref_n, rtol=0, atol=0)
    torch.testing.assert_close(summed, ref_s, rtol=0, atol=0)


@needs_ext
def test_requires_grad_uses_reference_and_backprops():
    x, r, w, b = _ln_inputs((5,), 80, torch.float32)
    w.requires_grad_(True)
    normed, _ = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert normed.grad_fn is not None
    normed.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    with torch.no_grad():
        out = ops.bias_act(x, b.requires_grad_(True), "gelu")
    assert out.grad_fn is None  # no grad mode: the extension serves it


def test_other_dtypes_fall_back_to_reference():
    x, r, w, b = _ln_inputs((3,), 80, torch.float64)
    normed, summed = ops.add_layer_norm(x, r, w, b, 1e-5)
    ref_n, ref_s = ops.add_layer_norm_reference(x, r, w, b, 1e-5)
    torch.testing.assert_close(normed, ref_n, rtol=0, atol=0)
    assert normed.dtype == torch.float64


# -- CPU accuracy ----------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("lead", LEADING)
def test_add_layer_norm_fp32(lead, width):
    x, r, w, b = _ln_inputs(lead, width, torch.float32)
    normed, summed = ops.add_layer_norm(x, r, w, b, 1e-5)
    ref_n, ref_s = ops.add_layer_norm_reference(x, r, w, b, 1e-5)
    torch.testing.assert_close(summed, ref_s, rtol=0, atol=0)
    _assert_close(normed, ref_n, rtol=1e-5, atol=1e-5)
    normed, summed = ops.add_layer_norm(x, None, w, b, 1e-12)
    assert summed is x
    _assert_close(normed, F.layer_norm(x, (width,), w, b, 1e-12), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("width", WIDTHS)
def test_add_layer_norm_low_precision(width, dtype):
    x, r, w, b = _ln_inputs((33,), width, dtype)
    normed, summed = ops.add_layer_norm(x, r, w, b, 1e-5)
    torch_n, torch_s = ops.add_layer_norm_reference(x, r, w, b, 1e-5)
    # the sum is rounded to the dtype exactly as torch rounds x + residual
    assert torch.equal(summed, torch_s)
    # normalising the rounded sum in fp32 is what both should approximate
    ref_n, _ = ops.add_layer_norm_reference(*_f32(torch_s, None, w, b), 1e-5)
    assert normed.dtype == dtype
    assert _err(normed, ref_n) <= 2 * _err(torch_n, ref_n)


@needs_ext
def test_half_conversions_are_exact_for_every_value():
    # all 65536 bit patterns through the load/round path (x + 0 must give x back), then sums that
    # land everywhere from subnormals to overflow
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(64, 1024)
    for dtype in LOW:
        x = bits.view(dtype)
        zero = torch.zeros_like(x)
        _, summed = ops.add_layer_norm(x, zero, torch.ones(1024, dtype=dtype), torch.zeros(1024, dtype=dtype), 1e-5)
        same = (summed.view(torch.int16) == (x + zero).view(torch.int16)) | (summed.isnan() & x.isnan())
        assert bool(same.all()), f"{dtype}: {int((~same).sum())} values differ"
        scale = torch.logspace(-30, 30, 1031)
        a = (torch.randn(16, 1031) * scale).to(dtype)
        c = (torch.randn(16, 1031) * scale.flip(0)).to(dtype)
        _, summed = ops.add_layer_norm(a, c, torch.ones(1031, dtype=dtype), torch.zeros(1031, dtype=dtype), 1e-5)
        ref = a + c
        same = (summed.view(torch.int16) == ref.view(torch.int16)) | (summed.isnan() & ref.isnan())
        assert bool(same.all()), f"{dtype}: {int((~same).sum())} sums differ"


@needs_ext
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("width", WIDTHS)
def test_bias_act_fp32(width, activation):
    x = _randn(2, 9, width, scale=3.0)
    b = _randn(width)
    _assert_close(ops.bias_act(x, b, activation), ops.bias_act_reference(x, b, activation), rtol=1e-5, atol=1e-5)
    _assert_close(ops.bias_act(x, None, activation), ops.bias_act_reference(x, None, activation), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_bias_act_fp32_tails(activation):
    # large |x|: the exponentials saturate (exp(-87) floor, no inf/NaN), GELU's negative tail keeps
    # its relative accuracy
    x = torch.linspace(-60, 60, 12000).view(3, -1)
    out = ops.bias_act(x, None, activation)
    ref = ops.bias_act_reference(x.double(), None, activation).float()
    assert torch.isfinite(out).all()
    _assert_close(out, ref, rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("width", (80, 1030, 3072))
def test_bias_act_low_precision(width, dtype, activation):
    x = _randn(17, width, dtype=dtype, scale=3.0)
    b = _randn(width, dtype=dtype)
    ref = ops.bias_act_reference(*_f32(x, b), activation)
    out = ops.bias_act(x, b, activation)
    assert out.dtype == dtype
    assert _err(out, ref) <= 2 * _err(ops.bias_act_reference(x, b, activation), ref)


@needs_ext
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("width,hidden", ((768, 3072), (80, 1030), (1024, 4096)))
def test_mlp_fp32(width, hidden, activation):
    lead = (2, 5) if width != 1024 else (3,)
    args = _mlp_inputs(lead, width, hidden, torch.float32)
    out = ops.mlp(*args, activation)
    assert out.shape == (*lead, width)
    _assert_close(out, ops.mlp_reference(*args, activation), rtol=1e-5, atol=1e-5)
    x, w1, _, w2, _ = args
    _assert_close(ops.mlp(x, w1, None, w2, None, activation), ops.mlp_reference(x, w1, None, w2, None, activation),
                  rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("dtype", LOW)
def test_mlp_low_precision(dtype, activation):
    args = _mlp_inputs((37,), 768, 3072, dtype)
    ref = ops.mlp_reference(*_f32(*args), activation)
    out = ops.mlp(*args, activation)
    assert out.dtype == dtype
    assert _err(out, ref) <= 2 * _err(ops.mlp_reference(*args, activation), ref)


@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_rows_split_across_threads(dtype):
    # 1500 rows of 80 on 2 threads: parallel_for splits them in two tasks, each with its own scratch;
    # every row must come out as it does alone (batch invariance)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, r, w, b = _ln_inputs((1500,), 80, dtype)
        normed, summed = ops.add_layer_norm(x, r, w, b, 1e-5)
        activated = ops.bias_act(x, b, "quick_gelu")
    finally:
        torch.set_num_threads(threads)
    for i in (0, 749, 750, 1499):  # first row, either side of the task boundary, last row
        n1, s1 = ops.add_layer_norm(x[i:i + 1], r[i:i + 1], w, b, 1e-5)
        assert torch.equal(normed[i], n1[0]) and torch.equal(summed[i], s1[0])  # rows are independent
        assert torch.equal(activated[i], ops.bias_act(x[i:i + 1], b, "quick_gelu")[0])
    if dtype == torch.float32:
        _assert_close(normed, ops.add_layer_norm_reference(x, r, w, b, 1e-5)[0], rtol=1e-5, atol=1e-5)


@needs_ext
def test_zero_rows_and_non_contiguous_inputs():
    x, r, w, b = _ln_inputs((0,), 80, torch.float32)
    normed, summed = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert normed.shape == summed.shape == (0, 80)
    assert ops.mlp(*_mlp_inputs((0,), 80, 96, torch.float32), "gelu").shape == (0, 80)
    xt = _randn(80, 6).t()  # [6, 80], not contiguous
    _assert_close(ops.bias_act(xt, None, "gelu"), ops.bias_act_reference(xt, None, "gelu"), rtol=1e-5, atol=1e-5)


# -- errors ----------------------------------------------------------------------------------------


def test_bad_activation_is_refused_by_name():
    x = _randn(2, 8)
    with pytest.raises(ValueError, match="'relu'"):
        ops.bias_act(x, None, "relu")
    with pytest.raises(ValueError, match="'tanh'"):
        ops.mlp(x, _randn(4, 8), None, _randn(8, 4), None, "tanh")


@needs_ext
def test_raw_ops_check_their_inputs():
    g = torch.ops.gitfast
    x, r, w, b = _ln_inputs((4,), 80, torch.float32)
    with pytest.raises(ValueError, match="unsupported activation 'silu'"):
        g.bias_act(x, b, "silu")
    with pytest.raises(RuntimeError, match="residual has dtype BFloat16 but x has Float"):
        g.add_layer_norm(x, r.bfloat16(), w, b, 1e-5)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        ops.add_layer_norm(x.bfloat16(), r.bfloat16(), w, b.bfloat16(), 1e-5)  # public path, same check
    with pytest.raises(RuntimeError, match=r"residual has shape \[4, 81\]"):
        g.add_layer_norm(x, _randn(4, 81), w, b, 1e-5)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[80\]"):
        g.layer_norm(x, w, _randn(79), 1e-5)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        g.bias_act(_randn(80, 4).t(), None, "gelu")
    with pytest.raises(RuntimeError, match="supported dtypes are float32, float16 and bfloat16"):
        g.bias_act(x.double(), None, "gelu")
    with pytest.raises(RuntimeError, match=r"fc1_weight must have shape \[hidden, 80\]"):
        g.mlp(x, _randn(96, 81), None, _randn(80, 96), None, "gelu")
    with pytest.raises(RuntimeError, match=r"fc2_weight must have shape \[out, 96\]"):
        g.mlp(x, _randn(96, 80), None, _randn(80, 95), None, "gelu")
    with pytest.raises(RuntimeError, match=r"fc1_bias must have shape \[96\]"):
        g.mlp(x, _randn(96, 80), _randn(80), _randn(80, 96), None, "gelu")


# -- tracing ---------------------------------------------------------------------------------------


@needs_ext
def test_opcheck():
    x, r, w, b = _ln_inputs((3, 5), 80, torch.float32)
    x1, w1, b1, w2, b2 = _mlp_inputs((4,), 80, 96, torch.float32)
    g = torch.ops.gitfast
    for op, args in (
        (g.layer_norm, (x, w, b, 1e-5)),
        (g.add_layer_norm, (x, r, w, b, 1e-5)),
        (g.bias_act, (x, b, "quick_gelu")),
        (g.bias_act, (x, None, "gelu")),
        (g.mlp, (x1, w1, b1, w2, b2, "gelu")),
        (g.mlp, (x1, w1, None, w2, None, "quick_gelu")),
    ):
        torch.library.opcheck(op, args)


@needs_ext
def test_torch_compile_traces_the_ops():
    def block(x, r, w, b, w1, b1, w2, b2):
        h, s = ops.add_layer_norm(x, r, w, b, 1e-5)
        return ops.mlp(h, w1, b1, w2, b2, "quick_gelu") + ops.bias_act(s, b, "gelu")

    x, r, w, b = _ln_inputs((2, 3), 80, torch.float32)
    _, w1, b1, w2, b2 = _mlp_inputs((1,), 80, 96, torch.float32)
    args = (x, r, w, b, w1, b1, w2, b2)
    traced = []

    def recording_backend(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(block, backend=recording_backend, fullgraph=True)(*args)
        assert {"gitfast.add_layer_norm", "gitfast.mlp", "gitfast.bias_act"} <= set(traced)
        compiled = torch.compile(block, fullgraph=True)  # Inductor: the ops become extern kernel calls
        _assert_close(compiled(*args), block(*args), rtol=1e-6, atol=1e-6)


# -- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_build_serves_cuda():
    assert all(ops.backend(op, "cuda") == "cuda ext" for op in ops.OPS), "gitfast._C was built without CUDA"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, *LOW))
@pytest.mark.parametrize("width", (80, 768, 1030, 1024, 3072, 4096))
def test_cuda_add_layer_norm(width, dtype):
    for lead in ((1,), (3, 7), (517,)):
        x, r, w, b = _ln_inputs(lead, width, dtype, device="cuda")
        normed, summed = ops.add_layer_norm(x, r, w, b, 1e-5)
        torch_n, torch_s = ops.add_layer_norm_reference(x, r, w, b, 1e-5)
        assert torch.equal(summed, torch_s)
        if dtype == torch.float32:
            _assert_close(normed, torch_n, rtol=1e-5, atol=1e-5)
        else:
            ref_n, _ = ops.add_layer_norm_reference(*_f32(torch_s, None, w, b), 1e-5)
            assert _err(normed, ref_n) <= 2 * _err(torch_n, ref_n)
        normed, _ = ops.add_layer_norm(x, None, w, b, 1e-5)
        torch_n, _ = ops.add_layer_norm_reference(x, None, w, b, 1e-5)
        if dtype == torch.float32:
            _assert_close(normed, torch_n, rtol=1e-5, atol=1e-5)
        else:
            ref_n, _ = ops.add_layer_norm_reference(*_f32(x, None, w, b), 1e-5)
            assert _err(normed, ref_n) <= 2 * _err(torch_n, ref_n)


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("dtype", (torch.float32, *LOW))
@pytest.mark.parametrize("width", (80, 1030, 3072, 4096))
def test_cuda_bias_act(width, dtype, activation):
    x = _randn(2, 37, width, dtype=dtype, device="cuda", scale=3.0)
    b = _randn(width, dtype=dtype, device="cuda")
    out = ops.bias_act(x, b, activation)
    ref = ops.bias_act_reference(*_f32(x, b), activation)
    if dtype == torch.float32:
        _assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert _err(out, ref) <= 2 * _err(ops.bias_act_reference(x, b, activation), ref)
    out = ops.bias_act(x, None, activation)
    ref = ops.bias_act_reference(*_f32(x, None), activation)
    if dtype == torch.float32:
        _assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert _err(out, ref) <= 2 * _err(ops.bias_act_reference(x, None, activation), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("dtype", (torch.float32, *LOW))
def test_cuda_mlp(dtype, activation):
    args = _mlp_inputs((3, 171), 768, 3072, dtype, device="cuda")
    out = ops.mlp(*args, activation)
    ref = ops.mlp_reference(*_f32(*args), activation)
    if dtype == torch.float32:
        # TF32 off in both: the GEMMs are cuBLAS either way
        _assert_close(out, ops.mlp_reference(*args, activation), rtol=1e-5, atol=1e-5)
    else:
        assert _err(out, ref) <= 2 * _err(ops.mlp_reference(*args, activation), ref)


@pytest.mark.cuda
def test_cuda_graph_capture():
    x, r, w, b = _ln_inputs((64,), 768, torch.float16, device="cuda")
    args = _mlp_inputs((64,), 768, 3072, torch.float16, device="cuda")

    def step():
        h, s = ops.add_layer_norm(x, r, w, b, 1e-5)
        return ops.mlp(h, *args[1:], "gelu") + s

    expected = step()
    x0 = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(x0 * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out, expected)  # the replay read the new input
    x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


# -- Linear and feed_forward ------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_f_linear_and_repacks_when_the_weight_changes(dtype, activation):
    torch.manual_seed(0)
    lin = ops.Linear(96, 80).to(dtype)
    x = _randn(3, 5, 96, dtype=dtype)
    with torch.inference_mode():
        for _ in range(2):  # the second call reads the cached packed weight (bf16 on native-bf16 CPUs)
            ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            ref = ref if activation is None else ops.activation_reference(ref, activation)
            out = lin(x, activation)
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            _assert_close(out.float(), ref, rtol=tol, atol=tol)
            with torch.no_grad():
                lin.weight.mul_(-1)  # a new weight: the packed copy must not be reused


def test_linear_keeps_autograd():
    lin = ops.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    lin(x, "quick_gelu").sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


@pytest.mark.parametrize("dtype, fp32_backend", [(torch.float32, "cpu ext"), (torch.float32, "torch swapped"),
                                                  (torch.float32, "torch"), (torch.bfloat16, None)])
def test_feed_forward_over_linears_is_the_mlp(forced_fp32, dtype, fp32_backend):
    """fp32 at 6 rows (decode-sized) takes the narrow band's backend, each one forced here as some CPU
    would measure it, bit for bit; bf16 stays within its rounding of the fp32 result."""
    if fp32_backend is not None:
        if fp32_backend == "cpu ext" and not ops.extension_loaded():
            pytest.skip("needs gitfast._C")
        forced_fp32(fp32_backend)
    x, w1, b1, w2, b2 = _mlp_inputs((2, 3), 80, 96, dtype)
    fc1, fc2 = ops.Linear(80, 96).to(dtype), ops.Linear(96, 80).to(dtype)
    with torch.no_grad():
        for m, w, b in ((fc1, w1, b1), (fc2, w2, b2)):
            m.weight.copy_(w)
            m.bias.copy_(b)
    with torch.inference_mode():
        out = ops.feed_forward(x, fc1, fc2, "quick_gelu")
    if fp32_backend == "cpu ext":  # fc1 (activation fused) and fc2 in the fp32 kernel
        g = torch.ops.gitfast
        assert torch.equal(out, g.linear_fp32(g.linear_fp32(x, w1, b1, "quick_gelu"), w2, b2))
    elif fp32_backend == "torch swapped":  # each layer through MKL with its operands swapped
        swapped = fp32_backends.swapped_linear
        assert torch.equal(out, swapped(ops.bias_act(swapped(x, w1, b1), None, "quick_gelu"), w2, b2))
    elif fp32_backend == "torch":  # the fused op
        assert torch.equal(out, ops.mlp(x, w1, b1, w2, b2, "quick_gelu"))
    else:
        ref = ops.mlp_reference(*_f32(x, w1, b1, w2, b2), "quick_gelu")
        assert _err(out, ref) <= 2 * _err(ops.mlp_reference(x, w1, b1, w2, b2, "quick_gelu"), ref) + 1e-2


def test_bf16_logits_on_the_cpu_are_fp32():
    torch.manual_seed(0)
    head = ops.Logits(64, 300).to(torch.bfloat16)
    x = _randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = head(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x.float(), head.weight.float(), head.bias.float()))
    assert ops.Logits(8, 4)(torch.randn(2, 8)).dtype == torch.float32  # fp32 unchanged
