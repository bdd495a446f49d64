#!/usr/bin/env bash
# Link check without a GPU: build gitfast._C WITH its CUDA kernels against a CUDA build of torch, load
# it, check that every op has a CUDA kernel registered, and run tests/test_ops.py on CPU tensors.
# It proves the .cu files compile, link (no undefined symbols once libtorch_cuda is loaded) and register;
# running them needs a GPU (bench/gpu_session.sh).
#
#   nice -n 10 bash bench/link_check.sh ENV_DIR   # ~5.5 GB venv in ENV_DIR once, then a few minutes of nvcc
#
# A CPU build of torch cannot build CUDA code, and a venv with --system-site-packages would still
# import it, so a fresh venv (ENV_DIR/venv, outside the repository) gets torch 2.14.1, a CUDA build.
# The build runs in a copy of the tracked tree (ENV_DIR/src) so the checkout's own CPU-built
# gitfast/_C*.so is never replaced. Needs the CUDA toolkit: CUDA_HOME, else the one whose nvcc is on
# PATH. Env: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
env_dir=${1:?usage: bash bench/link_check.sh ENV_DIR (a folder outside the repository for the CUDA venv and build)}
mkdir -p "$env_dir"
env_dir=$(cd "$env_dir" && pwd)
venv=$env_dir/venv
py=$venv/bin/python
if [ -z "${CUDA_HOME:-}" ]; then
    nvcc=$(command -v nvcc) || { echo "no CUDA toolkit: set CUDA_HOME or put its bin/ (nvcc) on PATH" >&2; exit 2; }
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export GITFAST_REQUIRE_CUDA=1   # a missing toolkit is an error here, not a CPU-only build

if [ ! -x "$py" ] || ! "$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "== venv $venv (torch 2.14.1, a CUDA build)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.14.1 numpy pytest packaging ninja setuptools wheel
fi
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== copy of the tracked tree -> $env_dir/src"
mkdir -p "$env_dir/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | grep -zv '^shared/' \
    | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$env_dir/src"
cd "$env_dir/src"
rm -f gitfast/_C*.so

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
PATH=$venv/bin:$CUDA_HOME/bin:$PATH "$py" setup.py -q build_ext --inplace > "$env_dir/build.log" 2>&1 \
    || { tail -60 "$env_dir/build.log"; echo "LINK CHECK: build FAILED"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

echo "== load and registration"
PYTHONPATH=$env_dir/src "$py" - <<'PY'
import torch
import gitfast._C as C
from gitfast import ops

assert C.with_cuda == 1, f"built without CUDA: {getattr(C, 'cuda_build_note', '?')}"
has = torch._C._dispatch_has_kernel_for_dispatch_key
names = sorted({n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                if n.startswith("gitfast::")})
missing = {key: [n for n in names if not has(f"gitfast::{n}", key)] for key in ("CPU", "CUDA")}
cuda_ops = [n for n in names if has(f"gitfast::{n}", "CUDA")]
print("ops:", ", ".join(names))
print("CUDA kernels:", ", ".join(cuda_ops))
print("no CPU kernel:", missing["CPU"] or "-", "| no CUDA kernel:", missing["CUDA"] or "-")
# the fused ops must have CUDA kernels; the CPU attention ops are CPU-only by design (Triton on CUDA)
fused = {"layer_norm", "add_layer_norm", "bias_act", "mlp"}
assert fused <= set(cuda_ops), f"fused ops without a CUDA kernel: {sorted(fused - set(cuda_ops))}"
assert ops.extension_loaded()
PY

echo "== tests/test_ops.py on CPU tensors"
cd "$env_dir/src/tests"
PYTHONPATH=$env_dir/src "$py" -m pytest -q -p no:cacheprovider test_ops.py 2>&1 | tail -5
echo "LINK CHECK: ok"
