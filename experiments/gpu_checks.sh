#!/usr/bin/env bash
# The checks that need a GPU, in one time-boxed run (budget ~540 s, under a 10-minute device limit):
#   bash experiments/gpu_checks.sh [OUT_DIR]            # on a GPU machine; OUT_DIR default: $OUT, else /tmp/gpu_checks
#   bash experiments/gpu_checks.sh --dry-run [OUT_DIR]  # CPU dry run (or GPU_CHECKS_DRY_RUN=1): the Python steps at
#                                                       # tiny sizes with --interpret, GPU-only steps skipped, < 90 s
# Steps, in order of value (each under its own `timeout`; one that would start with less than its minimum time left
# in the budget is skipped; a failing one does not stop the next):
#   env          nvidia-smi, versions, whether the CUPTI profiler (jax.experimental.mosaic.gpu.profiler) can load
#   bench_bf16   experiments/bench_pallas_ffn.py at 7B / 13B, 88%, batch 1, bf16: copy ceiling, dense GEMV bandwidth,
#                S2 / S3 dense and Pallas over 8 rotated layers: CUPTI device time, in-graph slope time (K = 16 vs 32),
#                dispatch latency; speedups with and without the gate beside ProSparse's published ratios; for
#                pallas_triton and pallas_compact where that backend exists (GPU_CHECKS_IMPLS overrides the list)
#   tests_triton the Triton kernel tests compiled (not interpreted), 7B / 13B / MiniCPM shapes included (GPU only);
#                with tests/kernels/test_pallas_compact.py where it exists
#   decode       experiments/bench_decode.py end to end: random FATReLU model 4096x11008, 4 layers, 88%, prompt 16,
#                64 new tokens, batch 1 and 4, reps 3, bf16 weights cast once: dense vs the Pallas backends, and HF
#                transformers' LlamaForCausalLM (ReLU) eager generate on CUDA; token agreement reported, not fatal
#                (GPU_CHECKS_TORCH_COMPILE=1: also static cache + torch.compile)
#   deps         import check of the data stack; where something is missing and .whl/ exists (experiments/
#                gpu_wheels.sh, carried to the device), its wheels installed into /tmp/site, put on PYTHONPATH
#   train        python -m prosparse_jax.main.train, config tiny, 70 steps (eval every 30, checkpoints at 60 and 70),
#                then the step-70 checkpoint removed and the same command rerun: it resumes from step 60 (a run
#                resumes only its own config, so the resume re-runs 61..70); first / last loss, tokens/s, no NaN
#   bench_nocmdbuf  bench_bf16's in-graph slope at 7B with XLA command buffers off (what CUDA graphs buy)
#   tune         block_f / block_d / num_warps sweep of S2 and S3 at 7B (CUPTI) (GPU only)
#   bench_fp32   the benchmark in float32
#   tests_backends  the Triton backend behind sparse_ffn and in generate, cuDNN attention (GPU only)
# Files under OUT_DIR (at most 8): run.log (every step's output), tests.log, bench_bf16.json, bench_more.json
# (bench_nocmdbuf, tune and bench_fp32's JSON by step name, rewritten after each), decode.json, train_metrics.jsonl
# (the train step's metrics.jsonl), results.json (the steps' status, rewritten after each step), summary.txt (last).
# Scratch (outputs merged into OUT, the training workdir, the XLA cache): a fresh folder under ${TMPDIR:-/tmp}.
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
rm -f "$OUT"/run.log "$OUT"/tests.log "$OUT"/results.json "$OUT"/summary.txt "$OUT"/bench_*.json "$OUT"/tune.json \
    "$OUT"/decode.json "$OUT"/train_metrics.jsonl
SCR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
trap 'rm -rf "$SCR"' EXIT
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
if [ "$DRY" = 1 ]; then BUDGET_S=${GPU_CHECKS_BUDGET_S:-110}; else BUDGET_S=${GPU_CHECKS_BUDGET_S:-540}; fi
START=$SECONDS
STEPS_JSON=""

say() { echo "$*" | tee -a "$OUT/run.log"; }

record() {  # record NAME STATUS RC SECONDS: add the step to results.json (rewritten whole: valid after every step)
    STEPS_JSON+="${STEPS_JSON:+,}{\"name\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"seconds\": $4}"
    printf '{"dry_run": %s, "budget_s": %s, "elapsed_s": %s, "steps": [%s]}\n' \
        "$([ "$DRY" = 1 ] && echo true || echo false)" "$BUDGET_S" "$((SECONDS - START))" "$STEPS_JSON" \
        > "$OUT/results.json"
    case $1 in bench_nocmdbuf|tune|bench_fp32) merge_more ;; esac
}

