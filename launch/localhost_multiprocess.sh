#!/usr/bin/env bash
# N processes on this machine joined by jax.distributed: the multi-host code path, on a laptop.
#
#   launch/localhost_multiprocess.sh N CONFIG WORKDIR [extra main flags...]
#   launch/localhost_multiprocess.sh 2 configs/tiny.py runs/tiny_2proc
#
# Every process reads its own shards and feeds its slice of the global batch; process 0 writes
# the logs; all of them write their part of each checkpoint.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,8p' "$0"; exit 2; fi
N=$1 CONFIG=$2 WORKDIR=$3; shift 3
cd "$(dirname "$0")/.."
PORT=${PORT:-$((20000 + RANDOM % 10000))}
pids=()
for ((i = 0; i < N; i++)); do
  python -m script_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed \
    --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i" "$@" \
    > "/tmp/script_jax_proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 5 /tmp/script_jax_proc0.log
exit $status
