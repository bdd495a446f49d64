"""Build-time helpers of setup.py: find the CUDA toolkit, decide whether the CUDA kernels are built,
pick the GPU architectures. No torch import here, so tests load this file by path with fake inputs.

setup.py loads it by path (it is not part of the installed package) and passes in what it knows
from torch (`torch.version.cuda`, `cpp_extension.CUDA_HOME`, the visible GPU's capability).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
from typing import Callable, Mapping, Optional, Sequence

# The C++ flags of gitfast._C's sources (setup.py; tests/avx512_emulation.py adds its own to them).
# -fno-trapping-math: the CPU kernels compute both arms of their branch-free selects; GCC only
# vectorises those loops when FP exceptions need not be preserved (nothing here reads them).
CXX_FLAGS = ("-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno")

DEFAULT_ARCHS = ("8.0", "9.0")  # A100, H100: the GPUs gitfast is tuned for
# TORCH_CUDA_ARCH_LIST's names for architecture families (as torch's own builds spell them).
NAMED_ARCHS = {
    "Volta": "7.0+PTX", "Turing": "7.5+PTX", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX",
    "Hopper": "9.0+PTX", "Blackwell": "10.0;12.0+PTX",
}


# -- the toolkit ----------------------------------------------------------------------------------


def cudart_dir(root: str) -> Optional[str]:
    """The folder holding libcudart under a toolkit root (lib64, lib, or targets/<arch>/lib), or None."""
    for sub in ("lib64", "lib", os.path.join("targets", "*", "lib")):
        for folder in sorted(glob.glob(os.path.join(root, sub))):
            if glob.glob(os.path.join(folder, "libcudart.so*")) or glob.glob(os.path.join(folder, "cudart*.lib")):
                return folder
    return None


def is_toolkit(root: Optional[str]) -> bool:
    """A usable toolkit: bin/nvcc to compile with and a libcudart to link against."""
    if not root:
        return False
    nvcc = os.path.join(root, "bin", "nvcc")
    return (os.path.isfile(nvcc) or os.path.isfile(nvcc + ".exe")) and cudart_dir(root) is not None


def _run(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


def nvcc_release(nvcc: str, run: Callable[[Sequence[str]], str] = _run) -> Optional[str]:
    """`nvcc --version`'s release ("12.4"), or None when nvcc does not answer."""
    m = re.search(r"release (\d+\.\d+)", run([nvcc, "--version"]))
    return m.group(1) if m else None


