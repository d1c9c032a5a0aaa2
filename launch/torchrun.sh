#!/usr/bin/env bash
# torchrun on one node or on many, with every network and backend setting an explicit option.
# Run it once per node (by hand, by srun in launch/slurm.sbatch, by your scheduler):
#
#   bash launch/torchrun.sh --nproc-per-node 8 -- -m pretrain.train --config configs/gpt-1.3b.yaml --resume auto
#   bash launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node01:29500 --max-restarts 3 \
#       --socket-ifname ib0 -- -m pretrain.train --config configs/gpt-1.3b.yaml --resume auto     # on each node
#
# `bash launch/torchrun.sh --help` lists the options. The environment must already exist on every node
# (bash launch/setup.sh once, on the shared filesystem): this script installs nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/launcher_options.sh
source "$root/launch/launcher_options.sh"

usage() {
  cat <<'EOF'
usage: bash launch/torchrun.sh [OPTIONS] -- PYTHON_ARGS...    (e.g. -- -m pretrain.train --config FILE --resume auto)

Processes
  --nnodes N               nodes taking part (default 1; MIN:MAX for an elastic job)
  --nproc-per-node N       processes on this node (default: the GPUs nvidia-smi lists, else 1)
  --node-rank R            this node's rank, 0..N-1, for --rdzv-backend static (default $NODE_RANK, else
                           $SLURM_NODEID, else 0); c10d assigns node ranks itself, ordered by --local-addr
  --max-restarts N         restart all workers up to N times after a failure (default 0), with the same
                           command line: give the training --resume auto so a restart resumes
Rendezvous
  --rdzv-endpoint H:P      where the nodes meet (default $MASTER_ADDR:$MASTER_PORT; needed when nnodes > 1)
  --master-addr H          the endpoint's host (default $MASTER_ADDR, else 127.0.0.1)
  --master-port P          the endpoint's port (default $MASTER_PORT, else 29500)
  --rdzv-backend B         c10d (default; needed for restarts and elastic sizes) or static
  --rdzv-id ID             job id shared by the nodes (default $SLURM_JOB_ID, else pretrain)
  --rdzv-timeout S         seconds to wait for every node to join (default 900)
  --local-addr A           this node's address as the other nodes reach it (default: its FQDN)
  --rdzv-host auto|yes|no  whether this node hosts the c10d rendezvous store (default auto: yes when the
                           endpoint is an address of one of this node's interfaces, which torch's own
                           hostname match misses on secondary NICs; else torch decides)
Network and backend
  --socket-ifname IF       network interface for both NCCL and gloo (sets NCCL_SOCKET_IFNAME and
                           GLOO_SOCKET_IFNAME; default: unset, the libraries pick one)
  --nccl-socket-ifname IF  NCCL only (comma list; NCCL matches prefixes and ^exclusions, e.g. ^docker,lo)
  --gloo-socket-ifname IF  gloo only (comma list of exact interface names)
  --pg-timeout MIN         timeout of every collective, minutes (DEEPSPEED_TIMEOUT; default 30)
  --shutdown-timeout S     after SIGTERM/SIGINT/SIGUSR1, seconds the workers get to save a checkpoint and
                           exit before SIGKILL (default 300); torchrun forwards these signals to every worker
Other
  --dry-run                print the environment and the command instead of running them
  -h, --help               this text

Also set unless already in the environment: TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (a failed or timed-out NCCL
collective tears the process down, so torchrun can restart it), PYTHONPATH (this checkout).
Environment: PRETRAIN_VENV (default .venv) selects the virtual environment.
EOF
}

gpu_count() {
  if command -v nvidia-smi > /dev/null 2>&1; then
    local n
    n="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)"
    if is_pos "${n:-0}"; then echo "$n"; return; fi
  fi
  echo 1
}

