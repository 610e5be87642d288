#!/usr/bin/env bash
# The checks that need a GPU, in one time-boxed run (budget ~540 s, under a 10-minute device limit):
#   bash experiments/gpu_checks.sh [OUT_DIR]            # on a GPU machine; OUT_DIR default: $OUT, else /tmp/gpu_checks
#   bash experiments/gpu_checks.sh --dry-run [OUT_DIR]  # CPU dry run (or GPU_CHECKS_DRY_RUN=1): the Python steps at
#                                                       # tiny sizes with --interpret, GPU-only steps skipped, < 60 s
# Steps, in order of value (each under its own `timeout`; one that would start with less than its minimum time left
# in the budget is skipped; a failing one does not stop the next):
#   env          nvidia-smi, versions, whether the CUPTI profiler (jax.experimental.mosaic.gpu.profiler) can load
#   bench_bf16   experiments/bench_pallas_ffn.py at 7B / 13B, 88%, batch 1, bf16: copy ceiling, dense GEMV bandwidth,
#                S2 / S3 dense and Pallas over 8 rotated layers: CUPTI device time, in-graph slope time (K = 16 vs 32),
#                dispatch latency; speedups with and without the gate beside ProSparse's published ratios; for
#                pallas_triton and pallas_compact where that backend exists (GPU_CHECKS_IMPLS overrides the list)
#   tests_triton the Triton kernel tests compiled (not interpreted), 7B / 13B / MiniCPM shapes included (GPU only);
#                with tests/kernels/test_pallas_compact.py where it exists
#   bench_nocmdbuf  bench_bf16's in-graph slope at 7B with XLA command buffers off (what CUDA graphs buy)
#   tune         block_f / block_d / num_warps sweep of S2 and S3 at 7B (CUPTI) (GPU only)
#   bench_fp32   the benchmark in float32
#   tests_backends  the Triton backend behind sparse_ffn and in generate, cuDNN attention (GPU only)
# Files under OUT_DIR (at most 8): run.log (every step's output), tests.log, bench_bf16.json, bench_nocmdbuf.json,
# bench_fp32.json, tune.json, results.json (the steps' status, rewritten after each step), summary.txt (printed last).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${GPU_CHECKS_DRY_RUN:-0}
OUT_ARG=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -*) echo "gpu_checks.sh: unknown option $arg (use --dry-run and/or an output folder)" >&2; exit 2 ;;
        *) OUT_ARG=$arg ;;
    esac
done
OUT=${OUT_ARG:-${OUT:-/tmp/gpu_checks}}
mkdir -p "$OUT"
rm -f "$OUT"/run.log "$OUT"/tests.log "$OUT"/results.json "$OUT"/summary.txt "$OUT"/bench_*.json "$OUT"/tune.json
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
if [ "$DRY" = 1 ]; then BUDGET_S=${GPU_CHECKS_BUDGET_S:-55}; else BUDGET_S=${GPU_CHECKS_BUDGET_S:-540}; fi
START=$SECONDS
STEPS_JSON=""

say() { echo "$*" | tee -a "$OUT/run.log"; }

record() {  # record NAME STATUS RC SECONDS: add the step to results.json (rewritten whole: valid after every step)
    STEPS_JSON+="${STEPS_JSON:+,}{\"name\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"seconds\": $4}"
    printf '{"dry_run": %s, "budget_s": %s, "elapsed_s": %s, "steps": [%s]}\n' \
        "$([ "$DRY" = 1 ] && echo true || echo false)" "$BUDGET_S" "$((SECONDS - START))" "$STEPS_JSON" \
        > "$OUT/results.json"
}

step() {  # step NAME LIMIT_S MIN_S LOG CMD...: run CMD under timeout min(LIMIT_S, time left), append to OUT/LOG
    local name=$1 limit=$2 min=$3 log=$4; shift 4
    local left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt "$min" ]; then
        say "== $name: skipped (budget: ${left} s left, needs ${min} s)"
        record "$name" skipped 0 0
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    say "== $name (timeout ${limit} s): $*"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT/$log" | tail -n 40
    local rc=${PIPESTATUS[0]} status=ok
    [ "$rc" -ne 0 ] && status=failed
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status=timeout
    say "== $name: $status (exit $rc) in $((SECONDS - t0)) s"
    record "$name" "$status" "$rc" "$((SECONDS - t0))"
}

gpu_only() {  # gpu_only NAME: a step the dry run skips
    say "== $1: skipped (dry run: needs a GPU)"
    record "$1" skipped 0 0
}

ENV_PY='import jax, jaxlib, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())
for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "torch", "transformers", "google.protobuf"):
    try:
        m = __import__(name, fromlist=["_"])
        print(name, getattr(m, "__version__", "present"))
    except Exception as e:
        print(name, "missing:", type(e).__name__)
sys.path.insert(0, ".")
from experiments.bench_pallas_ffn import cupti_unavailable
why = cupti_unavailable()
print("cupti profiler:", "available" if not why else "unavailable: " + why)'

env_step() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    $PY -c "$ENV_PY"
}

