#!/usr/bin/env bash
# Cloud TPU VMs for script_jax: create a VM or pod slice, set it up, check it can use the workdir,
# train on every worker, read the logs, resume after a Spot preemption, delete. Each step is a few
# gcloud commands; --dry-run prints them, one per line, quoted so they can be pasted, and runs
# nothing else.
#
#   launch/tpu.sh SUBCOMMAND NAME [FLAGS] [-- MAIN_FLAGS...]
#   launch/tpu.sh SUBCOMMAND --help
#
# Walk-through, costs and pinned versions: launch/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=launch/tpu.sh
# requirements-tpu.txt was resolved with this Python; the TPU images ship 3.10.
PYTHON_VERSION=3.12
# Sets $p on the workers to a pattern for `pgrep -f` that matches the trainer's command line
# (`.../python -m script_jax.main ...`), not that of the remote shell running the pattern, which
# holds the same words further along. No single quotes: they would nest in --dry-run's output.
# shellcheck disable=SC2016  # expanded on the workers
SET_TRAINER_PATTERN='p="^[^ ]*python[0-9.]* -m script_jax[.]main( |\$)"'
QUEUE_POLL_SECONDS=30
# The exit status of `python -m script_jax.launch_check` when the workdir cannot be used
# (CANNOT_USE_WORKDIR there), and of the check's remote command when the worker is not set up.
CHECK_CANNOT_USE_WORKDIR=3
CHECK_NOT_SET_UP=4
# Processes that hold these keep the next trainer off the TPU: /dev/accel* up to v4,
# /dev/vfio/* from v5e on.
TPU_DEVICE_FILES='/dev/accel* /dev/vfio/*'

usage_main() {
  cat <<EOF
Usage: $PROG SUBCOMMAND NAME [FLAGS] [-- MAIN_FLAGS...]

Subcommands:
  create   create the TPU VM (on-demand, Spot, or through a queued resource)
  setup    copy this checkout to every worker; install Python $PYTHON_VERSION and pinned packages
  check    can worker 0 write, read and remove files under the workdir? (train runs it first)
  train    (re)start training on every worker, detached from the SSH session
  logs     show the training log of every worker
  status   the VM's state, and which workers are training
  resume   after a preemption: recreate the VM if needed, set it up, restart training
  delete   delete the VM (and its queued resource)

Flags every subcommand takes:
  --zone=ZONE        e.g. us-central2-b (saved at create; later commands reuse it)
  --project=PROJECT  otherwise gcloud's default project
  --state-dir=DIR    where each VM's settings are saved
                     (default \${XDG_CONFIG_HOME:-~/.config}/script_jax/launch)
  --ssh-flag=F       one more flag for every gcloud tpu-vm ssh and scp, e.g.
                     --ssh-flag=--tunnel-through-iap (repeatable; saved by create, train and
                     resume; delete takes none)
  --dry-run          print the commands instead of running them
  --help             help for a subcommand: $PROG create --help

Example (see launch/README.md):
  $PROG create my-tpu --zone=us-central2-b --type=v4-8 --spot
  $PROG setup my-tpu
  $PROG check my-tpu --workdir=gs://BUCKET/script_small
  $PROG train my-tpu --config=configs/small.py --workdir=gs://BUCKET/script_small
  $PROG logs my-tpu --follow
  $PROG resume my-tpu          # after a preemption
  $PROG delete my-tpu
EOF
}

usage_create() {
  cat <<EOF
Usage: $PROG create NAME --zone=ZONE --type=TYPE [--spot] [--queued] [--version=V] [FLAGS]

Creates the TPU VM NAME and saves its settings for the other subcommands.

  --type=TYPE        accelerator type: v2-8, v3-8, v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ...
                     (--accelerator-type=TYPE is the same)
  --version=V        TPU software version; by default chosen for the type:
                       v2, v3, v4         tpu-ubuntu2204-base
                       v5e (v5litepod-*)  v2-alpha-tpuv5-lite
                       v5p                v2-alpha-tpuv5
                       v6e                v2-alpha-tpuv6e
  --spot             a Spot VM: much cheaper, preempted at any time (then: $PROG resume NAME)
  --queued           ask through a queued resource (waits for capacity instead of failing);
                     combines with --spot
  --on-demand        neither Spot nor queued (the default; overrides saved settings)
  --provisioning=M   the same as one of the above: on-demand, spot, queued or queued-spot
  --create-flag=F    one more flag for gcloud's create, e.g. --create-flag=--network=my-net
                     or --create-flag=--service-account=SA_EMAIL (repeatable; saved)
  --no-wait          --queued only: return once queued instead of waiting until it is ACTIVE
  --zone, --project, --state-dir, --dry-run as for every subcommand

Example:
  $PROG create my-tpu --zone=us-central2-b --type=v4-8 --spot
  $PROG create my-v5e --zone=us-west4-a --type=v5litepod-16 --queued --spot
EOF
}