nnodes=1
nproc=""
node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
max_restarts=0
endpoint=""
rdzv_backend=c10d
rdzv_id="${SLURM_JOB_ID:-pretrain}"
rdzv_timeout=900
local_addr=""
rdzv_host=auto
shutdown_timeout=300

while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) need "$@"; nnodes="$2"; shift 2 ;;
    --nproc-per-node|--nproc_per_node) need "$@"; nproc="$2"; shift 2 ;;
    --node-rank|--node_rank) need "$@"; node_rank="$2"; shift 2 ;;
    --max-restarts|--max_restarts) need "$@"; max_restarts="$2"; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) need "$@"; endpoint="$2"; shift 2 ;;
    --rdzv-backend|--rdzv_backend) need "$@"; rdzv_backend="$2"; shift 2 ;;
    --rdzv-id|--rdzv_id) need "$@"; rdzv_id="$2"; shift 2 ;;
    --rdzv-timeout) need "$@"; rdzv_timeout="$2"; shift 2 ;;
    --local-addr|--local_addr) need "$@"; local_addr="$2"; shift 2 ;;
    --rdzv-host) need "$@"; rdzv_host="$2"; shift 2 ;;
    --shutdown-timeout) need "$@"; shutdown_timeout="$2"; shift 2 ;;
    --) shift; break ;;
    *) shared_option "$@" || unknown_option "$1"; shift "$shared_shift" ;;  # launch/launcher_options.sh
  esac
done
[ $# -gt 0 ] || { usage >&2; exit 2; }

# ---------------------------------------------------------------------------------- checks
[ -n "$nproc" ] || nproc="$(gpu_count)"
is_pos "$nproc" || die "--nproc-per-node: '$nproc' is not a positive integer"
if [[ "$nnodes" =~ ^([1-9][0-9]*):([1-9][0-9]*)$ ]]; then
  [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ] || die "--nnodes: '$nnodes': MIN must not exceed MAX"
  max_nodes="${BASH_REMATCH[2]}"
elif is_pos "$nnodes"; then
  max_nodes="$nnodes"
else
  die "--nnodes: '$nnodes' is not a positive integer or MIN:MAX"
fi
is_uint "$node_rank" || die "--node-rank: '$node_rank' is not a non-negative integer"
is_uint "$max_restarts" || die "--max-restarts: '$max_restarts' is not a non-negative integer"
is_pos "$rdzv_timeout" || die "--rdzv-timeout: '$rdzv_timeout' is not a positive number of seconds"
net_check
is_uint "$shutdown_timeout" || die "--shutdown-timeout: '$shutdown_timeout' is not a non-negative number of seconds"
case "$rdzv_backend" in c10d|static) ;; *) die "--rdzv-backend: '$rdzv_backend' is not allowed; allowed: c10d, static" ;; esac
case "$rdzv_host" in auto|yes|no) ;; *) die "--rdzv-host: '$rdzv_host' is not allowed; allowed: auto, yes, no" ;; esac

if [ -z "$endpoint" ] && { [ -n "$master_addr" ] || [ -n "$master_port" ] || [ "$max_nodes" -gt 1 ]; }; then
  [ "$max_nodes" -eq 1 ] || [ -n "$master_addr" ] || die "--nnodes $nnodes: the nodes need a meeting point: \
--rdzv-endpoint HOST:PORT (or --master-addr, or MASTER_ADDR) naming one node every node can reach"
  endpoint="${master_addr:-127.0.0.1}:${master_port:-29500}"
