"""Triton kernels and launchers for the fused Peri-LN junction.

Forward, one pass per row:  s = r + N_out(f);  y = N_in(s) * scale.
Reads f and r, writes s and y (4 row-passes); the unfused composition (norm, add, norm) makes 7.
N_out(f) stays in fp32 registers (never rounded to the activation dtype); s is rounded once when
stored and the stored value is what N_in normalises, so backward can read s back exactly.

Backward, one pass per row: reads dy, ds (optional), s, f; writes dr = ds + dN_in/ds and
df = dN_out/df applied to dr (the gradient flowing into N_out is exactly dr): 6 row-passes
against ~9 unfused. Four gain/bias gradients are reduced as per-program partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import LAST_COMPILED, backward_programs, block_size, num_warps_for
from kernels.triton_norm import row_input_grad, row_norm


@triton.jit
def peri_fwd_kernel(
    F,
    R,
    S,
    Y,
    WO,
    BO,
    WI,
    BI,
    MeanO,
    RstdO,
    MeanI,
    RstdI,
    stride_f,
    stride_r,
    stride_s,
    stride_y,
    N,
    eps,
    scale,
    BLOCK: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_OUT_BIAS: tl.constexpr,
    HAS_IN_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    # --- output norm of the sublayer result f (never scaled) ---
    f = tl.load(F + row * stride_f + cols, mask=mask, other=0.0).to(tl.float32)
    a = row_norm(f, WO, BO, MeanO, RstdO, row, cols, mask, N, eps, IS_RMS, HAS_OUT_BIAS)
    # --- residual add ---
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (r + a).to(S.dtype.element_ty)
    tl.store(S + row * stride_s + cols, s, mask=mask)
    # --- next block's input norm of s, times the LNS scale ---
    y = row_norm(s.to(tl.float32), WI, BI, MeanI, RstdI, row, cols, mask, N, eps, IS_RMS, HAS_IN_BIAS) * scale
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def peri_bwd_kernel(
    DY,
    DS,
    S,
    F,
    WO,
    WI,
    MeanO,
    RstdO,
    MeanI,
    RstdI,
    DR,
    DF,
    DWO_part,
    DBO_part,
    DWI_part,
    DBI_part,
    stride_dy,
    stride_ds,
    stride_s,
    stride_f,
    stride_dr,
    stride_df,
    n_rows,
    N,
    rows_per_program,
    scale,
    BLOCK: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_OUT_BIAS: tl.constexpr,
    HAS_IN_BIAS: tl.constexpr,
    HAS_DS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    wi = tl.load(WI + cols, mask=mask, other=0.0).to(tl.float32) * scale
    wo = tl.load(WO + cols, mask=mask, other=0.0).to(tl.float32)
    dwi_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    dbi_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    dwo_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    dbo_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        # --- input norm backward: gradient reaching s ---
        x = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd_i = tl.load(RstdI + row)
        if IS_RMS:
            xhat = x * rstd_i
        else:
            xhat = tl.where(mask, (x - tl.load(MeanI + row)) * rstd_i, 0.0)
        dwi_acc += dy * xhat
        if HAS_IN_BIAS:
            dbi_acc += dy
        g = row_input_grad(xhat, wi * dy, rstd_i, N, IS_RMS)
        if HAS_DS:
            g += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        # s = r + N_out(f): the residual's gradient is g itself.
        tl.store(DR + row * stride_dr + cols, g.to(DR.dtype.element_ty), mask=mask)
        # --- output norm backward with upstream g (kept in fp32) ---
        f = tl.load(F + row * stride_f + cols, mask=mask, other=0.0).to(tl.float32)
        rstd_o = tl.load(RstdO + row)
        if IS_RMS:
            fhat = f * rstd_o
        else:
            fhat = tl.where(mask, (f - tl.load(MeanO + row)) * rstd_o, 0.0)
        dwo_acc += g * fhat
        if HAS_OUT_BIAS:
            dbo_acc += g
        df = row_input_grad(fhat, wo * g, rstd_o, N, IS_RMS)
        tl.store(DF + row * stride_df + cols, df.to(DF.dtype.element_ty), mask=mask)
    tl.store(DWI_part + pid * N + cols, dwi_acc * scale, mask=mask)
    tl.store(DWO_part + pid * N + cols, dwo_acc, mask=mask)
    if HAS_IN_BIAS:
        tl.store(DBI_part + pid * N + cols, dbi_acc * scale, mask=mask)
    if HAS_OUT_BIAS:
        tl.store(DBO_part + pid * N + cols, dbo_acc, mask=mask)


def peri_fwd(f, r, out_weight, out_bias, in_weight, in_bias, eps, scale, is_rms, out_shape=None):
    """f, r: [rows, hidden] with unit last stride. Returns (s, y, stats) where stats is
    (mean_o, rstd_o, mean_i, rstd_i) (means None for RMSNorm); s, y have dtype promote(f, r)
    and shape out_shape (default [rows, hidden])."""
    n_rows, hidden = f.shape
    block = block_size(hidden, "peri_junction")
    out_dtype = torch.promote_types(f.dtype, r.dtype)
    out_shape = tuple(out_shape) if out_shape is not None else (n_rows, hidden)
    s_full = torch.empty(out_shape, dtype=out_dtype, device=f.device)
    y_full = torch.empty(out_shape, dtype=out_dtype, device=f.device)
    s, y = s_full.view(n_rows, hidden), y_full.view(n_rows, hidden)

    def stat():
        return torch.empty(n_rows, dtype=torch.float32, device=f.device)

    rstd_o, rstd_i = stat(), stat()
    mean_o, mean_i = (None, None) if is_rms else (stat(), stat())
    stats = (mean_o, rstd_o, mean_i, rstd_i)
    if n_rows == 0:
        return s_full, y_full, stats
    handle = peri_fwd_kernel[(n_rows,)](
        f,
        r,
        s,
        y,
        out_weight,
        out_bias if out_bias is not None else out_weight,
        in_weight,
        in_bias if in_bias is not None else in_weight,
        mean_o if mean_o is not None else rstd_o,
        rstd_o,
        mean_i if mean_i is not None else rstd_i,
        rstd_i,
        f.stride(0),
        r.stride(0),
        s.stride(0),
        y.stride(0),
        hidden,
        eps,
        scale,
        BLOCK=block,
        IS_RMS=is_rms,
        HAS_OUT_BIAS=out_bias is not None,
        HAS_IN_BIAS=in_bias is not None,
        num_warps=num_warps_for(block),
    )
    LAST_COMPILED["peri_fwd"] = handle
    return s_full, y_full, stats


def peri_bwd(dy, ds, s, f, out_weight, in_weight, has_out_bias, has_in_bias, stats, scale, is_rms, r_dtype):
    """Returns (dr in r_dtype, df in f's dtype, dwo, dbo, dwi, dbi) with fp32 gain/bias grads
    (biases None when absent). dy, ds (may be None), s, f: [rows, hidden]."""
    n_rows, hidden = f.shape
    block = block_size(hidden, "peri_junction backward")
    num_warps = num_warps_for(block)
    dr = torch.empty((n_rows, hidden), dtype=r_dtype, device=f.device)
    df = torch.empty((n_rows, hidden), dtype=f.dtype, device=f.device)

    def grads_or_none(parts, present):
        return parts.sum(0) if present else None

    if n_rows == 0:
        z = torch.zeros((1, hidden), dtype=torch.float32, device=f.device)
        return (dr, df, z.sum(0), grads_or_none(z, has_out_bias), z.sum(0), grads_or_none(z, has_in_bias))
    progs = backward_programs(n_rows, f.device, num_warps)
    rows_per_program = triton.cdiv(n_rows, progs)
    progs = triton.cdiv(n_rows, rows_per_program)

    def part():
        return torch.empty((progs, hidden), dtype=torch.float32, device=f.device)

    dwo_p, dwi_p = part(), part()
    dbo_p = part() if has_out_bias else dwo_p
    dbi_p = part() if has_in_bias else dwi_p
    mean_o, rstd_o, mean_i, rstd_i = stats
    ds_arg = ds if ds is not None else dy
    handle = peri_bwd_kernel[(progs,)](
        dy,
        ds_arg,
        s,
        f,
        out_weight,
        in_weight,
        mean_o if mean_o is not None else rstd_o,
        rstd_o,
        mean_i if mean_i is not None else rstd_i,
        rstd_i,
        dr,
        df,
        dwo_p,
        dbo_p,
        dwi_p,
        dbi_p,
        dy.stride(0),
        ds_arg.stride(0),
        s.stride(0),
        f.stride(0),
        dr.stride(0),
        df.stride(0),
        n_rows,
        hidden,
        rows_per_program,
        scale,
        BLOCK=block,
        IS_RMS=is_rms,
        HAS_OUT_BIAS=has_out_bias,
        HAS_IN_BIAS=has_in_bias,
        HAS_DS=ds is not None,
        num_warps=num_warps,
    )
    LAST_COMPILED["peri_bwd"] = handle
    return (dr, df, dwo_p.sum(0), grads_or_none(dbo_p, has_out_bias), dwi_p.sum(0), grads_or_none(dbi_p, has_in_bias))
