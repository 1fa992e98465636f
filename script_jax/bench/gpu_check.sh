#!/usr/bin/env bash
# One GPU's iteration-rate check (issue 5's H100 targets), every variant in one call:
#
#   OUT=/tmp/gpu bash script_jax/bench/gpu_check.sh
#
# SCRIPT and ELECTRA small models at the paper's batch (128 x 128), bfloat16 compute: as
# configured, then the variants of script_jax/bench/variants.py (fused_qkv, cuDNN LayerNorm,
# several steps per call), all in one process on the same device, each
# objective's state initialised once. The log and JSON go under $OUT and the JSON is rewritten
# after every variant, so a run cut short keeps what it measured. (On an H200 on 2026-11-26,
# rng_impl=rbg and the inverse-CDF sampler made no measurable difference: docs/benchmarks.md
# section (e).) Needs only jax, flax, optax, orbax-checkpoint, ml-collections and absl.
set -u
OUT=${OUT:-/tmp/script_jax_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"

# CONFIG, BATCH, STEPS, BUDGET override the defaults (a CPU smoke run uses tiny ones). On an
# H200 each objective spends ~20-45 s initialising and each variant ~25-55 s compiling.
timeout "${LIMIT:-540}" $PY -m script_jax.bench.variants --config=${CONFIG:-configs/small.py} \
  --batch_size=${BATCH:-128} --config.model.dtype=bfloat16 --steps=${STEPS:-50} --repeats=2 \
  --warmup=10 --budget_s=${BUDGET:-500} --output="$OUT/variants.json" 2>&1 | tee "$OUT/variants.log" |
  grep -vE "^\[.*\] (state|warmed|compiled)"
status=${PIPESTATUS[0]}
echo "exit $status after ${SECONDS}s"
exit $status
