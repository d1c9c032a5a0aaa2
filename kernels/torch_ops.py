"""Torch norm ops: the CPU path and the backend every fused one must agree with (the tests compare all of
them with float64 references). RMSNorm has a hand-written backward (_RMSNorm); LayerNorm is torch's.

Statistics are computed in fp32 whatever the input dtype; the output has the input's dtype.
`scale` is a constant multiplier applied after the gain (LayerNorm Scaling's 1/sqrt(l)).
The fused ops (add_norm, peri_junction) are the plain compositions here; the Triton backend
computes the same values in one pass.

CRMSNorm (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers"): a zero-mean vector of d
coordinates is stored losslessly by its first d - 1 (the last is minus their sum), and normalised as

    CRMSNorm(x) = RMSNorm(decompress(x)),  decompress(x) = (x_1 .. x_(d-1), -(x_1 + .. + x_(d-1)))

whose mean square is (sum x_i^2 + (sum x_i)^2) / d over the first d - 1. On a zero-mean input it equals
RMSNorm, which on a zero-mean input equals LayerNorm. Our residual stream keeps its width d (attention
and MLP share it), so the d-th coordinate is stored but never read: CRMSNorm's input is the first d - 1.
It is a composition on top of any backend's RMSNorm (`compressed`), so every backend runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu_kernels
from kernels.checks import check_add_norm, check_params, check_peri_junction, check_same_shape


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with a hand-written backward: autograd of the composition keeps five intermediates and
    runs about ten elementwise passes; this saves x and the per-row 1/rms, and its backward runs four
    elementwise passes and two matrix-vector products (CPU eager, forward + backward at 2048 x 256:
    2.4x the composition's speed, bench/block_ops.py in bench/RESULTS.md). Under torch.compile dynamo traces both halves
    and inductor fuses them like the composition."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, scale: float) -> Tensor:
        ctx.scale = scale
        fused = cpu_kernels.usable(x, weight)
        if fused is not None:  # one pass each way (kernels/cpu_kernels.py)
            y, rstd = fused.rms_norm_forward(x, weight, eps, scale)
            ctx.save_for_backward(x, weight, rstd)
            return y
        xf = x.float()
        d = x.shape[-1]
        # 1/rms from the 2-norm: one pass, no x^2 temporary
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).div_(d**0.5).square_().add_(eps).rsqrt_()
        w = weight.float() * scale if scale != 1.0 else weight.float()
        ctx.save_for_backward(x, weight, rstd)
        ctx.scale = scale
        return (xf * rstd).mul_(w).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # y = x r w, r = (mean(x^2) + eps)^-1/2:  dx = r g w - x r^3 (sum_i g_i w_i x_i) / d,
        # dw = sum over rows of r g x. Both sums are matrix-vector products of u = g x (one pass each).
        x, weight, rstd = ctx.saved_tensors
        scale = ctx.scale
        fused = cpu_kernels.usable(grad, x, weight)
        if fused is not None:
            grad_x, grad_w = fused.rms_norm_backward(grad, x, weight, rstd, scale)
            return grad_x if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None, None, None
        d = x.shape[-1]
        xf, g, r = x.float().reshape(-1, d), grad.float().reshape(-1, d), rstd.reshape(-1)
        u = g * xf
        grad_w = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.mv(u.t(), r)
            grad_w = (grad_w * scale if scale != 1.0 else grad_w).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            w = weight.float() * scale if scale != 1.0 else weight.float()
            k = torch.mv(u, w).mul_(r.square()).mul_(r).div_(d)
            grad_x = torch.mul(g, w).mul_(r.unsqueeze(1)).addcmul_(xf, k.unsqueeze(1), value=-1)
            grad_x = grad_x.to(x.dtype).view(grad.shape)
        return grad_x, grad_w, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float = 1.0) -> torch.Tensor:
    check_params("rms_norm", x.shape[-1], weight, None, True)
    return _RMSNorm.apply(x, weight, eps, scale)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, scale: float = 1.0
) -> torch.Tensor:
    check_params("layer_norm", x.shape[-1], weight, bias, False)
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    if scale != 1.0:
        y = y * scale
    return y.to(x.dtype)


def compose_fused(rms_norm_fn, layer_norm_fn):
    """(add_norm, peri_junction) composed from a backend's two norm functions: the torch backend's
    own fused ops, and apex's (which has norms but no residual or Peri fusion)."""

    def norm(is_rms, x, weight, bias, eps, scale=1.0):
        return rms_norm_fn(x, weight, eps, scale) if is_rms else layer_norm_fn(x, weight, bias, eps, scale)

    def add_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, scale: float = 1.0,
                 kind: str = "rmsnorm") -> tuple[Tensor, Tensor]:  # fmt: skip
        """(x + residual, N(x + residual) * scale): the pre/lns junction, unfused."""
        is_rms = check_add_norm(x, residual, weight, bias, kind)
        s = x + residual
        return s, norm(is_rms, s, weight, bias, eps, scale)

    def peri_junction(f: Tensor, residual: Tensor, out_weight: Tensor, out_bias: Tensor | None, in_weight: Tensor,
                      in_bias: Tensor | None, eps: float, scale: float = 1.0,
                      kind: str = "rmsnorm") -> tuple[Tensor, Tensor]:  # fmt: skip
        """(s, N_in(s) * scale) with s = residual + N_out(f): the Peri-LN junction, unfused.
        The scale belongs to the next block's input norm only (LNS never scales the output norm)."""
        is_rms = check_peri_junction(f, residual, out_weight, out_bias, in_weight, in_bias, kind)
        s = residual + norm(is_rms, f, out_weight, out_bias, eps)
        return s, norm(is_rms, s, in_weight, in_bias, eps, scale)

    return add_norm, peri_junction