BENCH=experiments/bench_pallas_ffn.py
# the Pallas backends to compare (each against the same dense timings): the compacting kernels too where present
if [ -n "${GPU_CHECKS_IMPLS:-}" ]; then IMPLS=$GPU_CHECKS_IMPLS
elif [ -f pallas_kernels/sparse_ffn_compact.py ]; then IMPLS=pallas_triton,pallas_compact
else IMPLS=pallas_triton
fi
TRITON_TESTS=(tests/kernels/test_pallas_triton.py)
[ -f tests/kernels/test_pallas_compact.py ] && TRITON_TESTS+=(tests/kernels/test_pallas_compact.py)
say "gpu_checks: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), OUT=$OUT, budget ${BUDGET_S} s" \
    "$([ "$DRY" = 1 ] && echo '(DRY RUN)')"
export -f env_step; export PY ENV_PY
step env 30 5 run.log bash -c env_step
if [ "$DRY" = 1 ]; then
    TINY=(--interpret --shapes=64x96 --reps=1)  # every backend in bench_bf16; the other runs check the first only
    step bench_bf16 30 10 run.log $PY $BENCH "${TINY[@]}" --implementation="$IMPLS" --out="$OUT/bench_bf16.json"
    gpu_only tests_triton
    step bench_nocmdbuf 20 8 run.log env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
        $PY $BENCH "${TINY[@]}" --implementation="${IMPLS%%,*}" --timing=slope --out="$OUT/bench_nocmdbuf.json"
    gpu_only tune
    step bench_fp32 20 8 run.log $PY $BENCH "${TINY[@]}" --implementation="${IMPLS%%,*}" --dtype=float32 \
        --timing=slope --out="$OUT/bench_fp32.json"
    gpu_only tests_backends
else
    step bench_bf16 200 60 run.log $PY $BENCH --dtype=bfloat16 --implementation="$IMPLS" \
        --out="$OUT/bench_bf16.json"
    step tests_triton 150 60 tests.log $PY -m pytest -q -p no:cacheprovider --maxfail=20 -rf "${TRITON_TESTS[@]}"
    step bench_nocmdbuf 60 30 run.log env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
        $PY $BENCH --shapes=4096x11008 --timing=slope,dispatch --implementation="$IMPLS" \
        --out="$OUT/bench_nocmdbuf.json"
    step tune 90 45 run.log $PY $BENCH --tune --shapes=4096x11008 --reps=5 --out="$OUT/tune.json"
    step bench_fp32 70 40 run.log $PY $BENCH --dtype=float32 --implementation="$IMPLS" --out="$OUT/bench_fp32.json"
    step tests_backends 120 45 tests.log $PY -m pytest -q -p no:cacheprovider -rf \
        tests/inference/test_sparse_ffn.py tests/inference/test_generate.py tests/model/test_attention.py \
        -k "pallas_triton or pallas_compact or cudnn or (backend_equals_reference and xla and not splash)"
fi

say "== summary ($((SECONDS - START)) s of ${BUDGET_S} s)"
$PY - "$OUT" 2>&1 <<'PYEOF' | tee -a "$OUT/run.log"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
lines = []
res = load("results.json") or {"steps": []}
lines.append("steps: " + ", ".join(f"{s['name']} {s['status']}" + (f" ({s['seconds']} s)" if s["seconds"] else "")
                                   for s in res["steps"]))
for name in ("bench_bf16.json", "bench_nocmdbuf.json", "bench_fp32.json"):
    b = load(name)
    if not b:
        lines.append(f"{name}: none")
        continue
    lines.append(f"{name}: {b['device']}, jax {b['jax']}, {b['implementation']}, {b['dtype']}, {b['layers']} layers"
                 + "".join(f"; {m} skipped: {why}" for m, why in b.get("skipped", {}).items()))
    c = b.get("copy_ceiling")
    if c:
        lines.append(f"  ceiling: copy {c['gb_s']:.0f} GB/s ({c['method']})")
    for r in b["rows"]:
        ops = r["ops"]
        lines.append(f"  {r['shape']} {r.get('implementation', '')} sparsity {r['sparsity']:.3f}; "
                     f"dense gate GEMV {ops['gate']['gb_s']:.0f} GB/s, "
                     f"S3 dense {ops['s3_dense']['gb_s']:.0f} GB/s")
        lines.append("    " + " | ".join(f"{k} {ops[k]['us']:.1f}" for k in ops) + " us (" +
                     ",".join(sorted({o["method"] for o in ops.values()})) + ")")
        sp, pro = r["speedup"], r.get("prosparse", {})
        lines.append("    speedup " + " | ".join(
            f"{k} {v['x']:.2f}x ({v['method']})" + (f" vs ProSparse {pro[k]:.2f}x" if k in pro else "")
            for k, v in sp.items()) + (f"  [ProSparse: {pro['label']}]" if pro else "")
            + f"; rel err S2 {r['s2_rel_err']:.1e} S3 {r['s3_rel_err']:.1e}")
t = load("tune.json")
if t:
    for op in ("s2", "s3"):
        best = sorted((r for r in t["rows"] if r["op"] == op and r["us"] == r["us"]), key=lambda r: r["us"])[:1]
        for r in best:
            lines.append(f"tune best {op} {r['shape']}: block_f={r['block_f']} block_d={r['block_d']} "
                         f"num_warps={r['num_warps']} {r['us']:.2f} us ({r['method']})")
text = "\n".join(lines)
with open(os.path.join(out, "summary.txt"), "w") as f:
    f.write(text + "\n")
print(text)
PYEOF