def _roots_from_nvcc(nvcc: str, run: Callable[[Sequence[str]], str]) -> list[str]:
    """Toolkit roots an nvcc on PATH points to: its own folder's parent, its resolved path's parent
    (symlinks), and what nvcc itself reports in a dry run (`TOP=...`, wrapper scripts that exec
    the real nvcc elsewhere)."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(nvcc))),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    # A dry run compiles nothing; nvcc prints its environment, `#$ TOP=<root>/bin/..` among it.
    out = run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
    for m in re.finditer(r"^#\$ (?:TOP|_HERE_)=(.+?)\s*$", out, flags=re.MULTILINE):
        top = os.path.normpath(m.group(1))
        roots.append(os.path.dirname(top) if os.path.basename(top) == "bin" else top)
    return roots


def find_cuda_home(torch_cuda_home: Optional[str] = None, env: Mapping[str, str] = os.environ,
                   which: Callable[[str], Optional[str]] = shutil.which,
                   run: Callable[[Sequence[str]], str] = _run) -> Optional[str]:
    """The CUDA toolkit root to build with, or None. In order: torch's CUDA_HOME, $CUDA_HOME,
    $CUDA_PATH, then the nvcc on PATH (which may be a symlink or a wrapper script). Only a folder
    with bin/nvcc and libcudart counts: a runtime-only install cannot build the kernels."""
    for root in (torch_cuda_home, env.get("CUDA_HOME"), env.get("CUDA_PATH")):
        if is_toolkit(root):
            return os.path.normpath(root)
    nvcc = which("nvcc")
    for root in _roots_from_nvcc(nvcc, run) if nvcc else ():
        if is_toolkit(root):
            return os.path.normpath(root)
    return None


@dataclasses.dataclass
class CudaPlan:
    """Whether the CUDA kernels are built, with which toolkit, and the note `gitfast._C` keeps."""
    with_cuda: bool
    cuda_home: Optional[str]
    note: str
    warn: bool = False  # a CUDA build of torch gets a CPU-only extension: say so loudly


def plan_cuda(torch_cuda: Optional[str], have_cu_sources: bool, torch_cuda_home: Optional[str] = None,
              env: Mapping[str, str] = os.environ, which: Callable[[str], Optional[str]] = shutil.which,
              run: Callable[[Sequence[str]], str] = _run) -> CudaPlan:
    """Decide the CUDA part of the build. `torch_cuda` is torch.version.cuda (None: CPU torch).
    GITFAST_SKIP_CUDA=1 skips the CUDA kernels; GITFAST_REQUIRE_CUDA=1 makes their absence an error."""
    require = env.get("GITFAST_REQUIRE_CUDA", "0") == "1"

    def without(note: str, warn: bool) -> CudaPlan:
        if require:
            raise RuntimeError(f"GITFAST_REQUIRE_CUDA=1 but {note}")
        return CudaPlan(False, None, note, warn)

    if env.get("GITFAST_SKIP_CUDA", "0") == "1":
        return without("the CUDA kernels were skipped (GITFAST_SKIP_CUDA=1)", warn=False)
    if not have_cu_sources:
        return without("no CUDA sources in csrc/cuda", warn=False)
    if torch_cuda is None:
        return without("torch is a CPU-only build", warn=False)
    home = find_cuda_home(torch_cuda_home, env, which, run)
    if home is None:
        return without(
            f"torch is a CUDA {torch_cuda} build but no CUDA toolkit (bin/nvcc and libcudart) was found "
            "via torch's CUDA_HOME, $CUDA_HOME, $CUDA_PATH or nvcc on PATH; gitfast._C has CPU kernels "
            "only and its ops run the plain-torch reference on GPUs. Install the toolkit (or set "
            "CUDA_HOME) and rebuild", warn=True)
    release = nvcc_release(os.path.join(home, "bin", "nvcc"), run)
    return CudaPlan(True, home, f"CUDA kernels built with the toolkit at {home} (nvcc {release or 'unknown'}) "
                                f"for torch CUDA {torch_cuda}")


# -- architectures --------------------------------------------------------------------------------


def parse_arch_list(text: str) -> list[tuple[str, bool]]:
    """TORCH_CUDA_ARCH_LIST syntax ("8.0;9.0+PTX", "8.6 9.0a", "Hopper") or GITFAST_CUDA_ARCHS' own
    ("80;90") -> [(arch, with_ptx)] with arch as nvcc spells it ("80", "90a"), in order, deduplicated."""
    out: list[tuple[str, bool]] = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        if item in NAMED_ARCHS:
            out += [a for a in parse_arch_list(NAMED_ARCHS[item]) if a not in out]
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?|(\d{2,3})([af]?)(\+PTX)?", item, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"unrecognised CUDA architecture {item!r} in {text!r}; expected e.g. "
                             "'9.0', '8.0;9.0+PTX', '90' or one of " + ", ".join(NAMED_ARCHS))
        if m.group(1):
            arch = m.group(1) + m.group(2) + m.group(3).lower()
            ptx = bool(m.group(4))
        else:
            arch = m.group(5) + m.group(6).lower()
            ptx = bool(m.group(7))
        if (arch, ptx) not in out:
            out.append((arch, ptx))
    if not out:
        raise ValueError(f"empty CUDA architecture list {text!r}")
    return out


def cuda_archs(env: Mapping[str, str] = os.environ,
               visible_capability: Optional[tuple[int, int]] = None) -> list[tuple[str, bool]]:
    """The architectures to compile for: GITFAST_CUDA_ARCHS if set, else TORCH_CUDA_ARCH_LIST
    ("native": the visible GPU), else the visible GPU's own, else sm_80 and sm_90."""
    for name in ("GITFAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        value = env.get(name, "").strip()
        if value and value != "native":
            return parse_arch_list(value)
    if visible_capability is not None:
        return [(f"{visible_capability[0]}{visible_capability[1]}", False)]
    return parse_arch_list(";".join(DEFAULT_ARCHS))


def gencode_flags(archs: Sequence[tuple[str, bool]]) -> list[str]:
    """nvcc -gencode flags: SASS for each arch, plus PTX (JIT-compilable on newer GPUs) where asked."""
    flags: list[str] = []
    for arch, ptx in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


# -- what the extension reports at run time ---------------------------------------------------------


def build_info_header(plan: CudaPlan) -> str:
    """C++ header text compiled into gitfast._C (bindings.cpp exposes it as `cuda_build_note`)."""
    note = plan.note.replace(")gitfast\"", ") gitfast\"")  # cannot end the raw string early
    return ("// Generated by setup.py (csrc/build_support.py); not part of the source tree.\n"
            "#pragma once\n"
            f"#define GITFAST_CUDA_BUILD_NOTE R\"gitfast({note})gitfast\"\n")
