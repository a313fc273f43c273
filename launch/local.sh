#!/usr/bin/env bash
# Train on this machine (one process: all local GPUs, or the CPU), then sample from the result.
#
#   launch/local.sh --config experiments/phantom_256.py --workdir runs/phantom_256 [--num N] \
#       [-- --config.a.b=VALUE ...]
#
# Flags (each also settable from the environment): --config FILE (CONFIG), --workdir DIR
# (WORKDIR), --num N (NUM_SAMPLES, default 8); arguments after `--` go to `python -m
# cxr_rf.train` unchanged. PYTHON: the interpreter (default: the repository's .venv, else
# python3); JAX_PLATFORMS=cpu forces the CPU.
#
# Steps: print the devices JAX sees; `python -m cxr_rf.train --config=FILE --workdir=DIR ...`;
# then `python -m cxr_rf.sample --workdir=DIR --num=N --out=DIR/samples/final`. Rerunning the
# same command resumes training from the newest checkpoint in DIR. SIGTERM/SIGINT are forwarded
# to training, which checkpoints and exits 0; sampling is then skipped. The exit status is the
# first failing step's (2 for bad flags).
set -euo pipefail

usage="usage: $0 --config FILE --workdir DIR [--num N] [-- TRAIN_FLAGS...]"
die() { echo "error: $*" >&2; exit 2; }

config=${CONFIG:-} workdir=${WORKDIR:-} num=${NUM_SAMPLES:-8}
while [[ $# -gt 0 ]]; do
  case $1 in
    --config | --workdir | --num)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case $1 in --config) config=$2 ;; --workdir) workdir=$2 ;; --num) num=$2 ;; esac
      shift 2 ;;
    --config=*) config=${1#*=}; shift ;;
    --workdir=*) workdir=${1#*=}; shift ;;
    --num=*) num=${1#*=}; shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (train flags go after '--'); $usage" ;;
  esac
done
[[ -n $config ]] || die "--config (or CONFIG) is required, e.g. experiments/phantom_256.py"
[[ -n $workdir ]] || die "--workdir (or WORKDIR) is required, e.g. runs/phantom_256"
[[ $num =~ ^[1-9][0-9]*$ ]] || die "--num must be a positive integer, got '$num'"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

"$python" -c 'import jax; print("devices:", jax.devices())'

signalled=0
# shellcheck disable=SC2317  # invoked by the trap below
forward() { signalled=1; if [[ -n ${pid:-} ]]; then kill -TERM "$pid" 2>/dev/null || true; fi; }
trap forward INT TERM

"$python" -m cxr_rf.train --config="$config" --workdir="$workdir" "$@" &
pid=$!
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
trap - INT TERM
if ((rc != 0)); then exit "$rc"; fi
if ((signalled)); then
  echo "training stopped by a signal after its checkpoint; rerun to resume (sampling skipped)" >&2
  exit 0
fi

"$python" -m cxr_rf.sample --workdir="$workdir" --num="$num" --out="$workdir/samples/final"
