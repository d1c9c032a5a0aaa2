"""A transformer block: two residual sublayers whose norm slots come from a LayerSpec.

    y = post_norm(alpha * x + out_norm(F(in_norm(x) * in_scale)))

Each Sublayer owns its norms (empty slots are identities without parameters). The block's forward
is the same for every placement: it carries (x, h) = (residual stream, normed input of the next
sublayer) and leaves each sublayer through a Junction (model/junction.py), which fuses the residual
add with the norms around it where the kernel backend can.
"""

from __future__ import annotations

import torch
from torch import nn

from model.norms import NormFactory
from model.placement import SublayerSpec
from model.recompute import recomputed


class Sublayer(nn.Module):
    def __init__(self, fn: nn.Module, spec: SublayerSpec, dim: int, norms: NormFactory, dropout: float):
        super().__init__()
        self.fn = fn
        self.in_norm = norms.optional(spec.in_norm, dim, scale=spec.in_scale)
        self.out_norm = norms.optional(spec.out_norm, dim)
        self.post_norm = norms.optional(spec.post_norm, dim)
        self.alpha = spec.residual_alpha
        self.dropout = nn.Dropout(dropout)


class Block(nn.Module):
    def __init__(self, layer: int, attn: nn.Module, mlp: nn.Module, spec, dim: int, norms: NormFactory, dropout: float):
        super().__init__()
        self.layer = layer  # global, 1-based
        self.attn = Sublayer(attn, spec.attn, dim, norms, dropout)
        self.mlp = Sublayer(mlp, spec.mlp, dim, norms, dropout)
        self.attn_exit = None  # Junctions, set by connect() once the next block is known
        self.mlp_exit = None
        self.recompute = False  # activation checkpointing (model/recompute.py)

    def connect(self, next_in_norm: nn.Module | None) -> None:
        """Wires the junctions; next_in_norm is the next block's input norm, the final norm after the
        last block, or None at a boundary (the next block then normalises its own input)."""
        from model.junction import Junction

        sequence_parallel = getattr(self.mlp_exit, "sequence_parallel", False)  # keep it when re-wiring
        self.attn_exit = Junction(
            self.attn.out_norm, self.attn.post_norm, self.attn.alpha, self.mlp.in_norm, self.attn.dropout
        )
        self.mlp_exit = Junction(self.mlp.out_norm, self.mlp.post_norm, self.mlp.alpha, next_in_norm, self.mlp.dropout)
        self.attn_exit.sequence_parallel = self.mlp_exit.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: residual stream entering the block; h: its normed attention input when the previous
        junction computed it. Returns (x, h) for the next block."""
        if self.recompute and torch.is_grad_enabled():
            return recomputed(self._forward, x, h)
        return self._forward(x, h)

    def _forward(self, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if h is None:
            h = self.attn.in_norm(x)
        x, h = self.attn_exit(x, self.attn.fn(h))
        return self.mlp_exit(x, self.mlp.fn(h))

    def junction_norms(self) -> list[nn.Parameter]:
        """Norm parameters this block's forward reads without calling their module (ZeRO-3 must
        gather them for this block: deepspeed.zero.register_external_parameter)."""
        return [p for j in (self.attn_exit, self.mlp_exit) for n in j.norms() for p in n.parameters()]
