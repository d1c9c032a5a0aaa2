"""Rotary position embeddings, in the rotate-half convention (as Llama / Hugging Face)."""

from __future__ import annotations

import torch


class Rotary:
    """cos/sin tables computed in fp32 and cached per (length, device, dtype).

    Deliberately not a buffer: engines that cast the module to bf16 would otherwise round the
    tables, and they are cheap to rebuild.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict = {}

    def tables(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, device, dtype)
        if key not in self._cache:
            inv_freq = 1.0 / (
                self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
            )
            angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
            emb = torch.cat([angles, angles], dim=-1)
            self._cache = {key: (emb.cos().to(dtype), emb.sin().to(dtype))}
        return self._cache[key]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (seq, batch, heads, head_dim); cos, sin: (seq, head_dim)."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None, None, :] + rotated * sin[:, None, None, :]