usage_setup() {
  cat <<EOF
Usage: $PROG setup NAME [--zone=ZONE] [FLAGS]

Copies this checkout ($ROOT) to ~/script_jax on every worker, installs uv, a Python
$PYTHON_VERSION venv at ~/script_jax_venv, the pinned launch/requirements-tpu.txt and the project
(editable). Run it again after changing the code here; then train again.

Example:
  $PROG setup my-tpu
EOF
}

usage_check() {
  cat <<EOF
Usage: $PROG check NAME --workdir=gs://BUCKET/DIR [FLAGS]

On worker 0, over ssh: ~/script_jax_venv/bin/python -m script_jax.launch_check --workdir=DIR
writes a small file under DIR through script_jax's own file-system layer, reads it back and
removes it. When it cannot, prints the VM's service account and the command that lets it use
the bucket. train runs the same check first (unless --no-check). Needs setup first.

  --workdir=DIR      the workdir to check (default: the one saved by train)

Example:
  $PROG check my-tpu --workdir=gs://BUCKET/script_small
EOF
}

usage_train() {
  cat <<EOF
Usage: $PROG train NAME --workdir=gs://BUCKET/DIR [--config=FILE] [FLAGS] [-- MAIN_FLAGS...]

First checks that worker 0 can write, read and remove files under WORKDIR ($PROG check NAME).
Then on every worker: stops a trainer that is still running (SIGTERM, which saves a checkpoint;
up to 120 s, then SIGKILL), removes /tmp/libtpu_lockfile, and starts
  ~/script_jax_venv/bin/python -m script_jax.main --config=FILE --workdir=DIR \\
      --distributed MAIN_FLAGS
detached from the SSH session, appending to ~/script_jax.log. Training resumes from WORKDIR's
latest checkpoint when there is one. The settings are saved for resume.

  --workdir=DIR      a gs:// path: checkpoints must outlive the VM and be shared by all workers
  --config=FILE      a config file of this checkout (default configs/small.py)
  -- MAIN_FLAGS      passed to script_jax.main as given, e.g. -- --config.model.dtype=bfloat16
                     (saved; a later resume reuses them unless given a new --)
  --no-check         skip the workdir check
  --kill-tpu-holders also stop (sudo kill) every other process that holds the TPU's device
                     files ($TPU_DEVICE_FILES), and say which

Example:
  $PROG train my-tpu --config=configs/small.py --workdir=gs://BUCKET/script_small \\
      -- --config.num_train_steps=100000
EOF
}

usage_logs() {
  cat <<EOF
Usage: $PROG logs NAME [--lines=N] [--follow] [--worker=all|K] [FLAGS]

Prints the last N lines (default 100) of ~/script_jax.log on every worker (or worker K), each
line prefixed with the worker's hostname. --follow keeps printing (Ctrl-C to stop).

Example:
  $PROG logs my-tpu --follow --worker=0
EOF
}

usage_status() {
  cat <<EOF
Usage: $PROG status NAME [FLAGS]

Prints the VM's state (READY, PREEMPTED, NOTFOUND, ...), the queued resource's state when there
is one, and, when the VM is READY, which workers run the trainer and their last log line.

Example:
  $PROG status my-tpu
EOF
}

usage_resume() {
  cat <<EOF
Usage: $PROG resume NAME [FLAGS of create and train] [-- MAIN_FLAGS...]

Brings training back after a preemption, with the settings saved by create and train (flags
given here override them and are saved):
  VM READY                       train again
  VM STOPPED                     start it (gcloud compute tpus tpu-vm start), train
                                 (with a queued resource: delete, create, setup, train)
  VM PREEMPTED or TERMINATED     delete it, create it, setup, train
  VM not found                   create it, setup, train
  queued resource still waiting  wait until ACTIVE, setup, train
After a create, ssh and scp skip the host key check (--strict-host-key-checking=no): the new VM
has new keys under the old name. Training continues from the latest checkpoint in the gs://
workdir; train's --no-check and --kill-tpu-holders apply. With --dry-run the VM's
state is still read (describe changes nothing) and the commands of the path it picks are printed.

Example:
  $PROG resume my-tpu
  $PROG resume my-tpu --dry-run
EOF
}

