"""Causal softmax attention for fp32 CPU training: the C++ kernel of kernels/csrc/cpu_kernels.cpp
(`causal_attention_forward` / `_backward`) behind one torch custom op, so that eager and compiled models
call the same thing and inductor leaves it whole.

Why not SDPA: at short sequences torch's CPU flash kernel spends most of its time outside its matrix
products (quickstart shape, one thread: 18 ms per layer forward + backward, of which its products would
take about 9). The kernel makes one BLAS product per block of 64 queries against only the keys that block
sees, and does each row's softmax while it sits in cache (bench/block_ops.py `attention`).

Contract, the same as torch's `_scaled_dot_product_flash_attention_for_cpu`: q (B, H, S, D), k and v
(B, Hkv, S, D) with Hkv dividing H (grouped-query attention: query head h reads kv head h // (H / Hkv), as
SDPA's enable_gqa), no dropout, no mask but the causal one. Outputs and gradients come back in batch-major
memory, (B, S, heads, D), which is what the projection after attention reads. Where the kernels are off
(PRETRAIN_CPU_KERNELS=0, a failed build, a BLAS without sgemm_) the op runs torch's flash kernel instead,
same values.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from kernels import cpu_kernels

# Longest sequence the kernel takes. Its rows of scores span every visible key, where torch's flash kernel
# streams keys in blocks with an online softmax. Forward + backward, one thread: the kernel is 1.3x SDPA at
# 256 tokens and 1.2x at 1024 (head size 64), even at 2048 (two threads: 1% slower), 4% slower at 4096 (head
# size 128; two threads: 10%). bench/RESULTS.md, issue 19, "Causal attention in C++".
MAX_SEQ_LEN = 1024


def applies(q: Tensor, dropout: float) -> bool:
    """Whether attention over q (B, H, S, D) and its k, v runs through this op: fp32 on CPU, no dropout,
    S <= MAX_SEQ_LEN. Static properties only, so that torch.compile decides while tracing."""
    return (
        dropout == 0.0
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and q.shape[-2] <= MAX_SEQ_LEN
        and cpu_kernels.enabled_by_env()
    )


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q (B, H, S, D), k and v (B, Hkv, S, D)."""
    out, _ = torch.ops.pretrain.cpu_causal_attention(q, k, v, q.shape[-1] ** -0.5)
    return out


def _kernel_ops():
    """torch.ops.pretrain_cpu when the kernels load and the attention kernel has its sgemm, else None."""
    ops = cpu_kernels.load()
    return ops if ops is not None and _has_blas(ops) else None


@functools.cache
def _has_blas(ops) -> bool:
    """Asked of the loaded library once, not on every forward and backward."""
    return ops.attention_has_blas()


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _batch_major(t: Tensor) -> Tensor:
    """t (B, heads, S, D) with its memory in (B, S, heads, D) order: the layout the op promises."""
    b, h, s, d = t.shape
    return t if t.stride() == (s * h * d, d, h * d, 1) else _empty_batch_major(t, h).copy_(t)


def _empty_batch_major(like: Tensor, heads: int) -> Tensor:
    b, _, s, d = like.shape
    return like.new_empty(b, s, heads, d).permute(0, 2, 1, 3)


def _repeat_kv(t: Tensor, heads: int) -> Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


@torch.library.custom_op("pretrain::cpu_causal_attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, H, S, D) in batch-major memory, lse (B, H, S) the rows' log-sum-exp."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    ops = _kernel_ops()
    if ops is not None:
        return ops.causal_attention_forward(q, k, v, scale)
    heads = q.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _repeat_kv(k, heads), _repeat_kv(v, heads), 0.0, True, scale=scale
    )
    return _batch_major(out), lse.contiguous()


@_attention.register_fake
def _(q, k, v, scale):
    return _empty_batch_major(q, q.shape[1]), q.new_empty(q.shape[:3])


@torch.library.custom_op("pretrain::cpu_causal_attention_backward", mutates_args=())
def _attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each in batch-major memory."""
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    ops = _kernel_ops()
    if ops is not None:
        dq, dk, dv = ops.causal_attention_backward(dout, q, k, v, out, lse.contiguous(), scale)
        return dq, dk, dv
    heads, kv_heads = q.shape[1], k.shape[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, _repeat_kv(k, heads), _repeat_kv(v, heads), out, lse, 0.0, True, scale=scale
    )
    if kv_heads != heads:  # each kv head's gradient is the sum over the query heads that read it
        dk, dv = (t.unflatten(1, (kv_heads, heads // kv_heads)).sum(2) for t in (dk, dv))
    return _batch_major(dq), _batch_major(dk), _batch_major(dv)


@_attention_backward.register_fake
def _(dout, q, k, v, out, lse, scale):
    return _empty_batch_major(q, q.shape[1]), _empty_batch_major(k, k.shape[1]), _empty_batch_major(k, k.shape[1])


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.pretrain.cpu_causal_attention_backward(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention.register_autograd(_backward, setup_context=_setup_context)


# FLOPs as torch counts SDPA's (torch.utils.flop_counter, causal mask not discounted), so that
# FlopCounterMode reports the same whichever op runs. Without them the op counts as free, and inductor's
# activation memory budget (train.compile_memory_budget), which prices recomputation in FLOPs, would
# recompute attention rather than store its output.
@register_flop_formula(torch.ops.pretrain.cpu_causal_attention)
def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, *_query_headed(q_shape, k_shape, v_shape))


@register_flop_formula(torch.ops.pretrain.cpu_causal_attention_backward)
def _attention_backward_flops(dout_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(dout_shape, q_shape, *_query_headed(q_shape, k_shape, v_shape))


def _query_headed(q_shape, *kv_shapes) -> list[tuple]:
    """k and v shapes with as many heads as q: grouped-query heads are counted per query head, as torch counts
    them (the formulas of older torch releases assert equal heads)."""
    return [(s[0], q_shape[1], *s[2:]) for s in kv_shapes]
