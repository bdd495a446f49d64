#!/usr/bin/env bash
# Everything a GPU machine should check, in few calls (each well under 10 minutes):
#   bash bench/gpu_session.sh test     build gitfast._C with its CUDA kernels, `gitfast info`, the cuda tests
#   bash bench/gpu_session.sh kernels  attention, paged decode, KV write and fused-op benchmarks (fp16, bf16)
#   bash bench/gpu_session.sh e2e      end-to-end captioning vs transformers, and the JPEG->Parquet pipeline
# Results go to $OUT (default ./gpu-results): logs, results-*.json/.md and plots-*.tar (one file per
# stage, so few files come back). The last thing each stage prints is a short table. Nothing is downloaded.
set -uo pipefail
stage=${1:-test}
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3

build() {
    if ! $py -c "import torch, gitfast._C" 2>/dev/null; then  # the extension needs libtorch loaded first
        $py -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
            || { tail -40 "$OUT/build.log"; exit 1; }
    fi
    $py -c "from gitfast.cli import main; main(['info'])" | tee "$OUT/info.txt"
}

bench() {  # bench NAME SUITES...
    local name=$1; shift
    $py -m gitfast.bench.runner --device cuda --dtype float16 bfloat16 --only "$@" \
        --out "$OUT/results-$name.json" --markdown "$OUT/results-$name.md" --plots "$OUT/plots-$name" \
        2> "$OUT/bench-$name.log"
    tar -cf "$OUT/plots-$name.tar" -C "$OUT" "plots-$name" && rm -rf "$OUT/plots-$name"
}

case $stage in
    test)
        build
        $py -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1 | tee "$OUT/cuda-tests.log" | tail -25
        ;;
    kernels)
        build > /dev/null
        bench kernels attention paged_decode kv_write ops
        ;;
    e2e)
        build > /dev/null
        bench e2e e2e pipeline
        ;;
    *)
        echo "usage: bash bench/gpu_session.sh test|kernels|e2e" >&2
        exit 2
        ;;
esac
