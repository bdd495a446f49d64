"""gitfast.quantization: dynamic INT8 (per-channel int8 weights, per-token int8 activations).

The row passes (gitfast._C) against their plain-torch references, each GEMM backend against the
reference integers, whole layers against `DynamicInt8Linear.reference`, and a quantized GIT model
whose greedy captions agree with its fp32 self.
"""
import time

import pytest
import torch
import torch.nn.functional as F

from gitfast import backend_choice as BC, bf16_backends, fp32_backends, int8_backends as B, ops, quantization as Q

from git_factory import make_hf_model

needs_ext = pytest.mark.skipif(not (ops.extension_loaded() and hasattr(torch.ops.gitfast, "quantize_rows")),
                               reason="gitfast._C is not built")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (5, 768), (33, 1030)])
def test_quantize_rows_matches_the_reference(dtype, shape):
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    x[0, :3] = 0
    if shape[0] > 2:
        x[2] = 0  # an all-zero row: scale 0, q 0
    q, s = torch.ops.gitfast.quantize_rows(x)
    qr, sr = Q.quantize_rows_reference(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert (q.int() - qr.int()).abs().max() <= 1  # x * (127 / max) may round a tie the other way
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)


@needs_ext
@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32])
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_rows_matches_the_reference(acc_dtype, activation, out_dtype):
    g = torch.Generator().manual_seed(3)
    acc = torch.randint(-30000, 30000, (9, 131), generator=g).to(acc_dtype)
    rs, cs = torch.rand(9, generator=g) * 1e-3, torch.rand(131, generator=g) * 1e-2
    bias = torch.randn(131, generator=g).to(out_dtype)
    for col, b in ((cs, bias), (None, None)):
        out = torch.ops.gitfast.dequantize_rows(acc, rs, col, b, activation, out_dtype)
        ref = Q.dequantize_rows_reference(acc, rs, col, b, activation, out_dtype)
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@needs_ext
def test_dequantize_rows_names_a_bad_scale():
    acc = torch.zeros(3, 5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"row_scale must be a contiguous float32 CPU tensor of 3 entries"):
        torch.ops.gitfast.dequantize_rows(acc, torch.ones(4), None, None, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"col_scale must be a contiguous float32 CPU tensor of 5 entries"):
        torch.ops.gitfast.dequantize_rows(acc, torch.ones(3), torch.ones(5).double(), None, None, torch.float32)


@pytest.fixture
def fresh_choice(fresh_decision):
    """The int8 GEMMs decided anew in the test, and again after it (the process's real decisions)."""
    fresh_decision("int8_gemm", "GITFAST_INT8_BACKEND")
    fresh_decision("int8_gemm_image", "GITFAST_INT8_IMAGE_BACKEND")


def _fit(name):
    try:
        B.prepare(name)  # the check
    except BC.Unfit:
        return False
    return True


def test_the_chosen_backend_gives_the_reference_integers():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (129, 300), generator=g, dtype=torch.int8)
    q, zero = B.check_rows(B.backend(), 33, 300, g)
    got = B.gemm_for(B.backend(), w)(q, zero)
    assert torch.equal(got.double(), B.reference_products(q, zero, w))
    assert B.decision().how in ("measured", "only one fit")


def _slow_correct(real, seconds):
    def mm_factory(name, w):
        mm = real("reference", w)

        def slow(q, zero=None):
            calls.append(name)
            time.sleep(seconds)
            return mm(q, zero)
        return slow if name == "onednn" else real(name, w)
    calls = []
    return mm_factory, calls


def test_a_slow_backend_that_works_is_not_chosen(monkeypatch, fresh_choice):
    # onednn comes first and gives the right integers, but each call takes 1.5 s (as oneDNN's
    # reference path does, only less so): the measurement must pass it over, after one timed call
    factory, calls = _slow_correct(B.gemm_for, 1.5)
    monkeypatch.setattr(B, "gemm_for", factory)
    d = B.decision()
    assert d.chosen != "onednn" and d.seconds["onednn"] == float("inf"), d
    assert len(calls) == 2, (calls, d)  # its check and one first call: never timed in full


