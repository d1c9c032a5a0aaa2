"""Rotary position embeddings, in the rotate-half convention (as Llama / Hugging Face).

With c = cos and s = sin of each pair's angle (the tables repeat them over the two halves), rotating
x = (x1, x2) is

    y1 = x1 c - x2 s        y2 = x2 c + x1 s

and its backward is the inverse rotation: dx1 = dy1 c + dy2 s, dx2 = dy2 c - dy1 s. The autograd of
the textbook expression x * cos + cat(-x2, x1) * sin keeps a negated copy and a concatenation and, in
backward, zero-fills and copies each half (slice backward); the hand-written functions below run
the four half-size passes each way (eager only: dynamo cannot trace their strided `out=` writes, and
under torch.compile inductor fuses the plain expression anyway). The attention's fused form takes
the projection's q|k|v output at once and writes its gradient into one tensor, so the split that
separates q, k and v needs no cat in backward.

Outputs are laid out batch-major in memory ((B, S, heads, hd) order, shown as the model's (S, B,
heads, hd)): SDPA's CPU flash kernel reads each head's rows S-contiguous then (HF's layout), 15% faster
forward + backward than over the sequence-first stride (bench/RESULTS.md, issue 19).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import cpu_kernels


class Rotary:
    """cos/sin tables computed in fp32 and cached per (length, device, dtype).

    Deliberately not a buffer: engines that cast the module to bf16 would otherwise round the
    tables, and they are cheap to rebuild.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict = {}

    def tables(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            # Inside a compiled graph: an opaque op that computes them (a few thousand cos/sin per graph).
            # Filling the cache there is a side effect whose guard fails on the next call (the whole model
            # compiled twice, both graphs kept); the plain expression would be fused by inductor into each
            # rotation, one cos and one sin per element of q and k (35 ms of a 0.8 s step at quickstart size).
            return torch.ops.pretrain.rope_tables(length, self.head_dim, self.theta, dtype, device)
        key = (length, device, dtype)
        if key not in self._cache:
            self._cache = {key: _rope_tables(length, self.head_dim, self.theta, dtype, device)}
        return self._cache[key]

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (seq, batch, heads, head_dim); cos, sin: (seq, head_dim) from tables()."""
        if torch.compiler.is_compiling():  # inductor fuses the expression itself
            return _rotate(x, *_halves(cos, sin))
        return _Rotate.apply(x, *_halves(cos, sin))

    def apply_qkv(self, qkv: Tensor, q_heads: int, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """qkv: (seq, batch, kv_heads, q_heads/kv_heads + 2, head_dim), the fused projection's output
        grouped by KV head (q rows, then k, then v). Returns q (S, B, q_heads, hd) and k, v
        (S, B, kv_heads, hd), q and k rotated; their gradient is written into one tensor of qkv's shape.
        Eager only (dynamo cannot trace its strided writes): compiled, the caller splits and calls apply()."""
        return _RotateQKV.apply(qkv, q_heads, cos, sin)


@torch.library.custom_op("pretrain::rope_tables", mutates_args=())
def _rope_tables(
    length: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """cos and sin (length, head_dim), computed in fp32, then cast to dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@_rope_tables.register_fake
def _(length, head_dim, theta, dtype, device):
    return tuple(torch.empty(length, head_dim, dtype=dtype, device=device) for _ in range(2))


def _halves(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The first half of each table (the second repeats it), shaped to broadcast over (S, B, heads, hd/2)."""
    half = cos.shape[-1] // 2
    return cos[:, None, None, :half], sin[:, None, None, :half]


def _rotate(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """The rotation as one expression (what autograd and inductor see under torch.compile)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _batch_major(shape: torch.Size, like: Tensor) -> Tensor:
    """An uninitialised (S, B, ...) tensor whose memory is ordered (B, S, ...)."""
    return like.new_empty((shape[1], shape[0], *shape[2:])).transpose(0, 1)


def _rotate_into(out: Tensor, x: Tensor, c: Tensor, s: Tensor, sign: float) -> Tensor:
    """out = x rotated by +angle (sign 1) or -angle (sign -1, the backward); out and x may not overlap."""
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    return out


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor, s: Tensor) -> Tensor:
        ctx.save_for_backward(c, s)
        return _rotate_into(_batch_major(x.shape, x), x, c, s, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        c, s = ctx.saved_tensors
        return _rotate_into(torch.empty_like(grad), grad, c, s, -1.0), None, None


class _RotateQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, q_heads: int, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sq, b, kv, per, hd = qkv.shape
        c, s = _halves(cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.shape = qkv.shape
        q_out = _batch_major(torch.Size((sq, b, kv, per - 2, hd)), qkv)
        k_out, v_out = _batch_major(torch.Size((sq, b, kv, hd)), qkv), _batch_major(torch.Size((sq, b, kv, hd)), qkv)
        fused = cpu_kernels.usable(qkv, cos, sin)
        if fused is not None:  # one pass over q|k|v (kernels/cpu_kernels.py)
            fused.rope_qkv(qkv, *(t.transpose(0, 1) for t in (q_out, k_out, v_out)), cos, sin, False)
            return q_out.reshape(sq, b, q_heads, hd), k_out, v_out
        q, k, v = qkv[:, :, :, : per - 2], qkv[:, :, :, per - 2], qkv[:, :, :, per - 1]
        _rotate_into(q_out, q, c[:, :, :, None], s[:, :, :, None], 1.0)
        _rotate_into(k_out, k, c, s, 1.0)
        v_out.copy_(v)
        return q_out.reshape(sq, b, q_heads, hd), k_out, v_out  # a view: kv and q-per-kv heads are adjacent

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
        # autograd materializes the gradient of an unused output as zeros, so none of dq, dk, dv is None
        cos, sin = ctx.saved_tensors
        per = ctx.shape[3]
        grad = dq.new_empty(ctx.shape)
        fused = cpu_kernels.usable(grad, cos, sin)
        if fused is not None:  # the gradients batch-major (a copy only if SDPA gave another layout)
            sq, b, kv, _, hd = ctx.shape
            grads = [t.transpose(0, 1).contiguous() for t in (dq.reshape(sq, b, kv, per - 2, hd), dk, dv)]
            fused.rope_qkv(grad, *grads, cos, sin, True)
            return grad, None, None, None
        c, s = _halves(cos, sin)
        dq_in = grad[:, :, :, : per - 2]
        _rotate_into(dq_in, dq.reshape(dq_in.shape), c[:, :, :, None], s[:, :, :, None], -1.0)
        _rotate_into(grad[:, :, :, per - 2], dk, c, s, -1.0)
        grad[:, :, :, per - 1].copy_(dv)
        return grad, None, None, None
