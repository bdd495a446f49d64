"""setup.py's build helpers (csrc/build_support.py): CUDA toolkit discovery, the CUDA-or-not decision
and GPU architecture lists, on fake toolkit folders (shell-script nvcc on PATH); no toolkit needed.
"""
import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_build_support():
    spec = importlib.util.spec_from_file_location("gitfast_build_support_test", ROOT / "csrc" / "build_support.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bs = _load_build_support()
posix_only = pytest.mark.skipif(os.name != "posix", reason="fake nvcc is a shell script")


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _toolkit(root: Path, libdir: str = "lib64", release: str = "12.4") -> Path:
    """A fake toolkit: bin/nvcc answering --version and --dryrun like the real one, libcudart."""
    _script(root / "bin" / "nvcc", f"""case "$*" in
  *--version*) echo "Cuda compilation tools, release {release}, V{release}.131" ;;
  *--dryrun*) echo "#\\$ _HERE_={root}/bin"; echo "#\\$ TOP={root}/bin/.." ;;
esac
""")
    if libdir:
        (root / libdir).mkdir(parents=True, exist_ok=True)
        (root / libdir / "libcudart.so.12").write_text("")
    return root


def _path_env(monkeypatch, *dirs):
    monkeypatch.setenv("PATH", os.pathsep.join(str(d) for d in dirs))


# -- toolkit discovery ------------------------------------------------------------------------------


@posix_only
def test_nvcc_symlink_on_path_resolves_to_its_toolkit(tmp_path, monkeypatch):
    root = _toolkit(tmp_path / "cuda-12.4")
    (tmp_path / "wrap").mkdir()
    (tmp_path / "wrap" / "nvcc").symlink_to(root / "bin" / "nvcc")
    _path_env(monkeypatch, tmp_path / "wrap")
    assert bs.find_cuda_home(None, env={}) == str(root)


@posix_only
def test_nvcc_wrapper_script_is_followed_through_its_dry_run(tmp_path, monkeypatch):
    # a wrapper (as conda or ccache install) that execs the real nvcc from elsewhere: neither its
    # folder nor its resolved path is the toolkit, only what nvcc itself reports
    root = _toolkit(tmp_path / "opt" / "cuda")
    _script(tmp_path / "wrap" / "nvcc", f'exec "{root}/bin/nvcc" "$@"\n')
    _path_env(monkeypatch, tmp_path / "wrap")
    assert bs.find_cuda_home(None, env={}) == str(root)


@posix_only
def test_toolkit_without_cudart_is_not_a_toolkit(tmp_path, monkeypatch):
    root = _toolkit(tmp_path / "cuda", libdir="")
    _path_env(monkeypatch, root / "bin")
    assert bs.find_cuda_home(None, env={"CUDA_HOME": str(root)}) is None
    (root / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
    (root / "targets" / "x86_64-linux" / "lib" / "libcudart.so").write_text("")
    assert bs.find_cuda_home(None, env={}) == str(root)  # conda's layout
    assert bs.cudart_dir(str(root)) == str(root / "targets" / "x86_64-linux" / "lib")


def test_torch_and_env_homes_come_first(tmp_path, monkeypatch):
    first, second = _toolkit(tmp_path / "a"), _toolkit(tmp_path / "b")
    _path_env(monkeypatch, tmp_path / "nowhere")
    assert bs.find_cuda_home(str(first), env={"CUDA_HOME": str(second)}) == str(first)
    assert bs.find_cuda_home(str(tmp_path / "missing"), env={"CUDA_HOME": str(second)}) == str(second)
    assert bs.find_cuda_home(None, env={"CUDA_PATH": str(first)}) == str(first)
    assert bs.find_cuda_home(None, env={}) is None


@posix_only
def test_nvcc_release_is_read_from_version(tmp_path):
    root = _toolkit(tmp_path / "cuda", release="12.8")
    assert bs.nvcc_release(str(root / "bin" / "nvcc")) == "12.8"
    assert bs.nvcc_release(str(tmp_path / "no-nvcc")) is None


# -- the CUDA-or-not decision -------------------------------------------------------------------------


@posix_only
def test_cuda_torch_with_toolkit_builds_cuda(tmp_path, monkeypatch):
    root = _toolkit(tmp_path / "cuda", release="12.6")
    _path_env(monkeypatch, root / "bin")
    plan = bs.plan_cuda("12.6", True, None, env={})
    assert plan.with_cuda and plan.cuda_home == str(root) and not plan.warn
    assert str(root) in plan.note and "12.6" in plan.note


def test_cuda_torch_without_toolkit_builds_cpu_only_loudly(tmp_path, monkeypatch):
    _path_env(monkeypatch, tmp_path)  # no nvcc anywhere
    plan = bs.plan_cuda("12.4", True, None, env={})
    assert not plan.with_cuda and plan.warn
    assert "CUDA 12.4 build" in plan.note and "CPU kernels only" in plan.note
    with pytest.raises(RuntimeError, match="GITFAST_REQUIRE_CUDA=1 but torch is a CUDA 12.4 build"):
        bs.plan_cuda("12.4", True, None, env={"GITFAST_REQUIRE_CUDA": "1"})


def test_cpu_torch_and_skip_switch_build_cpu_quietly(tmp_path, monkeypatch):
    root = _toolkit(tmp_path / "cuda")
    _path_env(monkeypatch, root / "bin")
    plan = bs.plan_cuda(None, True, str(root), env={})
    assert not plan.with_cuda and not plan.warn and "CPU-only build" in plan.note
    plan = bs.plan_cuda("12.4", True, str(root), env={"GITFAST_SKIP_CUDA": "1"})
    assert not plan.with_cuda and not plan.warn and "GITFAST_SKIP_CUDA" in plan.note
    with pytest.raises(RuntimeError, match="CPU-only build"):
        bs.plan_cuda(None, True, None, env={"GITFAST_REQUIRE_CUDA": "1"})


def test_build_info_header_holds_the_note_verbatim(tmp_path):
    note = 'toolkit at /opt/cuda "x" (nvcc 12.4); a )gitfast" inside'
    text = bs.build_info_header(bs.CudaPlan(False, None, note))
    assert text.count('R"gitfast(') == 1 and text.rstrip().endswith(')gitfast"')
    assert "/opt/cuda" in text


# -- architectures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("9.0", [("90", False)]),
    ("8.0;9.0+PTX", [("80", False), ("90", True)]),
    ("8.6 9.0a", [("86", False), ("90a", False)]),
    ("80;90", [("80", False), ("90", False)]),                    # GITFAST_CUDA_ARCHS' own spelling
    ("Hopper", [("90", True)]),
    ("Ampere;9.0", [("80", False), ("86", True), ("90", False)]),
    ("9.0;9.0", [("90", False)]),
])
def test_arch_lists_parse(text, expected):
    assert bs.parse_arch_list(text) == expected


