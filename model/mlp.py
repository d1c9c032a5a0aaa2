"""Feed-forward sublayers: SwiGLU (Llama) and GELU (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """fc2(silu(gate) * up) with gate and up computed by one fused fc1 ([gate; up] rows)."""

    def __init__(self, hidden: int, ffn: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 2 * ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP}