def test_a_backend_with_wrong_integers_is_never_chosen_nor_forced(monkeypatch, fresh_choice):
    real = B.gemm_for
    monkeypatch.setattr(B, "gemm_for", lambda name, w: (lambda q, zero=None: real(name, w)(q, zero) + 1) if name == "torch._int_mm"
                        else real(name, w))
    d = B.decision()
    assert d.chosen != "torch._int_mm" and "wrong integers" in d.unfit["torch._int_mm"], d
    BC.forget("int8_gemm")
    monkeypatch.setenv("GITFAST_INT8_BACKEND", "torch._int_mm")
    with pytest.raises(ValueError, match="GITFAST_INT8_BACKEND"):
        B.backend()


def test_a_backend_can_be_forced_by_name(monkeypatch, fresh_choice):
    monkeypatch.setenv("GITFAST_INT8_BACKEND", "reference")
    assert B.backend() == "reference" and "forced" in B.decision().how
    assert Q.DynamicInt8Linear.from_linear(ops.Linear(8, 4)).backend == "reference"
    BC.forget("int8_gemm")
    monkeypatch.setenv("GITFAST_INT8_BACKEND", "mkl")
    with pytest.raises(ValueError, match="not one of"):
        B.backend()


@pytest.mark.parametrize("backend", B.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_its_reference_and_the_float_layer(monkeypatch, backend, dtype):
    if not _fit(backend):  # a backend that cannot serve here must be ruled out, never chosen
        assert backend in B.decision().unfit and B.backend() != backend
        return
    torch.manual_seed(0)
    lin = ops.Linear(200, 72)
    layer = Q.DynamicInt8Linear.from_linear(lin)
    layer.use(backend)
    x = torch.randn(2, 9, 200).to(dtype)
    for act in (None, "gelu"):
        out = layer(x, act)
        assert out.dtype == dtype and out.shape == (2, 9, 72)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), layer.reference(x, act).float(), rtol=tol, atol=tol)
        exact = lin(x.float(), act)
        assert (out.float() - exact).norm() / exact.norm() < 0.02  # int8's own error, not a bug's


@pytest.mark.parametrize("fp32_backend", ["cpu ext", "torch swapped", "torch"])
def test_quantize_swaps_the_linears_but_keeps_the_lm_head(forced_fp32, fp32_backend):
    import gitfast

    if fp32_backend == "cpu ext" and not ops.extension_loaded():
        pytest.skip("needs gitfast._C")
    forced_fp32(fp32_backend)  # the kept head's fp32 rows: each backend some CPU would measure fastest

    hf = make_hf_model("hd64_odd_tokens")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    Q.quantize(fm.model, "dynamic")
    kinds = {name: type(m) for name, m in fm.model.named_modules()}
    assert kinds["lm_head"] is ops.Logits
    assert kinds["vision.layers.0.fc1"] is Q.DynamicInt8Linear and kinds["layers.1.qkv"] is Q.DynamicInt8Linear
    assert kinds["proj"] is Q.DynamicInt8Linear
    assert Q.describe(fm.model).startswith("dynamic INT8")
    assert not any(isinstance(m, ops.Linear) for n, m in fm.model.named_modules() if n != "lm_head")
    # where the bf16 kernel serves logits (measured) the kept head reads a bf16 copy of its weight:
    # fp32 logits within bf16's rounding
    assert fm.model.lm_head.reads_bf16 == bf16_backends.kernel_serves_logits()
    x = torch.randn(3, fm.config.hidden_size)
    with torch.no_grad():
        got, exact = fm.model.lm_head(x), F.linear(x, fm.model.lm_head.weight, fm.model.lm_head.bias)
    assert got.dtype == torch.float32
    if bf16_backends.kernel_serves_logits():
        rounded = F.linear(x.bfloat16().float(), fm.model.lm_head.weight.bfloat16().float(),
                                             fm.model.lm_head.bias)
        assert torch.allclose(got, rounded, atol=1e-5, rtol=1e-5) and not torch.equal(got, exact)
    elif fp32_backend == "cpu ext":  # 3 rows: the fp32 kernel, fp32 rounding apart
        assert torch.allclose(got, exact, atol=1e-5, rtol=1e-5)
    elif fp32_backend == "torch swapped":  # MKL with its operands swapped
        assert torch.equal(got, fp32_backends.swapped_linear(x, fm.model.lm_head.weight, fm.model.lm_head.bias))
    else:
        assert torch.equal(got, exact)


