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
# default cxr_rf), STOP_TIMEOUT (seconds leftover trainers get to checkpoint before SIGKILL,
# default 120), APT_LOCK_WAIT (seconds to wait for apt/dpkg locks on a worker, default 900),
# MOUNT_CACHE_MB (gcsfuse file cache per bucket; default 80% of the free space under the
# worker's home, shared by the buckets).
#
# Steps:
# 1. Reuse the queued resource NAME if it exists and is queued or ACTIVE (refused, exit 2, if its
#    accelerator type is not TYPE); delete and recreate it if it is SUSPENDED/FAILED (e.g. after
#    a spot preemption); wait out a deletion; else create it.
# 2. Wait for ACTIVE.
# 3. Stage this repository (without .venv, .git, runs) as WORKDIR/code/cxr_rf-<UTC time>.tar.gz
#    (`gcloud storage cp`). On every worker (`gcloud ... ssh --worker=all`): stop leftover
#    trainers (SIGTERM, so they checkpoint; SIGKILL after STOP_TIMEOUT) and remove
#    /tmp/libtpu_lockfile (a reused slice), copy the code down from the bucket, `pip install -e
#    '.[tpu,gcs]'` in REMOTE_DIR/.venv (Python 3.11).
#    Why the bucket and not `tpu-vm scp --worker=all`: gcloud's scp to several workers stops
#    with SSHKeyNotInAgent whenever an ssh-agent runs without the key (it checks `ssh-add -l`),
#    and `ssh-add` here would change the user's agent; the workers need the bucket anyway
#    (checkpoints), one upload serves every worker, and the tarball records what each launch ran.
# 4. With --mount: install gcsfuse if missing (waiting out unattended-upgrades' apt/dpkg locks,
#    at most APT_LOCK_WAIT), mount each bucket read-only at /gcs/BUCKET with a file cache on the
#    worker's disk (~/.cache/gcsfuse/BUCKET; whole files are cached on first read, random reads
#    included), so each host reads the data from GCS once.
# 5. Run `python -m cxr_rf.train --config=CONFIG --workdir=WORKDIR --cluster=tpu FLAGS` on all
#    workers with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs otherwise probes the bucket type
#    on every call). --cluster=tpu makes every worker call jax.distributed.initialize(), which
#    finds the other hosts through the metadata server; nothing in a TPU VM's environment names
#    them. Process 0's logs stream back here.
# 6. Delete the queued resource (also on failure or Ctrl-C) unless --keep.
#
# Preemption: rerun the same command. It recreates the slice and training resumes from the newest
# checkpoint in the gs:// workdir (workers need the `gcs` extra, installed above). Closing this terminal ends the ssh sessions and so the
# training (run it under tmux/screen, or on a small always-on VM); a rerun resumes likewise.
#
# Exit status: 2 for bad flags or a bash older than 4.4, and for an existing slice NAME of another
# accelerator type (nothing is created, run or deleted), 1 if the slice fails, is suspended or is
# not ACTIVE within WAIT_TIMEOUT, else the training's status (non-zero if any worker failed).

# ${a@Q} and empty arrays under `set -u` need bash >= 4.4 (macOS ships 3.2). POSIX syntax only up
# to here, so that sh, zsh and old bash all reach this line.
case ${BASH_VERSION:-} in
  4.[4-9]* | [5-9].* | [1-9][0-9]*.*) ;;
  *)
    echo "error: launch/tpu_pod.sh needs bash >= 4.4, this is ${BASH_VERSION:-not bash}; run it with a newer bash (macOS: brew install bash)" >&2
    exit 2 ;;
esac
set -euo pipefail

usage="usage: $0 --name NAME --type TYPE --config FILE --workdir gs://... [--zone Z] [--project P] [--runtime V] [--spot|--reserved] [--mount BUCKET]... [--keep] [--dry-run] [-- TRAIN_FLAGS...]"
die() { echo "error: $*" >&2; exit 2; }

