#!/usr/bin/env bash
# Issue #25's measurements on the CPU this runs on, in one go, for a session on a CPU kind not yet
# measured (Intel with AMX, AMD Zen 4/5 with AVX-512 and VNNI):
#   bash bench/cpu_session.sh [all|quick] [--out DIR]
#     all    facts -> the C++ kernels' tests (every ISA path this CPU has) -> INT8 GEMM backends ->
#            generate at batch 8 and 1 (fp32, bf16, INT8) -> agreement with fp32 -> start-up ->
#            the whole job over 256 JPEGs in fp32, INT8 and bf16 (about 60-90 minutes on 2 cores)
#     quick  the same stages on small inputs: the plumbing, in about 10 minutes
# Results reach --out (default ./cpu-results) as each stage ends: session.log (everything printed),
# summary.txt (a line per stage: status and seconds), facts.txt, one <stage>.log each, int8.md.
# Each stage runs under `timeout` (GITFAST_BOX_<stage>=SECONDS overrides its box); a stage that fails or
# overruns is reported and the next one runs. Put the tables in bench/RESULTS.md under a heading that
# names the CPU (facts.txt has lscpu's model and flags), the date and the load.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=all
while (( $# )); do
    case $1 in
        all|quick) mode=$1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        *) echo "usage: bash bench/cpu_session.sh [all|quick] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-$PWD/cpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
export py=${PYTHON:-python3}
exec > >(tee -a "$OUT/session.log") 2>&1
: > "$OUT/summary.txt"

stage() {  # stage NAME SECONDS COMMAND...: its output in NAME.log, a line in summary.txt
    local name=$1 box=$2; shift 2
    local override="GITFAST_BOX_${name//-/_}"
    box=${!override:-$box}
    echo "== $name (box ${box}s): $*"
    local start=$SECONDS rc
    timeout "$box" "$@" > >(tee "$OUT/$name.log") 2>&1
    rc=$?
    local status=ok
    (( rc == 124 )) && status=timeout
    (( rc != 0 && rc != 124 )) && status="failed($rc)"
    printf '%-14s %-12s %5ss\n' "$name" "$status" "$((SECONDS - start))" | tee -a "$OUT/summary.txt"
}

facts() {
    date -u +%FT%TZ
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|L2|L3)'
    echo "flags: $(grep -m1 -oE '\b(avx2|fma|avx512[a-z_0-9]*|avx_vnni|amx[a-z_0-9]*)\b' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    uptime
    "$py" -c 'import torch, transformers, platform; print("torch", torch.__version__, "transformers", transformers.__version__, "python", platform.python_version(), "threads", torch.get_num_threads())'
    "$py" -m gitfast.tools.cli info
    "$py" -c 'import torch, gitfast.ops as o; o.extension_loaded(); g = torch.ops.gitfast; print("kernel ISAs: attention", g.cpu_isa(), "int8", g.int8_isa(), "int8 u7", g.int8_u7_isa(), "int8 vnni", g.int8_vnni_isa(), "linear_fp32", g.linear_fp32_isa(), "logits", g.logits_isa())'
}

if [ "$mode" = quick ]; then
    images=8; rounds=1; gen_rounds=1; agree=8; hf="--hf-batches 4 --sweep-images 8"
else
    images=256; rounds=2; gen_rounds=3; agree=32; hf=
fi
export -f facts
stage facts 300 bash -c facts  # a function: through bash for timeout
cp "$OUT/facts.log" "$OUT/facts.txt"
stage kernel-tests 1800 "$py" -m pytest -q -p no:cacheprovider tests/test_cpu_attention.py tests/test_int8_gemm.py \
    tests/test_int8_gemm_u7_packed.py tests/test_int8_gemm_vnni.py tests/test_linear_fp32.py tests/test_logits_kernel.py \
    tests/test_ops.py tests/test_quantization.py
stage int8-gemm 900 "$py" -m gitfast.tools.cli bench --only int8 --device cpu --out "$OUT/int8.json" \
    --markdown "$OUT/int8.md" $([ "$mode" = quick ] && echo --quick)
stage generate 3600 "$py" -m gitfast.bench.bench_cpu --sizes git-base --batches 8 1 --precisions fp32 bf16 int8 \
    --rounds "$gen_rounds"
stage agreement 3600 "$py" -m gitfast.bench.bench_cpu --sizes git-base --precisions bf16 int8 --agreement "$agree"
stage startup 900 "$py" bench/startup.py --rounds 3
for dtype in float32 int8 bfloat16; do
    # bf16 last: transformers' bf16 loop is slow where the CPU has no bf16 arithmetic (12x on AMD Zen 3)
    stage "whole-$dtype" 5400 "$py" -m gitfast.bench.whole_job --images "$images" --dtype "$dtype" \
        --rounds "$rounds" $hf
done
echo "== summary"; cat "$OUT/summary.txt"