def test_quantized_greedy_captions_agree_with_fp32():
    import gitfast

    hf = make_hf_model("hd64_odd_tokens")
    px = torch.randn(6, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    ref = gitfast.GitForCausalLM.from_transformers(hf)
    q = gitfast.GitForCausalLM.from_transformers(hf)
    Q.quantize(q.model, "dynamic")
    a = ref.generate(pixel_values=px, max_new_tokens=8)
    b = q.generate(pixel_values=px, max_new_tokens=8)
    assert (a == b).all(dim=1).float().mean() >= 5 / 6


def test_config_names_are_checked():
    assert Q.method_of(None) is None and Q.method_of("dynamic") == "dynamic"
    assert Q.method_of({"method": "dynamic"}) == "dynamic"
    with pytest.raises(ValueError, match="unsupported quantization_config 'int4'"):
        Q.method_of("int4")


def test_a_model_off_the_cpu_is_refused():
    with torch.device("meta"):
        model = torch.nn.Sequential(ops.Linear(4, 4))
    with pytest.raises(ValueError, match="runs on the CPU only.*float16"):
        Q.quantize(model, "dynamic")


def test_the_drop_in_takes_quantization_config(tmp_path):
    import gitfast

    hf = make_hf_model("hd64_odd_tokens")
    fm = gitfast.GitForCausalLM.from_transformers(hf, quantization_config="dynamic")
    assert isinstance(fm.model.layers[0].fc1, Q.DynamicInt8Linear)
    hf.save_pretrained(tmp_path)
    loaded = gitfast.GitForCausalLM.from_pretrained(tmp_path, quantization_config="dynamic")
    assert isinstance(loaded.model.vision.layers[0].qkv, Q.DynamicInt8Linear)
    px = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fm.generate(pixel_values=px, max_new_tokens=5), loaded.generate(pixel_values=px, max_new_tokens=5))
    with pytest.raises(ValueError, match="unsupported quantization_config"):
        gitfast.GitForCausalLM.from_pretrained(tmp_path, quantization_config="int4")
    with pytest.raises(NotImplementedError, match="save the model before quantizing"):
        loaded.save_pretrained(tmp_path / "again")  # refused by name, not a failure deep in the writer


def test_captioner_and_cli_take_dynamic_int8_and_auto_dtype(tmp_path):
    import json
    import subprocess
    import sys

    import gitfast
    from gitfast.defaults import EXAMPLES
    from gitfast.devices import default_dtype

    cap = gitfast.Captioner(quantization_config="dynamic", dtype="auto", device="cpu")
    assert isinstance(cap.model.layers[0].qkv, Q.DynamicInt8Linear)
    assert next(cap.model.parameters()).dtype == default_dtype("cpu")
    out = tmp_path / "c.jsonl"
    subprocess.run([sys.executable, "-m", "gitfast.tools.cli", "caption", str(EXAMPLES), "--quantize", "dynamic",
                    "--device", "cpu", "--out", str(out), "--quiet"], check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(list(EXAMPLES.glob("*.png"))) and all(r.get("caption") for r in rows)


def test_the_embedded_model_keeps_its_held_out_captions_in_int8():
    """gitfast.training.evaluate's held-out pictures (100 of its 1000): dynamic INT8 keeps >= 99% exact
    (measured on all 1000: 999/1000, as fp32 and bf16)."""
    from transformers import AutoProcessor

    import gitfast
    from gitfast.training import evaluate, shapes

    processor = AutoProcessor.from_pretrained(evaluate.DEFAULT_MODEL)
    model = gitfast.GitForCausalLM.from_pretrained(evaluate.DEFAULT_MODEL, quantization_config="dynamic")
    data = shapes.make_dataset(100, evaluate.HELD_OUT_SEED)
    pix = processor(images=[im for im, _ in data], return_tensors="pt").pixel_values
    out = model.generate(pixel_values=pix, max_new_tokens=20)
    captions = processor.batch_decode(out[:, 1:], skip_special_tokens=True)
    assert sum(c == ref for c, (_, ref) in zip(captions, data)) >= 99


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (6, 768), (33, 1030)])
def test_quantize_rows_u7_matches_the_reference(dtype, shape):
    g = torch.Generator().manual_seed(shape[1] + 1)
    x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    if shape[0] > 3:
        x[1] = x[1].abs()   # all >= 0: zero point 0
        x[2] = 0            # all zero: scale 0, zero point 0, q 0
        x[3] = -x[3].abs()  # all <= 0: zero point 127
    q, s, z = torch.ops.gitfast.quantize_rows_u7(x)
    qr, sr, zr = Q.quantize_rows_u7_reference(x)
    assert q.dtype == torch.uint8 and s.dtype == torch.float32 and z.dtype == torch.int32
    assert int(q.max()) <= 127 and int(z.min()) >= 0 and int(z.max()) <= 127
    assert (q.int() - qr.int()).abs().max() <= 1 and (z - zr).abs().max() <= 1  # a tie may round the other way
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    back = s[:, None] * (q.float() - z[:, None].float())  # within a step of x, everywhere
    assert ((back - x.float()).abs() <= s[:, None] * 1.0 + 1e-6).all()
    if shape[0] > 3:
        assert int(z[1]) == 0 and (int(s[2]), int(z[2]), int(q[2].max())) == (0, 0, 0) and int(z[3]) == 127


