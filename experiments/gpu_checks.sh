#!/usr/bin/env bash
# The checks that need a GPU, in one short run (~4 min on an H100/H200 once JAX is installed):
#   bash experiments/gpu_checks.sh [OUT_DIR]
# 1. the Pallas Triton kernels compiled (not interpreted) against their references:
#    tests/kernels/test_pallas_triton.py (every case of the CPU suite, plus the 7B / 13B / MiniCPM-1B shapes), the
#    kernels behind sparse_ffn and in generate (tests -k pallas), and cuDNN attention against the float32 reference
#    (tests/model/test_attention.py);
# 2. experiments/bench_pallas_ffn.py: S2 / S3 vs the dense GEMVs at 7B / 13B, 88%, batch 1, bf16 and fp32, and
#    bf16 again timed inside one jitted loop (--timing=loop: device time without the host dispatch).
# Each step runs on its own (a failing one does not stop the next); logs and the benchmark JSON go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_checks}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}

step() {  # step NAME TIMEOUT_S CMD...: run CMD, tee its output to OUT/NAME.log, print its exit status and time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
    echo "== $name: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
}

nvidia-smi -L
$PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
step bench_bf16 90 $PY experiments/bench_pallas_ffn.py --dtype=bfloat16 --out="$OUT/bench_bf16.json"
step bench_fp32 60 $PY experiments/bench_pallas_ffn.py --dtype=float32 --out="$OUT/bench_fp32.json"
step bench_loop 90 $PY experiments/bench_pallas_ffn.py --timing=loop --out="$OUT/bench_loop.json"
step test_triton 150 $PY -m pytest -q -p no:cacheprovider --maxfail=20 -rf tests/kernels/test_pallas_triton.py
step test_backends 120 $PY -m pytest -q -p no:cacheprovider -rf tests/inference/test_sparse_ffn.py \
    tests/inference/test_generate.py tests/model/test_attention.py \
    -k "pallas_triton or cudnn or (backend_equals_reference and xla and not splash)"
