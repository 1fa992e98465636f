#!/usr/bin/env bash
# Pretrain on the GPUs of this machine (one process sees all of them; data-parallel).
#
#   launch/gpu.sh CONFIG WORKDIR [extra main flags...]
#   launch/gpu.sh configs/small.py runs/script_small --config.model.dtype=bfloat16
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,6p' "$0"; exit 2; fi
CONFIG=$1 WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
python -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null \
  || pip install -q -e ".[gpu]"
# Let XLA use most of the GPU memory up front; tf.data stays on the CPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m script_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
