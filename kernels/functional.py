"""Functional API of the Triton backend: the same signatures as kernels.torch_ops.

These validate arguments (same messages as the torch path), then call the custom ops
(kernels/custom_ops.py, made differentiable by kernels/autograd.py; opaque to torch.compile).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.autograd import norm_fwd_op, peri_fwd_op
from kernels.checks import check_add_norm, check_params, check_peri_junction
from kernels.triton_common import block_size


def _check_input(what: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"{what}: expected floating-point tensors, got {t.dtype}")
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"{what}: all tensors must be on one device, got {dev} and {t.device}")
    block_size(tensors[0].shape[-1], what)  # hidden-size limit, with the message that names it


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float = 1.0) -> torch.Tensor:
    check_params("rms_norm", x.shape[-1], weight, None, True)
    _check_input("rms_norm", x, weight)
    return norm_fwd_op(x, None, weight, None, float(eps), float(scale), True)[0]


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, scale: float = 1.0
) -> torch.Tensor:
    check_params("layer_norm", x.shape[-1], weight, bias, False)
    _check_input("layer_norm", x, weight, *([bias] if bias is not None else []))
    return norm_fwd_op(x, None, weight, bias, float(eps), float(scale), False)[0]


def add_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, scale: float = 1.0,
             kind: str = "rmsnorm") -> tuple[Tensor, Tensor]:  # fmt: skip
    """(x + residual, N(x + residual) * scale) in one kernel."""
    is_rms = check_add_norm(x, residual, weight, bias, kind)
    _check_input("add_norm", x, residual, weight, *([bias] if bias is not None else []))
    y, s, _, _ = norm_fwd_op(x, residual, weight, bias, float(eps), float(scale), is_rms)
    return s, y


def peri_junction(f: Tensor, residual: Tensor, out_weight: Tensor, out_bias: Tensor | None, in_weight: Tensor,
                  in_bias: Tensor | None, eps: float, scale: float = 1.0,
                  kind: str = "rmsnorm") -> tuple[Tensor, Tensor]:  # fmt: skip
    """(s, N_in(s) * scale) with s = residual + N_out(f), in one kernel."""
    is_rms = check_peri_junction(f, residual, out_weight, out_bias, in_weight, in_bias, kind)
    biases = [b for b in (out_bias, in_bias) if b is not None]
    _check_input("peri_junction", f, residual, out_weight, in_weight, *biases)
    args = (f, residual, out_weight, out_bias, in_weight, in_bias, float(eps), float(scale), is_rms)
    s, y, *_ = peri_fwd_op(*args)
    return s, y
