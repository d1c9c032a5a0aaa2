"""Causal self-attention with RoPE, grouped-query attention and optional QK-norm.

Activations are sequence-first, (S, B, d), as in Megatron: sequence parallelism then splits and
gathers along the first dimension, which is contiguous. The fused QKV projection uses Megatron's
grouped layout: for each key/value head g, its q_per_kv query heads, then its key, then its value.
A contiguous split of the output dimension is then a split by KV group, which is what tensor
parallelism needs.

Under DeepSpeed-Ulysses (model/ulysses.py) x is this rank's slice of the sequence: queries and keys are
rotated at their global positions, then `ulysses` (DeepSpeed's DistributedAttention) exchanges heads for
sequence by all-to-all, so the attention core sees the whole sequence for a share of the heads.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_attention
from model.norms import NormFactory
from model.parallel_rng import TP_RNG
from model.recompute import recomputed
from model.rope import Rotary
from model.sigma_reparam import linear


class Attention(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        dropout: float,
        qk_norm: bool,
        norms: NormFactory,
        rotary: Rotary,
        qk_norm_scope: str = "head",
        sigma_reparam: bool = False,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden // num_heads
        self.q_per_kv = num_heads // num_kv_heads
        self.qkv = linear(hidden, (num_heads + 2 * num_kv_heads) * self.head_dim, bias, sigma_reparam)
        self.proj = linear(num_heads * self.head_dim, hidden, bias, sigma_reparam)
        # "head": one gain of head_dim shared by the heads; "layer": one norm over all heads (OLMo 2).
        per_layer = qk_norm_scope == "layer"
        self.qk_norm_per_layer = per_layer
        self.has_qk_norm = bool(qk_norm)
        self.q_norm = norms.optional(qk_norm, num_heads * self.head_dim if per_layer else self.head_dim)
        self.k_norm = norms.optional(qk_norm, num_kv_heads * self.head_dim if per_layer else self.head_dim)
        self.dropout = dropout
        self.rotary = rotary
        self.recompute_core = False  # selective activation checkpointing (model/recompute.py)
        self.ulysses = None  # DeepSpeed's DistributedAttention around self.attend (model/ulysses.py)
        self.sequence_shard = (0, 1)  # (this rank's slice, slices) of the sequence under Ulysses

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S, B, d) -> q (S, B, H, hd), k and v (S, B, Hkv, hd), normed and rotated."""
        qkv = self.qkv(x)  # under sequence parallelism x is a sequence shard and qkv the whole sequence
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.num_kv_heads, self.q_per_kv + 2, self.head_dim)
        index, slices = self.sequence_shard
        cos, sin = self.rotary.tables(s * slices, x.device, qkv.dtype)
        if slices > 1:  # this rank's tokens sit at positions index*s ... (index+1)*s - 1
            cos, sin = cos[index * s : (index + 1) * s], sin[index * s : (index + 1) * s]
        if not self.has_qk_norm and not torch.compiler.is_compiling():  # eager: split and rotated at once,
            return self.rotary.apply_qkv(qkv, self.num_heads, cos, sin)  # a backward without the split's cat
        # torch.split, not indexing: its backward is one cat, where three index backwards would each
        # zero-fill a tensor of qkv's size and copy into it (CPU, 2048 tokens x 768: 6.9 ms against 18.5)
        q, k, v = torch.split(qkv, [self.q_per_kv, 1, 1], dim=3)
        q = q.reshape(s, b, self.num_heads, self.head_dim)
        k, v = k.squeeze(3), v.squeeze(3)
        if self.qk_norm_per_layer:
            q = self.q_norm(q.reshape(s, b, -1)).view_as(q)
            k = self.k_norm(k.reshape(s, b, -1)).view_as(k)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        if torch.compiler.is_compiling():  # batch-major memory, as the eager path's: SDPA reads it faster
            q, k, v = (_batch_major(z) for z in (q, k, v))
        return q, k, v

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if cpu_attention.applies(q, p):  # fp32 CPU: our kernel, faster than SDPA's at short sequences
            return cpu_attention.causal_attention(q, k, v)
        with TP_RNG.fork() if p > 0 else nullcontext():  # this rank's heads: its own dropout stream
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=p, enable_gqa=self.num_kv_heads != self.num_heads
            )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over the sequence of q, k, v (S, B, heads, hd) -> (S, B, heads, hd)."""
        q, k, v = (z.permute(1, 2, 0, 3) for z in (q, k, v))  # (B, heads, S, hd) for SDPA
        y = recomputed(self._core, q, k, v) if self.recompute_core and torch.is_grad_enabled() else self._core(q, k, v)
        return y.permute(2, 0, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(x)
        y = self.attend(q, k, v) if self.ulysses is None else self.ulysses(q, k, v, 1)  # 1: the batch dimension
        s, b = y.shape[:2]
        return self.proj(y.reshape(s, b, self.num_heads * self.head_dim))


def _batch_major(x: torch.Tensor) -> torch.Tensor:
    """x (S, B, ...) with its memory in (B, S, ...) order; inductor writes the producing kernel's output so."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)