class _FusedRMSJunction(torch.autograd.Function):
    """add_norm (out_weight None) or peri_junction on the fused CPU kernels: (s, y) in one pass forward and
    one backward, saving f, s and the two 1/rms (what the composition saves, less the out norm's output)."""

    @staticmethod
    def forward(ctx, f, residual, out_weight, in_weight, eps, scale):
        ops = cpu_kernels.load()
        s, y, rstd_out, rstd_in = ops.junction_forward(f, residual, out_weight, in_weight, eps, scale)
        ctx.scale = scale
        ctx.save_for_backward(f, s, out_weight, in_weight, rstd_out, rstd_in)
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        f, s, out_weight, in_weight, rstd_out, rstd_in = ctx.saved_tensors
        ops = torch.ops.pretrain_cpu  # loaded by the forward; its statistics have no torch-ops backward here
        ds, dy = ds.contiguous(), dy.contiguous()  # autograd's zeros for an unused output are contiguous too
        d_f, d_res, d_out_w, d_in_w = ops.junction_backward(
            dy, ds, f, s, out_weight, in_weight, rstd_out, rstd_in, ctx.scale
        )
        return d_f, d_res, d_out_w if out_weight is not None else None, d_in_w, None, None


def with_cpu_junctions(add_norm_fn, peri_junction_fn):
    """add_norm / peri_junction that take the fused CPU kernels for RMSNorm without bias on contiguous fp32
    CPU tensors in eager mode (kernels/cpu_kernels.py), and the composition otherwise."""

    def add_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, scale: float = 1.0,
                 kind: str = "rmsnorm") -> tuple[Tensor, Tensor]:  # fmt: skip
        if kind == "rmsnorm" and bias is None and x.shape == residual.shape:
            if cpu_kernels.usable(x, residual, weight) is not None:
                check_add_norm(x, residual, weight, bias, kind)
                return _FusedRMSJunction.apply(x, residual, None, weight, eps, scale)
        return add_norm_fn(x, residual, weight, bias, eps, scale, kind)

    def peri_junction(f: Tensor, residual: Tensor, out_weight: Tensor, out_bias: Tensor | None, in_weight: Tensor,
                      in_bias: Tensor | None, eps: float, scale: float = 1.0,
                      kind: str = "rmsnorm") -> tuple[Tensor, Tensor]:  # fmt: skip
        if kind == "rmsnorm" and out_bias is None and in_bias is None and f.shape == residual.shape:
            if cpu_kernels.usable(f, residual, out_weight, in_weight) is not None:
                check_peri_junction(f, residual, out_weight, out_bias, in_weight, in_bias, kind)
                return _FusedRMSJunction.apply(f, residual, out_weight, in_weight, eps, scale)
        return peri_junction_fn(f, residual, out_weight, out_bias, in_weight, in_bias, eps, scale, kind)

    return add_norm, peri_junction


add_norm, peri_junction = with_cpu_junctions(*compose_fused(rms_norm, layer_norm))


# ------------------------------------------------------------------------------------- CRMSNorm


def decompress(x: torch.Tensor) -> torch.Tensor:
    """The zero-mean vector whose first d - 1 coordinates are x's (the last, x's own, is not read); the
    sum in fp32, the result in x's dtype."""
    head = x[..., :-1]
    return torch.cat([head, -head.float().sum(-1, keepdim=True).to(x.dtype)], dim=-1)


def compressed(rms_norm_fn):
    """crms_norm(x, weight, eps, scale=1.0) on a backend's RMSNorm."""

    def crms_norm(x: Tensor, weight: Tensor, eps: float, scale: float = 1.0) -> Tensor:
        check_params("crms_norm", x.shape[-1], weight, None, True)
        return rms_norm_fn(decompress(x), weight, eps, scale)

    return crms_norm


def with_crmsnorm(crms_norm_fn, add_norm_fn, peri_junction_fn):
    """(add_norm, peri_junction) that also take kind="crmsnorm" (composed from crms_norm_fn: the residual
    add, then the norm), passing every other kind to the backend's own ops unchanged."""

    def add_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, scale: float = 1.0,
                 kind: str = "rmsnorm") -> tuple[Tensor, Tensor]:  # fmt: skip
        if kind != "crmsnorm":
            return add_norm_fn(x, residual, weight, bias, eps, scale, kind)
        check_same_shape("add_norm", x, residual, ("x", "residual"))
        check_params("add_norm", x.shape[-1], weight, bias, True)
        s = x + residual
        return s, crms_norm_fn(s, weight, eps, scale)

    def peri_junction(f: Tensor, residual: Tensor, out_weight: Tensor, out_bias: Tensor | None, in_weight: Tensor,
                      in_bias: Tensor | None, eps: float, scale: float = 1.0,
                      kind: str = "rmsnorm") -> tuple[Tensor, Tensor]:  # fmt: skip
        if kind != "crmsnorm":
            return peri_junction_fn(f, residual, out_weight, out_bias, in_weight, in_bias, eps, scale, kind)
        check_same_shape("peri_junction", f, residual, ("f", "residual"))
        check_params("peri_junction (out norm)", f.shape[-1], out_weight, out_bias, True)
        check_params("peri_junction (in norm)", f.shape[-1], in_weight, in_bias, True)
        s = residual + crms_norm_fn(f, out_weight, eps)
        return s, crms_norm_fn(s, in_weight, eps, scale)

    return add_norm, peri_junction


crms_norm = compressed(rms_norm)
add_norm, peri_junction = with_crmsnorm(crms_norm, add_norm, peri_junction)
