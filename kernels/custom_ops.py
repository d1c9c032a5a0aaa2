"""The Triton norm kernels as torch.library custom ops, so torch.compile sees each launch as one
opaque call with known output shapes (a "fake" implementation) instead of breaking the graph on the
launcher's Python.

    pretrain::norm_fwd   (x, residual?, weight, bias?, eps, scale, is_rms) -> (y, s, mean, rstd)
    pretrain::norm_bwd   (dy, ds?, x, weight, mean, rstd, has_bias, scale, is_rms) -> (dx, dw, db)
    pretrain::peri_fwd   (f, residual, w_out, b_out?, w_in, b_in?, eps, scale, is_rms)
                         -> (s, y, mean_out, rstd_out, mean_in, rstd_in)
    pretrain::peri_bwd   (dy, ds?, s, f, w_out, w_in, mean_out, rstd_out, mean_in, rstd_in, has_out_bias,
                          has_in_bias, scale, is_rms, r_dtype) -> (dr, df, dw_out, db_out, dw_in, db_in)

A custom op cannot return None: a tensor that does not exist (s without a residual, the means of
RMSNorm, the gradient of an absent bias) is returned empty (0 elements). Outputs have the caller's
shape (not [rows, hidden] views); statistics and gain/bias gradients are fp32. The autograd formulas
that join the forward and backward ops are registered by kernels/autograd.py, which is where the
differentiable ops are imported from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.triton_common import as_rows
from kernels.triton_norm import norm_bwd, norm_fwd
from kernels.triton_peri import peri_bwd, peri_fwd

_F32 = torch.float32


def _rows(t: Tensor) -> int:
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=_F32)


def _or_none(t: Tensor, present: bool) -> Tensor | None:
    return t if present else None


# ------------------------------------------------------------------------ RMSNorm / LayerNorm (+ residual)


@torch.library.custom_op("pretrain::norm_fwd", mutates_args=())
def norm_fwd_op(
    x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float, scale: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    hidden = x.shape[-1]
    r2 = None if residual is None else as_rows(residual, hidden)
    y, s, mean, rstd = norm_fwd(
        as_rows(x, hidden), weight.contiguous(), None if bias is None else bias.contiguous(), eps, scale, is_rms,
        residual=r2, out_shape=x.shape,
    )  # fmt: skip
    return y, s if s is not None else _empty(x), mean if mean is not None else _empty(x), rstd


@norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, scale, is_rms):
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    rows = _rows(x)
    y = x.new_empty(x.shape, dtype=dtype)
    s = _empty(x) if residual is None else x.new_empty(x.shape, dtype=dtype)
    mean = _empty(x) if is_rms else x.new_empty(rows, dtype=_F32)
    return y, s, mean, x.new_empty(rows, dtype=_F32)


@torch.library.custom_op("pretrain::norm_bwd", mutates_args=())
def norm_bwd_op(
    dy: Tensor,
    ds: Tensor | None,
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
    scale: float,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: the normalised input as saved (the sum s for add_norm); dx has x's shape and dtype."""
    hidden = x.shape[-1]
    dx, dw, db = norm_bwd(
        as_rows(dy, hidden), as_rows(x, hidden), weight.contiguous(), has_bias, _or_none(mean, not is_rms), rstd,
        scale, is_rms, ds=None if ds is None else as_rows(ds, hidden),
    )  # fmt: skip
    return dx.view(x.shape), dw, db if db is not None else _empty(x)


@norm_bwd_op.register_fake
def _(dy, ds, x, weight, mean, rstd, has_bias, scale, is_rms):
    hidden = x.shape[-1]
    return torch.empty_like(x), x.new_empty(hidden, dtype=_F32), x.new_empty(hidden if has_bias else 0, dtype=_F32)


# ------------------------------------------------------------------------------------- Peri-LN junction


@torch.library.custom_op("pretrain::peri_fwd", mutates_args=())
def peri_fwd_op(
    f: Tensor,
    residual: Tensor,
    out_weight: Tensor,
    out_bias: Tensor | None,
    in_weight: Tensor,
    in_bias: Tensor | None,
    eps: float,
    scale: float,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    hidden = f.shape[-1]
    contiguous = lambda t: None if t is None else t.contiguous()
    s, y, stats = peri_fwd(
        as_rows(f, hidden), as_rows(residual, hidden), out_weight.contiguous(), contiguous(out_bias),
        in_weight.contiguous(), contiguous(in_bias), eps, scale, is_rms, out_shape=f.shape,
    )  # fmt: skip
    mean_o, rstd_o, mean_i, rstd_i = (t if t is not None else _empty(f) for t in stats)
    return s, y, mean_o, rstd_o, mean_i, rstd_i


@peri_fwd_op.register_fake
def _(f, residual, out_weight, out_bias, in_weight, in_bias, eps, scale, is_rms):
    dtype = torch.promote_types(f.dtype, residual.dtype)
    rows = _rows(f)

    def stat(present=True):
        return f.new_empty(rows if present else 0, dtype=_F32)

    s, y = f.new_empty(f.shape, dtype=dtype), f.new_empty(f.shape, dtype=dtype)
    return s, y, stat(not is_rms), stat(), stat(not is_rms), stat()


@torch.library.custom_op("pretrain::peri_bwd", mutates_args=())
def peri_bwd_op(
    dy: Tensor,
    ds: Tensor | None,
    s: Tensor,
    f: Tensor,
    out_weight: Tensor,
    in_weight: Tensor,
    mean_o: Tensor,
    rstd_o: Tensor,
    mean_i: Tensor,
    rstd_i: Tensor,
    has_out_bias: bool,
    has_in_bias: bool,
    scale: float,
    is_rms: bool,
    r_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dr in r_dtype and df in f's dtype, both shaped like f; fp32 gain/bias gradients."""
    hidden = f.shape[-1]
    stats = (_or_none(mean_o, not is_rms), rstd_o, _or_none(mean_i, not is_rms), rstd_i)
    dr, df, dwo, dbo, dwi, dbi = peri_bwd(
        as_rows(dy, hidden), None if ds is None else as_rows(ds, hidden), as_rows(s, hidden), as_rows(f, hidden),
        out_weight.contiguous(), in_weight.contiguous(), has_out_bias, has_in_bias, stats, scale, is_rms, r_dtype,
    )  # fmt: skip
    return (
        dr.view(f.shape),
        df.view(f.shape),
        dwo,
        dbo if dbo is not None else _empty(f),
        dwi,
        dbi if dbi is not None else _empty(f),
    )


@peri_bwd_op.register_fake
def _(dy, ds, s, f, out_weight, in_weight, mean_o, rstd_o, mean_i, rstd_i, has_out_bias, has_in_bias, scale, is_rms,
      r_dtype):  # fmt: skip
    hidden = f.shape[-1]

    def grad(present=True):
        return f.new_empty(hidden if present else 0, dtype=_F32)

    dr = f.new_empty(f.shape, dtype=r_dtype)
    return dr, torch.empty_like(f), grad(), grad(has_out_bias), grad(), grad(has_in_bias)
