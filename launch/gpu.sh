#!/usr/bin/env bash
# Pretrain on the GPUs of this machine (one process sees all of them; data-parallel).
#
#   launch/gpu.sh CONFIG WORKDIR [extra main flags...]
#   launch/gpu.sh configs/small.py runs/script_small --config.model.dtype=bfloat16
#
# Installs this checkout first (pip install -e ".[gpu]", quietly; a no-op when it is current).
# PYTHON=/path/to/python picks the interpreter; by default python, else python3.
set -euo pipefail
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0
  exit 2
fi
CONFIG=$1 WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
"$PY" -m pip install -q -e ".[gpu]"
# Let XLA use most of the GPU memory up front; tf.data stays on the CPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "$PY" -m script_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
