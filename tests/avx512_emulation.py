"""A test build of gitfast._C whose AVX-512 paths run on a CPU without AVX-512 (csrc/cpu/simd_emulation.h:
SIMDe's portable AVX-512 intrinsics, from the `simde-py` package, over the AVX2 baseline).

    python tests/avx512_emulation.py BUILD_DIR   # builds BUILD_DIR/_C.so (about 45 s on 2 cores), prints its path

A pytest session with GITFAST_TEST_EXTENSION set to that path gets it as gitfast._C (tests/conftest.py
calls `install`), so the kernel tests run the AVX-512 paths: tests/test_avx512_emulated.py."""
import glob
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def simde_include():
    """SIMDe's include folder, or None without `simde-py` (a dev dependency)."""
    try:
        import simde_py
    except ImportError:
        return None
    return simde_py.get_include()


def install(path: str) -> None:
    """Loads the test build at `path` as gitfast._C, before anything imports gitfast; the installed
    extension is then never loaded (both would register torch.ops.gitfast)."""
    import torch  # noqa: F401  (loads libtorch, which the build links against)

    spec = importlib.util.spec_from_file_location("gitfast._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gitfast._C"] = module
    spec.loader.exec_module(module)


def build_in_subprocess(build_dir: str, timeout: int = 1200) -> str:
    """`build` in a fresh process, the .so's path: torch's builder loads what it built, and in a process
    that already loaded gitfast._C the second registration of torch.ops.gitfast would abort it."""
    import subprocess

    done = subprocess.run([sys.executable, os.path.abspath(__file__), build_dir], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the emulation build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def build(build_dir: str, verbose: bool = False) -> str:
    """Compiles the extension's CPU sources with GITFAST_EMULATE_AVX512 into build_dir and loads the
    result into this process (torch's builder does): call it where gitfast._C is not loaded, else
    `build_in_subprocess`. The .so's path."""
    from torch.utils import cpp_extension

    spec = importlib.util.spec_from_file_location("gitfast_build_support", os.path.join(ROOT, "csrc", "build_support.py"))
    support = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = support
    spec.loader.exec_module(support)
    os.makedirs(build_dir, exist_ok=True)
    generated = os.path.join(build_dir, "generated")
    os.makedirs(generated, exist_ok=True)
    note = support.CudaPlan(False, None, "CPU-only build: the AVX-512 emulation test build (tests/avx512_emulation.py)", False)
    with open(os.path.join(generated, "gitfast_build_info.h"), "w") as f:
        f.write(support.build_info_header(note))
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # the extension's own flags, an AVX2 baseline for SIMDe to build on, the switch (-Wno-psabi: GCC's
    # note on passing 64-byte vectors, which SIMDe's functions do without AVX-512)
    flags = [*support.CXX_FLAGS, "-mavx2", "-mfma", "-mf16c", "-DGITFAST_EMULATE_AVX512", "-DGITFAST_WITH_CUDA=0",
             "-Wno-psabi"]
    cpp_extension.load("_C", sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       extra_include_paths=[os.path.join(ROOT, "csrc"), generated, simde_include()],
                       build_directory=build_dir, is_python_module=False, verbose=verbose)
    return os.path.join(build_dir, "_C.so")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(os.path.abspath(sys.argv[1]), verbose=True))
