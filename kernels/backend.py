"""Choosing the norm implementation: `kernels.backend: auto | triton | apex | torch` in the config.

`auto` picks the best backend that can run on the device and says why (triton on CUDA, torch
on CPU); an explicitly requested backend that cannot run is an error naming the backend, the
device and what is missing, never a silent fallback.

Fused backends are imported lazily: importing this module must not import the Triton kernels,
because whether they run compiled or interpreted is fixed when they are first imported
(TRITON_INTERPRET), and the tests set that up first.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import torch_ops
from kernels.errors import ConfigError, EnvironmentCheckError

BACKEND_CHOICES = ("auto", "triton", "apex", "torch")

# Mirrors kernels.triton_common.MAX_HIDDEN without importing triton here (a test checks they agree).
TRITON_MAX_HIDDEN = 32768


class BackendUnavailableError(EnvironmentCheckError):
    """An explicitly requested norm backend cannot run on this device / install."""


@dataclass(frozen=True)
class NormOps:
    """The functions a backend provides; same signatures in every backend (kernels.torch_ops):

    rms_norm(x, weight, eps, scale=1.0) -> y
    layer_norm(x, weight, bias, eps, scale=1.0) -> y
    add_norm(x, residual, weight, bias, eps, scale=1.0, kind="rmsnorm") -> (x + residual, normed)
    peri_junction(f, residual, out_weight, out_bias, in_weight, in_bias, eps, scale=1.0,
                  kind="rmsnorm") -> (s, normed) with s = residual + N_out(f)
    crms_norm(x, weight, eps, scale=1.0) -> y   (CRMSNorm: kernels/torch_ops.py)

    kind is "rmsnorm", "layernorm" or "crmsnorm". No backend has a CRMSNorm kernel: crms_norm and the
    crmsnorm kind of add_norm / peri_junction are compositions around the backend's own RMSNorm
    (kernels.torch_ops.compressed / with_crmsnorm), so every backend runs them, unfused.
    """

    name: str
    rms_norm: Callable[..., torch.Tensor]
    layer_norm: Callable[..., torch.Tensor]
    add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    peri_junction: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    crms_norm: Callable[..., torch.Tensor] | None = None  # None: composed from rms_norm

    def __post_init__(self):
        if self.crms_norm is None:
            object.__setattr__(self, "crms_norm", torch_ops.compressed(self.rms_norm))


TORCH_OPS = NormOps(
    name="torch",
    rms_norm=torch_ops.rms_norm,
    layer_norm=torch_ops.layer_norm,
    add_norm=torch_ops.add_norm,
    peri_junction=torch_ops.peri_junction,
    crms_norm=torch_ops.crms_norm,
)


def _ops_from(name: str, module) -> NormOps:
    crms_norm = torch_ops.compressed(module.rms_norm)
    add_norm, peri_junction = torch_ops.with_crmsnorm(crms_norm, module.add_norm, module.peri_junction)
    return NormOps(
        name=name,
        rms_norm=module.rms_norm,
        layer_norm=module.layer_norm,
        add_norm=add_norm,
        peri_junction=peri_junction,
        crms_norm=crms_norm,
    )


def triton_missing(device: torch.device, hidden_size: int | None = None) -> str | None:
    """None when the Triton kernels can run on `device`, else what is missing."""
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"the 'triton' package is not importable ({e})"
    if hidden_size is not None and hidden_size > TRITON_MAX_HIDDEN:
        return (
            f"hidden size {hidden_size} exceeds the Triton norm kernels' maximum of "
            f"{TRITON_MAX_HIDDEN} (a row must fit in registers)"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (
                "torch.cuda.is_available() is False (a CPU-only torch build, or no GPU visible: "
                "check CUDA_VISIBLE_DEVICES and the driver)"
            )
        return None
    if device.type == "cpu":
        from kernels.triton_norm import interpreter_active

        if interpreter_active():
            return None
        return (
            "the Triton kernels need a CUDA GPU; on CPU they run only under the Triton "
            "interpreter (TRITON_INTERPRET=1 set before triton is first imported; for tests)"
        )
    return f"the Triton kernels run on cuda (or cpu under the interpreter), not on '{device.type}'"


def apex_missing(device: torch.device) -> str | None:
    """None when apex's fused norms can run on `device`, else what is missing."""
    from kernels import apex_ops

    problems = []
    if device.type != "cuda":
        problems.append(f"apex's fused norms are CUDA-only and the device is '{device.type}'")
    elif not torch.cuda.is_available():
        problems.append("torch.cuda.is_available() is False")
    missing = apex_ops.apex_missing()
    if missing is not None:
        problems.append(
            missing + "; apex is optional: build NVIDIA apex from source with its CUDA "
            "extensions, or choose kernels.backend: triton or torch"
        )
    return "; ".join(problems) if problems else None


def resolve_backend(requested: str, device: torch.device | str, hidden_size: int | None = None) -> tuple[NormOps, str]:
    """Returns the ops for `requested` on `device` and a sentence saying why they were picked.

    hidden_size (optional) lets `auto` avoid the Triton kernels above their maximum hidden size
    and makes an explicit `triton` request fail at build time rather than at the first forward.
    """
    device = torch.device(device)
    if requested not in BACKEND_CHOICES:
        raise ConfigError(f"kernels.backend: '{requested}' is not a backend; allowed: {', '.join(BACKEND_CHOICES)}")
    if requested == "torch":
        return TORCH_OPS, f"torch: requested in the config (device {device.type})"
    if requested == "triton":
        missing = triton_missing(device, hidden_size)
        if missing is not None:
            raise BackendUnavailableError(f"kernels.backend: 'triton' cannot run on device '{device}': {missing}")
        how = "interpreted on CPU (slow; for tests)" if device.type == "cpu" else "compiled for CUDA"
        return _ops_from("triton", importlib.import_module("kernels.functional")), (
            f"triton: requested in the config; fused Triton kernels {how}"
        )
    if requested == "apex":
        missing = apex_missing(device)
        if missing is not None:
            raise BackendUnavailableError(f"kernels.backend: 'apex' cannot run on device '{device}': {missing}")
        return _ops_from("apex", importlib.import_module("kernels.apex_ops")), (
            "apex: requested in the config; apex fused CUDA norms (scale, residual add and Peri "
            "junction are unfused compositions around them)"
        )
    # auto
    if device.type == "cuda":
        why_not_triton = triton_missing(device, hidden_size)
        if why_not_triton is None:
            return _ops_from("triton", importlib.import_module("kernels.functional")), (
                "triton: auto on cuda (fused Triton norm kernels, residual-add and Peri-junction fusions)"
            )
        why_not_apex = apex_missing(device)
        if why_not_apex is None:
            return _ops_from("apex", importlib.import_module("kernels.apex_ops")), (
                f"apex: auto on cuda because triton cannot run ({why_not_triton}) and apex is importable"
            )
        return TORCH_OPS, (
            f"torch: auto on cuda because triton cannot run ({why_not_triton}) and apex cannot either ({why_not_apex})"
        )
    if device.type == "cpu":
        return TORCH_OPS, (
            "torch: auto on cpu (the fused Triton and apex kernels need a CUDA GPU; the Triton "
            "interpreter is for tests only)"
        )
    return TORCH_OPS, f"torch: auto on {device.type} (no fused backend supports this device type)"
