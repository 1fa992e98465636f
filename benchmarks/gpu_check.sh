#!/usr/bin/env bash
# One GPU's iteration-rate check (issue 5's H100 targets), every variant in one call:
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# SCRIPT and ELECTRA small models at the paper's batch (128 x 128), bfloat16 compute, as
# configured and with model.fused_qkv. (On an H200 on 2026-11-26, rng_impl=rbg and the
# inverse-CDF sampler made no measurable difference: docs/benchmarks.md section (e).) Each
# variant is one `script_jax.benchmark` process with its own JSON and log under $OUT; a variant
# that fails or overruns its time does not stop the rest.
# Needs only jax, flax, optax, orbax-checkpoint, ml-collections and absl (no TensorFlow).
set -u
OUT=${OUT:-/tmp/script_jax_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# CONFIG, BATCH, STEPS, REPEATS, PEAK override the defaults (a CPU smoke run uses tiny ones).
COMMON=(--config=${CONFIG:-configs/small.py} --batch_size=${BATCH:-128}
        --config.model.dtype=bfloat16 --steps=${STEPS:-50} --repeats=${REPEATS:-3} --warmup=5
        --peak_size=${PEAK:-8192} --peak_iters=20)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"

run() {  # name, seconds, extra flags...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout "$limit" $PY -m script_jax.benchmark "${COMMON[@]}" "$@" \
    --output="$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s in all"
  grep -E "^(objective|script |electra |mlm |matmul peak|SCRIPT/ELECTRA)" "$OUT/$name.log" ||
    tail -5 "$OUT/$name.log"
}

# On an H200 each objective spends ~20-45 s initialising and ~25-55 s compiling before ~5 s of
# timing: two processes of SCRIPT and ELECTRA fit one 10-minute device call (OBJECTIVES=...
# adds mlm, which needs one more call's worth of minutes).
OBJECTIVES=${OBJECTIVES:-script,electra}
run as_configured "${T1:-270}" --objectives="$OBJECTIVES"
run fused_qkv "${T2:-270}" --objectives="$OBJECTIVES" --config.model.fused_qkv=True
