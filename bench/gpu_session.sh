#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU and no network needed:
#   bash bench/gpu_session.sh [all|test|kernels|e2e] [--wheels DIR] [--out DIR]
#     all      install -> build -> CUDA extension -> gitfast info -> pytest -m cuda -> host-sync check
#              -> fidelity -> end to end -> kernel benchmarks
#     test     install -> build -> CUDA extension -> gitfast info -> pytest -m cuda
#     kernels  the kernel benchmarks;  e2e  the end-to-end and pipeline benchmarks
# --wheels DIR: wheels to install first with pip --no-index (made by bench/fetch_wheels.sh on a
# machine with network, then copied here; default .whl when it exists). --out DIR: where results go
# (default $OUT, else ./gpu-results).
#
# Each stage runs under `timeout` with its own time box, a guard against a hung stage rather than a
# budget (GITFAST_BOX_<stage>=SECONDS overrides one); GITFAST_SESSION_S=SECONDS caps the whole run
# when set: a stage that would start past it is reported skipped. A stage that fails or overruns is
# reported and the next one runs.
# Results reach the out folder as each row ends, so a run cut short still leaves what it had:
#   session.log  everything printed      build.log  the extension's build   tests.log  pytest -m cuda
#   junit.xml    pytest's per-test report    rows.jsonl  every JSON row (stages, sync, fidelity, benchmarks)
#   summary.txt  the pass/fail table, also printed last      bench-<suite>.json  the runner's results
# fp16 by default (GITFAST_DTYPE). GITFAST_DRY_RUN=1 runs each stage's CPU equivalent and skips the
# GPU asserts: the plumbing (out files, time boxes, table) proven on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=all
wheels=
while (( $# )); do
    case $1 in
        all|test|kernels|e2e) mode=$1 ;;
        --wheels) wheels=${2:?--wheels needs a folder}; shift ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        *) echo "usage: bash bench/gpu_session.sh [all|test|kernels|e2e] [--wheels DIR] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
[ -z "$wheels" ] && [ -d .whl ] && wheels=.whl
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
dry=${GITFAST_DRY_RUN:-0}
dtype=${GITFAST_DTYPE:-float16}
session_s=${GITFAST_SESSION_S:-}  # empty: no cap on the whole run
rows=$OUT/rows.jsonl
summary=$OUT/summary.txt
t0=$(date +%s)
if [ "$dry" = 1 ]; then dev=cpu; bench_dtype=float32; quick=--quick; else dev=cuda; bench_dtype=$dtype; quick=; fi
exec > >(tee -a "$OUT/session.log") 2>&1
: > "$summary"

note_row() {  # note_row STAGE STATUS SECONDS DETAIL: one JSON row and one table line
    "$py" -c 'import json,sys; print(json.dumps({"stage": sys.argv[1], "status": sys.argv[2], "seconds": int(sys.argv[3]), "detail": sys.argv[4]}))' \
        "$1" "$2" "$3" "$4" >> "$rows"
    printf '%-12s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" >> "$summary"
}

stage() {  # stage NAME SECONDS COMMAND...: run under its time box, never past GITFAST_SESSION_S when set
    local name=$1 box=$2; shift 2
    local override="GITFAST_BOX_${name}"
    box=${!override:-$box}  # e.g. GITFAST_BOX_e2e=120
    if [ -n "$session_s" ]; then
        local left=$(( session_s - ($(date +%s) - t0) - 5 ))
        if (( left < 10 )); then
            echo "== $name: skipped, the run's GITFAST_SESSION_S=${session_s} s are spent"
            note_row "$name" skipped 0 "no time left"
            return 0
        fi
        (( box > left )) && box=$left
    fi
    echo "== $name (time box ${box} s)"
    local start=$(date +%s) rc=0
    timeout -k 5 "$box" bash -c '"$@"' stage "$@" || rc=$?  # functions are exported (below)
    local took=$(( $(date +%s) - start )) status=pass
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=fail; fi
    echo "== $name: $status (rc $rc, ${took} s)"
    note_row "$name" "$status" "$took" "rc $rc"
    return 0
}

# -- stages ---------------------------------------------------------------------------------------
install() {  # the copied transformers wheel: 5.0-5.17 generate wrong GIT tokens with a KV cache; floor 5.24
    local wheel
    wheel=$(ls -v "${wheels:-.whl}"/transformers-*.whl 2>/dev/null | tail -1)  # the newest copied
    if [ -n "$wheel" ]; then
        if [ "$dry" = 1 ]; then
            "$py" -m pip install --dry-run --no-deps --no-index "$wheel" || return 1
        else
            "$py" -m pip install -q --no-deps --no-index "$wheel" || return 1
        fi
    else
        echo "no transformers wheel in ${wheels:-.whl}" \
             "(bash bench/fetch_wheels.sh DIR where there is network, then copy DIR here)"
    fi
    "$py" -c "import transformers; print('transformers', transformers.__version__)
from gitfast.checkpoint.compat import check_transformers; check_transformers()"
}

