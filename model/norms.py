"""Norm modules (RMSNorm, LayerNorm) that run on the selected kernel backend.

The module owns the parameters (gain, and bias for LayerNorm) and a constant `scale` (LayerNorm
Scaling's 1/sqrt(l)): a plain Python float, so it is neither trained nor saved in the state dict.
The computation itself is delegated to `kernels` so fused backends can replace it.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import NormOps


class Norm(nn.Module):
    def __init__(
        self, kind: str, dim: int, eps: float, ops: NormOps, *, zero_centered_gain: bool = False, scale: float = 1.0
    ):
        super().__init__()
        if kind not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm kind '{kind}': allowed rmsnorm, layernorm")
        self.kind = kind
        self.eps = eps
        self.ops = ops
        self.scale = float(scale)
        self.zero_centered_gain = zero_centered_gain
        # (1 + w) parameterisation starts at w = 0 so the effective gain starts at 1.
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered_gain else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def gain(self) -> torch.Tensor:
        return self.weight + 1.0 if self.zero_centered_gain else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return self.ops.rms_norm(x, self.gain(), self.eps, self.scale)
        return self.ops.layer_norm(x, self.gain(), self.bias, self.eps, self.scale)

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, dim={self.weight.shape[0]}, eps={self.eps}, scale={self.scale:.4g}, "
            f"backend={self.ops.name}" + (", zero_centered" if self.zero_centered_gain else "")
        )


class NormFactory:
    """Builds the norms of one model with the same kind, eps, gain style and backend."""

    def __init__(self, kind: str, eps: float, ops: NormOps, zero_centered_gain: bool):
        self.kind, self.eps, self.ops, self.zero_centered_gain = kind, eps, ops, zero_centered_gain

    def __call__(self, dim: int, scale: float = 1.0) -> Norm:
        return Norm(self.kind, dim, self.eps, self.ops, zero_centered_gain=self.zero_centered_gain, scale=scale)

    def optional(self, present: bool, dim: int, scale: float = 1.0) -> nn.Module:
        """A norm where a slot is filled, an identity (no parameters) where it is empty."""
        return self(dim, scale) if present else nn.Identity()