def test_a_config_can_name_the_backends_and_a_run_hands_its_own_on(fresh_choice):
    import gitfast

    hf = make_hf_model("hd64_odd_tokens")
    for name in [b for b in B.BACKENDS if _fit(b)]:
        model = gitfast.GitForCausalLM.from_transformers(hf).model
        Q.quantize(model, {"method": "dynamic", "backend": name, "image_backend": "reference"})
        layers = {n: m for n, m in model.named_modules() if isinstance(m, Q.DynamicInt8Linear)}
        image_only = {n for n in layers if n.startswith(Q.IMAGE_ONLY)}
        assert "proj" in image_only and "vision.layers.0.fc1" in image_only and "layers.0.qkv" not in image_only
        assert {(m.backend, m.image_backend) for n, m in layers.items() if n in image_only} == {("reference", "reference")}
        assert {(m.backend, m.image_backend) for n, m in layers.items() if n not in image_only} == {(name, "reference")}
        text_rows = f"text rows: {name} ({B.activation_bits(name)}-bit activations)"
        assert Q.describe(model) == f"dynamic INT8 ({len(layers)} layers; {text_rows}; image rows: reference (8-bit activations))"
    with pytest.raises(ValueError, match="not one of"):
        Q.quantize(torch.nn.Sequential(ops.Linear(64, 32)), {"method": "dynamic", "backend": "mkl"})
    assert Q.resolved(None) is None and Q.activation_bits(None) is None
    text, image = B.backend(), B.image_backend()
    assert Q.resolved("dynamic") == {"method": "dynamic", "backend": text, "image_backend": image}
    assert text in B.EIGHT_BIT and image in (text, *B.SEVEN_BIT)  # 7 bits never serve text rows
    assert Q.activation_bits("dynamic") == {"text": 8, "image": 7 if image in B.SEVEN_BIT else 8}
    assert Q.activation_bits({"method": "dynamic", "backend": "reference"}) == {"text": 8, "image": 8}


@needs_ext
def test_image_rows_take_the_image_backend_only_inside_their_pass():
    torch.manual_seed(0)
    layer = Q.DynamicInt8Linear.from_linear(ops.Linear(96, 40), "cpu ext", "cpu ext u7")
    x = torch.randn(5, 96)
    text = layer(x)
    with Q.image_rows():
        assert layer.serving() == "cpu ext u7"
        image = layer(x)
        torch.testing.assert_close(image, layer.reference(x), rtol=1e-5, atol=1e-5)  # the 7-bit reference
    assert layer.serving() == "cpu ext" and torch.equal(layer(x), text)
    torch.testing.assert_close(text, layer.reference(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(text, image)  # 7 and 8 bits round differently


def test_the_engine_runs_the_decoders_image_prefix_as_image_rows(monkeypatch):
    import gitfast

    fm = gitfast.GitForCausalLM.from_transformers(make_hf_model("hd64_odd_tokens"))
    Q.quantize(fm.model, {"method": "dynamic", "backend": "reference"})
    seen = []
    forward = Q.DynamicInt8Linear.forward

    def spy(self, x, activation=None):
        seen.append((self.serving() == self.image_backend and Q._IMAGE_ROWS.get(), x.shape[-2]))
        return forward(self, x, activation)
    monkeypatch.setattr(Q.DynamicInt8Linear, "forward", spy)
    fm.generate(pixel_values=torch.randn(1, 3, fm.config.vision_config.image_size, fm.config.vision_config.image_size),
                max_new_tokens=3)
    image_pass = [rows for inside, rows in seen if inside]
    assert image_pass and len(image_pass) < len(seen)  # the decoder's prefix pass, and not the prompt / decode steps


@needs_ext
@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32])
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_requantize_rows_u7_is_bitwise_the_two_passes(acc_dtype, activation, dtype):
    g = torch.Generator().manual_seed(5)
    acc = torch.randint(-30000, 30000, (37, 1030), generator=g).to(acc_dtype)
    rs, cs = torch.rand(37, generator=g) * 1e-3, torch.rand(1030, generator=g) * 1e-2
    rs[3] = 0  # an all-zero row (without bias): scale 0, zero point 0
    bias = torch.randn(1030, generator=g).to(dtype)
    for col, b in ((cs, bias), (None, None), (cs, None)):
        got = torch.ops.gitfast.requantize_rows_u7(acc, rs, col, b, activation, dtype)
        two = torch.ops.gitfast.quantize_rows_u7(torch.ops.gitfast.dequantize_rows(acc, rs, col, b, activation, dtype))
        for a, w in zip(got, two):
            assert a.dtype == w.dtype and torch.equal(a, w)
        ref = Q.requantize_rows_u7_reference(acc, rs, col, b, activation, dtype)
        assert (got[0].int() - ref[0].int()).abs().max() <= 1  # a tie may round the other way, as the two passes
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=0)
    q, s, z = torch.ops.gitfast.requantize_rows_u7(acc, rs, None, None, None, dtype)
    assert (float(s[3]), int(z[3]), int(q[3].max())) == (0.0, 0, 0)


