"""A real two-node run on one machine: two network namespaces joined by a veth pair, one torchrun
(launch/torchrun.sh) per "node", the c10d rendezvous on node 0's veth address and gloo bound to the
veth interface. The losses must equal those of the same job on one node (2 processes), since the
data-parallel reduction is the same; only the transport differs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, _env, run_module, tiny_args, train_losses

pytestmark = pytest.mark.distributed

STEPS = 6
SETS = [
    f"train.max_steps={STEPS}",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.diagnostics_every=0",
    "checkpoint.every=3",
]


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


class VethPair:
    """Two namespaces `<tag>a`/`<tag>b`, joined by veth `<tag>va` (10.231.<k>.1) <-> `<tag>vb` (.2)."""

    def __init__(self, tag: str, subnet: int):
        self.ns = (f"{tag}a", f"{tag}b")
        self.ifs = (f"{tag}va", f"{tag}vb")
        self.addrs = (f"10.231.{subnet}.1", f"10.231.{subnet}.2")

    def up(self) -> None:
        steps = [
            ("ip", "netns", "add", self.ns[0]),
            ("ip", "netns", "add", self.ns[1]),
            ("ip", "link", "add", self.ifs[0], "type", "veth", "peer", "name", self.ifs[1]),
        ]
        for i in (0, 1):
            steps += [
                ("ip", "link", "set", self.ifs[i], "netns", self.ns[i]),
                ("ip", "-n", self.ns[i], "addr", "add", f"{self.addrs[i]}/24", "dev", self.ifs[i]),
                ("ip", "-n", self.ns[i], "link", "set", self.ifs[i], "up"),
                ("ip", "-n", self.ns[i], "link", "set", "lo", "up"),
            ]
        for step in steps:
            proc = _sh(*step)
            if proc.returncode != 0:
                self.down()
                raise RuntimeError(f"{' '.join(step)}: {proc.stderr.strip()}")

    def down(self) -> None:
        for ns in self.ns:  # deleting a namespace deletes the veth end inside it, and so the pair
            _sh("ip", "netns", "del", ns)

    def exec_prefix(self, node: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[node]]


@pytest.fixture
def veth():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed, so network namespaces cannot be made")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (this test runs as uid %d)" % os.geteuid())
    pair = VethPair(f"pt{os.getpid() % 10000}", os.getpid() % 250 + 1)
    try:
        pair.up()
    except RuntimeError as err:
        pytest.skip(f"cannot make network namespaces here: {err}")
    yield pair
    pair.down()
    assert not any(ns in _sh("ip", "netns", "list").stdout.split() for ns in pair.ns), "namespaces left behind"


def test_two_namespaces_over_veth_train_like_one_node(bundled_dir, tmp_path, veth):
    one_dir = tmp_path / "one-node"
    ref = run_module(tiny_args(bundled_dir, one_dir, *SETS), nproc=2)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    two_dir = tmp_path / "two-nodes"
    env = _env({"PRETRAIN_VENV": str(Path(sys.executable).parent.parent)})
    endpoint = f"{veth.addrs[0]}:29611"
    procs, logs = [], []
    for node in (0, 1):
        cmd = (
            veth.exec_prefix(node)
            + [
                "bash",
                str(ROOT / "launch" / "torchrun.sh"),
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                f"two-node-{os.getpid()}",
                "--rdzv-timeout",
                "120",
                "--local-addr",
                veth.addrs[node],
                "--socket-ifname",
                veth.ifs[node],
                "--",
            ]
            + tiny_args(bundled_dir, two_dir, *SETS)
        )
        log = tmp_path / f"node{node}.log"
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n----\n".join(t[-3000:] for t in text)

    # each launcher bound gloo to its own veth end and met at node 0's veth address
    for node in (0, 1):
        assert f"GLOO_SOCKET_IFNAME={veth.ifs[node]}" in text[node] and f"rendezvous c10d at {endpoint}" in text[node]
    assert "world 2 = pp 1 x dp 2 x tp 1" in text[0] + text[1]

    one, two = train_losses(one_dir), train_losses(two_dir)
    assert sorted(two) == list(range(1, STEPS + 1))
    assert two == one, {s: (one[s], two[s]) for s in one}
    # both nodes wrote their part of the checkpoint into the shared run directory
    manifest = json.loads((two_dir / "checkpoints" / f"step_{STEPS:06d}" / "manifest.json").read_text())
    assert manifest
