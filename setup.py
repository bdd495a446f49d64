"""Build script: packages (with `kernels/` installed as `gitfast.kernels`) and the `gitfast._C` extension.

The extension is built from `csrc/` with torch's cpp_extension: the bindings (`csrc/*.cpp`) and the
CPU kernels (`csrc/cpu/*.cpp`) always, the CUDA kernels (`csrc/cuda/*.cu`) too when a CUDA toolkit
and a CUDA build of torch are present. `GITFAST_SKIP_EXTENSION=1` skips it;
gitfast then falls back to its plain-torch reference ops. Nothing here downloads anything.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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

    cu = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("GITFAST_SKIP_CUDA", "0") == "1":
        with_cuda = False
    # -fno-trapping-math: the CPU kernels compute both arms of their branch-free selects; GCC only
    # vectorises those loops when FP exceptions need not be preserved (nothing here reads them).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    define = [("GITFAST_WITH_CUDA", "1")] if with_cuda else []
    if with_cuda:
        archs = os.environ.get("GITFAST_CUDA_ARCHS", "80;90").split(";")
        # no --use_fast_math: the kernels pick their fast intrinsics (__expf) themselves, and the
        # LayerNorm keeps IEEE division/sqrt so fp32 stays within 1e-5 of torch
        nvcc = ["-O3", "-std=c++20", "-lineinfo"]  # torch 2.13 headers are C++20
        for a in archs:
            nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        ext = cpp_extension.CUDAExtension(
            "gitfast._C", cpp + cu, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "gitfast._C", cpp, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["gitfast", "gitfast.serving", "gitfast.captioning", "gitfast.kernels", "gitfast.bench", "gitfast.assets",
              "gitfast.training"],
    package_dir={"gitfast": "gitfast", "gitfast.kernels": "kernels", "gitfast.bench": "bench"},
    package_data={"gitfast.assets": ["**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
