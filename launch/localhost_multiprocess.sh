#!/usr/bin/env bash
# N processes on this machine joined by jax.distributed: the multi-host code path, on a laptop.
#
#   launch/localhost_multiprocess.sh N CONFIG WORKDIR [extra main flags...]
#   launch/localhost_multiprocess.sh 2 configs/tiny.py runs/tiny_2proc
#
# Every process reads its own shards and feeds its slice of the global batch; process 0 writes
# the logs; all of them write their part of each checkpoint. Installs this checkout first
# (pip install -q -e .). When one process fails, the others are stopped (they would wait for it
# forever), its log's tail is printed and its exit status returned. Logs: LOG_DIR/procI.log
# (LOG_DIR defaults to a new /tmp/script_jax_localhost.XXXXXX). PORT: the coordinator's port.
# PYTHON=/path/to/python picks the interpreter; by default python, else python3.
set -euo pipefail
if [[ $# -lt 3 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0
  exit 2
fi
N=$1 CONFIG=$2 WORKDIR=$3; shift 3
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive number, not '$N'" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
"$PY" -m pip install -q -e .
PORT=${PORT:-$((20000 + RANDOM % 10000))}
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/script_jax_localhost.XXXXXX")}
mkdir -p "$LOG_DIR"

pids=()
# shellcheck disable=SC2329  # run by the EXIT trap
stop_all() {  # SIGTERM (a checkpoint is saved), then SIGKILL after 10 s
  local pid waited=0
  for pid in ${pids[@]+"${pids[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in ${pids[@]+"${pids[@]}"}; do
    while kill -0 "$pid" 2>/dev/null && ((waited < 100)); do sleep 0.1; waited=$((waited + 1)); done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for ((i = 0; i < N; i++)); do
  "$PY" -m script_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed \
    --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i" "$@" \
    > "$LOG_DIR/proc$i.log" 2>&1 &
  pids+=($!)
done
echo "$N processes started; logs in $LOG_DIR/proc*.log" >&2

# Poll rather than `wait -n`: that needs bash 4.3, and macOS ships 3.2. Bash reaps each child as
# it exits and keeps its status for `wait PID`.
running=$N status=0
while ((running > 0 && status == 0)); do
  sleep 0.2
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then continue; fi
    code=0; wait "$pid" || code=$?
    pids[i]="" running=$((running - 1))
    if ((code != 0)); then
      status=$code
      echo "process $i failed with status $code; stopping the others. $LOG_DIR/proc$i.log ends:" >&2
      tail -n 20 "$LOG_DIR/proc$i.log" >&2
    fi
  done
done
if ((status == 0)); then tail -n 5 "$LOG_DIR/proc0.log"; fi
exit "$status"
