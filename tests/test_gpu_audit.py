"""The GPU-only paths found by reading the code (issue 19), each held by a test that runs here: no host
syncs in the model or the kernels (a CUDA graph or torch.compile would break on them), the RNG states a
checkpoint saves are CPU tensors that load back on the CPU (torch.cuda.set_rng_state takes nothing
else), and batches reach the device with their values. The collectives have their own file
(tests/test_collectives.py)."""

from __future__ import annotations

import ast
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

# Calls that copy a tensor to the host and wait for the device.
SYNCS = {"item", "tolist", "cpu", "numpy"}


def host_syncs(path, root=ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(root).as_posix()}:{node.lineno}: .{node.func.attr}()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SYNCS
    ]


def test_no_host_syncs_in_the_model_and_the_kernels():
    """What runs every micro-step on the device: the model's forward/backward and the norm kernels. The
    training loop syncs once per step, on purpose (the loss all ranks agree on, the bad-step verdict)."""
    paths = [path for room in ("model", "kernels") for path in sorted((ROOT / room).rglob("*.py"))]
    found = [hit for path in paths for hit in host_syncs(path)]
    assert found == [], "host syncs in per-micro-step code:\n  " + "\n  ".join(found)


def test_the_scan_finds_syncs(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f(x):\n    a = x.sum().item()\n    return x.tolist(), x.cpu(), x.float()\n")
    assert sorted(h.rsplit(": ", 1)[1] for h in host_syncs(src, tmp_path)) == [".cpu()", ".item()", ".tolist()"]


def draws() -> list:
    out = [torch.rand(3).tolist(), float(np.random.rand()), random.random()]
    if torch.cuda.is_available():
        out.append(torch.rand(3, device="cuda").tolist())
    return out


def test_rng_states_are_cpu_tensors_and_restore_through_a_checkpoint_file(tmp_path):
    """A checkpoint's RNG file is read with map_location=cpu; the saved states are CPU tensors (the CUDA
    generators' too), so set_rng_state accepts them on any machine and the next draws repeat."""
    from pretrain.checkpoint.rng import rng_state, set_rng_state
    from pretrain.checkpoint.safe_load import load_weights_only

    torch.manual_seed(3)
    state = rng_state()
    tensors = [state["torch"], *state.get("cuda", [])]
    assert all(t.device.type == "cpu" and t.dtype == torch.uint8 for t in tensors)
    torch.save(state, tmp_path / "rng.pt")
    expected = draws()
    set_rng_state(load_weights_only(tmp_path / "rng.pt"))
    assert draws() == expected


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_batches_reach_the_device_with_their_values(device):
    """On a GPU through pinned memory and a non-blocking copy (the caching host allocator keeps the pinned
    buffer until the copy is done): the values arrive intact even when the host tensor changes at once."""
    from pretrain.runner import _Runner

    runner = SimpleNamespace(device=torch.device(device))
    host = torch.arange(4096, dtype=torch.int64).reshape(8, 512)
    expected = host.clone()
    out = _Runner.to_device(runner, host)
    if device == "cuda":
        host.zero_()  # the copy was taken from a pinned staging buffer, not from this tensor
    assert out.device.type == device
    assert torch.equal(out.cpu(), expected)