@needs_ext
def test_requantize_rows_u7_takes_empty_rows_and_names_bad_arguments():
    q, s, z = torch.ops.gitfast.requantize_rows_u7(torch.zeros(0, 8, dtype=torch.int32), torch.ones(0), None, None,
                                                   "gelu", torch.float32)
    assert q.shape == (0, 8) and s.shape == z.shape == (0,)
    q, s, z = torch.ops.gitfast.requantize_rows_u7(torch.zeros(2, 0, dtype=torch.int32), torch.ones(2), None, None,
                                                   None, torch.float32)
    assert q.shape == (2, 0) and s.tolist() == [0.0, 0.0] and z.tolist() == [0, 0]
    acc = torch.zeros(3, 5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"requantize_rows_u7: row_scale must be a contiguous float32 CPU tensor of 3"):
        torch.ops.gitfast.requantize_rows_u7(acc, torch.ones(4), None, None, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"requantize_rows_u7: acc must be a contiguous 2-D int32 or float32"):
        torch.ops.gitfast.requantize_rows_u7(acc.double(), torch.ones(3), None, None, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"requantize_rows_u7: dtype Long is not float32"):
        torch.ops.gitfast.requantize_rows_u7(acc, torch.ones(3), None, None, None, torch.int64)


@pytest.mark.parametrize("image_rows", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_passes", ["extension", "plain torch"])
def test_an_int8_mlp_hands_its_second_layer_the_same_bits(monkeypatch, image_rows, dtype, row_passes):
    """ops.feed_forward over two INT8 layers equals the layers called one after the other, bitwise, on
    image rows (7-bit: the fused requantize pass) and text rows (8-bit: the layers' own passes); and
    without the extension (plain torch) too."""
    names = [n for n in ("cpu ext", "reference") if _fit(n)]
    image = "cpu ext u7" if _fit("cpu ext u7") else names[0]
    g = torch.Generator().manual_seed(11)
    fc1 = Q.DynamicInt8Linear.from_linear(ops.Linear(96, 200), names[0], image)
    fc2 = Q.DynamicInt8Linear.from_linear(ops.Linear(200, 96), names[0], image)
    x = torch.randn(2, 45, 96, generator=g).to(dtype)
    if row_passes == "plain torch":
        monkeypatch.setattr(Q, "_use_extension", lambda x: False)
    fused = []
    real = Q.requantize_rows_u7
    monkeypatch.setattr(Q, "requantize_rows_u7", lambda *a: fused.append(1) or real(*a))
    with (Q.image_rows() if image_rows else torch.no_grad()):
        got = ops.feed_forward(x, fc1, fc2, "gelu")
        want = fc2(fc1(x, "gelu"))
        ref = fc2.reference(fc1.reference(x, "gelu"))
    assert bool(fused) == (image_rows and image in B.SEVEN_BIT)
    assert got.dtype == dtype and torch.equal(got, want)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