cuda_arch() {  # the device's own architecture only: 9.0 on an H100/H200
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
    [ -z "$cap" ] && cap=$("$py" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}.{c[1]}' if c else '')" 2>/dev/null)
    echo "${cap:-9.0}"
}

build() {
    export TORCH_CUDA_ARCH_LIST=$(cuda_arch) MAX_JOBS=${MAX_JOBS:-$(nproc)}
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    if [ "$dry" = 1 ]; then  # the checkout's CPU build stays; show what the GPU machine runs
        echo "would run: GITFAST_REQUIRE_CUDA=1 pip install --no-deps --no-build-isolation --no-index -e ."
        "$py" -c "import torch, gitfast._C" > "$OUT/build.log" 2>&1
        return
    fi
    # no network and no Ray there: no build isolation, no dependencies, no .[dev]
    GITFAST_REQUIRE_CUDA=1 "$py" -m pip install --no-deps --no-build-isolation --no-index -e . \
        > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
    tail -3 "$OUT/build.log"
}

cuda_extension() {
    "$py" -c "
import torch, gitfast._C as C
print('with_cuda', C.with_cuda, '-', C.cuda_build_note)
assert C.with_cuda or $dry, 'gitfast._C was built without CUDA kernels'"
}

cuda_tests() {
    local per_test=()
    "$py" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
    local select=(-m cuda tests/)
    # the dry run: the cuda tests collect and skip; their CPU twin runs
    [ "$dry" = 1 ] && select=(tests/test_cuda_engine.py tests/test_cuda_ops.py tests/test_cuda_captioner.py)
    "$py" -m pytest -q -p no:cacheprovider "${per_test[@]}" --junitxml="$OUT/junit.xml" "${select[@]}" \
        > "$OUT/tests.log" 2>&1
    local rc=$?
    tail -15 "$OUT/tests.log"
    return $rc
}

bench_suites() {  # bench_suites SUITES... (rows appended to rows.jsonl as each ends)
    local skip=()  # e.g. GITFAST_SKIP_PROVIDERS="flex torch.compile": their cold compiles take minutes
    [ -n "${GITFAST_SKIP_PROVIDERS:-}" ] && skip=(--skip-provider $GITFAST_SKIP_PROVIDERS)
    "$py" -m gitfast.bench.runner --device "$dev" --dtype "$bench_dtype" $quick --only "$@" \
        "${skip[@]}" --out "$OUT/bench-$1.json" --jsonl "$rows" 2>&1 | tail -25
}

export py dry dtype dev bench_dtype quick rows OUT wheels
export -f install cuda_arch build cuda_extension cuda_tests bench_suites

table() {
    echo
    echo "== JSON rows ($rows; benchmark rows shortened here, whole in the file)"
    "$py" - "$rows" <<'PY'
import json, sys
keep = ("benchmark", "label", "provider", "dtype", "status", "median_ms", "images_per_s", "pct_of_peak", "reason")
for line in open(sys.argv[1]):
    row = json.loads(line)
    if "benchmark" in row:
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in keep and v is not None}
    print(json.dumps(row))
PY
    echo
    echo "== gpu_session $mode$([ "$dry" = 1 ] && echo ' (DRY RUN: CPU equivalents)'): $(( $(date +%s) - t0 )) s"
    printf '%-12s %-8s %6s  %s\n' stage status time detail
    cat "$summary"
}

case $mode in
    all)
        stage install 120 install
        stage build 1800 build
        stage cuda_ext 60 cuda_extension
        stage info 60 "$py" -c "from gitfast.tools.cli import main; main(['info'])"
        stage cuda_tests 1800 cuda_tests
        stage sync 300 "$py" -m gitfast.bench.sync_check --device "$dev" --out "$rows"
        stage fidelity 600 "$py" -m gitfast.bench.fidelity_check --device "$dev" --out "$rows" \
            $([ "$dry" = 1 ] && echo "--images 4 --new-tokens 8")
        export GITFAST_BENCH_E2E=${GITFAST_BENCH_E2E:-git-base:32,git-base:256}
        stage e2e 1800 bench_suites e2e
        stage kernels 3600 bench_suites attention paged_decode kv_write ops
        table
        ;;
    test)
        stage install 120 install
        stage build 1800 build
        stage cuda_ext 60 cuda_extension
        stage info 60 "$py" -c "from gitfast.tools.cli import main; main(['info'])"
        stage cuda_tests 1800 cuda_tests
        table
        ;;
    kernels)
        stage kernels 3600 bench_suites attention paged_decode kv_write ops
        table
        ;;
    e2e)
        stage e2e 3600 bench_suites e2e pipeline
        table
        ;;
esac
