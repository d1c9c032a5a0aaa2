"""torch.autograd.Functions over the Triton launchers: shapes, dtypes and saved tensors only.

Any leading shape is flattened to [rows, hidden]; outputs are allocated in the caller's shape
(plain tensors, so in-place ops on them stay legal). Saved for backward: the normalised input
(or the sum s for the fused ops) and fp32 rstd (and mean for LayerNorm) per row; nothing is
recomputed except xhat. Gain/bias gradients come back in the parameter's dtype.
Double backward is not supported (once_differentiable).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.triton_common import as_rows
from kernels.triton_norm import norm_bwd, norm_fwd
from kernels.triton_peri import peri_bwd, peri_fwd


def _dtype(t: torch.Tensor | None):
    # Only dtypes (not tensors) go on ctx: tensors belong in save_for_backward.
    return None if t is None else t.dtype


def _grad_or_none(needed: bool, g: torch.Tensor | None, dtype: torch.dtype | None):
    if not needed or g is None or dtype is None:
        return None
    return g.to(dtype)


class NormFunction(torch.autograd.Function):
    """y = N(x) * scale, N = RMSNorm (is_rms) or LayerNorm with gain and optional bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, scale: float, is_rms: bool):
        hidden = x.shape[-1]
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        x2 = as_rows(x, hidden)
        y, _, mean, rstd = norm_fwd(x2, weight, bias, eps, scale, is_rms, out_shape=x.shape)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.meta = (x.shape, scale, is_rms, _dtype(bias))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        shape, scale, is_rms, bias_dtype = ctx.meta
        dx, dw, db = norm_bwd(as_rows(dy, x2.shape[1]), x2, weight, bias_dtype is not None, mean, rstd, scale, is_rms)
        need = ctx.needs_input_grad
        return (
            dx.view(shape) if need[0] else None,
            _grad_or_none(need[1], dw, weight.dtype),
            _grad_or_none(need[2], db, bias_dtype),
            None,
            None,
            None,
        )


class AddNormFunction(torch.autograd.Function):
    """(s, N(s) * scale) with s = x + residual, in one pass."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, scale: float, is_rms: bool):
        hidden = x.shape[-1]
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        y, s, mean, rstd = norm_fwd(
            as_rows(x, hidden), weight, bias, eps, scale, is_rms, residual=as_rows(residual, hidden), out_shape=x.shape
        )
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.meta = (x.dtype, residual.dtype, scale, is_rms, _dtype(bias))
        # An unused output gets None, not a zero tensor we would have to read.
        ctx.set_materialize_grads(False)
        return s, y

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        x_dtype, r_dtype, scale, is_rms, bias_dtype = ctx.meta
        hidden = s.shape[-1]
        s2 = s.view(-1, hidden)
        if dy is None:
            dy = torch.zeros_like(s)
        dx, dw, db = norm_bwd(
            as_rows(dy, hidden),
            s2,
            weight,
            bias_dtype is not None,
            mean,
            rstd,
            scale,
            is_rms,
            ds=None if ds is None else as_rows(ds, hidden),
        )
        dx = dx.view(s.shape)
        need = ctx.needs_input_grad
        # d(x + r)/dx = d(x + r)/dr = 1: both get the same gradient (as torch's add does).
        return (
            dx.to(x_dtype) if need[0] else None,
            dx.to(r_dtype) if need[1] else None,
            _grad_or_none(need[2], dw, weight.dtype),
            _grad_or_none(need[3], db, bias_dtype),
            None,
            None,
            None,
        )


class PeriJunctionFunction(torch.autograd.Function):
    """(s, N_in(s) * scale) with s = residual + N_out(f), in one pass."""

    @staticmethod
    def forward(ctx, f, residual, out_weight, out_bias, in_weight, in_bias, eps: float, scale: float, is_rms: bool):
        hidden = f.shape[-1]
        out_weight, in_weight = out_weight.contiguous(), in_weight.contiguous()
        out_bias = out_bias.contiguous() if out_bias is not None else None
        in_bias = in_bias.contiguous() if in_bias is not None else None
        f2 = as_rows(f, hidden)
        s, y, stats = peri_fwd(
            f2,
            as_rows(residual, hidden),
            out_weight,
            out_bias,
            in_weight,
            in_bias,
            eps,
            scale,
            is_rms,
            out_shape=f.shape,
        )
        ctx.save_for_backward(s, f2, out_weight, in_weight, *stats)
        ctx.meta = (f.shape, residual.dtype, scale, is_rms, _dtype(out_bias), _dtype(in_bias))
        ctx.set_materialize_grads(False)
        return s, y

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dy):
        s, f2, out_weight, in_weight, *stats = ctx.saved_tensors
        shape, r_dtype, scale, is_rms, out_bias_dtype, in_bias_dtype = ctx.meta
        hidden = f2.shape[1]
        if dy is None:
            dy = torch.zeros_like(s)
        dr, df, dwo, dbo, dwi, dbi = peri_bwd(
            as_rows(dy, hidden),
            None if ds is None else as_rows(ds, hidden),
            s.view(-1, hidden),
            f2,
            out_weight,
            in_weight,
            out_bias_dtype is not None,
            in_bias_dtype is not None,
            tuple(stats),
            scale,
            is_rms,
            r_dtype,
        )
        need = ctx.needs_input_grad
        return (
            df.view(shape) if need[0] else None,
            dr.view(shape) if need[1] else None,
            _grad_or_none(need[2], dwo, out_weight.dtype),
            _grad_or_none(need[3], dbo, out_bias_dtype),
            _grad_or_none(need[4], dwi, in_weight.dtype),
            _grad_or_none(need[5], dbi, in_bias_dtype),
            None,
            None,
            None,
        )
