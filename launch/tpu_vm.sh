#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM (single host v3-8/v4-8, or a multi-host pod slice).
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [extra main flags...]
#   launch/tpu_vm.sh script-small europe-west4-a v3-8 configs/small.py gs://BUCKET/script_small
#
# Creates the VM if it does not exist (spot: preemptions are survived by SIGTERM checkpointing
# and automatic resume), copies this checkout to every worker, installs it with jax[tpu], and
# runs the same command on all workers with --distributed (jax.distributed finds the slice).
# Rerun the same command after a preemption: training resumes from WORKDIR.
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
NAME=$1 ZONE=$2 ACCEL=$3 CONFIG=$4 WORKDIR=$5; shift 5
VERSION=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" \
    --version "$VERSION" --spot
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$ROOT" --exclude=.git --exclude=runs -czf /tmp/script_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/script_jax.tgz "$NAME":~/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/script_jax && tar -C ~/script_jax -xzf ~/script_jax.tgz && cd ~/script_jax
  pip install -q -e '.[tpu]'
  nohup python -m script_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed $* \
    > ~/script_jax.log 2>&1 &
  echo started on \$(hostname)"
echo "Follow with: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f ~/script_jax.log'"
