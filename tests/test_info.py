"""`gitfast info`: versions, devices and the backend of each op, as text and as JSON."""
import importlib.util
import json
import re

import pytest
import torch
import transformers

import gitfast
from gitfast import ops
from gitfast.tools import cli


FUSED = ("add_layer_norm", "bias_act", "mlp")


def _expected_backends():
    """What each fused op should report, known from the build itself (not from the dispatcher that
    `gitfast info` reads): the compiled module's presence and its own CUDA flag."""
    if importlib.util.find_spec("gitfast._C") is None:
        return {"cpu": "reference", "cuda": "reference"}
    import gitfast._C as ext

    return {"cpu": "cpu ext", "cuda": "cuda ext" if getattr(ext, "with_cuda", False) else "reference"}


def _info(capsys, *argv):
    assert cli.main(["info", *argv]) == 0
    return capsys.readouterr().out


def test_text_names_versions_devices_and_backends(capsys):
    out = _info(capsys)
    assert f"gitfast {gitfast.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert f"transformers {transformers.__version__}" in out
    assert "triton " in out
    assert "cpu " in out
    want = _expected_backends()
    for op in FUSED:
        row = next(line for line in out.splitlines() if line.strip().startswith(op))
        assert row.split()[1:] == [*want["cuda"].split(), *want["cpu"].split()]
    if want["cpu"] == "cpu ext":
        assert "extension gitfast._C: loaded" in out


