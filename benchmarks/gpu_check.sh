#!/usr/bin/env bash
# One GPU's iteration-rate check (issue 5's H100 targets), every variant in one call:
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# SCRIPT, ELECTRA and MLM small models at the paper's batch (128 x 128), bfloat16 compute, as
# configured (threefry randomness) and with each speed option (rng_impl=rbg, the inverse-CDF
# sampler, the chunked logsumexp). Each variant is one `script_jax.benchmark` process with its
# own JSON and log under $OUT; a variant that fails or overruns its time does not stop the rest.
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

run as_configured "${T1:-150}" --objectives=script,electra,mlm
run rbg "${T2:-150}" --objectives=script,electra,mlm --config.rng_impl=rbg
run rbg_inverse_cdf "${T3:-100}" --objectives=script,electra --config.rng_impl=rbg \
  --config.sampler=inverse_cdf
run rbg_chunk "${T4:-70}" --objectives=script --config.rng_impl=rbg \
  --config.model.logsumexp_chunk=8192