name=${TPU_NAME:-} type=${ACCELERATOR_TYPE:-} zone=${ZONE:-} project=${PROJECT:-}
runtime=${RUNTIME_VERSION:-} provisioning=${PROVISIONING:-on-demand}
config=${CONFIG:-} workdir=${WORKDIR:-} keep=${KEEP:-0} dry_run=${DRY_RUN:-0}
read -r -a buckets <<<"${MOUNT_BUCKETS:-}"
poll=${POLL_SECONDS:-30} wait_timeout=${WAIT_TIMEOUT:-21600} remote_dir=${REMOTE_DIR:-cxr_rf}
stop_timeout=${STOP_TIMEOUT:-120} apt_wait=${APT_LOCK_WAIT:-900} cache_mb=${MOUNT_CACHE_MB:-}

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
[[ $stop_timeout =~ ^[0-9]+$ ]] ||
  die "STOP_TIMEOUT must be a whole number of seconds, got '$stop_timeout'"
[[ $apt_wait =~ ^[0-9]+$ ]] || die "APT_LOCK_WAIT must be a whole number of seconds, got '$apt_wait'"
[[ -z $cache_mb || $cache_mb =~ ^[1-9][0-9]*$ ]] ||
  die "MOUNT_CACHE_MB must be a positive whole number of MiB, got '$cache_mb'"
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

# Print a field of the queued resource ($2, default its state), or nothing if it does not exist;
# exit 1 on other errors (with $1 = tolerant, only warn: a transient error while polling must not
# end a long wait).
state_of() {
  local out err rc=0 field=${2:-state.state}
  err=$(mktemp)
  out=$("${qr[@]}" describe "$name" "${loc[@]}" --format="value($field)" 2>"$err") || rc=$?
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
case $state in
  ACTIVE | ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING)
    # Reusing a slice of another size would train on the wrong mesh (or not fit), and the
    # cleanup would then delete that slice: refuse before the cleanup trap owns it.
    actual=$(state_of strict 'tpu.nodeSpec[0].node.acceleratorType')
    if [[ $actual != "$type" ]]; then
      echo "error: queued resource '$name' exists as ${actual:-an accelerator config without a type}, not --type $type; pass --type ${actual:-TYPE} or another --name, or delete it: gcloud compute tpus queued-resources delete $name --force" >&2
      exit 2
    fi ;;
esac
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

# 3. Stage this repository in the bucket, then install it on every worker (see the header).
tarball_dir=""
if [[ $dry_run == 1 ]]; then
  tarball=/tmp/cxr_rf.tar.gz
else
  tarball_dir=$(mktemp -d)
  tarball=$tarball_dir/cxr_rf.tar.gz
fi
code_url=${workdir%/}/code/cxr_rf-$(date -u +%Y%m%dT%H%M%SZ).tar.gz
run tar -czf "$tarball" --exclude=./.venv --exclude=./.git --exclude=./runs \
  --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.pytest_cache -C "$root" .
run gcloud storage cp "$tarball" "$code_url"
rd=$(quote "$remote_dir")
# Leftover trainers of an earlier launch on a reused slice hold the TPU (and libtpu's lock file):
# SIGTERM lets them checkpoint; whatever is left after STOP_TIMEOUT is killed. The pattern's
# [.] keeps it from matching this very command line.
# shellcheck disable=SC2016  # expanded by the workers' shell
{
  stop='p="python[^ ]* -m cxr_rf[.]train"; '
  stop+='if pgrep -f "$p" >/dev/null; then echo "stopping leftover trainers on $(hostname)" >&2; '
  stop+='sudo pkill -TERM -f "$p" || true; t=0; '
  stop+="while pgrep -f \"\$p\" >/dev/null && [ \$t -lt $stop_timeout ]; do sleep 2; t=\$((t + 2)); done; "
  stop+='sudo pkill -KILL -f "$p" || true; fi; sudo rm -f /tmp/libtpu_lockfile'
}
install="set -eu; $stop; mkdir -p $rd; cd $rd; \
find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; \
gcloud storage cp $(quote "$code_url") ~/cxr_rf.tar.gz; tar -xzf ~/cxr_rf.tar.gz; \
if [ ! -x .venv/bin/python ]; then \
if command -v python3.11 >/dev/null; then python3.11 -m venv .venv; \
else python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --seed --python 3.11 .venv; fi; fi; \
.venv/bin/python -m pip install -q -e '.[tpu,gcs]'"
run "${vm[@]}" ssh "$name" --worker=all "${loc[@]}" --command="$install"

