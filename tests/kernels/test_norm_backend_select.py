"""Backend selection: auto picks and explains; an explicit request that cannot run is a clear
error naming the backend, the device and what is missing; unknown names list the choices."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kernels import BACKEND_CHOICES, BackendUnavailableError, NormOps, resolve_backend, triton_common, triton_norm

ROOT = Path(__file__).resolve().parents[2]
OP_NAMES = ("rms_norm", "layer_norm", "add_norm", "peri_junction")


def install_fake_apex(monkeypatch, with_extension=True):
    """Make `apex.normalization.fused_layer_norm` (and its CUDA extension) importable."""
    apex = types.ModuleType("apex")
    norm = types.ModuleType("apex.normalization")
    fln = types.ModuleType("apex.normalization.fused_layer_norm")
    fln.fused_rms_norm_affine = lambda *a, **k: None
    fln.fused_layer_norm_affine = lambda *a, **k: None
    apex.normalization, norm.fused_layer_norm = norm, fln
    for name, mod in (("apex", apex), ("apex.normalization", norm), ("apex.normalization.fused_layer_norm", fln)):
        monkeypatch.setitem(sys.modules, name, mod)
    if with_extension:
        monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda"))
    else:
        monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", None)  # import fails
    return fln


def hide_apex(monkeypatch):
    # None in sys.modules makes `import` raise ImportError, as on a machine without apex.
    for name in ("apex", "apex.normalization", "apex.normalization.fused_layer_norm", "fused_layer_norm_cuda"):
        monkeypatch.setitem(sys.modules, name, None)


def test_choices():
    assert BACKEND_CHOICES == ("auto", "triton", "apex", "torch")


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="'cudnn' is not a backend; allowed: auto, triton, apex, torch"):
        resolve_backend("cudnn", "cpu")


def test_every_backend_has_the_same_ops(device):
    for name in ("torch", "triton"):
        ops, _ = resolve_backend(name, device)
        assert isinstance(ops, NormOps) and ops.name == name
        assert all(callable(getattr(ops, op)) for op in OP_NAMES)


def test_auto_on_cpu_is_torch_with_a_reason():
    ops, reason = resolve_backend("auto", "cpu")
    assert ops.name == "torch"
    assert reason.startswith("torch: auto on cpu") and "CUDA" in reason


def test_torch_requested():
    ops, reason = resolve_backend("torch", "cpu")
    assert ops.name == "torch" and "requested" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter path")
def test_triton_on_cpu_under_the_interpreter():
    assert triton_norm.interpreter_active()
    ops, reason = resolve_backend("triton", "cpu")
    assert ops.name == "triton" and "interpreted" in reason


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_norm, "interpreter_active", lambda: False)
    msg = r"'triton' cannot run on device 'cpu'.*CUDA GPU.*TRITON_INTERPRET"
    with pytest.raises(BackendUnavailableError, match=msg):
        resolve_backend("triton", "cpu")


def test_triton_without_interpreter_in_a_fresh_process():
    # The real thing, not a monkeypatch: kernels imported without TRITON_INTERPRET on a machine
    # (or view) with no GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = (
        "from kernels import resolve_backend, BackendUnavailableError\n"
        "try:\n    resolve_backend('triton', 'cpu')\nexcept BackendUnavailableError as e:\n    print('ERR', e)\n"
        "try:\n    resolve_backend('triton', 'cuda')\nexcept BackendUnavailableError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout
    assert "'triton' cannot run on device 'cpu'" in lines[0] and "TRITON_INTERPRET" in lines[0]
    assert "'triton' cannot run on device 'cuda'" in lines[1] and "torch.cuda.is_available() is False" in lines[1]


def test_triton_on_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = r"'triton' cannot run on device 'cuda'.*is_available\(\) is False"
    with pytest.raises(BackendUnavailableError, match=msg):
        resolve_backend("triton", "cuda")


def test_triton_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(BackendUnavailableError, match=r"'triton' cannot run.*'triton' package is not importable"):
        resolve_backend("triton", "cuda")


def test_auto_on_cuda_picks_triton(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ops, reason = resolve_backend("auto", "cuda")
    assert ops.name == "triton" and reason.startswith("triton: auto on cuda")


def test_auto_on_cuda_above_triton_maximum_falls_back_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hide_apex(monkeypatch)
    h = triton_common.MAX_HIDDEN + 1
    ops, reason = resolve_backend("auto", "cuda", hidden_size=h)
    assert ops.name == "torch" and f"hidden size {h}" in reason and "apex" in reason
    install_fake_apex(monkeypatch)
    ops, reason = resolve_backend("auto", "cuda", hidden_size=h)
    assert ops.name == "apex" and f"hidden size {h}" in reason


def test_apex_not_importable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hide_apex(monkeypatch)
    with pytest.raises(BackendUnavailableError) as e:
        resolve_backend("apex", "cuda")
    msg = str(e.value)
    assert "'apex' cannot run on device 'cuda'" in msg
    assert "'apex.normalization.fused_layer_norm' is not importable" in msg
    assert "triton or torch" in msg


def test_apex_on_cpu_is_a_clear_error(monkeypatch):
    install_fake_apex(monkeypatch)
    with pytest.raises(BackendUnavailableError, match=r"'apex' cannot run on device 'cpu'.*CUDA-only"):
        resolve_backend("apex", "cpu")


def test_apex_without_its_cuda_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    install_fake_apex(monkeypatch, with_extension=False)
    with pytest.raises(BackendUnavailableError, match="fused_layer_norm_cuda' is not importable"):
        resolve_backend("apex", "cuda")


def test_apex_importable_is_selected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    install_fake_apex(monkeypatch)
    ops, reason = resolve_backend("apex", "cuda")
    assert ops.name == "apex" and reason.startswith("apex: requested")
    assert all(callable(getattr(ops, op)) for op in OP_NAMES)


def test_auto_on_cuda_without_triton_uses_apex_then_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)
    install_fake_apex(monkeypatch)
    ops, reason = resolve_backend("auto", "cuda")
    assert ops.name == "apex" and "triton cannot run" in reason
    hide_apex(monkeypatch)
    ops, reason = resolve_backend("auto", "cuda")
    assert ops.name == "torch" and "triton cannot run" in reason and "apex cannot either" in reason
