#!/usr/bin/env bash
# Train on a Cloud TPU pod slice obtained through a queued resource, then release it.
#
#   launch/tpu_pod.sh --name NAME --type TYPE --config experiments/NAME.py --workdir gs://B/runs/X \
#       [--zone Z] [--project P] [--runtime V] [--spot | --reserved] [--mount BUCKET]... \
#       [--keep] [--dry-run] \
#       [-- --config.a.b=VALUE ...]
#
# Flags (each also settable from the environment; a flag wins over its variable):
#   --name NAME      TPU_NAME          queued resource and TPU node id (required)
#   --type TYPE      ACCELERATOR_TYPE  e.g. v5p-128, v5litepod-64, v6e-256, v4-32 (required)
#   --zone Z         ZONE              default: gcloud's configured compute/zone
#   --project P      PROJECT           default: gcloud's configured project
#   --runtime V      RUNTIME_VERSION   TPU software; default by generation: v4 tpu-ubuntu2204-base,
#                                      v5e/v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#                                      v6e v2-alpha-tpuv6e
#   --spot           PROVISIONING=spot       spot capacity (preemptible, cheaper)
#   --reserved       PROVISIONING=reserved   the project's reservation; default: on-demand
#   --config FILE    CONFIG            experiment file inside this repository (required)
#   --workdir URL    WORKDIR           gs:// run directory shared by all workers (required)
#   --mount BUCKET   MOUNT_BUCKETS     mount gs://BUCKET at /gcs/BUCKET on every worker with
#                                      gcsfuse (installed if missing); repeatable, the variable is
#                                      space-separated. ArrayRecord data must be read through such
#                                      a mount (data.root=/gcs/BUCKET/...); checkpoints go to gs://
#   --keep           KEEP=1            do not delete the queued resource at the end
#   --dry-run        DRY_RUN=1         print every command ("+ " prefix, one per line), run none
#   -- FLAGS...                        passed to `python -m cxr_rf.train` unchanged
# Other settings: POLL_SECONDS (state poll interval, default 30), WAIT_TIMEOUT (seconds to wait
# for ACTIVE, default 21600), REMOTE_DIR (checkout on each worker, relative to its home,
# default cxr_rf).
#
# Steps: reuse the queued resource NAME if it exists and is queued or ACTIVE; delete and recreate
# it if it is SUSPENDED/FAILED (e.g. after a spot preemption); wait out a deletion; else create
# it. Wait for ACTIVE. Copy this repository (without .venv, .git, runs) to every worker and
# `pip install -e '.[tpu,gcs]'` there (in REMOTE_DIR/.venv, Python 3.11). Run `python -m
# cxr_rf.train --config=CONFIG --workdir=WORKDIR FLAGS` on all workers over `gcloud ... ssh
# --worker=all`: jax.distributed joins by itself on the pod and process 0's logs stream back
# here. Finally delete the queued resource (also on failure or Ctrl-C) unless --keep.
#
# Preemption: rerun the same command. It recreates the slice and training resumes from the newest
# checkpoint in the gs:// workdir (workers need the `gcs` extra, installed above). Closing this terminal ends the ssh sessions and so the
# training (run it under tmux/screen, or on a small always-on VM); a rerun resumes likewise.
#
# Exit status: 2 for bad flags (nothing is run), 1 if the slice fails, is suspended or is not
# ACTIVE within WAIT_TIMEOUT, else the training's status (non-zero if any worker failed).
set -euo pipefail

usage="usage: $0 --name NAME --type TYPE --config FILE --workdir gs://... [--zone Z] [--project P] [--runtime V] [--spot|--reserved] [--mount BUCKET]... [--keep] [--dry-run] [-- TRAIN_FLAGS...]"
die() { echo "error: $*" >&2; exit 2; }

name=${TPU_NAME:-} type=${ACCELERATOR_TYPE:-} zone=${ZONE:-} project=${PROJECT:-}
runtime=${RUNTIME_VERSION:-} provisioning=${PROVISIONING:-on-demand}
config=${CONFIG:-} workdir=${WORKDIR:-} keep=${KEEP:-0} dry_run=${DRY_RUN:-0}
read -r -a buckets <<<"${MOUNT_BUCKETS:-}"
poll=${POLL_SECONDS:-30} wait_timeout=${WAIT_TIMEOUT:-21600} remote_dir=${REMOTE_DIR:-cxr_rf}

