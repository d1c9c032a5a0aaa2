"""Autograd for the Triton norm ops (kernels/custom_ops.py): what each forward saves, and the backward
op it calls, registered with torch.library.register_autograd so that eager mode and torch.compile
run the same formulas. Import the differentiable ops from here (norm_fwd_op, peri_fwd_op): importing
this module is what registers their formulas.

Saved for backward: the normalised input (or the sum s for the fused ops) and the fp32 rstd (and
mean for LayerNorm) per row; nothing is recomputed except xhat. Gain/bias gradients come back in the
parameter's dtype, input gradients in the input's. An output whose gradient is not needed gets None,
not a zero tensor the backward would have to read (set_materialize_grads(False)), except that the
kernels always read dy, so an unused normed output costs one zero tensor. Double backward is not
supported.
"""

from __future__ import annotations

import torch

from kernels.custom_ops import norm_bwd_op, norm_fwd_op, peri_bwd_op, peri_fwd_op

__all__ = ["norm_fwd_op", "peri_fwd_op"]  # differentiable once this module is imported


def _grad_or_none(needed: bool, g: torch.Tensor, dtype: torch.dtype | None):
    if not needed or dtype is None:
        return None
    return g.to(dtype)


def _dtype(t: torch.Tensor | None):
    return None if t is None else t.dtype


# ------------------------------------------------------------------ norm_fwd: y = N(x) or (s, N(s)), s = x + r


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _eps, scale, is_rms = inputs
    _y, s, mean, rstd = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.meta = (residual is not None, x.dtype, _dtype(residual), scale, is_rms, _dtype(bias))


def _norm_backward(ctx, dy, ds, _dmean, _drstd):
    xs, weight, mean, rstd = ctx.saved_tensors
    fused_add, x_dtype, r_dtype, scale, is_rms, bias_dtype = ctx.meta
    if dy is None:
        dy = torch.zeros_like(xs)
    dx, dw, db = norm_bwd_op(
        dy, ds if fused_add else None, xs, weight, mean, rstd, bias_dtype is not None, scale, is_rms
    )
    need = ctx.needs_input_grad
    # For add_norm d(x + r)/dx = d(x + r)/dr = 1: both get the same gradient (as torch's add does).
    return (
        dx.to(x_dtype) if need[0] else None,
        dx.to(r_dtype) if fused_add and need[1] else None,
        _grad_or_none(need[2], dw, weight.dtype),
        _grad_or_none(need[3], db, bias_dtype),
        None,
        None,
        None,
    )


norm_fwd_op.register_autograd(_norm_backward, setup_context=_norm_setup)


# ------------------------------------------------------------------ peri_fwd: (s, N_in(s)), s = r + N_out(f)


def _peri_setup(ctx, inputs, output):
    f, residual, out_weight, out_bias, in_weight, in_bias, _eps, scale, is_rms = inputs
    s, _y, *stats = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(s, f, out_weight, in_weight, *stats)
    ctx.meta = (residual.dtype, scale, is_rms, _dtype(out_bias), _dtype(in_bias))


def _peri_backward(ctx, ds, dy, *_dstats):
    s, f, out_weight, in_weight, *stats = ctx.saved_tensors
    r_dtype, scale, is_rms, out_bias_dtype, in_bias_dtype = ctx.meta
    if dy is None:
        dy = torch.zeros_like(s)
    has_out_bias, has_in_bias = out_bias_dtype is not None, in_bias_dtype is not None
    dr, df, dwo, dbo, dwi, dbi = peri_bwd_op(
        dy, ds, s, f, out_weight, in_weight, *stats, has_out_bias, has_in_bias, scale, is_rms, r_dtype
    )
    need = ctx.needs_input_grad
    return (
        df if need[0] else None,
        dr if need[1] else None,
        _grad_or_none(need[2], dwo, out_weight.dtype),
        _grad_or_none(need[3], dbo, out_bias_dtype),
        _grad_or_none(need[4], dwi, in_weight.dtype),
        _grad_or_none(need[5], dbi, in_bias_dtype),
        None,
        None,
        None,
    )


peri_fwd_op.register_autograd(_peri_backward, setup_context=_peri_setup)
