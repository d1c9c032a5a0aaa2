#!/usr/bin/env bash
# The DeepSpeed launcher over a hostfile (`host slots=N` lines): it ssh-es (pdsh) into every host and
# starts `slots` processes there. The hostfile is validated first, and checked against the config's
# layout, batch and GPU memory (python -m launch.hostfile), before anything starts.
#
#   bash launch/deepspeed.sh --hostfile hosts.txt -- -m pretrain.train --config configs/gpt-1.3b.yaml --resume auto
#   bash launch/deepspeed.sh --hostfile hosts.txt --master-addr node01 --socket-ifname ib0 -- -m pretrain.train ...
#
# Needs passwordless ssh from this node to every host and the same checkout + .venv path on all of
# them (a shared filesystem). `bash launch/deepspeed.sh --help` lists the options.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/launcher_options.sh
source "$root/launch/launcher_options.sh"

usage() {
  cat <<'EOF'
usage: bash launch/deepspeed.sh --hostfile FILE [OPTIONS] -- PYTHON_ARGS...   (e.g. -- -m pretrain.train --config FILE)

  --hostfile FILE          hosts and their GPU counts, one 'HOST slots=N' per line (# comments)
  --master-addr A          where the ranks meet (default: the hostfile's first host; 127.0.0.1 for localhost)
  --master-port P          its port (default $MASTER_PORT, else 29500)
  --launcher L             how DeepSpeed reaches the hosts: pdsh (default), openmpi, mpich, impi, mvapich, slurm
  --launcher-args S        extra arguments for that launcher (one string)
  --socket-ifname IF       network interface for NCCL and gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
  --nccl-socket-ifname IF  NCCL only;   --gloo-socket-ifname IF   gloo only
  --pg-timeout MIN         collective timeout in minutes (DEEPSPEED_TIMEOUT; default 30)
  --gpu-memory SIZE        GPU memory for the fit check (default 80GB)
  --no-check               skip checking the config against the hostfile (the hostfile syntax is still checked)
  --dry-run                print the environment and the command instead of running them
  -h, --help               this text

Remote hosts get PYTHONPATH, DEEPSPEED_TIMEOUT, TORCH_NCCL_ASYNC_ERROR_HANDLING and the *_SOCKET_IFNAME
settings through a DeepSpeed env file (DS_ENV_FILE); DeepSpeed's own export covers only PYTHON*/NCCL*/UCX*.
EOF
}

hostfile=""
master_addr=""  # not $MASTER_ADDR: rank 0 runs on the hostfile's first host
master_port="${master_port:-29500}"
launcher=pdsh
launcher_args=""
gpu_memory=80GB
check=1
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) need "$@"; hostfile="$2"; shift 2 ;;
    --launcher) need "$@"; launcher="$2"; shift 2 ;;
    --launcher-args|--launcher_args) need "$@"; launcher_args="$2"; shift 2 ;;
    --gpu-memory) need "$@"; gpu_memory="$2"; shift 2 ;;
    --no-check) check=0; shift ;;
    --) shift; break ;;
    *) shared_option "$@" || unknown_option "$1"; shift "$shared_shift" ;;  # launch/launcher_options.sh
  esac
done
[ $# -gt 0 ] || { usage >&2; exit 2; }
[ -n "$hostfile" ] || die "--hostfile FILE is required ('HOST slots=N' per line)"
[[ "$master_port" =~ ^[0-9]+$ ]] && [ "$master_port" -ge 1 ] && [ "$master_port" -le 65535 ] \
  || die "--master-port: '$master_port' is not a port (1..65535)"
net_check
case "$launcher" in pdsh|openmpi|mpich|impi|mvapich|slurm) ;;
  *) die "--launcher: '$launcher' is not allowed; allowed: pdsh, openmpi, mpich, impi, mvapich, slurm" ;; esac

venv="${PRETRAIN_VENV:-$root/.venv}"
[ -x "$venv/bin/deepspeed" ] || die "no deepspeed launcher in $venv: run 'bash launch/setup.sh' first"
py="$venv/bin/python"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# The program: `-m MODULE ARGS` becomes DeepSpeed's `--module MODULE ARGS`; a script path stays as it is.
prog=("$@")
if [ "${prog[0]}" = "-m" ]; then
  [ ${#prog[@]} -ge 2 ] || die "-m needs a module name"
  prog=(--module "${prog[@]:1}")
fi

# Validate the hostfile, and the config (--config/--set among the program's arguments) on its world size.
check_args=(check "$hostfile" --gpu-memory "$gpu_memory")
if [ "$check" = 1 ]; then
  prev=""
  for a in "$@"; do
    case "$prev" in --config) check_args+=(--config "$a") ;; --set) check_args+=(--set "$a") ;; esac
    case "$a" in --config=*) check_args+=(--config "${a#--config=}") ;; --set=*) check_args+=(--set "${a#--set=}") ;; esac
    prev="$a"
  done
fi
"$py" -m launch.hostfile "${check_args[@]}" || exit 2

[ -n "$master_addr" ] || master_addr="$("$py" -m launch.hostfile get "$hostfile" master)"
local_only="$("$py" -m launch.hostfile get "$hostfile" local)"

net_export
env_file="$(mktemp "${TMPDIR:-/tmp}/pretrain-ds-env.XXXXXX")"
trap 'rm -f "$env_file"' EXIT
for v in PYTHONPATH DEEPSPEED_TIMEOUT TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME DS_ACCELERATOR \
         OMP_NUM_THREADS PRETRAIN_VENV; do
  if [ -n "${!v:-}" ]; then printf '%s=%s\n' "$v" "${!v}" >> "$env_file"; fi
done
export DS_ENV_FILE="$env_file"

cmd=("$venv/bin/deepspeed" --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port"
     --launcher "$launcher")
if [ -n "$launcher_args" ]; then cmd+=(--launcher_args "$launcher_args"); fi
if [ "$local_only" = 1 ]; then cmd+=(--no_ssh_check); fi  # one local host: DeepSpeed runs it without ssh
cmd+=("${prog[@]}")

if [ "$dry_run" = 1 ]; then
  sed 's/^/export /' "$env_file"
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "[launch] deepspeed over $hostfile ($("$py" -m launch.hostfile get "$hostfile" world) slots), master $master_addr:$master_port, launcher $launcher" >&2
"${cmd[@]}"
