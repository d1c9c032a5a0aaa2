"""Collectives take tensors on the group's device: NCCL refuses CPU tensors (the depth diagnostics once
all-reduced CPU float64 tensors, which would have crashed the first diagnostics step of a GPU run with
tp/pp/sp > 1). Every tensor collective in pretrain/ goes through pretrain.distributed.all_reduce, which
moves the tensor to the group's device; the model's own (tensor-parallel activations) live in
model/tensor_parallel.py. The scan below fails on any other call."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import pretrain.distributed as pd
from tests.conftest import ROOT

# torch.distributed / deepspeed.comm functions that take tensors (object collectives and barrier do not)
TENSOR_COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_coalesced",
    "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce",
    "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv",
}  # fmt: skip
DIST_MODULES = {"torch.distributed", "torch.distributed.distributed_c10d", "deepspeed.comm", "deepspeed.comm.comm"}
# (file, function or "*") allowed to call them, and why
ALLOWED = {
    ("pretrain/distributed.py", "all_reduce"): "the helper itself",
    ("pretrain/distributed.py", "all_gather"): "the helper itself",
    ("model/tp_mappings.py", "*"): "the tensor-parallel mappings: activations on the compute device; model/ "
    "cannot import pretrain/",
    ("model/ulysses.py", "*"): "the Ulysses sequence mappings and loss share: activations and the loss, on the "
    "compute device; model/ cannot import pretrain/",
}


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def collective_calls(path: Path) -> list[tuple[int, str, str]]:
    """(line, enclosing function, call) of every tensor collective called in `path`, whatever the import
    style (torch.distributed.x, `import torch.distributed as dist`, `from deepspeed import comm`, ...)."""
    tree = ast.parse(path.read_text(), str(path))
    modules = set(DIST_MODULES)  # names bound to a distributed module
    functions = set()  # names bound to a collective function
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in DIST_MODULES:
                    modules.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in TENSOR_COLLECTIVES:
                    functions.add(a.asname or a.name)
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                name = dotted(child.func)
                if name is not None:
                    base, _, attr = name.rpartition(".")
                    if (attr in TENSOR_COLLECTIVES and base in modules) or (not base and attr in functions):
                        found.append((child.lineno, function, name))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_every_tensor_collective_goes_through_the_helper():
    offenders = []
    for room in ("pretrain", "model"):
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, function, call in collective_calls(path):
                if (rel, function) not in ALLOWED and (rel, "*") not in ALLOWED:
                    offenders.append(f"{rel}:{line} in {function}(): {call}")
    assert not offenders, (
        "tensor collectives outside pretrain.distributed.all_reduce (NCCL needs the tensors on the group's "
        "device; the helper moves them there):\n  " + "\n  ".join(offenders)
    )


def test_the_scan_sees_every_import_style(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import torch\nimport torch.distributed as dist\nfrom deepspeed import comm\n"
        "from torch.distributed import broadcast as bc\n"
        "def f(t):\n    torch.distributed.all_reduce(t)\n    dist.all_gather_into_tensor(t, t)\n"
        "    comm.reduce_scatter_tensor(t, t)\n    bc(t, 0)\n    dist.all_gather_object([], 1)\n    dist.barrier()\n"
    )
    calls = [c for _, _, c in collective_calls(src)]
    assert calls == ["torch.distributed.all_reduce", "dist.all_gather_into_tensor", "comm.reduce_scatter_tensor", "bc"]


class FakeGroup:
    """torch.distributed as seen by the helper: an initialized world of 2 on `backend`, whose all_reduce
    records the device it was given and doubles the tensor (the sum of two equal ranks)."""

    def __init__(self, monkeypatch, backend: str):
        self.devices = []
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
        monkeypatch.setattr(torch.distributed, "all_reduce", self.all_reduce)

    def all_reduce(self, t, op=None, group=None):
        self.devices.append(t.device)
        t.mul_(2)


def test_gloo_collectives_run_on_cpu_and_leave_the_input_alone(monkeypatch):
    fake = FakeGroup(monkeypatch, "gloo")
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y = pd.all_reduce(x)
    assert fake.devices == [torch.device("cpu")]
    assert y.tolist() == [2.0, 4.0] and x.tolist() == [1.0, 2.0]
    assert pd.all_reduce_sum([1.5, 3.0]) == [3.0, 6.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL takes only CUDA tensors)")
def test_nccl_collectives_move_cpu_tensors_to_the_current_gpu(monkeypatch):
    fake = FakeGroup(monkeypatch, "nccl")
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)  # what diagnostics used to hand NCCL
    y = pd.all_reduce(x)
    assert fake.devices == [torch.device("cuda", torch.cuda.current_device())]
    assert y.device == x.device and y.tolist() == [2.0, 4.0]


def test_diagnostics_statistics_go_through_the_helper(monkeypatch):
    """The per-layer statistics under sequence parallelism: combined by the helper, on the group's device."""
    from pretrain import diagnostics

    fake = FakeGroup(monkeypatch, "gloo")
    x = torch.arange(12.0).reshape(3, 4)
    stats = diagnostics._residual_stats(x, shard_group=object())
    assert fake.devices == [torch.device("cpu")] * 2
    # two equal shards: n, the sum and the sum of squares double
    n, total, sq = 24, 2 * float(x.sum()), 2 * float(x.pow(2).sum())
    assert stats["var"] == pytest.approx((sq - total**2 / n) / (n - 1))
    assert stats["rms"] == pytest.approx((sq / n) ** 0.5)