@pytest.mark.parametrize("bad", ["sm_90", "9", "Pascall", ";"])
def test_bad_arch_lists_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="CUDA architecture"):
        bs.parse_arch_list(bad)


def test_arch_precedence():
    both = {"GITFAST_CUDA_ARCHS": "80", "TORCH_CUDA_ARCH_LIST": "9.0+PTX"}
    assert bs.cuda_archs(both, (8, 9)) == [("80", False)]                        # gitfast's own wins
    assert bs.cuda_archs({"TORCH_CUDA_ARCH_LIST": "9.0+PTX"}, (8, 9)) == [("90", True)]
    assert bs.cuda_archs({"TORCH_CUDA_ARCH_LIST": "native"}, (8, 9)) == [("89", False)]
    assert bs.cuda_archs({}, (9, 0)) == [("90", False)]                           # the visible GPU
    assert bs.cuda_archs({}, None) == [("80", False), ("90", False)]
    assert bs.gencode_flags([("90", True), ("80", False)]) == [
        "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90",
        "-gencode", "arch=compute_80,code=sm_80"]


# -- what setup.py wires up -----------------------------------------------------------------------------


def test_built_extension_says_whether_it_has_cuda_and_why():
    try:
        import gitfast._C as ext
    except ImportError:
        pytest.skip("gitfast._C is not built")
    assert ext.with_cuda in (0, 1) and isinstance(ext.cuda_build_note, str) and ext.cuda_build_note
    if torch.version.cuda is None:
        assert ext.with_cuda == 0 and "CPU-only build" in ext.cuda_build_note


@posix_only
def test_setup_py_loads_the_helpers_without_building(tmp_path):
    # setup.py must stay importable as pip runs it; the helpers must not need torch at import
    code = ("import importlib.util, sys; "
            f"s = importlib.util.spec_from_file_location('b', {str(ROOT / 'csrc' / 'build_support.py')!r}); "
            "m = importlib.util.module_from_spec(s); sys.modules['b'] = m; s.loader.exec_module(m); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