while [[ $# -gt 0 ]]; do
  case $1 in
    --name | --type | --zone | --project | --runtime | --config | --workdir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;; --type) type=$2 ;; --zone) zone=$2 ;; --project) project=$2 ;;
        --runtime) runtime=$2 ;; --config) config=$2 ;; --workdir) workdir=$2 ;;
      esac
      shift 2 ;;
    --name=* | --type=* | --zone=* | --project=* | --runtime=* | --config=* | --workdir=*)
      value=${1#*=}
      case $1 in
        --name=*) name=$value ;; --type=*) type=$value ;; --zone=*) zone=$value ;;
        --project=*) project=$value ;; --runtime=*) runtime=$value ;;
        --config=*) config=$value ;; --workdir=*) workdir=$value ;;
      esac
      shift ;;
    --mount)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      buckets+=("$2"); shift 2 ;;
    --mount=*) buckets+=("${1#*=}"); shift ;;
    --spot) provisioning=spot; shift ;;
    --reserved) provisioning=reserved; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (train flags go after '--'); $usage" ;;
  esac
done
train_flags=("$@")

[[ -n $name ]] || die "--name (or TPU_NAME) is required"
[[ -n $type ]] || die "--type (or ACCELERATOR_TYPE) is required, e.g. v5p-128"
[[ -n $config ]] || die "--config (or CONFIG) is required, e.g. experiments/cxr_b.py"
[[ -n $workdir ]] || die "--workdir (or WORKDIR) is required, a gs:// path"
[[ $workdir == gs://?* ]] ||
  die "--workdir must be a gs:// path (every worker writes the same checkpoints), got '$workdir'"
case $provisioning in
  on-demand | spot | reserved) ;;
  *) die "PROVISIONING must be on-demand, spot or reserved, got '$provisioning'" ;;
esac
for b in "${buckets[@]}"; do
  [[ $b =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]] ||
    die "--mount takes a bucket name (lowercase letters, digits, . _ -; no gs://), got '$b'"
done
[[ $poll =~ ^[0-9]+$ ]] || die "POLL_SECONDS must be a whole number of seconds, got '$poll'"
[[ $wait_timeout =~ ^[0-9]+$ ]] ||
  die "WAIT_TIMEOUT must be a whole number of seconds, got '$wait_timeout'"
