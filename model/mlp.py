"""Feed-forward sublayers: SwiGLU (Llama) and GELU (GPT-2); sigma_reparam: model/sigma_reparam.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_kernels
from model.sigma_reparam import linear


class SwiGLU(nn.Module):
    """fc2(silu(gate) * up) with gate and up computed by one fused fc1 ([gate; up] rows)."""

    def __init__(self, hidden: int, ffn: int, bias: bool, sigma_reparam: bool = False):
        super().__init__()
        self.fc1 = linear(hidden, 2 * ffn, bias, sigma_reparam)
        self.fc2 = linear(ffn, hidden, bias, sigma_reparam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(swiglu(self.fc1(x)))


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool, sigma_reparam: bool = False):
        super().__init__()
        self.fc1 = linear(hidden, ffn, bias, sigma_reparam)
        self.fc2 = linear(ffn, hidden, bias, sigma_reparam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP}


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused [gate; up] projection output (last dimension 2F -> F)."""
    if torch.compiler.is_compiling():  # inductor fuses the expression and writes its own backward
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_up)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up with a hand-written backward. Autograd of the composition saves silu(gate) too
    (an [tokens x F] activation per block) and concatenates the two halves' gradients in backward; this
    saves only the input, recomputes silu(gate), and writes both halves of the gradient into one tensor.
    The halves are taken as 2-D views: on a 3-D strided half, CPU eager silu runs 2x slower."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        fused = cpu_kernels.usable(gate_up)
        if fused is not None:  # one pass (kernels/cpu_kernels.py)
            return fused.swiglu_forward(gate_up)
        gate, up = _halves(gate_up)
        return F.silu(gate).mul_(up).view(*gate_up.shape[:-1], gate.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        fused = cpu_kernels.usable(gate_up, grad)
        if fused is not None:
            return fused.swiglu_backward(gate_up, grad)
        gate, up = _halves(gate_up)
        grad = grad.reshape(gate.shape)
        out = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        d_gate, d_up = _halves(out)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        torch.mul(F.silu(gate), grad, out=d_up)
        return out


def _halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = gate_up.reshape(-1, gate_up.shape[-1])
    return flat.chunk(2, dim=-1)
