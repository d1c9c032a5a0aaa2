"""A transformer block: two residual sublayers whose norm slots come from a LayerSpec.

    y = post_norm(alpha * x + out_norm(F(in_norm(x) * in_scale)))

Empty slots are identities, so the forward is the same two lines for every placement.
"""
from __future__ import annotations

import torch
from torch import nn

from model.norms import NormFactory
from model.placement import SublayerSpec


class Sublayer(nn.Module):
    def __init__(self, fn: nn.Module, spec: SublayerSpec, dim: int, norms: NormFactory, dropout: float):
        super().__init__()
        self.fn = fn
        self.in_norm = norms.optional(spec.in_norm, dim, scale=spec.in_scale)
        self.out_norm = norms.optional(spec.out_norm, dim)
        self.post_norm = norms.optional(spec.post_norm, dim)
        self.alpha = spec.residual_alpha
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.dropout(self.out_norm(self.fn(self.in_norm(x))))
        # torch.add(branch, x, alpha=a) = branch + a * x in one op (a = 1 except DeepNorm).
        return self.post_norm(torch.add(branch, x, alpha=self.alpha))


class Block(nn.Module):
    def __init__(self, layer: int, attn: nn.Module, mlp: nn.Module, spec, dim: int, norms: NormFactory,
                 dropout: float):
        super().__init__()
        self.layer = layer  # global, 1-based
        self.attn = Sublayer(attn, spec.attn, dim, norms, dropout)
        self.mlp = Sublayer(mlp, spec.mlp, dim, norms, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))