if [[ -z $runtime ]]; then
  case $type in
    v4-*) runtime=tpu-ubuntu2204-base ;;
    v5e-* | v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) die "no default --runtime for accelerator type '$type' (known: v4-*, v5e-*/v5litepod-*, v5p-*, v6e-*); pass --runtime" ;;
  esac
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The workers run the config from their copy of this repository: it must live inside it.
config_file=${config%%:*}  # ml_collections allows FILE:ARG
case $config_file in
  /*) abs=$config_file ;;
  *) abs=$PWD/$config_file ;;
esac
[[ -f $abs ]] || die "--config file not found: '$config_file'"
abs=$(cd "$(dirname "$abs")" && pwd)/$(basename "$abs")
[[ $abs == "$root"/* ]] ||
  die "--config must be a file inside this repository (it is copied to the workers), got '$config_file'"
remote_config=${abs#"$root"/}${config#"$config_file"}

# Shell-quote each argument for display and for the workers' shell.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
  done
  echo "${out[*]}"
}

# Run a command, or print it in a dry run.
run() {
  if [[ $dry_run == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

loc=()
[[ -z $zone ]] || loc+=(--zone="$zone")
[[ -z $project ]] || loc+=(--project="$project")
qr=(gcloud compute tpus queued-resources)
vm=(gcloud compute tpus tpu-vm)

# Print the queued resource's state, or nothing if it does not exist; exit 1 on other errors
# (with $1 = tolerant, only warn: a transient error while polling must not end a long wait).
state_of() {
  local out err rc=0
  err=$(mktemp)
  out=$("${qr[@]}" describe "$name" "${loc[@]}" --format='value(state.state)' 2>"$err") || rc=$?
  if ((rc == 0)); then
    echo "$out"
  elif grep -qi 'not.found' "$err"; then
    :
  elif [[ ${1:-} == tolerant ]]; then
    echo "warning: describe failed ($(tr '\n' ' ' <"$err")); retrying" >&2
    echo UNKNOWN
  else
    echo "error: cannot describe queued resource '$name': $(tr '\n' ' ' <"$err")" >&2
    rm -f "$err"
    exit 1
  fi
  rm -f "$err"
}

create() {
  local extra=()
  [[ $provisioning == on-demand ]] || extra+=(--"$provisioning")
  run "${qr[@]}" create "$name" --node-id="$name" --accelerator-type="$type" \
    --runtime-version="$runtime" "${loc[@]}" "${extra[@]}"
}

cleanup() {
  local rc=$?
  [[ -z ${tarball_dir:-} ]] || rm -rf "$tarball_dir"
  if [[ ${created:-0} == 1 && $keep != 1 ]]; then
    echo "deleting queued resource '$name' (pass --keep to keep it)" >&2
    run "${qr[@]}" delete "$name" "${loc[@]}" --force --async --quiet || true
  fi
  exit "$rc"
}

# 1. Obtain the slice.
if [[ $dry_run == 1 ]]; then
  echo "+ $(quote "${qr[@]}" describe "$name" "${loc[@]}" --format='value(state.state)')"
  state=""
else
  state=$(state_of)
fi
created=1
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
case $state in
  "")
    create ;;
  ACTIVE | ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING)
    echo "reusing queued resource '$name' ($state)" >&2 ;;
  DELETING)
    echo "queued resource '$name' is being deleted; waiting to recreate it" >&2
    start=$SECONDS
    while [[ -n $(state_of tolerant) ]]; do
      if ((SECONDS - start >= wait_timeout)); then
        echo "error: queued resource '$name' is still DELETING after ${wait_timeout}s (WAIT_TIMEOUT)" >&2
        exit 1
      fi
      sleep "$poll"
    done
    create ;;
  *)
    echo "queued resource '$name' is $state (preempted or failed): deleting and recreating it" >&2
    run "${qr[@]}" delete "$name" "${loc[@]}" --force --quiet
    create ;;
esac

# 2. Wait for ACTIVE.
if [[ $dry_run == 1 ]]; then
  echo "+ $(quote "${qr[@]}" describe "$name" "${loc[@]}" --format='value(state.state)')  # until ACTIVE"
else
  start=$SECONDS
  while true; do
    state=$(state_of tolerant)
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDING | SUSPENDED)
        echo "error: queued resource '$name' is $state; see: gcloud compute tpus queued-resources describe $name" >&2
        exit 1 ;;
      "")
        echo "error: queued resource '$name' disappeared while waiting for it" >&2
        exit 1 ;;
    esac
    if ((SECONDS - start >= wait_timeout)); then
      echo "error: queued resource '$name' is still $state after ${wait_timeout}s (WAIT_TIMEOUT)" >&2
      exit 1
    fi
    echo "waiting for '$name': $state" >&2
    sleep "$poll"
  done
fi

# 3. Install this repository on every worker.
tarball_dir=""
if [[ $dry_run == 1 ]]; then
  tarball=/tmp/cxr_rf.tar.gz
else
  tarball_dir=$(mktemp -d)
  tarball=$tarball_dir/cxr_rf.tar.gz
fi
run tar -czf "$tarball" --exclude=./.venv --exclude=./.git --exclude=./runs \
  --exclude='*.egg-info' --exclude=__pycache__ -C "$root" .
run "${vm[@]}" scp "$tarball" "$name:cxr_rf.tar.gz" --worker=all "${loc[@]}"
rd=$(quote "$remote_dir")
install="set -eu; mkdir -p $rd; cd $rd; \
find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; tar -xzf ~/cxr_rf.tar.gz; \
if [ ! -x .venv/bin/python ]; then \
if command -v python3.11 >/dev/null; then python3.11 -m venv .venv; \
else python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --seed --python 3.11 .venv; fi; fi; \
.venv/bin/python -m pip install -q -e '.[tpu,gcs]'"
run "${vm[@]}" ssh "$name" --worker=all "${loc[@]}" --command="$install"

# Mount the data buckets with gcsfuse (installing it from Google's apt repository if missing).
if [[ ${#buckets[@]} -gt 0 ]]; then
  # shellcheck disable=SC2016  # expanded by the workers' shell
  {
    mount='set -eu; if ! command -v gcsfuse >/dev/null; then '
    mount+='curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg'
    mount+=' | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; '
    mount+='echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt'
    mount+=' gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; '
    mount+='sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi'
  }
  for b in "${buckets[@]}"; do
    mount+="; sudo mkdir -p /gcs/$b; sudo chown \"\$(id -u):\$(id -g)\" /gcs/$b"
    mount+="; mountpoint -q /gcs/$b || gcsfuse --implicit-dirs $b /gcs/$b"
  done
  run "${vm[@]}" ssh "$name" --worker=all "${loc[@]}" --command="$mount"
fi

# 4. Train on every worker; the exit status is the training's.
train="cd $rd && PYTHONUNBUFFERED=1 exec .venv/bin/python -m cxr_rf.train \
$(quote --config="$remote_config" --workdir="$workdir" "${train_flags[@]}")"
run "${vm[@]}" ssh "$name" --worker=all "${loc[@]}" --command="$train"