MORE=(bench_nocmdbuf tune bench_fp32)  # their JSON goes to SCR, then into OUT/bench_more.json by step name
merge_more() {
    $PY - "$SCR" "$OUT/bench_more.json" "${MORE[@]}" <<'PYEOF'
import json, os, sys
scr, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
more = {}
for name in names:
    try:
        with open(os.path.join(scr, name + ".json")) as f:
            more[name] = json.load(f)
    except (OSError, ValueError):
        pass
with open(dest + ".tmp", "w") as f:
    json.dump(more, f, indent=1)
os.replace(dest + ".tmp", dest)
PYEOF
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

DEPS_MODULES="ml_collections tensorflow_datasets array_record grain tokenizers orbax.checkpoint optax tensorboardX"
DEPS_PY='import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "present"))
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
print("data stack:", "all present" if not missing else "missing: " + "; ".join(missing))
sys.exit(1 if missing else 0)'
# exit 0 where google.protobuf is at least grain's floor (5.28.3)
PROTOBUF_OK_PY='import re, sys
import google.protobuf as p
sys.exit(tuple(int(x) for x in re.findall(r"\d+", p.__version__)[:3]) < (5, 28, 3))'
if [ "$DRY" = 1 ]; then SITE=$SCR/site; else SITE=${GPU_CHECKS_SITE:-/tmp/site}; fi

deps_step() {  # the data stack imports, else the carried wheels (.whl/, experiments/gpu_wheels.sh) into SITE
    $PY -c "$DEPS_PY" $DEPS_MODULES && return 0
    if ! ls .whl/*.whl > /dev/null 2>&1; then
        echo "deps: no .whl/*.whl to install from (experiments/gpu_wheels.sh, then the run with carry=[\".whl\"])"
        return 1
    fi
    echo "deps: installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .whl/*.whl || return 1
    if ls .whl/optional/protobuf-*.whl > /dev/null 2>&1 && ! $PY -c "$PROTOBUF_OK_PY" 2> /dev/null; then
        echo "deps: protobuf older than 5.28.3 (grain): installing the carried one"
        $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .whl/optional/protobuf-*.whl || return 1
    fi
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" $PY -c "$DEPS_PY" $DEPS_MODULES
}

TRAIN_PY='import json, math, statistics, sys
wd, dry = sys.argv[1], sys.argv[2] == "1"
entries = [json.loads(line) for line in open(wd + "/metrics.jsonl") if line.strip()]
train = [e for e in entries if e.get("kind") == "train"]
evals = [(e["step"], e["eval_loss"]) for e in entries if e.get("kind") == "eval"]
steps = [e["step"] for e in train]
losses = [e["loss"] for e in train]
tps = [e["tokens_per_sec"] for e in train[1:]] or [e["tokens_per_sec"] for e in train]
finite = all(math.isfinite(v) for v in losses + [v for _, v in evals])
print(f"train: steps {steps[0]}..{steps[-1]}, loss first {losses[0]:.4f} last {losses[-1]:.4f}, median tokens/s "
      f"{statistics.median(tps):.0f} (first entry, with compilation, left out), eval loss by step {evals}, "
      f"finite {finite}")
if not finite:
    sys.exit("train: a non-finite loss")
if not dry and losses[-1] >= losses[0]:
    sys.exit("train: the loss did not fall")'

train_step() {  # train_step STEPS CKPT_AT EVAL_EVERY [FLAG...]: train, drop the last checkpoint, rerun: resumes
    local steps=$1 at=$2 every=$3; shift 3
    local wd=$SCR/tiny
    local cmd=("$PY" -m prosparse_jax.main.train --config=configs/prosparse.py:tiny --workdir="$wd"
               --config.train.steps="$steps" --config.train.eval_every="$every" --config.train.checkpoint_every="$at"
               --config.train.progress_bar=False "$@")
    # JAX's persistent cache: the resumed run loads the first one's compiled programs
    export JAX_COMPILATION_CACHE_DIR=$SCR/xla JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
    echo "train: ${cmd[*]}"
    "${cmd[@]}" || return 1
    if [ ! -d "$wd/checkpoints/$steps" ] || [ ! -d "$wd/checkpoints/$at" ]; then
        echo "train: expected checkpoints $at and $steps in $wd/checkpoints, found: $(ls "$wd/checkpoints" | tr '\n' ' ')"
        return 1
    fi
    rm -rf "${wd:?}/checkpoints/$steps"  # as if the run had stopped after the checkpoint of step $at
    echo "train: checkpoint $steps removed; the same command again (resume)"
    "${cmd[@]}" > "$SCR/resume.log" 2>&1
    local rc=$?
    cat "$SCR/resume.log"
    [ "$rc" -eq 0 ] || return "$rc"
    grep -q "resuming $wd from step $at" "$SCR/resume.log" || { echo "train: the rerun did not resume from $at"; return 1; }
    echo "train: resumed from step $at"
    cp "$wd/metrics.jsonl" "$OUT/train_metrics.jsonl"
    $PY -c "$TRAIN_PY" "$wd" "$DRY"
}

BENCH=experiments/bench_pallas_ffn.py
DECODE=experiments/bench_decode.py
# the Pallas backends to compare (each against the same dense timings): the compacting kernels too where present
if [ -n "${GPU_CHECKS_IMPLS:-}" ]; then IMPLS=$GPU_CHECKS_IMPLS
elif [ -f pallas_kernels/sparse_ffn_compact.py ]; then IMPLS=pallas_triton,pallas_compact
else IMPLS=pallas_triton
fi
TRITON_TESTS=(tests/kernels/test_pallas_triton.py)
[ -f tests/kernels/test_pallas_compact.py ] && TRITON_TESTS+=(tests/kernels/test_pallas_compact.py)
say "gpu_checks: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), OUT=$OUT, budget ${BUDGET_S} s" \
    "$([ "$DRY" = 1 ] && echo '(DRY RUN)')"
export -f env_step deps_step train_step; export PY ENV_PY DEPS_PY DEPS_MODULES PROTOBUF_OK_PY TRAIN_PY SITE SCR OUT DRY
deps_then_path() {  # the deps step; the wheels it installed (SITE) on PYTHONPATH for the steps after it
    step deps 60 10 run.log bash -c deps_step
    if [ -d "$SITE" ]; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        say "== PYTHONPATH=$PYTHONPATH"
    fi
}
step env 30 5 run.log bash -c env_step
if [ "$DRY" = 1 ]; then
    TINY=(--interpret --shapes=64x96 --reps=1)  # every backend in bench_bf16; the other runs check the first only
    # decode and train at tiny sizes (decode: 2 layers of 128x352, 4 tokens, batch 2; train: 2 layers, 3 steps, resumed
    # from 3 to 4)
    step bench_bf16 30 10 run.log $PY $BENCH "${TINY[@]}" --implementation="$IMPLS" --out="$OUT/bench_bf16.json"
    gpu_only tests_triton
    step decode 45 15 run.log $PY $DECODE --d_model=128 --d_ff=352 --n_layers=2 --n_heads=4 --prompt_len=8 \
        --new_tokens=4 --batch=2 --reps=1 --dtype=bfloat16 --rank=0 --implementations="${IMPLS%%,*}" --torch \
        --out="$OUT/decode.json"
    deps_then_path
    step train 60 20 run.log bash -c 'train_step 4 3 2 --config.model.n_layers=2 --config.train.eval_batches=1 \
        --config.optim.warmup_steps=1 --config.train.log_every=1'
    step bench_nocmdbuf 20 8 run.log env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
        $PY $BENCH "${TINY[@]}" --implementation="${IMPLS%%,*}" --timing=slope --out="$SCR/bench_nocmdbuf.json"
    gpu_only tune
    step bench_fp32 20 8 run.log $PY $BENCH "${TINY[@]}" --implementation="${IMPLS%%,*}" --dtype=float32 \
        --timing=slope --out="$SCR/bench_fp32.json"
    gpu_only tests_backends
else
    step bench_bf16 200 60 run.log $PY $BENCH --dtype=bfloat16 --implementation="$IMPLS" \
        --out="$OUT/bench_bf16.json"
    step tests_triton 150 60 tests.log $PY -m pytest -q -p no:cacheprovider --maxfail=20 -rf "${TRITON_TESTS[@]}"
    TORCH_COMPILE=()
    [ "${GPU_CHECKS_TORCH_COMPILE:-0}" = 1 ] && TORCH_COMPILE=(--torch_compile)
    step decode 170 60 run.log $PY $DECODE --d_model=4096 --d_ff=11008 --n_layers=4 --n_heads=32 --sparsity=0.88 \
        --prompt_len=16 --new_tokens=64 --batch=1,4 --reps=3 --dtype=bfloat16 --rank=0 --implementations="$IMPLS" \
        --torch "${TORCH_COMPILE[@]}" --compilation_cache="$SCR/xla" --out="$OUT/decode.json"
    deps_then_path
    step train 120 50 run.log bash -c 'train_step 70 60 30'
    step bench_nocmdbuf 60 30 run.log env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
        $PY $BENCH --shapes=4096x11008 --timing=slope,dispatch --implementation="$IMPLS" \
        --out="$SCR/bench_nocmdbuf.json"
    step tune 90 45 run.log $PY $BENCH --tune --shapes=4096x11008 --reps=5 --out="$SCR/tune.json"
    step bench_fp32 70 40 run.log $PY $BENCH --dtype=float32 --implementation="$IMPLS" --out="$SCR/bench_fp32.json"
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
more = load("bench_more.json") or {}
def bench(name):  # bench_bf16.json from OUT; the others from bench_more.json
    return load(name) if name == "bench_bf16.json" else more.get(name[:-len(".json")])
lines = []
res = load("results.json") or {"steps": []}
lines.append("steps: " + ", ".join(f"{s['name']} {s['status']}" + (f" ({s['seconds']} s)" if s["seconds"] else "")
                                   for s in res["steps"]))
for name in ("bench_bf16.json", "bench_nocmdbuf.json", "bench_fp32.json"):
    b = bench(name)
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
t = more.get("tune")
if t:
    for op in ("s2", "s3"):
        best = sorted((r for r in t["rows"] if r["op"] == op and r["us"] == r["us"]), key=lambda r: r["us"])[:1]
        for r in best:
            lines.append(f"tune best {op} {r['shape']}: block_f={r['block_f']} block_d={r['block_d']} "
                         f"num_warps={r['num_warps']} {r['us']:.2f} us ({r['method']})")
d = load("decode.json")
if d:
    lines.append(f"decode.json: {d['shape']} x {d['layers']} layers, {d['dtype']}, {d['devices']}"
                 + (f", torch on {d['torch_device']}, max |logit diff| step 1 "
                    f"{d['torch_max_logit_diff_step1']:.3g}" if "torch_device" in d else ""))
    for b, r in (d.get("by_batch") or {str(d["batch"]): d}).items():
        tps = r["decode_tokens_per_s"]
        lines.append(f"  batch {b}: sparsity " + "/".join(f"{x:.3f}" for x in r["measured_sparsity_per_layer"])
                     + "; tok/s " + " | ".join(f"{k} {v:.1f}" for k, v in tps.items() if k != "same_tokens_as_torch"))
        lines.append("    over dense " + " | ".join(f"{k} {v:.2f}x" for k, v in r["over_dense"].items())
                     + (f"; ours (dense relu) over torch {r['ours_over_torch_dense_relu']:.2f}x"
                        if "ours_over_torch_dense_relu" in r else ""))
        lines.append("    tokens " + " | ".join(f"{k} agree {a['agreement']:.2f}, first diff {a['first_divergent_step']}"
                                            for k, a in r["token_agreement"].items()))
else:
    lines.append("decode.json: none")
try:
    with open(os.path.join(out, "train_metrics.jsonl")) as f:
        ent = [json.loads(x) for x in f if x.strip()]
    tr = [e for e in ent if e.get("kind") == "train"]
    ev = [e for e in ent if e.get("kind") == "eval"]
    lines.append(f"train_metrics.jsonl: steps {tr[0]['step']}..{tr[-1]['step']}, loss {tr[0]['loss']:.4f} -> "
                 f"{tr[-1]['loss']:.4f}, tokens/s (last) {tr[-1]['tokens_per_sec']:.0f}"
                 + (f", eval loss (step {ev[-1]['step']}) {ev[-1]['eval_loss']:.4f}" if ev else ""))
except (OSError, ValueError, IndexError, KeyError):
    lines.append("train_metrics.jsonl: none")
text = "\n".join(lines)
with open(os.path.join(out, "summary.txt"), "w") as f:
    f.write(text + "\n")
print(text)
PYEOF
