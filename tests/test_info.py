"""`gitfast info`: versions, devices and the backend of each op, as text and as JSON."""
import importlib.util
import json

import pytest
import torch
import transformers

import gitfast
from gitfast import cli, ops


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
        assert row.split()[1:] == [*want["cpu"].split(), *want["cuda"].split()]
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
    from gitfast import info

    real = info.collect

    def with_a_gpu():
        data = real()
        data["devices"].append({"name": "cuda:0", "description": "fake", "capability": "sm_90", "memory_gib": 80})
        data["extension"]["cuda_kernels"] = False
        return data

    monkeypatch.setattr(info, "collect", with_a_gpu)
    assert cli.main(["info"]) == 1
    assert "has no CUDA kernels" in capsys.readouterr().err