# 4. Mount the data buckets with gcsfuse (installing it from Google's apt repository if missing).
if [[ ${#buckets[@]} -gt 0 ]]; then
  # shellcheck disable=SC2016  # expanded by the workers' shell
  {
    # A fresh VM runs unattended-upgrades at boot: apt-get would fail on its locks. Wait for
    # them (bounded); DPkg::Lock::Timeout covers the dpkg lock but not `apt-get update`'s lists
    # lock, hence the fuser poll and the retries.
    mount='set -eu; wait_apt() { t=0; '
    mount+='while sudo fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock >/dev/null 2>&1; do '
    mount+="if [ \$t -ge $apt_wait ]; then echo \"error: apt/dpkg still locked after ${apt_wait}s on \$(hostname) (unattended-upgrades?); APT_LOCK_WAIT\" >&2; return 1; fi; "
    mount+='sleep 2; t=$((t + 2)); done; }; '
    mount+='apt_get() { for try in 1 2 3; do wait_apt || return 1; '
    mount+="if sudo apt-get -o DPkg::Lock::Timeout=$apt_wait \"\$@\"; then return 0; fi; sleep 5; done; return 1; }; "
    mount+='if ! command -v gcsfuse >/dev/null; then '
    mount+='curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg'
    mount+=' | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; '
    mount+='echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt'
    mount+=' gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; '
    mount+='apt_get update -qq; apt_get install -y -qq gcsfuse; fi; '
    # One file cache per bucket on the local disk, read-only mounts (the data never changes
    # under a run). cache-file-for-range-read: ArrayRecord reads records at random offsets,
    # which gcsfuse would otherwise never cache.
    mount+='cache=$HOME/.cache/gcsfuse; mkdir -p "$cache"; '
    if [[ -n $cache_mb ]]; then
      mount+="mb=$cache_mb; "
    else
      mount+="mb=\$((\$(df -Pm \"\$cache\" | awk 'NR == 2 {print \$4}') * 4 / 5 / ${#buckets[@]})); "
    fi
  }
  for b in "${buckets[@]}"; do
    mount+="sudo mkdir -p /gcs/$b; sudo chown \"\$(id -u):\$(id -g)\" /gcs/$b; "
    mount+="if ! mountpoint -q /gcs/$b; then mkdir -p \"\$cache/$b\"; "
    mount+="printf 'cache-dir: %s\\nimplicit-dirs: true\\nfile-cache:\\n  max-size-mb: %s\\n  cache-file-for-range-read: true\\n' \"\$cache/$b\" \"\$mb\" >\"\$cache/$b.yaml\"; "
    mount+="gcsfuse --config-file \"\$cache/$b.yaml\" --o ro $b /gcs/$b; fi; "
  done
  run "${vm[@]}" ssh "$name" --worker=all "${loc[@]}" --command="${mount%; }"
fi

# 5. Train on every worker; the exit status is the training's.
train="cd $rd && PYTHONUNBUFFERED=1 GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false \
exec .venv/bin/python -m cxr_rf.train \
$(quote --config="$remote_config" --workdir="$workdir" --cluster=tpu "${train_flags[@]}")"
run "${vm[@]}" ssh "$name" --worker=all "${loc[@]}" --command="$train"
