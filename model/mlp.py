"""Feed-forward sublayers: SwiGLU (Llama) and GELU (GPT-2); sigma_reparam: model/sigma_reparam.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.sigma_reparam import linear


class SwiGLU(nn.Module):
    """fc2(silu(gate) * up) with gate and up computed by one fused fc1 ([gate; up] rows)."""

    def __init__(self, hidden: int, ffn: int, bias: bool, sigma_reparam: bool = False):
        super().__init__()
        self.fc1 = linear(hidden, 2 * ffn, bias, sigma_reparam)
        self.fc2 = linear(ffn, hidden, bias, sigma_reparam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool, sigma_reparam: bool = False):
        super().__init__()
        self.fc1 = linear(hidden, ffn, bias, sigma_reparam)
        self.fc2 = linear(ffn, hidden, bias, sigma_reparam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP}
