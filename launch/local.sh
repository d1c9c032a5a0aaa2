#!/usr/bin/env bash
# Runs `python ARGS...` as NPROC processes on this machine (torchrun --standalone).
#   bash launch/local.sh 2 -m pretrain.train --config configs/tiny.yaml --set train.max_steps=50
# On a machine without a GPU the processes train on CPU with gloo (DeepSpeed's CPU accelerator).
# Threads: torchrun gives each process OMP_NUM_THREADS=1 when NPROC > 1 unless you set it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/local.sh NPROC ARGS...   (e.g. 2 -m pretrain.train --config configs/tiny.yaml)" >&2
  exit 2
fi
nproc="$1"; shift
bash "$root/launch/setup.sh"
venv="${PRETRAIN_VENV:-$root/.venv}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/torchrun" --standalone --nproc_per_node "$nproc" "$@"
