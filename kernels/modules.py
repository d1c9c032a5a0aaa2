"""nn.Module forms of the norm ops, over any backend's NormOps.

The model builds its own norms (model/norms.py) and calls NormOps directly; these modules are
for everything else (benchmarks, tests, quick experiments) and show the intended parameter
layout: gain (and bias) per norm, a plain-float LNS scale, eps. With ops=None the backend is
resolved as `auto` for the input's device on first use.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.backend import NormOps, resolve_backend
from kernels.checks import check_kind


class _UsesOps(nn.Module):
    def __init__(self, ops: NormOps | None):
        super().__init__()
        self._ops = ops

    def ops_for(self, device: torch.device) -> NormOps:
        if self._ops is None:
            self._ops = resolve_backend("auto", device)[0]
        return self._ops


def _gain_and_bias(module: nn.Module, hidden: int, bias: bool, prefix: str = "") -> None:
    module.register_parameter(prefix + "weight", nn.Parameter(torch.ones(hidden)))
    module.register_parameter(prefix + "bias", nn.Parameter(torch.zeros(hidden)) if bias else None)


class RMSNorm(_UsesOps):
    def __init__(self, hidden_size: int, eps: float = 1e-5, scale: float = 1.0, ops: NormOps | None = None):
        super().__init__(ops)
        self.eps, self.scale = eps, float(scale)
        _gain_and_bias(self, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops_for(x.device).rms_norm(x, self.weight, self.eps, self.scale)


class LayerNorm(_UsesOps):
    def __init__(
        self, hidden_size: int, eps: float = 1e-5, bias: bool = True, scale: float = 1.0, ops: NormOps | None = None
    ):
        super().__init__(ops)
        self.eps, self.scale = eps, float(scale)
        _gain_and_bias(self, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops_for(x.device).layer_norm(x, self.weight, self.bias, self.eps, self.scale)


class _Junction(_UsesOps):
    """A fused residual junction: `norms` sets of parameters named <prefix>weight / <prefix>bias."""

    prefixes: tuple[str, ...] = ("",)

    def __init__(self, hidden_size: int, kind: str = "rmsnorm", eps: float = 1e-5, bias: bool = False,
                 scale: float = 1.0, ops: NormOps | None = None):  # fmt: skip
        super().__init__(ops)
        self.is_rms = check_kind(kind)
        self.kind, self.eps, self.scale = kind, eps, float(scale)
        for prefix in self.prefixes:
            _gain_and_bias(self, hidden_size, bias and not self.is_rms, prefix=prefix)


class AddNorm(_Junction):
    """forward(x, residual) -> (x + residual, N(x + residual) * scale)."""

    def forward(self, x, residual):
        ops = self.ops_for(x.device)
        return ops.add_norm(x, residual, self.weight, self.bias, self.eps, self.scale, kind=self.kind)


class PeriJunction(_Junction):
    """forward(f, residual) -> (s, N_in(s) * scale), s = residual + N_out(f).

    Holds both norms' parameters (out_weight/out_bias of this block's output norm, in_weight/
    in_bias of the next block's input norm)."""

    prefixes = ("out_", "in_")

    def forward(self, f, residual):
        ops = self.ops_for(f.device)
        out, nxt = (self.out_weight, self.out_bias), (self.in_weight, self.in_bias)
        return ops.peri_junction(f, residual, *out, *nxt, self.eps, self.scale, kind=self.kind)