def test_json_matches_the_dispatcher(capsys):
    info = json.loads(_info(capsys, "--json"))
    assert info["versions"]["torch"] == torch.__version__
    assert info["devices"][0]["name"] == "cpu"
    assert len(info["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    want = _expected_backends()
    assert info["extension"]["loaded"] == (want["cpu"] == "cpu ext")
    assert set(info["ops"]) == set(FUSED)
    assert all(info["ops"][op] == want for op in FUSED)
    # the vision attention row names what attention.bidirectional runs on the CPU
    from gitfast import attention
    from gitfast.attention import cpu_backend

    row = info["attention"]["vision_attention"]["cpu"]
    runs = attention.backend_for(attention.VISION, torch.zeros(1, 3, 2, 64))
    assert row.startswith("cpu ext") == (runs is cpu_backend.BACKEND), row
    assert row.startswith(("cpu ext (measured", "cpu ext (forced", "torch sdpa")), row


def test_reports_reference_without_the_extension(capsys, monkeypatch):
    def no_extension():
        raise ImportError("simulated")

    monkeypatch.setattr(ops, "_import_extension", no_extension)
    monkeypatch.setattr(ops, "_extension_state", None)
    with pytest.warns(RuntimeWarning, match="gitfast._C is not available"):
        out = _info(capsys)
    assert "extension gitfast._C: not built" in out
    for op in ops.OPS:
        row = next(line for line in out.splitlines() if line.strip().startswith(op))
        assert row.split()[1:] == ["reference", "reference"]


def test_a_subcommand_that_fails_to_import_breaks_only_itself(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, "broken": ("gitfast.no_such_module", "broken on purpose")})
    assert cli.main(["info"]) == 0  # the broken module is never imported
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "broken on purpose" in capsys.readouterr().out
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        cli.main(["broken"])


def test_a_gpu_without_cuda_kernels_is_an_error(capsys, monkeypatch):
    """A CUDA device with an extension built CPU-only: every fused op would silently run its
    reference, so `gitfast info` says so and exits 1."""
    from gitfast.tools import info

    real = info.collect

    def with_a_gpu():
        data = real()
        data["devices"].append({"name": "cuda:0", "description": "fake", "capability": "sm_90", "memory_gib": 80})
        data["extension"]["cuda_kernels"] = False
        return data

    monkeypatch.setattr(info, "collect", with_a_gpu)
    assert cli.main(["info"]) == 1
    assert "has no CUDA kernels" in capsys.readouterr().err


_PROBE = r"""
import json, torch
from gitfast import bf16_backends, fp32_backends, ops
from gitfast.tools import info

calls = {"linear_bf16": 0, "_linear_pointwise": 0, "linear_fp32": 0, "upcast_linear": 0, "swapped_linear": 0}
def spy(namespace, name):
    real = getattr(namespace, name, None)
    if real is None:
        return
    def counted(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)
    setattr(namespace, name, counted)

ops.extension_loaded()
spy(torch.ops.gitfast, "linear_bf16")
spy(torch.ops.mkldnn, "_linear_pointwise")
spy(torch.ops.gitfast, "linear_fp32")
spy(bf16_backends, "upcast_linear")
spy(fp32_backends, "swapped_linear")
ran = {}
with torch.no_grad():
    for name, layer, rows in (("logits", ops.Logits(64, 96), 1), ("linear_narrow", ops.Linear(64, 96), 1),
                              ("linear_wide", ops.Linear(64, 96), 40)):  # 40: past every narrow limit
        layer = layer.bfloat16()
        before = dict(calls)
        layer(torch.randn(rows, 64).bfloat16())
        ran[name] = [k for k in calls if calls[k] > before[k]]
    # 17: past fp32_backends.NARROW_MAX_ROWS; 65: past MIDDLE_MAX_ROWS. Decided first: timing the
    # candidates calls each of them
    fp32_backends.decide(fp32_backends.NARROW), fp32_backends.decide(fp32_backends.MIDDLE)
    for name, rows in (("fp32_narrow", 1), ("fp32_middle", 17), ("fp32_wide", 65)):
        before = dict(calls)
        ops.Linear(512, 520)(torch.randn(rows, 512))  # >= fp32_backends.MIDDLE_MIN_WEIGHT
        ran[name] = [k for k in calls if calls[k] > before[k]]
print(json.dumps({"rows": info.collect()["linear"], "ran": ran}))
"""


@pytest.mark.parametrize("forced_isa", [None, "avx2"])
def test_linear_and_logits_rows_name_what_runs(forced_isa):
    """The linear_fp32 / linear_bf16 / logits_bf16 rows say what a layer's forward actually calls, in a fresh
    process (the kernels' ISA and the measured backends are chosen once per process), also with
    GITFAST_CPU_ISA=avx2 capping the bf16 kernel to its portable path (and the fp32 kernel to AVX2)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GITFAST_CPU_ISA"}
    if forced_isa:
        env["GITFAST_CPU_ISA"] = forced_isa
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    rows, ran = got["rows"], got["ran"]
    logits_row = rows["logits_bf16"]["cpu"]
    assert ("cpu ext" in logits_row) == ("linear_bf16" in ran["logits"]), (logits_row, ran)
    assert ran["logits"] or logits_row == "torch fp32", (logits_row, ran)
    linear_row, _, measured = rows["linear_bf16"]["cpu"].partition(" (")  # the backends, then their times
    assert not measured or measured.startswith(("measured", "forced", "only one fit")), measured
    assert ("cpu ext" in linear_row) == ("linear_bf16" in ran["linear_narrow"]), (linear_row, ran)
    assert ("onednn packed" in linear_row) == ("_linear_pointwise" in ran["linear_wide"]), (linear_row, ran)
    assert ("fp32 upcast" in linear_row) == ("upcast_linear" in ran["linear_wide"]), (linear_row, ran)
    fp32_row = rows["linear_fp32"]["cpu"]
    bands = dict((rows, name) for name, rows in re.findall(r"(torch swapped|cpu ext|torch) at (<= 16|17-64) rows", fp32_row))
    assert list(bands) == ["<= 16", "17-64"] and fp32_row.endswith("; torch above"), fp32_row
    for band, probe in (("<= 16", "fp32_narrow"), ("17-64", "fp32_middle")):
        served = {"cpu ext": ["linear_fp32"], "torch swapped": ["swapped_linear"], "torch": []}[bands[band]]
        assert ran[probe] == served, (fp32_row, ran)
    assert ran["fp32_wide"] == [], (fp32_row, ran)
