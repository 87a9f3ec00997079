#!/bin/bash
# One device call that checks the GPU paths and measures what the CPU cannot: every file lands under
# $OUT (the device tool's output folder), each step under its own time limit, so a cut-off call keeps
# what finished. Usage on the device: bash benchmarks/device_session.sh  (about 9 minutes)
set -u
OUT=${OUT:-benchmarks/results/device_session}
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.txt with its exit status
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "rc=$?" >> "$OUT/$name.txt"
}
step tests_gpu 240 python -m pytest -q -p no:cacheprovider -p no:logging tests/test_cuda_graphs.py \
    tests/test_sparse_kernels.py tests/test_triton_kernels.py
step e2e_gemma 300 python -m fbcompile bench --workloads benchmarks.e2e:workloads --model gemma \
    --contexts 8k,32k --batches 1 --variants compile,exact-ro,block-ro --repeats 3 --out "$OUT/e2e_gemma"
tail -n 3 "$OUT"/*.txt
