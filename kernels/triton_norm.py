"""Triton kernels and launchers for RMSNorm / LayerNorm, optionally fused with a residual add.

One kernel pair serves four ops, selected by constexpr flags (compiled away, no runtime cost):
  IS_RMS        RMSNorm (no mean) or LayerNorm
  HAS_BIAS      LayerNorm bias
  HAS_RESIDUAL  forward reads x and r, writes s = x + r and N(s) (add_norm)
  HAS_DS        backward adds the upstream gradient of s (add_norm's sum output)
y = (xhat * w + b) * scale, with scale a runtime float (LNS 1/sqrt(l) differs per layer and must
not trigger a recompile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import LAST_COMPILED, backward_programs, block_size, num_warps_for


@triton.jit
def row_input_grad(xhat, wdy, rstd, N, IS_RMS: tl.constexpr):
    """dL/dx of one row of y = N(x) given xhat = normalised x and wdy = gain * dL/dy (fp32):
    RMSNorm (wdy - xhat*mean(xhat*wdy)) * rstd; LayerNorm also subtracts mean(wdy).
    Shared by the norm and Peri-junction backward kernels (inlined by Triton)."""
    c1 = tl.sum(xhat * wdy, axis=0) / N
    if IS_RMS:
        grad = (wdy - xhat * c1) * rstd
    else:
        grad = (wdy - xhat * c1 - tl.sum(wdy, axis=0) / N) * rstd
    return grad


@triton.jit
def row_norm(x, W, B, Mean, Rstd, row, cols, mask, N, eps, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """N(x) * gain (+ bias) of one fp32 row, without the scale; stores the row's mean (LayerNorm)
    and rstd for the backward. Shared by the norm and Peri-junction forward kernels."""
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / N + eps)
    tl.store(Rstd + row, rstd)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def norm_fwd_kernel(
    X,
    R,
    S,
    Y,
    W,
    B,
    Mean,
    Rstd,
    stride_x,
    stride_r,
    stride_s,
    stride_y,
    N,
    eps,
    scale,
    BLOCK: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # int64 row offsets: rows * stride can exceed 2**31 for big activations.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=mask)
        # Normalise the stored (rounded) sum: backward reads it back, and the unfused
        # composition normalises the rounded sum too.
        x = s.to(tl.float32)
    y = row_norm(x, W, B, Mean, Rstd, row, cols, mask, N, eps, IS_RMS, HAS_BIAS) * scale
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_kernel(
    DY,
    DS,
    X,
    W,
    Mean,
    Rstd,
    DX,
    DW_part,
    DB_part,
    stride_dy,
    stride_ds,
    stride_x,
    stride_dx,
    n_rows,
    N,
    rows_per_program,
    scale,
    BLOCK: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    # Fold the constant scale into the gain once: dL/dxhat = dy * scale * w.
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * scale
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            mean = tl.load(Mean + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
        dx = row_input_grad(xhat, w * dy, rstd, N, IS_RMS)
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    # Unscaled gain gradient: y = (xhat*w + b) * scale, so dw = sum(dy * scale * xhat).
    tl.store(DW_part + pid * N + cols, dw_acc * scale, mask=mask)
    if HAS_BIAS:
        tl.store(DB_part + pid * N + cols, db_acc * scale, mask=mask)


def norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    scale: float,
    is_rms: bool,
    residual: torch.Tensor | None = None,
    out_shape: tuple[int, ...] | None = None,
):
    """x (and residual): [rows, hidden] with unit last stride.

    Returns (y, s, mean, rstd): s is x + residual (None without residual), mean is None for
    RMSNorm. y and s have dtype promote(x, residual) and shape out_shape (default [rows, hidden]):
    allocating them in the caller's shape keeps the autograd outputs plain tensors, not views.
    """
    n_rows, hidden = x.shape
    block = block_size(hidden, "rms_norm" if is_rms else "layer_norm")
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_shape = tuple(out_shape) if out_shape is not None else (n_rows, hidden)
    y_full = torch.empty(out_shape, dtype=out_dtype, device=x.device)
    s_full = None if residual is None else torch.empty(out_shape, dtype=out_dtype, device=x.device)
    y = y_full.view(n_rows, hidden)
    s = None if s_full is None else s_full.view(n_rows, hidden)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    mean = None if is_rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y_full, s_full, mean, rstd
    # Absent tensors get a harmless stand-in pointer; the constexpr flags keep them unread.
    r_arg = residual if residual is not None else x
    s_arg = s if s is not None else y
    handle = norm_fwd_kernel[(n_rows,)](
        x,
        r_arg,
        s_arg,
        y,
        weight,
        bias if bias is not None else weight,
        mean if mean is not None else rstd,
        rstd,
        x.stride(0),
        r_arg.stride(0),
        s_arg.stride(0),
        y.stride(0),
        hidden,
        eps,
        scale,
        BLOCK=block,
        IS_RMS=is_rms,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        num_warps=num_warps_for(block),
    )
    LAST_COMPILED["norm_fwd"] = handle
    return y_full, s_full, mean, rstd


def norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    scale: float,
    is_rms: bool,
    ds: torch.Tensor | None = None,
):
    """Gradients of y = N(x) * scale (plus an upstream ds added to dx when given).

    dy, ds, x: [rows, hidden]. Returns (dx in x's dtype, dw fp32, db fp32 or None).
    """
    n_rows, hidden = x.shape
    block = block_size(hidden, "rms_norm backward" if is_rms else "layer_norm backward")
    num_warps = num_warps_for(block)
    dx = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    progs = backward_programs(n_rows, x.device, num_warps)
    if n_rows == 0:
        zeros = torch.zeros(hidden, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone() if has_bias else None
    rows_per_program = triton.cdiv(n_rows, progs)
    progs = triton.cdiv(n_rows, rows_per_program)  # no idle programs writing zero partials
    dw_part = torch.empty((progs, hidden), dtype=torch.float32, device=x.device)
    db_part = torch.empty((progs, hidden), dtype=torch.float32, device=x.device) if has_bias else dw_part
    ds_arg = ds if ds is not None else dy
    handle = norm_bwd_kernel[(progs,)](
        dy,
        ds_arg,
        x,
        weight,
        mean if mean is not None else rstd,
        rstd,
        dx,
        dw_part,
        db_part,
        dy.stride(0),
        ds_arg.stride(0),
        x.stride(0),
        dx.stride(0),
        n_rows,
        hidden,
        rows_per_program,
        scale,
        BLOCK=block,
        IS_RMS=is_rms,
        HAS_BIAS=has_bias,
        HAS_DS=ds is not None,
        num_warps=num_warps,
    )
    LAST_COMPILED["norm_bwd"] = handle
    # The one reduction over programs (a [progs, hidden] fp32 buffer: a few MB at most).
    dw = dw_part.sum(0)
    db = db_part.sum(0) if has_bias else None
    return dx, dw, db


def interpreter_active() -> bool:
    """True when our kernels were built by the Triton interpreter (TRITON_INTERPRET=1 was set
    before kernels.triton_norm was first imported), i.e. they can run on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(norm_fwd_kernel, InterpretedFunction)
