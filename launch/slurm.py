"""SLURM: render launch/slurm.sbatch for a config and a resource ask, and read SLURM's environment.

    python -m launch.slurm render --config configs/gpt-1.3b.yaml --nodes 2 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu [--account A] [--socket-ifname ib0] --out job.sbatch
    python -m launch.slurm nodes 'node[01-04,07],gpu-a[1-2]'     # one host name per line
    python -m launch.slurm env                                     # inside a job: shell exports for torch

`render` checks the config against the world size and the GPU memory first (launch/plan.py) and
refuses a job that cannot start or does not fit (--force renders it anyway). The host-list syntax is
SLURM's: comma-separated names, each with any number of bracketed ranges `[01-04,07]` (zero padding
kept, several brackets give their product: `r[1-2]n[1-2]` = r1n1 r1n2 r2n1 r2n2).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kernels.errors import PretrainError, UsageError
from pretrain.cli import run

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "launch" / "slurm.sbatch"


class SlurmError(UsageError):
    """A SLURM value that cannot be used; the message names the variable and the value."""


# ------------------------------------------------------------------------------- host lists


# one piece of a host name between bracketed ranges: what a DNS label or SLURM node name may hold, so
# nothing reaching a shell, an #SBATCH line or MASTER_ADDR can carry a newline or a metacharacter
_HOST_PART = re.compile(r"[A-Za-z0-9._-]+")
# partition / account / QOS names (SLURM allows comma lists of them)
_SLURM_NAME = re.compile(r"[\w.+,-]+")


def _split_top(text: str) -> list[str]:
    """Splits on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmError(f"host list '{text}': nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"host list '{text}': ']' without '['")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise SlurmError(f"host list '{text}': '[' without ']'")
    parts.append(cur)
    return parts


def _expand_range(spec: str, where: str) -> list[str]:
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise SlurmError(f"host list '{where}': '{item}' in [{spec}] is not a number or a range like 01-04")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise SlurmError(f"host list '{where}': range {lo}-{hi} runs backwards")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(text: str) -> list[str]:
    """SLURM_JOB_NODELIST -> host names in order ('node[01-03,07],gpu-a[1-2]' -> node01 node02 node03
    node07 gpu-a1 gpu-a2). Duplicates are an error (a node cannot be allocated twice)."""
    text = (text or "").strip()
    if not text:
        raise SlurmError("host list is empty")
    hosts: list[str] = []
    for part in _split_top(text):
        part = part.strip()
        if not part:
            raise SlurmError(f"host list '{text}': empty entry (two commas in a row?)")
        pieces = re.split(r"(\[[^\]]*\])", part)
        names = [""]
        for piece in pieces:
            if piece.startswith("["):
                choices = _expand_range(piece[1:-1], text)
                names = [n + c for n in names for c in choices]
            elif piece:
                if not _HOST_PART.fullmatch(piece):
                    raise SlurmError(
                        f"host list {text!r}: bad host name {piece!r} (letters, digits, '.', '_' and '-' only)"
                    )
                names = [n + piece for n in names]
        hosts += names
    seen = set()
    for h in hosts:
        if h in seen:
            raise SlurmError(f"host list '{text}': '{h}' appears twice")
        seen.add(h)
    return hosts


# ------------------------------------------------------------------------------ environment


def _int(env: dict, name: str, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SlurmError(f"{name}={raw!r} is not an integer") from None


def parse_gpus(raw: str | None) -> int | None:
    """SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE: '8', 'gpu:8', 'h100:8', 'gpu:h100:8' (first count of a
    comma list of types is summed: 'a100:4,v100:2' -> 6)."""
    if not raw:
        return None
    total = 0
    for item in raw.split(","):
        m = re.fullmatch(r"(?:[\w.-]+:)*(\d+)(?:\(.*\))?", item.strip())
        if not m:
            raise SlurmError(f"GPU count {raw!r}: '{item}' is not N, TYPE:N or gpu:TYPE:N")
        total += int(m.group(1))
    return total


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    nodes: list
    node_id: int  # this node's index in `nodes` (SLURM_NODEID)
    procid: int  # this task's global rank (SLURM_PROCID)
    localid: int  # this task's rank on its node (SLURM_LOCALID)
    ntasks: int  # tasks in the step (SLURM_NTASKS)
    gpus_per_node: int | None
    restart_count: int

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def master_addr(self) -> str:
        return self.nodes[0]

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks // self.nnodes

    def torch_env(self, port: int = 29500, per_task: bool = False) -> dict[str, str]:
        """What torch.distributed needs. Per node (torchrun in each task): MASTER_ADDR/PORT, NNODES, NODE_RANK.
        per_task (one srun task per GPU, no torchrun): also RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE."""
        env = {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(port),
            "NNODES": str(self.nnodes),
            "NODE_RANK": str(self.node_id),
        }
        if self.gpus_per_node:
            env["GPUS_PER_NODE"] = str(self.gpus_per_node)
        if per_task:
            env.update(
                RANK=str(self.procid),
                LOCAL_RANK=str(self.localid),
                WORLD_SIZE=str(self.ntasks),
                LOCAL_WORLD_SIZE=str(self.tasks_per_node),
            )
        return env


def job_from_env(env: dict | None = None) -> SlurmJob:
    """Reads and cross-checks SLURM's variables (as srun sets them in a task, or sbatch in the batch shell)."""
    env = dict(os.environ if env is None else env)
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise SlurmError("SLURM_JOB_ID is not set: not inside a SLURM job (use sbatch / srun)")
    raw = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not raw:
        raise SlurmError("SLURM_JOB_NODELIST (or SLURM_NODELIST) is not set")
    nodes = expand_nodelist(raw)
    nnodes = _int(env, "SLURM_NNODES", _int(env, "SLURM_JOB_NUM_NODES", len(nodes)))
    if nnodes != len(nodes):
        raise SlurmError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={raw!r} names {len(nodes)} nodes")
    node_id = _int(env, "SLURM_NODEID", 0)
    if not 0 <= node_id < nnodes:
        raise SlurmError(f"SLURM_NODEID={node_id} is outside 0..{nnodes - 1}")
    ntasks = _int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", nnodes))
    procid = _int(env, "SLURM_PROCID", 0)
    if not 0 <= procid < ntasks:
        raise SlurmError(f"SLURM_PROCID={procid} is outside 0..{ntasks - 1} (SLURM_NTASKS={ntasks})")
    localid = _int(env, "SLURM_LOCALID", 0)
    if ntasks % nnodes:
        raise SlurmError(f"SLURM_NTASKS={ntasks} tasks do not spread evenly over {nnodes} nodes; use --ntasks-per-node")
    if not 0 <= localid < ntasks // nnodes:
        raise SlurmError(f"SLURM_LOCALID={localid} is outside 0..{ntasks // nnodes - 1}")
    gpus = parse_gpus(env.get("SLURM_GPUS_ON_NODE")) or parse_gpus(env.get("SLURM_GPUS_PER_NODE"))
    return SlurmJob(
        job_id=job_id,
        nodes=nodes,
        node_id=node_id,
        procid=procid,
        localid=localid,
        ntasks=ntasks,
        gpus_per_node=gpus,
        restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
    )


# --------------------------------------------------------------------------------- rendering


def parse_time(text: str) -> int:
    """SLURM time limits -> seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise SlurmError(f"--time: '{text}' is not a SLURM time (MINUTES, HH:MM:SS, D-HH:MM:SS, ...)")
    d, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if d is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = a, b or 0, c or 0
        secs = ((d * 24 + h) * 60 + mi) * 60 + s
    elif c is not None:  # H:M:S
        secs = (a * 60 + b) * 60 + c
    elif b is not None:  # M:S
        secs = a * 60 + b
    else:  # M
        secs = a * 60
    if secs <= 0:
        raise SlurmError(f"--time: '{text}' is zero")
    return secs


@dataclass
class Ask:
    """A resource ask and the launch settings of one job."""

    nodes: int
    gpus_per_node: int
    time: str = "24:00:00"
    job_name: str = "pretrain"
    partition: str = ""
    account: str = ""
    qos: str = ""
    output: str = "%x-%j.out"
    exclusive: bool = True
    cpus_per_node: int = 0
    port: int = 29500
    max_restarts: int = 3
    socket_ifname: str = ""
    pg_timeout: int = 30
    signal_lead: int = 120
    env_script: str = ""
    extra_sbatch: tuple = ()

    def check(self) -> None:
        if self.nodes < 1:
            raise SlurmError(f"--nodes: {self.nodes} must be >= 1")
        if self.gpus_per_node < 1:
            raise SlurmError(f"--gpus-per-node: {self.gpus_per_node} must be >= 1")
        if not 1 <= self.port <= 65535:
            raise SlurmError(f"--port: {self.port} is not in 1..65535")
        if self.cpus_per_node < 0:
            raise SlurmError(f"--cpus-per-node: {self.cpus_per_node} must be >= 0")
        if self.max_restarts < 0:
            raise SlurmError(f"--max-restarts: {self.max_restarts} must be >= 0")
        if self.pg_timeout < 1:
            raise SlurmError(f"--pg-timeout: {self.pg_timeout} minutes must be >= 1")
        limit = parse_time(self.time)
        if not 30 <= self.signal_lead < limit:
            raise SlurmError(
                f"--signal-lead: {self.signal_lead} s must be at least 30 and below the time limit "
                f"({limit} s = --time {self.time})"
            )
        if not re.fullmatch(r"[\w.+-]+", self.job_name):
            raise SlurmError(f"--job-name: '{self.job_name}' may hold letters, digits and . _ + - only")
        # Values that land on #SBATCH lines: a newline would end the line and start a shell command.
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos)):
            if value and not _SLURM_NAME.fullmatch(value):
                raise SlurmError(f"{flag}: {value!r} is not a SLURM name (letters, digits, and . _ + , - only)")
        if not self.output or re.search(r"\s", self.output):
            raise SlurmError(f"--output: {self.output!r} must be a file name pattern without spaces or newlines")
        for flag, value in (("--socket-ifname", self.socket_ifname), ("--env-script", self.env_script)):
            if re.search(r"[\x00-\x1f\x7f]", value):
                raise SlurmError(f"--{flag.lstrip('-')}: {value!r} holds a newline or another control character")
        if self.socket_ifname and not re.fullmatch(r"[\w.:,^!-]+", self.socket_ifname):
            raise SlurmError(
                f"--socket-ifname: {self.socket_ifname!r} is not a network interface name (e.g. ib0, eth0)"
            )
        for line in self.extra_sbatch:
            if not line.startswith("--"):
                raise SlurmError(f"--sbatch: '{line}' is not an sbatch option (e.g. --sbatch=--qos=high)")
            if re.search(r"[\x00-\x1f\x7f]", line):
                raise SlurmError(f"--sbatch: {line!r} holds a newline or another control character (one option each)")


_SBATCH = re.compile(r"^#SBATCH\s+--([\w-]+)(?:=(.*))?$")


def render(ask: Ask, train_args: list[str], repo: Path = ROOT, template: Path = TEMPLATE) -> str:
    """The batch script for this ask: the template's #SBATCH lines and settings block filled in."""
    ask.check()
    for a in train_args:
        if a == "--resume" or a.startswith("--resume="):
            raise SlurmError("the batch script always resumes with --resume auto; drop --resume from the arguments")
    directives = {
        "job-name": ask.job_name,
        "nodes": str(ask.nodes),
        "gpus-per-node": str(ask.gpus_per_node),
        "time": ask.time,
        "signal": f"B:USR1@{ask.signal_lead}",
        "output": ask.output,
    }
    out, seen, in_settings = [], set(), False
    for line in template.read_text().splitlines():
        m = _SBATCH.match(line)
        if m:
            key = m.group(1)
            seen.add(key)
            if key == "exclusive" and not ask.exclusive:
                continue
            out.append(f"#SBATCH --{key}={directives[key]}" if key in directives else line)
        elif line.startswith("# >>> settings"):
            in_settings = True
            out.append(f"# >>> settings (rendered by python -m launch.slurm render, {time.strftime('%Y-%m-%d %H:%M')})")
            out += _settings(ask, train_args, repo)
        elif line.startswith("# <<< settings"):
            in_settings = False
            out.append(line)
        elif not in_settings:
            out.append(line)
    missing = set(directives) - seen
    if missing:
        raise SlurmError(f"template {template}: no #SBATCH line for {', '.join(sorted(missing))}")
    extra = [
        f"#SBATCH --{k}={v}" for k, v in (("partition", ask.partition), ("account", ask.account), ("qos", ask.qos)) if v
    ]
    if ask.cpus_per_node:
        extra.append(f"#SBATCH --cpus-per-task={ask.cpus_per_node}")
    extra += [f"#SBATCH {line}" for line in ask.extra_sbatch]
    at = max(i for i, line in enumerate(out) if line.startswith("#SBATCH")) + 1
    return "\n".join(out[:at] + extra + out[at:]) + "\n"


def _settings(ask: Ask, train_args: list[str], repo: Path) -> list[str]:
    q = shlex.quote
    return [
        f"REPO={q(str(repo))}",
        f"GPUS_PER_NODE={ask.gpus_per_node}",
        f"MASTER_PORT={ask.port}",
        f"MAX_RESTARTS={ask.max_restarts}",
        f"SOCKET_IFNAME={q(ask.socket_ifname)}",
        f"PG_TIMEOUT={ask.pg_timeout}",
        f"SHUTDOWN_TIMEOUT={max(ask.signal_lead - 10, 20)}",
        f"ENV_SCRIPT={q(ask.env_script)}",
        "TRAIN_ARGS=(" + " ".join(q(a) for a in train_args) + ' "$@")',
    ]


# --------------------------------------------------------------------------------------- CLI


def _render_main(args) -> int:
    from launch.plan import format_plan, load_plan_config, make_plan, parse_memory

    config = str(Path(args.config).resolve())
    train_args = ["--config", config] + [x for s in args.set for x in ("--set", s)]
    cfg = load_plan_config(config, args.set, args.vocab_size)
    # The render options are named after Ask's fields, but for these three.
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(Ask) if hasattr(args, f.name)}
    other = {
        "job_name": args.job_name or cfg.run.name,
        "exclusive": not args.no_exclusive,
        "extra_sbatch": tuple(args.sbatch),
    }
    ask = Ask(**(same | other))
    ask.check()
    if not args.no_check:
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, parse_memory(args.gpu_memory))
        print(format_plan(plan, args.config, map_limit=16), file=sys.stderr)
        if plan.verdict == "does not fit" and not args.force:
            raise PretrainError("the job does not fit in GPU memory (above); change the config or pass --force")
    script = render(ask, train_args)
    if args.out:
        Path(args.out).write_text(script)
        print(f"[slurm] wrote {args.out}: submit with  sbatch {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="write the batch script for a config and a resource ask")
    r.add_argument("--config", required=True)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--nodes", type=int, required=True)
    r.add_argument("--gpus-per-node", type=int, required=True)
    r.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    r.add_argument("--partition", default="")
    r.add_argument("--account", default="")
    r.add_argument("--qos", default="")
    r.add_argument("--job-name", default="", help="default: run.name")
    r.add_argument("--output", default="%x-%j.out", help="log file pattern (default %%x-%%j.out)")
    r.add_argument("--no-exclusive", action="store_true", help="do not ask for whole nodes")
    r.add_argument(
        "--cpus-per-node", type=int, default=0, help="CPUs for each node's task (default: the node's, with --exclusive)"
    )
    r.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
    r.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts after a failure (default 3)")
    r.add_argument("--socket-ifname", default="", help="NCCL/gloo network interface, e.g. ib0 (default: auto)")
    r.add_argument("--pg-timeout", type=int, default=30, help="collective timeout in minutes (default 30)")
    r.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        help="seconds before the time limit when SIGUSR1 asks for a checkpoint (default 120)",
    )
    r.add_argument("--env-script", default="", help="file sourced before launching (module load, conda ...)")
    r.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="--OPTION=VALUE",
        help="an extra #SBATCH line (repeatable), e.g. --sbatch=--constraint=h100",
    )
    r.add_argument("--gpu-memory", default="80GB", help="for the memory check (default 80GB)")
    r.add_argument("--vocab-size", type=int, default=None)
    r.add_argument("--no-check", action="store_true", help="skip the layout and memory check")
    r.add_argument("--force", action="store_true", help="render even when the estimate does not fit")
    r.add_argument("--out", default="", help="write here instead of stdout")
    n = sub.add_parser("nodes", help="expand a SLURM host list (default: $SLURM_JOB_NODELIST), one per line")
    n.add_argument("nodelist", nargs="?")
    e = sub.add_parser("env", help="inside a job: shell exports for torch.distributed from SLURM's variables")
    e.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    e.add_argument("--per-task", action="store_true", help="one task per GPU: also RANK, LOCAL_RANK, WORLD_SIZE")
    args = p.parse_args(argv)
    if args.cmd == "render":
        return _render_main(args)
    if args.cmd == "nodes":
        raw = args.nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if not raw:
            raise SlurmError("no host list given and SLURM_JOB_NODELIST is not set")
        print("\n".join(expand_nodelist(raw)))
    else:
        for k, v in job_from_env().torch_env(args.port, args.per_task).items():
            print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
