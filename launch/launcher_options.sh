# Sourced by launch/torchrun.sh and launch/deepspeed.sh (not run on its own): the options they share
# -- the network and backend settings (rendezvous host and port, the socket interfaces of NCCL and
# gloo, the collective timeout), --dry-run and --help -- parsed, checked and exported in one place,
# so that both launchers read the same flags the same way. Each script keeps its own `usage` text.
#
# After sourcing, the option loop of a script hands what it does not know itself to
#   shared_option "$@" || unknown_option "$1"; shift "$shared_shift"
# and, once the options are read, calls net_check (and net_check_interfaces where the interfaces are
# this node's), then net_export.

script_name="launch/$(basename "${BASH_SOURCE[1]}")"  # the sourcing script, as its messages name it

die() { echo "$script_name: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_pos() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
unknown_option() {
  echo "$script_name: unknown option '$1' (the program's arguments go after --)" >&2
  usage >&2
  exit 2
}

# Defaults: what the environment already says, so a job script's exports keep working.
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-}"
nccl_if="${NCCL_SOCKET_IFNAME:-}"
gloo_if="${GLOO_SOCKET_IFNAME:-}"
pg_timeout="${DEEPSPEED_TIMEOUT:-30}"
dry_run=0
shared_shift=0

shared_option() {  # reads one shared option at "$@", sets shared_shift to the words it took; false if "$1" is none
  shared_shift=2
  case "$1" in
    --master-addr|--master_addr) need "$@"; master_addr="$2" ;;
    --master-port|--master_port) need "$@"; master_port="$2" ;;
    --socket-ifname) need "$@"; nccl_if="$2"; gloo_if="$2" ;;
    --nccl-socket-ifname) need "$@"; nccl_if="$2" ;;
    --gloo-socket-ifname) need "$@"; gloo_if="$2" ;;
    --pg-timeout) need "$@"; pg_timeout="$2" ;;
    --dry-run) dry_run=1; shared_shift=1 ;;
    -h|--help) usage; exit 0 ;;  # `usage` is the sourcing script's
    *) return 1 ;;
  esac
}

net_check() {
  is_pos "$pg_timeout" || die "--pg-timeout: '$pg_timeout' is not a positive number of minutes"
}

interfaces() { ls /sys/class/net 2> /dev/null | tr '\n' ' '; }
net_check_interfaces() {  # a misspelt interface fails here, not as a rendezvous timeout minutes later
  local wanted name prefix
  if [ -n "$gloo_if" ]; then
    IFS=',' read -r -a wanted <<< "$gloo_if"
    for name in "${wanted[@]}"; do
      [ -e "/sys/class/net/$name" ] || die "--gloo-socket-ifname/--socket-ifname: no network interface '$name' on \
$(hostname); this node has: $(interfaces)"
    done
  fi
  if [ -n "$nccl_if" ]; then
    IFS=',' read -r -a wanted <<< "$nccl_if"
    for name in "${wanted[@]}"; do
      case "$name" in ^*) continue ;; esac  # exclusions need not exist
      prefix="${name#=}"
      compgen -G "/sys/class/net/${prefix}*" > /dev/null || die "--nccl-socket-ifname/--socket-ifname: no network \
interface matching '$name' on $(hostname); this node has: $(interfaces)"
    done
  fi
}

net_export() {
  # A failed or timed-out NCCL collective tears the process down, so torchrun can restart it.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
  export DEEPSPEED_TIMEOUT="$pg_timeout"
  if [ -n "$nccl_if" ]; then export NCCL_SOCKET_IFNAME="$nccl_if"; fi
  if [ -n "$gloo_if" ]; then export GLOO_SOCKET_IFNAME="$gloo_if"; fi
}
