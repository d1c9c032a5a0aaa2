#!/usr/bin/env bash
# The main job, from a fresh machine: set up .venv, fetch and prepare the bundled corpus, train the
# default Peri-LN GPT with 2 CPU processes under DeepSpeed (about 10 minutes on 2 cores), then
# evaluate it on the held-out test set (State of the Union addresses 2000-2026).
#   bash launch/quickstart.sh                              # the default job
#   bash launch/quickstart.sh --set train.max_steps=50     # extra arguments go to pretrain.train
# Running it again resumes the run (--resume auto) and re-evaluates; NPROC=N changes the process count.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
echo "[quickstart] 1/4 setting up the environment (.venv)"
bash launch/setup.sh
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py="${PRETRAIN_VENV:-$root/.venv}/bin/python"
echo "[quickstart] 2/4 fetching and preparing the bundled corpus (data/bundled)"
"$py" -m pretrain.data prepare --out data/bundled
echo "[quickstart] 3/4 training (configs/quickstart.yaml, ${NPROC:-2} processes)"
bash launch/local.sh "${NPROC:-2}" -m pretrain.train --config configs/quickstart.yaml --resume auto "$@"
sets=()
prev=""
for a in "$@"; do  # the run directory, with the same --set overrides training got
  if [ "$prev" = "--set" ]; then sets+=(--set "$a"); fi
  case "$a" in --set=*) sets+=(--set "${a#--set=}") ;; esac
  prev="$a"
done
run_dir="$("$py" -m pretrain.config --config configs/quickstart.yaml "${sets[@]}" --get run.dir)"
echo "[quickstart] 4/4 evaluating on the held-out test set"
"$py" -m pretrain.eval --run "$run_dir" > /dev/null
result="$(ls -t "$run_dir"/eval/test_*.json | head -1)"
"$py" - "$result" "$run_dir" "$start" "${PRETRAIN_VENV:-.venv}" <<'PY'
import json, sys, time
r = json.load(open(sys.argv[1])); run_dir = sys.argv[2]; took = time.time() - int(sys.argv[3])
print(f"""
[quickstart] done in {took / 60:.1f} min
  test set      : {r['split']} ({r['tokens']:,} tokens, {r['bytes']:,} bytes) at step {r['step']}
  test loss     : {r['loss']:.4f} nats/token   perplexity {r['perplexity']:.1f}   bits/byte {r['bits_per_byte']:.4f}
  run directory : {run_dir}  (config.yaml, metrics.jsonl, train.log, checkpoints/)
  TensorBoard   : {sys.argv[4]}/bin/tensorboard --logdir {run_dir}/tb
  evaluation    : {sys.argv[1]}
  resume        : bash launch/local.sh 2 -m pretrain.train --config configs/quickstart.yaml --resume auto --set train.max_steps=N
""")
PY
