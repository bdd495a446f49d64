"""Build script: packages (with `kernels/` installed as `gitfast.kernels`) and the `gitfast._C` extension.

`gitfast/kernels` is a link to the top-level `kernels/` folder, which has no `__init__.py` so that it
never shadows Hugging Face's `kernels` package from the repository root (kernels/api.py says more);
setuptools follows the link, so a wheel holds the files themselves.

The extension is built from `csrc/` with torch's cpp_extension: the bindings (`csrc/*.cpp`) and the
CPU kernels (`csrc/cpu/*.cpp`) always, the CUDA kernels (`csrc/cuda/*.cu`) too when torch is a CUDA
build and a CUDA toolkit is found (csrc/build_support.py: torch's CUDA_HOME, $CUDA_HOME, $CUDA_PATH
or the nvcc on PATH). A CUDA torch without a toolkit gets a CPU-only extension, with a warning here
and `gitfast._C.with_cuda == 0` plus `gitfast._C.cuda_build_note` saying why at run time.

Environment: `GITFAST_SKIP_EXTENSION=1` skips the extension (gitfast then runs its plain-torch
reference ops); `GITFAST_SKIP_CUDA=1` builds the CPU kernels only; `GITFAST_REQUIRE_CUDA=1` makes a
missing toolkit an error; `GITFAST_CUDA_ARCHS` ("80;90"), else `TORCH_CUDA_ARCH_LIST` ("8.0;9.0+PTX"),
picks the GPU architectures (default: the visible GPU's, else sm_80 and sm_90). Nothing here
downloads anything.
"""
import glob
import importlib.util
import os
import sys
import warnings

from setuptools import find_namespace_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Generated build info (gitfast_build_info.h), kept out of the source tree.
GENERATED = os.path.join(ROOT, "build", "gitfast_generated")


def _build_support():
    """csrc/build_support.py, loaded by path: it is a build helper, not part of the package."""
    path = os.path.join(ROOT, "csrc", "build_support.py")
    spec = importlib.util.spec_from_file_location("gitfast_build_support", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _extensions():
    if os.environ.get("GITFAST_SKIP_EXTENSION", "0") == "1":
        return [], {}
    # Sources relative to setup.py (setuptools refuses absolute ones); pip runs us from ROOT.
    cpp = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT) + glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    if not cpp:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - README installs torch first
        raise RuntimeError(
            "building gitfast._C needs torch installed first: `pip install torch` then "
            "`pip install --no-build-isolation -e .` (or set GITFAST_SKIP_EXTENSION=1)"
        ) from exc
    import torch

    support = _build_support()
    cu = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    plan = support.plan_cuda(torch.version.cuda, bool(cu), cpp_extension.CUDA_HOME)
    if plan.warn:
        # pip shows a build's output only with -v; the warning also reaches `pip install` logs
        sys.stderr.write(f"\n{'=' * 78}\ngitfast: building WITHOUT CUDA kernels: {plan.note}\n{'=' * 78}\n\n")
        warnings.warn(f"gitfast: building without CUDA kernels: {plan.note}", stacklevel=1)
    os.makedirs(GENERATED, exist_ok=True)
    header = os.path.join(GENERATED, "gitfast_build_info.h")
    text = support.build_info_header(plan)
    old = None
    if os.path.exists(header):
        with open(header) as f:
            old = f.read()
    if old != text:  # rewritten only when it changes: ninja would rebuild bindings.cpp otherwise
        with open(header, "w") as f:
            f.write(text)
    include_dirs = [os.path.join(ROOT, "csrc"), GENERATED]
    cxx = list(support.CXX_FLAGS)
    define = [("GITFAST_WITH_CUDA", "1" if plan.with_cuda else "0")]
    if plan.with_cuda:
        # cpp_extension reads its module-level CUDA_HOME for nvcc, headers and libraries; it is None
        # when torch did not find the toolkit that build_support did (e.g. nvcc behind a wrapper)
        cpp_extension.CUDA_HOME = plan.cuda_home
        os.environ["CUDA_HOME"] = plan.cuda_home
        visible = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        archs = support.cuda_archs(os.environ, visible)
        # no --use_fast_math: the kernels pick their fast intrinsics (__expf) themselves, and the
        # LayerNorm keeps IEEE division/sqrt so fp32 stays within 1e-5 of torch
        nvcc = ["-O3", "-std=c++20", "-lineinfo"] + support.gencode_flags(archs)  # torch 2.13 headers are C++20
        ext = cpp_extension.CUDAExtension(
            "gitfast._C", cpp + cu, include_dirs=include_dirs,
            library_dirs=[support.cudart_dir(plan.cuda_home)],
            define_macros=define, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "gitfast._C", cpp, include_dirs=include_dirs,
            define_macros=define, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# Every folder of gitfast/ is a package, found rather than listed, so that no subpackage can be left
# out of a wheel (tests/test_packaging.py builds one and compares): namespace discovery, because
# gitfast.kernels has no __init__.py. The assets' subfolders are data (package_data), not code.
PACKAGES = find_namespace_packages(include=["gitfast", "gitfast.*"], exclude=["gitfast.assets.*"])

setup(
    packages=PACKAGES + ["gitfast.bench"],
    package_dir={"gitfast": "gitfast", "gitfast.bench": "bench"},
    package_data={"gitfast.assets": ["**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
