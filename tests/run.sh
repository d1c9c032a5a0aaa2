#!/usr/bin/env bash
# Sets up .venv (with the test dependencies) and runs the test suite.
#   bash tests/run.sh                 # the default suite (what CI runs); slow tests are skipped
#   bash tests/run.sh -m slow         # only the slow tests;  bash tests/run.sh tests/test_config.py -k typo
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh --dev
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  # The default suite starts with the style checks (pyproject.toml): a lint failure fails the suite.
  venv="${PRETRAIN_VENV:-$root/.venv}"
  "$venv/bin/ruff" check . && "$venv/bin/ruff" format --check --quiet . || { echo "[tests] ruff: fix the above (ruff format . && ruff check --fix .)" >&2; exit 1; }
  args=(-m "not slow" --durations=30)
fi
set +e
"${PRETRAIN_VENV:-$root/.venv}/bin/python" -m pytest "${args[@]}"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  # pytest's "no tests collected": an explicit selection that matched nothing is not a failure,
  # but the default suite collecting nothing means the suite is broken.
  if [ $# -gt 0 ]; then echo "[tests] no test matched the selection: $*"; exit 0; fi
  echo "[tests] the default suite collected no tests" >&2
  exit 1
fi
exit $rc
