"""The CPU kernels' AVX-512 paths, run here whatever the CPU: a test build of gitfast._C takes its
AVX-512 intrinsics from SIMDe over AVX2 (tests/avx512_emulation.py, csrc/cpu/simd_emulation.h), and the
kernel tests run again on it, each kernel on its AVX-512 path (the normal run covers the AVX2 and
portable ones). These are the paths of CPUs with AVX-512 (AMD Zen 4/5, Intel Xeon), which the machines
that build gitfast may not have; the emulation checks their results, not their speed."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from avx512_emulation import ROOT, build_in_subprocess, simde_include

# the test files whose kernels have AVX-512 paths (attention, fp32 decode Linear, INT8 GEMMs, bf16
# logits) and the ops that route to them
KERNEL_TESTS = ["tests/test_cpu_attention.py", "tests/test_linear_fp32.py", "tests/test_int8_gemm.py",
                "tests/test_int8_gemm_vnni.py", "tests/test_int8_gemm_u7_packed.py", "tests/test_logits_kernel.py",
                "tests/test_ops.py", "tests/test_quantization.py"]


# the build's baseline (-mavx2 -mfma -mf16c) must run here: torch's own dispatch level says so
pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the emulation build needs an x86-64 CPU with AVX2 and FMA")


@pytest.fixture(scope="module")
def emulated():
    assert simde_include() is not None, "simde-py is missing: pip install -e '.[dev]'"
    return build_in_subprocess(os.path.join(ROOT, "build", "avx512_emulation"))


def _run(so, args, timeout):
    # AVX-512 capped and the attention's measured ISA forced to it (emulated, it measures slower than
    # AVX2): the kernels run their AVX-512 paths, and the test files' forced-ISA subprocesses (the AVX2
    # and portable paths, which the normal run covers) stand aside as in any forced-ISA run
    env = {**os.environ, "GITFAST_TEST_EXTENSION": so, "GITFAST_CPU_ISA": "avx512", "GITFAST_ATTENTION_ISA": "avx512"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_emulated_build_takes_every_avx512_path(emulated):
    probe = ("import torch, json; from gitfast import ops; g = torch.ops.gitfast; "
             "print(json.dumps({'file': ops.extension().__file__, 'attention': g.cpu_isa(), 'int8': g.int8_isa(), "
             "'vnni': g.int8_vnni_isa(), 'logits': g.logits_isa(), 'linear_fp32': g.linear_fp32_isa()}))")
    load = "import os, sys; sys.path.insert(0, 'tests'); import avx512_emulation; " \
           "avx512_emulation.install(os.environ['GITFAST_TEST_EXTENSION']); "
    done = _run(emulated, ["-c", load + probe], 120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert os.path.samefile(got.pop("file"), emulated)
    assert got == {"attention": "avx512", "int8": "avx512", "vnni": "avx512vnni", "logits": "avx512bf16",
                   "linear_fp32": "avx512"}


def test_the_kernel_tests_pass_on_the_avx512_paths(emulated):
    # the one test that captions through a CLI subprocess would load the installed extension, which
    # refuses the forced ISA on a CPU without AVX-512
    cli = "tests/test_quantization.py::test_captioner_and_cli_take_dynamic_int8_and_auto_dtype"
    done = _run(emulated, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS, "--deselect", cli], 1500)
    tail = done.stdout[-5000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
