"""DeepSpeed hostfiles (`host slots=N`, MPI style): parse, validate, and check against a config.

    python -m launch.hostfile check hosts.txt                              # syntax, slots, duplicates, names resolve
    python -m launch.hostfile check hosts.txt --config configs/gpt-1.3b.yaml [--set ...] [--gpu-memory 80GB]
    python -m launch.hostfile get hosts.txt master|world|hosts|slots

A hostfile lists one node per line: its name (as the launching node reaches it over ssh) and its GPU
count. `#` starts a comment (a whole line, or the rest of one); blank lines are ignored:

    # two H100 nodes
    node01 slots=8
    node02 slots=8   # rack 2

DeepSpeed's own parser stops at the first match of `HOST slots=N` and ignores whatever follows on the
line; this one rejects anything it does not understand, naming the line and the value, before a job
starts. With --config the world size (the sum of the slots) is checked against the layout and the
batch (launch/plan.py): divisibility, and whether it fits in GPU memory.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from kernels.errors import UsageError
from pretrain.cli import run

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]+\]?")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


class HostfileError(UsageError):
    """A hostfile problem; the message names the file, the line and the value."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def parse_hostfile(text: str, name: str = "hostfile") -> list[Host]:
    hosts: list[Host] = []
    where: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        at = f"{name}:{number}"
        fields = line.split()
        host = fields[0]
        if host.startswith("slots="):
            raise HostfileError(f"{at}: '{raw.strip()}': the line starts with slots=; expected 'HOST slots=N'")
        if not _HOST.fullmatch(host):
            raise HostfileError(f"{at}: '{host}' is not a host name or address")
        if len(fields) == 1:
            raise HostfileError(f"{at}: '{host}' has no slots; write '{host} slots=N' (N = its GPUs)")
        if len(fields) > 2:
            raise HostfileError(
                f"{at}: '{raw.strip()}': unexpected '{' '.join(fields[2:])}' after the slots "
                f"(one 'HOST slots=N' per line; comments start with #)"
            )
        m = re.fullmatch(r"slots=(.*)", fields[1])
        if not m:
            raise HostfileError(f"{at}: '{fields[1]}' is not slots=N (e.g. '{host} slots=8')")
        value = m.group(1)
        if not re.fullmatch(r"\d+", value):
            raise HostfileError(f"{at}: slots='{value}' for {host} is not a whole number of GPUs")
        slots = int(value)
        if slots < 1:
            raise HostfileError(
                f"{at}: slots={slots} for {host}; a host needs at least 1 slot (leave it out of the file instead)"
            )
        if host in where:
            raise HostfileError(
                f"{at}: '{host}' is listed again (first on line {where[host]}); each host once, with all its slots"
            )
        where[host] = number
        hosts.append(Host(host, slots, number))
    if not hosts:
        raise HostfileError(f"{name}: no hosts (every line is blank or a comment); expected lines 'HOST slots=N'")
    return hosts


def read_hostfile(path: str | Path) -> list[Host]:
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile '{path}' does not exist")
    return parse_hostfile(path.read_text(), str(path))


def unresolvable(hosts: list[Host], name: str = "hostfile") -> list[str]:
    """One problem per host name that does not resolve here (the launcher would fail to ssh to it
    after the job was queued, or the ranks would wait for it until the rendezvous times out)."""
    problems = []
    for h in hosts:
        try:
            socket.getaddrinfo(h.name.strip("[]"), None)
        except (socket.gaierror, UnicodeError) as e:
            problems.append(
                f"{name}:{h.line}: '{h.name}' does not resolve ({getattr(e, 'strerror', None) or e}); fix the name, "
                "or its entry in DNS / /etc/hosts"
            )
    return problems


def world_size(hosts: list[Host]) -> int:
    return sum(h.slots for h in hosts)


def is_local(host: str) -> bool:
    return host in LOCAL_NAMES or host in (socket.gethostname(), socket.getfqdn())


def master_addr(hosts: list[Host]) -> str:
    """Where the ranks meet: the first host (rank 0 runs there), 127.0.0.1 for a local one."""
    return "127.0.0.1" if hosts[0].name in LOCAL_NAMES else hosts[0].name


def check_against_config(hosts: list[Host], cfg, gpu_memory: int | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) for running `cfg` on these hosts."""
    from launch.plan import PlanError, make_plan, parse_memory

    errors, warnings = [], []
    slots = {h.slots for h in hosts}
    tp = cfg.parallel.tp
    if len(slots) > 1:
        warnings.append(
            "hosts have different slot counts ("
            + ", ".join(f"{h.name}={h.slots}" for h in hosts)
            + "): ranks fill the hosts in file order"
        )
    straddle = [h for h in hosts if h.slots % tp]
    if straddle:
        warnings.append(
            f"parallel.tp={tp} does not divide the slots of "
            + ", ".join(f"{h.name} ({h.slots})" for h in straddle)
            + ": some tensor-parallel groups will span two hosts"
        )
    world = world_size(hosts)
    # Equal hosts: plan them as nodes x slots; unequal: as one pool of `world` GPUs (the rank map's node
    # column is then not meaningful, the sizes and the memory are).
    nodes, per_node = (len(hosts), hosts[0].slots) if len(slots) == 1 else (1, world)
    try:
        plan = make_plan(cfg, nodes, per_node, gpu_memory or parse_memory("80GB"), search=False)
    except PlanError as e:
        errors += [f"hostfile: {len(hosts)} host(s), {world} slots: {p}" for p in e.problems]
        return errors, warnings
    if plan.verdict == "does not fit":
        errors.append(
            f"{world} GPUs: the estimate ({plan.worst.total / 2**30:.1f} GiB per GPU) does not fit in "
            f"{plan.gpu_memory / 2**30:.0f} GiB; python -m launch.plan --config ... --nodes {nodes} "
            f"--gpus-per-node {per_node} lists the changes that would"
        )
    warnings += plan.warnings
    return errors, warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.hostfile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate a hostfile (and the config on its world size)")
    c.add_argument("hostfile")
    c.add_argument("--config")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--gpu-memory", default="80GB")
    c.add_argument("--vocab-size", type=int, default=None)
    c.add_argument("--no-resolve", action="store_true", help="do not check that every host name resolves")
    g = sub.add_parser("get", help="print one fact: master (first host's address), world, hosts, slots")
    g.add_argument("hostfile")
    g.add_argument("what", choices=["master", "world", "hosts", "slots", "local"])
    args = p.parse_args(argv)
    hosts = read_hostfile(args.hostfile)
    if args.cmd == "get":
        print(
            {
                "master": lambda: master_addr(hosts),
                "world": lambda: world_size(hosts),
                "hosts": lambda: " ".join(h.name for h in hosts),
                "slots": lambda: " ".join(str(h.slots) for h in hosts),
                "local": lambda: int(len(hosts) == 1 and is_local(hosts[0].name)),
            }[args.what]()
        )
        return 0
    summary = ", ".join(f"{h.name} ({h.slots})" for h in hosts)
    print(f"[hostfile] {args.hostfile}: {len(hosts)} host(s), {world_size(hosts)} slots: {summary}", file=sys.stderr)
    if not args.no_resolve and (problems := unresolvable(hosts, args.hostfile)):
        raise HostfileError("\n".join(problems))
    if args.config:
        from launch.plan import load_plan_config, parse_memory

        cfg = load_plan_config(args.config, args.set, args.vocab_size)
        errors, warnings = check_against_config(hosts, cfg, parse_memory(args.gpu_memory))
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        if errors:
            raise HostfileError("\n".join(errors))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