fi
if [ -n "$endpoint" ]; then
  [[ "$endpoint" =~ ^(.+):([0-9]+)$ ]] || die "--rdzv-endpoint: '$endpoint' is not HOST:PORT"
  rdzv_addr="${BASH_REMATCH[1]}"; port="${BASH_REMATCH[2]}"
  [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "--rdzv-endpoint: port $port is not in 1..65535"
fi

local_addresses() {  # every address of this node's interfaces (in this network namespace)
  if command -v ip > /dev/null 2>&1; then
    ip -o addr show 2> /dev/null | awk '{split($4, a, "/"); print a[1]}'
  elif hostname -I > /dev/null 2>&1; then
    hostname -I | tr ' ' '\n'
  fi
}
endpoint_is_local() {  # the endpoint's host, or what it resolves to, is an address of this node
  local want mine
  case "$1" in  # torch's own check gets these right (and falls back to a client if another process hosts)
    localhost|127.*|::1|"$(hostname)"|"$(hostname -f 2> /dev/null || hostname)") return 1 ;;
  esac
  want="$(printf '%s\n' "$1"; getent ahosts "$1" 2> /dev/null | awk '{print $1}')"
  mine="$(local_addresses)"
  [ -n "$mine" ] && grep -qxF -f <(printf '%s\n' "$mine") <<< "$want"
}
if [ "$rdzv_backend" = static ]; then
  [[ "$nnodes" =~ ^[0-9]+$ ]] || die "--rdzv-backend static: --nnodes must be a fixed number, not '$nnodes'"
  [ "$node_rank" -lt "$nnodes" ] || die "--node-rank: $node_rank is not below --nnodes $nnodes (allowed 0..$((nnodes - 1)))"
fi

net_check_interfaces

has_resume=0
for a in "$@"; do case "$a" in --resume|--resume=*) has_resume=1 ;; esac; done
if [ "$max_restarts" -gt 0 ] && [ "$has_resume" = 0 ]; then
  echo "launch/torchrun.sh: warning: --max-restarts $max_restarts restarts the workers with this same command line," \
       "which has no --resume: a restart would train from step 0; add --resume auto" >&2
fi

venv="${PRETRAIN_VENV:-$root/.venv}"
[ -x "$venv/bin/torchrun" ] || die "no torchrun in $venv: run 'bash launch/setup.sh' once (on a shared filesystem, \
before launching) or point PRETRAIN_VENV at an environment"

# ----------------------------------------------------------------------------- environment
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
net_export

cmd=("$venv/bin/torchrun" --nproc-per-node "$nproc" --max-restarts "$max_restarts"
     --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown-timeout "$shutdown_timeout")
if [ -z "$endpoint" ]; then
  cmd+=(--standalone)  # one node, a free local port
else
  conf="join_timeout=$rdzv_timeout"
  if [ "$rdzv_backend" = c10d ]; then
    if [ "$rdzv_host" = yes ] || { [ "$rdzv_host" = auto ] && endpoint_is_local "$rdzv_addr"; }; then
      conf+=",is_host=1"
    elif [ "$rdzv_host" = no ]; then
      conf+=",is_host=0"
    fi
  fi
  cmd+=(--nnodes "$nnodes" --rdzv-backend "$rdzv_backend" --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id"
        --rdzv-conf "$conf")
  if [ "$rdzv_backend" = static ]; then cmd+=(--node-rank "$node_rank"); fi
  if [ -n "$local_addr" ]; then cmd+=(--local-addr "$local_addr"); fi
fi
cmd+=("$@")

if [ "$dry_run" = 1 ]; then
  for v in PYTHONPATH TORCH_NCCL_ASYNC_ERROR_HANDLING DEEPSPEED_TIMEOUT NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do
    if [ -n "${!v:-}" ]; then printf 'export %s=%q\n' "$v" "${!v}"; fi
  done
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "[launch] $(hostname): torchrun ${nproc} process(es) per node, nnodes ${nnodes}${endpoint:+, rendezvous $rdzv_backend at $endpoint}" \
     "(id $rdzv_id${local_addr:+, local address $local_addr}), max restarts ${max_restarts}${gloo_if:+, GLOO_SOCKET_IFNAME=$gloo_if}${nccl_if:+, NCCL_SOCKET_IFNAME=$nccl_if}" >&2
exec "${cmd[@]}"
