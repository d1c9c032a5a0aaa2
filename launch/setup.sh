#!/usr/bin/env bash
# Creates (or brings up to date) the project's virtual environment in .venv.
# Idempotent: a stamp file records the hash of the requirement files; nothing is reinstalled
# when they have not changed. Every other script sources this one.
#   bash launch/setup.sh            runtime dependencies
#   bash launch/setup.sh --dev      runtime + test dependencies
# Environment: PYTHON (interpreter for the venv, default python3), PRETRAIN_VENV (default .venv),
# PRETRAIN_KEEP_TORCH=1 (keep an already installed torch, e.g. a CUDA build on a cluster).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PRETRAIN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (allowed: --dev)" >&2; exit 2 ;;
  esac
done

want_files=("$root/requirements.txt")
[ "$dev" = 1 ] && want_files+=("$root/requirements-dev.txt")
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }
want="$(stamp_of "${want_files[@]}")"
stamp="$venv/.pretrain-stamp-$dev"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "[setup] preparing $venv (this happens once; a few minutes on a fresh machine)"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip_install() {  # quiet, minus pip's notes about index locations this machine does not have
  "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install --upgrade "pip>=23" wheel setuptools
torch_pin="$(grep -E '^torch==' "$root/requirements.txt")"
if [ "${PRETRAIN_KEEP_TORCH:-0}" = 1 ] && "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] keeping installed torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  reqs=("$(mktemp)"); grep -vE '^torch==' "$root/requirements.txt" > "${reqs[0]}"
else
  # torch first: deepspeed is an sdist whose build imports torch.
  echo "[setup] installing $torch_pin"
  pip_install "$torch_pin"
  reqs=("$root/requirements.txt")
fi
echo "[setup] installing requirements (deepspeed builds from source without isolation)"
pip_install --no-build-isolation -r "${reqs[0]}"
if [ "$dev" = 1 ]; then
  echo "[setup] installing test requirements"
  pip_install -r "$root/requirements-dev.txt"
fi
# A runtime-only stamp is also valid once the dev set is in.
echo "$want" > "$stamp"
[ "$dev" = 1 ] && stamp_of "$root/requirements.txt" > "$venv/.pretrain-stamp-0"
echo "[setup] ready: $venv"