usage_delete() {
  cat <<EOF
Usage: $PROG delete NAME [--yes] [--queued] [FLAGS]

Deletes the VM, or with a queued resource (saved at create, or --queued) the queued resource and
its VM. gcloud asks for confirmation unless --yes. The saved settings stay (for a later create
or resume); remove the file it names to forget them.

Example:
  $PROG delete my-tpu --yes
EOF
}

die() {  # a failure while running
  echo "$PROG: $*" >&2
  exit 1
}

die_usage() {  # a mistake on the command line
  echo "$PROG${SUBCOMMAND:+ $SUBCOMMAND}: $*" >&2
  echo "Run '$PROG${SUBCOMMAND:+ $SUBCOMMAND} --help' for usage." >&2
  exit 2
}

shquote() {  # one word as a shell reads it back: the rule of Python's shlex.quote
  local s=$1 sq="'" escaped="'\"'\"'"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//"$sq"/$escaped}"
  fi
}

quote_cmd() {  # a command as one pasteable line
  local out="" word
  for word in "$@"; do out+="$(shquote "$word") "; done
  printf '%s' "${out% }"
}

run() {  # prints a command; runs it unless --dry-run
  if ((DRY_RUN)); then
    quote_cmd "$@"; echo
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

gcloud_tpu() {  # gcloud compute tpus ARGS [--project=P]
  run gcloud compute tpus "$@" ${PROJECT:+"--project=$PROJECT"}
}

# Every ssh and scp: --quiet (no prompt, e.g. for a new SSH key's passphrase), no host key
# check right after a create (as MaxText's multihost runner does), then the --ssh-flag flags.
RECREATED=0

gcloud_ssh_scp() {  # ssh|scp ARGS: gcloud compute tpus tpu-vm ssh|scp ARGS --quiet ...
  local verb=$1 host_keys=()
  shift
  ((RECREATED)) && host_keys=(--strict-host-key-checking=no)
  gcloud_tpu tpu-vm "$verb" "$@" --quiet ${host_keys[@]+"${host_keys[@]}"} \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"}
}

ssh_workers() {  # WORKER REMOTE_COMMAND
  gcloud_ssh_scp ssh "$NAME" "--zone=$ZONE" "--worker=$1" "--command=$2"
}

describe_state() {  # KIND FORMAT: sets STATE (READY, ..., NOTFOUND) or fails. Runs even in a dry run.
  local kind=$1 format=$2 err out
  local cmd=(gcloud compute tpus "$kind" describe "$NAME" "--zone=$ZONE"
             ${PROJECT:+"--project=$PROJECT"} "--format=$format")
  err=$(mktemp)
  if out=$("${cmd[@]}" 2>"$err"); then
    out=${out:-UNKNOWN}
  elif grep -q -e NOT_FOUND -e 'not found' "$err"; then
    out=NOTFOUND
  else
    cat "$err" >&2
    rm -f "$err"
    echo "$PROG: could not read the state of $NAME: $(quote_cmd "${cmd[@]}")" >&2
    return 1
  fi
  rm -f "$err"
  # A comment line in the dry-run output, so what follows can be read against it.
  if ((DRY_RUN)); then
    echo "# $(quote_cmd "${cmd[@]}")  ->  $out"
  else
    echo "# $kind $NAME: $out" >&2
  fi
  STATE=$out
}

# ---------------------------------------------------------------------------------------------
# Settings: flags (F_*) over the VM's saved file over defaults.

runtime_version_for() {
  case $1 in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

state_file() {
  echo "${F_STATE_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/script_jax/launch}/$NAME.env"
}

load_settings() {
  ZONE="" TYPE="" VERSION="" SPOT=0 QUEUED=0 PROJECT="" CONFIG="" WORKDIR=""
  EXTRA=() CREATE_FLAGS=() SSH_FLAGS=()
  local file
  file=$(state_file)
  if [[ -f $file ]]; then
    # shellcheck source=/dev/null
    source "$file"
  fi
  ZONE=${F_ZONE-$ZONE}
  TYPE=${F_TYPE-$TYPE}
  VERSION=${F_VERSION-$VERSION}
  SPOT=${F_SPOT-$SPOT}
  QUEUED=${F_QUEUED-$QUEUED}
  PROJECT=${F_PROJECT-$PROJECT}
  CONFIG=${F_CONFIG-${CONFIG:-configs/small.py}}
  WORKDIR=${F_WORKDIR-$WORKDIR}
  if ((F_EXTRA_GIVEN)); then EXTRA=(${F_EXTRA[@]+"${F_EXTRA[@]}"}); fi
  if ((F_CREATE_FLAGS_GIVEN)); then CREATE_FLAGS=(${F_CREATE_FLAGS[@]+"${F_CREATE_FLAGS[@]}"}); fi
  if ((F_SSH_FLAGS_GIVEN)); then SSH_FLAGS=(${F_SSH_FLAGS[@]+"${F_SSH_FLAGS[@]}"}); fi
}

save_settings() {  # not with --dry-run: that changes nothing
  ((DRY_RUN)) && return 0
  local file word
  file=$(state_file)
  mkdir -p "$(dirname "$file")"
  {
    echo "# $PROG settings of TPU VM $NAME, read by its subcommands (edit or delete freely)."
    for var in ZONE TYPE VERSION SPOT QUEUED PROJECT CONFIG WORKDIR; do
      echo "$var=$(shquote "${!var}")"
    done
    printf 'EXTRA=('
    for word in ${EXTRA[@]+"${EXTRA[@]}"}; do printf ' %s' "$(shquote "$word")"; done
    printf ' )\nCREATE_FLAGS=('
    for word in ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}; do printf ' %s' "$(shquote "$word")"; done
    printf ' )\nSSH_FLAGS=('
    for word in ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"}; do printf ' %s' "$(shquote "$word")"; done
    printf ' )\n'
  } > "$file.tmp"
  mv "$file.tmp" "$file"
  echo "# settings saved in $file" >&2
}

require_zone() {
  [[ -n $ZONE ]] || die_usage "--zone is needed (no zone saved for $NAME in $(state_file))"
}

require_create_settings() {
  require_zone
  [[ -n $TYPE ]] || die_usage "--type is needed, e.g. --type=v4-8" \
    "(none saved for $NAME in $(state_file))"
  # Google's docs: the Cloud TPU API (gcloud compute tpus) is in maintenance and does not
  # create TPU7x (Ironwood) or later generations; GKE or Compute Engine do.
  if [[ $TYPE =~ ^(tpu|v)([0-9]+) ]] && (( BASH_REMATCH[2] >= 7 )); then
    die_usage "type '$TYPE': TPU7x (Ironwood) and later generations cannot be created with" \
      "the Cloud TPU API this script uses (gcloud compute tpus). Create them through GKE or" \
      "Compute Engine instead; see launch/README.md, 'TPU7x and later'."
  fi
  if [[ -z $VERSION ]] && ! runtime_version_for "$TYPE" >/dev/null; then
    die_usage "no default TPU software version for type '$TYPE': pass --version=V" \
      "(gcloud compute tpus tpu-vm versions list --zone=$ZONE)"
  fi
}

require_workdir() {
  require_zone
  [[ -n $WORKDIR ]] || die_usage "--workdir is needed, e.g. --workdir=gs://BUCKET/script_small" \
    "(none saved for $NAME in $(state_file))"
}

require_train_settings() {
  require_workdir
  [[ -f $ROOT/$CONFIG ]] || die_usage "no config file $CONFIG in $ROOT (configs/*.py)"
  if [[ $WORKDIR != gs://* ]]; then
    echo "$PROG: warning: --workdir=$WORKDIR is not on gs://: a worker's local disk is lost with" \
      "the VM, and the workers of a pod slice do not share it" >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# The steps.

do_create() {
  local version=${VERSION:-$(runtime_version_for "$TYPE")}
  local spot=()
  ((SPOT)) && spot=(--spot)
  if ((QUEUED)); then
    gcloud_tpu queued-resources create "$NAME" "--node-id=$NAME" "--zone=$ZONE" \
      "--accelerator-type=$TYPE" "--runtime-version=$version" ${spot[@]+"${spot[@]}"} \
      ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
  else
    gcloud_tpu tpu-vm create "$NAME" "--zone=$ZONE" "--accelerator-type=$TYPE" \
      "--version=$version" ${spot[@]+"${spot[@]}"} ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
  fi
}

do_delete() {  # ASK: 1 to let gcloud ask for confirmation
  local quiet=(--quiet)
  (($1)) && quiet=()
  if ((QUEUED)); then
    # --force: the queued resource's node goes with it.
    gcloud_tpu queued-resources delete "$NAME" "--zone=$ZONE" --force ${quiet[@]+"${quiet[@]}"}
  else
    gcloud_tpu tpu-vm delete "$NAME" "--zone=$ZONE" ${quiet[@]+"${quiet[@]}"}
  fi
}

wait_until_active() {  # a queued resource gets its node when capacity frees up
  local format='value(state.state)'
  if ((DRY_RUN)); then
    echo "# then, every ${QUEUE_POLL_SECONDS}s until ACTIVE: $(quote_cmd gcloud compute tpus \
      queued-resources describe "$NAME" "--zone=$ZONE" ${PROJECT:+"--project=$PROJECT"} \
      "--format=$format")"
    return 0
  fi
  while :; do
    describe_state queued-resources "$format"
    case $STATE in
      ACTIVE) return 0 ;;
      ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES|CREATING) sleep "$QUEUE_POLL_SECONDS" ;;
      *) die "queued resource $NAME is $STATE and will not become ACTIVE:" \
           "$PROG delete $NAME, then create it again" ;;
    esac
  done
}

do_setup() {
  local tarball="${TMPDIR:-/tmp}/script_jax-$NAME.tgz"
  # shellcheck disable=SC2088  # the tilde is for the workers' shell
  local venv='~/script_jax_venv' remote
  remote="set -e; rm -rf ~/script_jax; mkdir -p ~/script_jax"
  remote+="; tar -C ~/script_jax -xzf ~/script_jax.tgz; rm -f ~/script_jax.tgz"
  remote+="; export PATH=\"\$HOME/.local/bin:\$PATH\""
  remote+="; command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh"
  remote+="; if ! $venv/bin/python -c"
  remote+=" \"import sys; sys.exit(sys.version_info[:2] != (${PYTHON_VERSION/./, }))\""
  remote+=" 2>/dev/null; then rm -rf $venv; uv venv --python $PYTHON_VERSION $venv; fi"
  remote+="; uv pip install --quiet --python $venv/bin/python"
  remote+=" -r ~/script_jax/launch/requirements-tpu.txt -e ~/script_jax"
  remote+="; echo \"\$(hostname): Python, jax, flax:\" \$($venv/bin/python -c"
  remote+=" \"import sys, jax, flax;"
  remote+=" print(sys.version.split()[0], jax.__version__, flax.__version__)\")"
  run env COPYFILE_DISABLE=1 tar -C "$ROOT" --exclude=.git --exclude=./runs --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.venv -czf "$tarball" .
  gcloud_ssh_scp scp "$tarball" "$NAME:script_jax.tgz" "--zone=$ZONE" --worker=all
  run rm -f "$tarball"
  ssh_workers all "$remote"
}

report_workdir_problem() {  # after the check failed: who the VM is, and how to let it in
  local format='value(serviceAccount.email)' account bucket
  echo "$PROG: worker 0 of $NAME cannot use $WORKDIR (the error above)." >&2
  if [[ $WORKDIR != gs://* ]]; then
    echo "It is a path on the worker's own disk: give one the VM may write, on gs://." >&2
    return 0
  fi
  account=$(gcloud compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" \
    ${PROJECT:+"--project=$PROJECT"} "--format=$format" 2>/dev/null) || account=""
  bucket=${WORKDIR#gs://}
  bucket=${bucket%%/*}
  if [[ -n $account ]]; then
    echo "The VM runs as the service account $account. Let it read and write the bucket:" >&2
  else
    echo "The VM's description names no service account, so it runs as the project's Compute" \
      "Engine default one, PROJECT_NUMBER-compute@developer.gserviceaccount.com. Let it read" \
      "and write the bucket:" >&2
    account=PROJECT_NUMBER-compute@developer.gserviceaccount.com
  fi
  echo "  gcloud storage buckets add-iam-policy-binding gs://$bucket" \
    "--member=serviceAccount:$account --role=roles/storage.objectAdmin" >&2
  echo "then check again: $PROG check $NAME (launch/README.md, 'Workdir access')" >&2
}

do_check() {  # worker 0 writes, reads and removes a file under WORKDIR, through script_jax.fs
  # shellcheck disable=SC2088  # the tilde is for the worker's shell
  local python='~/script_jax_venv/bin/python' status=0
  local remote="cd ~/script_jax 2>/dev/null && [ -x $python ] || { echo \"\$(hostname):"
  remote+=" ~/script_jax or ~/script_jax_venv is missing\" >&2; exit $CHECK_NOT_SET_UP; }"
  remote+="; $python -m script_jax.launch_check --workdir=$(shquote "$WORKDIR")"
  ssh_workers 0 "$remote" || status=$?
  case $status in
    0) ;;
    "$CHECK_CANNOT_USE_WORKDIR") report_workdir_problem; exit 1 ;;
    "$CHECK_NOT_SET_UP") die "$NAME is not set up: $PROG setup $NAME" ;;
    *) die "the check could not run on worker 0 of $NAME (exit status $status, see above)" ;;
  esac
}

do_train() {
  local args="" word
  for word in "--config=$CONFIG" "--workdir=$WORKDIR" --distributed ${EXTRA[@]+"${EXTRA[@]}"}; do
    args+=" $(shquote "$word")"
  done
  # POSIX sh, one line: whatever the workers' login shell, and one pasteable line in --dry-run.
  local remote="cd ~/script_jax || exit 1; $SET_TRAINER_PATTERN"
  remote+="; pkill -TERM -f \"\$p\"; i=0"
  remote+="; while pgrep -f \"\$p\" >/dev/null && [ \$i -lt 120 ]; do sleep 1; i=\$((i + 1)); done"
  remote+="; pkill -KILL -f \"\$p\""
  if ((F_KILL_TPU_HOLDERS)); then
    # Whoever else holds the TPU: lsof, or fuser where lsof is missing (both print the pids).
    remote+="; d=; for f in $TPU_DEVICE_FILES; do [ -e \"\$f\" ] && d=\"\$d \$f\"; done; h="
    remote+="; [ -n \"\$d\" ] && h=\$({ if command -v lsof >/dev/null; then sudo -n lsof -t \$d"
    remote+="; else sudo -n fuser \$d; fi; } 2>/dev/null | tr -s \" \" \"\\n\" | sort -un)"
    remote+="; h=\$(echo \$h)"
    remote+="; if [ -n \"\$h\" ]; then echo \"\$(hostname): stopping the processes that hold"
    remote+="\$d:\"; for q in \$h; do ps -o pid=,user=,args= -p \$q; done"
    remote+="; sudo -n kill -TERM \$h; i=0; while [ \$i -lt 10 ]; do a=; for q in \$h"
    remote+="; do ps -o stat= -p \$q | grep -q \"^[^Z]\" && a=1; done"
    remote+="; [ -z \"\$a\" ] && break; sleep 1"
    remote+="; i=\$((i + 1)); done; sudo -n kill -KILL \$h 2>/dev/null"
    remote+="; else echo \"\$(hostname): no other process holds the TPU\"; fi"
  fi
  remote+="; rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo -n rm -f /tmp/libtpu_lockfile"
  remote+="; echo \"=== \$(date -u) start\" >> ~/script_jax.log"
  remote+="; nohup setsid ~/script_jax_venv/bin/python -m script_jax.main$args"
  remote+=" >> ~/script_jax.log 2>&1 < /dev/null &"
  remote+=" echo \"\$(hostname): training started, pid \$!\""
  ((F_NO_CHECK)) || do_check
  ssh_workers all "$remote"
  if ((!DRY_RUN)); then
    echo "Training on $NAME. Follow it: $PROG logs $NAME --follow" >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# Subcommands.

cmd_create() {
  require_create_settings
  do_create
  save_settings
  if ((QUEUED && !F_NO_WAIT)); then wait_until_active; fi
}

cmd_setup() {
  require_zone
  do_setup
}

cmd_check() {
  require_workdir
  do_check
}

cmd_train() {
  require_train_settings
  save_settings
  do_train
}

cmd_logs() {
  require_zone
  local follow=""
  ((F_FOLLOW)) && follow=" -F"
  local remote="w=\$(hostname); tail -n $F_LINES$follow ~/script_jax.log 2>&1"
  remote+=" | sed -u \"s|^|[\$w] |\""
  ssh_workers "$F_WORKER" "$remote"
}

cmd_status() {
  require_zone
  local remote="w=\$(hostname); $SET_TRAINER_PATTERN"
  remote+="; if pids=\$(pgrep -f \"\$p\"); then echo \"[\$w] training, pid\" \$pids;"
  remote+=" else echo \"[\$w] not training\"; fi"
  remote+="; tail -n 1 ~/script_jax.log 2>/dev/null | sed \"s|^|[\$w] last log line: |\""
  if ((DRY_RUN)); then
    if ((QUEUED)); then
      gcloud_tpu queued-resources describe "$NAME" "--zone=$ZONE" '--format=value(state.state)'
    fi
    gcloud_tpu tpu-vm describe "$NAME" "--zone=$ZONE" '--format=value(state)'
    ssh_workers all "$remote"
    return 0
  fi
  if ((QUEUED)); then
    describe_state queued-resources 'value(state.state)'
    echo "queued resource $NAME: $STATE"
  fi
  describe_state tpu-vm 'value(state)'
  echo "TPU VM $NAME: $STATE"
  if [[ $STATE == READY ]]; then
    ssh_workers all "$remote"
  fi
}

cmd_resume() {
  require_create_settings
  require_train_settings
  save_settings
  describe_state tpu-vm 'value(state)'
  local node=$STATE
  case $node in
    READY)
      do_train
      return 0 ;;
    STOPPED)
      if ((!QUEUED)); then  # its disk, with the code and venv of the last setup, is kept
        gcloud_tpu tpu-vm start "$NAME" "--zone=$ZONE"
        do_train
        return 0
      fi
      # A queued resource's node is not started again here: delete and create, as before.
      do_delete 0
      do_create ;;
    PREEMPTED|TERMINATED)
      do_delete 0
      do_create ;;
    NOTFOUND)
      if ((QUEUED)); then
        describe_state queued-resources 'value(state.state)'
        case $STATE in
          NOTFOUND) do_create ;;
          ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES|CREATING) ;;  # still queued: wait below
          *) do_delete 0; do_create ;;  # FAILED, SUSPENDED, or ACTIVE without its node
        esac
      else
        do_create
      fi ;;
    *)
      die "TPU VM $NAME is $node; run '$PROG resume $NAME' again once it is READY or PREEMPTED" ;;
  esac
  if ((QUEUED)); then wait_until_active; fi
  RECREATED=1  # a new VM under the old name, with new host keys
  do_setup
  do_train
}

cmd_delete() {
  require_zone
  do_delete $((!F_YES))
  if ((!DRY_RUN)); then
    echo "Deleted $NAME. Its settings stay in $(state_file) for a later create or resume." >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# Command line.

ALLOWED_COMMON="--help --dry-run --zone --project --state-dir"
ALLOWED_CREATE="--type --accelerator-type --version --spot --queued --on-demand --provisioning"
ALLOWED_CREATE+=" --create-flag"
ALLOWED_TRAIN="--config --workdir --no-check --kill-tpu-holders"

allowed_flags() {
  case $1 in
    create) echo "$ALLOWED_COMMON --ssh-flag $ALLOWED_CREATE --no-wait" ;;
    setup|status) echo "$ALLOWED_COMMON --ssh-flag" ;;
    check) echo "$ALLOWED_COMMON --ssh-flag --workdir" ;;
    train) echo "$ALLOWED_COMMON --ssh-flag $ALLOWED_TRAIN" ;;
    logs) echo "$ALLOWED_COMMON --ssh-flag --lines --follow --worker" ;;
    resume) echo "$ALLOWED_COMMON --ssh-flag $ALLOWED_CREATE $ALLOWED_TRAIN" ;;
    delete) echo "$ALLOWED_COMMON --yes --queued" ;;
  esac
}

DRY_RUN=0 F_NO_WAIT=0 F_FOLLOW=0 F_YES=0 F_LINES=100 F_WORKER=all F_NO_CHECK=0
F_KILL_TPU_HOLDERS=0 F_EXTRA=() F_EXTRA_GIVEN=0 F_CREATE_FLAGS=() F_CREATE_FLAGS_GIVEN=0
F_SSH_FLAGS=() F_SSH_FLAGS_GIVEN=0
SUBCOMMAND="" NAME="" WANT_HELP=0

# Global flags may come before the subcommand too: launch/tpu.sh --dry-run create ...
PRE_FLAGS=()
while (($#)) && [[ $1 == -* ]]; do
  case $1 in
    -h|--help) usage_main; exit 0 ;;
    --) die_usage "a subcommand is needed before --" ;;
    --dry-run|--zone=*|--project=*|--state-dir=*|--ssh-flag=*) PRE_FLAGS+=("$1"); shift ;;
    --zone|--project|--state-dir|--ssh-flag)
      (($# >= 2)) || die_usage "$1 needs a value"
      PRE_FLAGS+=("$1=$2"); shift 2 ;;
    *) die_usage "unknown flag before the subcommand: $1" ;;
  esac
done
(($#)) || { usage_main >&2; exit 2; }
SUBCOMMAND=$1; shift
case $SUBCOMMAND in
  help) usage_main; exit 0 ;;
  create|setup|check|train|logs|status|resume|delete) ;;
  *) bad=$SUBCOMMAND; SUBCOMMAND=""; die_usage "unknown subcommand '$bad'" ;;
esac
if (($#)) && [[ $1 != -* ]]; then NAME=$1; shift; fi
set -- ${PRE_FLAGS[@]+"${PRE_FLAGS[@]}"} "$@"

ALLOWED=" $(allowed_flags "$SUBCOMMAND") "
while (($#)); do
  arg=$1; shift
  case $arg in
    --) F_EXTRA=("$@"); F_EXTRA_GIVEN=1; set --; break ;;
    -h) key=--help has_value=0 ;;
    --*=*) key=${arg%%=*} value=${arg#*=} has_value=1 ;;
    --*) key=$arg has_value=0 ;;
    *) die_usage "unexpected argument '$arg' (flags for script_jax.main go after --)" ;;
  esac
  [[ $ALLOWED == *" $key "* ]] \
    || die_usage "unknown flag $key (flags for script_jax.main go after --)"
  case $key in
    --zone|--type|--accelerator-type|--version|--project|--state-dir|--config|--workdir|\
    --lines|--worker|--provisioning|--create-flag|--ssh-flag)
      if ((!has_value)); then
        (($#)) || die_usage "$key needs a value"
        value=$1; shift
      fi ;;
    *) ((!has_value)) || die_usage "$key takes no value" ;;
  esac
  case $key in
    --help) WANT_HELP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --zone) F_ZONE=$value ;;
    --type|--accelerator-type) F_TYPE=$value ;;
    --version) F_VERSION=$value ;;
    --project) F_PROJECT=$value ;;
    --state-dir) F_STATE_DIR=$value ;;
    --config) F_CONFIG=$value ;;
    --workdir) F_WORKDIR=$value ;;
    --spot) F_SPOT=1 ;;
    --queued) F_QUEUED=1 ;;
    --on-demand) F_SPOT=0 F_QUEUED=0 ;;
    --provisioning)
      case $value in
        on-demand) F_SPOT=0 F_QUEUED=0 ;;
        spot) F_SPOT=1 F_QUEUED=0 ;;
        queued) F_SPOT=0 F_QUEUED=1 ;;
        queued-spot) F_SPOT=1 F_QUEUED=1 ;;
        *) die_usage "--provisioning is on-demand, spot, queued or queued-spot, not '$value'" ;;
      esac ;;
    --create-flag) F_CREATE_FLAGS+=("$value"); F_CREATE_FLAGS_GIVEN=1 ;;
    --ssh-flag) F_SSH_FLAGS+=("$value"); F_SSH_FLAGS_GIVEN=1 ;;
    --no-check) F_NO_CHECK=1 ;;
    --kill-tpu-holders) F_KILL_TPU_HOLDERS=1 ;;
    --no-wait) F_NO_WAIT=1 ;;
    --follow) F_FOLLOW=1 ;;
    --yes) F_YES=1 ;;
    --lines)
      [[ $value =~ ^[0-9]+$ ]] || die_usage "--lines takes a number, not '$value'"
      F_LINES=$value ;;
    --worker)
      [[ $value == all || $value =~ ^[0-9]+$ ]] \
        || die_usage "--worker is all or a number, not '$value'"
      F_WORKER=$value ;;
  esac
done

if ((WANT_HELP)); then "usage_$SUBCOMMAND"; exit 0; fi
[[ -n $NAME ]] || die_usage "the TPU VM's NAME is missing"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die_usage "NAME '$NAME' is not a TPU VM name (lowercase letters, digits and '-')"
if ((F_EXTRA_GIVEN)) && [[ $SUBCOMMAND != train && $SUBCOMMAND != resume ]]; then
  die_usage "only train and resume pass flags to script_jax.main (after --)"
fi
load_settings
[[ -z $ZONE || $ZONE =~ ^[a-z0-9-]+$ ]] || die_usage "--zone '$ZONE' is not a zone"
[[ -z $TYPE || $TYPE =~ ^[a-z0-9-]+$ ]] || die_usage "--type '$TYPE' is not an accelerator type"
"cmd_$SUBCOMMAND"
