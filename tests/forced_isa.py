"""A test file's own tests run again in a fresh process with GITFAST_CPU_ISA capping the CPU kernels
(each kernel picks its ISA once per process): the paths a CPU does not pick by itself."""
import os
import subprocess
import sys


def run_with_isa(test_file: str, isa: str, keywords: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`pytest -q -x -k keywords test_file` under GITFAST_CPU_ISA=isa; the finished process."""
    env = {**os.environ, "GITFAST_CPU_ISA": isa}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", keywords]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
