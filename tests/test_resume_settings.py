"""`--resume` compares what the captions were made with, as resolved on the machine: `--dtype auto` is
bf16 on a CPU with native bf16 and fp32 on others, and `--quantize dynamic` picks the LM head's precision
by the CPU (its INT8 GEMM too, but every backend gives the same integers). The recorded settings hold the resolved values, so a resume on another
machine that would mix fp32 and bf16 (or differently quantized) captions is refused by name."""
import json

import pytest

from gitfast import bf16_backends, devices, quantization
from gitfast.tools import cli
from gitfast.captioning import cli as caption_cli
from image_factory import small_images, write_files


def caption(*argv):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    extra = ["--max-new-tokens", "3", "--batch-size", "4", "--quiet", "--device", "cpu"]
    return caption_cli.run(parser.parse_args([str(a) for a in argv] + extra))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    write_files(folder, small_images(2))
    return folder


def _recorded(out):
    return json.loads(open(f"{out}.settings.json", encoding="utf-8").read())


def test_auto_dtype_is_recorded_resolved_and_a_resume_that_resolves_otherwise_is_refused(photos, tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    out = tmp_path / "o.jsonl"
    assert caption(photos, "--out", out, "--dtype", "auto") == 0, capsys.readouterr().err
    assert _recorded(out)["dtype"] == "float32"
    assert caption(photos, "--out", out, "--resume", "--dtype", "float32") == 0  # the same weights, spelt out
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)  # the output moved to a bf16 CPU
    capsys.readouterr()
    assert caption(photos, "--out", out, "--resume", "--dtype", "auto") == 2
    assert "dtype 'bfloat16' (was 'float32')" in capsys.readouterr().err
    assert _recorded(out)["dtype"] == "float32"


def test_int8_head_precision_is_recorded_and_compared(photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.jsonl"
    assert caption(photos, "--out", out, "--quantize", "dynamic") == 0, capsys.readouterr().err
    settings = _recorded(out)
    serves = bf16_backends.kernel_serves_logits()
    assert settings["int8_lm_head"] == ("bfloat16" if serves else "float32") and "int8_backend" not in settings
    monkeypatch.setattr(bf16_backends, "kernel_serves_logits", lambda: not serves)  # another CPU
    capsys.readouterr()
    assert caption(photos, "--out", out, "--resume", "--quantize", "dynamic") == 2
    was, now = ("bfloat16", "float32") if serves else ("float32", "bfloat16")
    assert f"int8_lm_head {now!r} (was {was!r})" in capsys.readouterr().err
    monkeypatch.setattr(bf16_backends, "kernel_serves_logits", lambda: serves)
    bits = quantization.activation_bits("dynamic")
    assert settings["int8_activation_bits"] == bits and bits["text"] == 8
    other = {"text": 8, "image": 15 - bits["image"]}  # a CPU where image rows take the other
    monkeypatch.setattr(quantization, "activation_bits", lambda config: other)
    assert caption(photos, "--out", out, "--resume", "--quantize", "dynamic") == 2
    assert f"int8_activation_bits {other!r} (was {bits!r})" in capsys.readouterr().err
