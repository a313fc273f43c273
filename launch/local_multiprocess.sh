#!/usr/bin/env bash
# Start N local CPU processes of one training run, joined over 127.0.0.1 (gloo collectives).
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [--config.a.b=VALUE ...]
#
# Environment: PYTHON (default: the repository's .venv, else python3), DEVICES_PER_PROCESS
# (forced CPU devices per process, default 1), PORT (coordinator port, default: a free one).
# Process 0 prints the logs; the exit status is the first failing process's (0 if all pass).
# SIGTERM/SIGINT are forwarded to every process, which then checkpoint and exit 0.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 N CONFIG WORKDIR [--config.a.b=VALUE ...]" >&2
  exit 2
fi
n=$1 config=$2 workdir=$3
shift 3
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N must be a positive integer, got '$n'" >&2
  exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
port=${PORT:-$("$python" -c 'import portpicker; print(portpicker.pick_unused_port())')}

pids=()
# shellcheck disable=SC2317  # invoked by the trap below
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward INT TERM

for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
    "$python" -m cxr_rf.train --config="$config" --workdir="$workdir" \
    --coordinator="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" &
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  while true; do
    rc=0
    wait "$pid" || rc=$?
    # wait also returns (> 128) when a trapped signal arrives: wait again while the process runs.
    # If it has ended meanwhile, bash still holds its real status: ask for it (127: none held,
    # so rc was already the real one).
    if ((rc > 128)); then
      if kill -0 "$pid" 2>/dev/null; then continue; fi
      again=0
      wait "$pid" || again=$?
      ((again == 127)) || rc=$again
    fi
    break
  done
  if ((rc != 0 && status == 0)); then status=$rc; fi
done
exit "$status"
