"""Argument checks shared by every norm backend, so that torch, triton and apex reject the same
calls with the same messages (a config that runs on CPU must not fail first on the GPU).
"""

from __future__ import annotations

import torch

NORM_KINDS = ("rmsnorm", "layernorm")


def check_kind(kind: str) -> bool:
    """Returns True for RMSNorm, False for LayerNorm."""
    if kind not in NORM_KINDS:
        raise ValueError(f"norm kind '{kind}' is not supported; allowed: {', '.join(NORM_KINDS)}")
    return kind == "rmsnorm"


def check_params(what: str, hidden: int, weight: torch.Tensor, bias: torch.Tensor | None, is_rms: bool) -> None:
    """Gain (and bias) must be 1-D of the input's last dim; RMSNorm has no bias."""
    if weight is None:
        raise ValueError(f"{what}: a gain tensor is required (pass ones for an identity gain)")
    if tuple(weight.shape) != (hidden,):
        raise ValueError(f"{what}: gain has shape {tuple(weight.shape)}, expected ({hidden},)")
    if bias is not None:
        if is_rms:
            raise ValueError(f"{what}: RMSNorm takes no bias; got one of shape {tuple(bias.shape)}")
        if tuple(bias.shape) != (hidden,):
            raise ValueError(f"{what}: bias has shape {tuple(bias.shape)}, expected ({hidden},)")


def check_same_shape(what: str, a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    # No broadcasting in the fused ops: a broadcast residual is almost always a bug upstream.
    if a.shape != b.shape:
        raise ValueError(
            f"{what}: {names[0]} has shape {tuple(a.shape)} but {names[1]} has {tuple(b.shape)}; they must match"
        )


def check_add_norm(x: torch.Tensor, residual: torch.Tensor, weight, bias, kind: str) -> bool:
    """add_norm's arguments; returns True for RMSNorm."""
    is_rms = check_kind(kind)
    check_same_shape("add_norm", x, residual, ("x", "residual"))
    check_params("add_norm", x.shape[-1], weight, bias, is_rms)
    return is_rms


def check_peri_junction(f: torch.Tensor, residual: torch.Tensor, out_weight, out_bias, in_weight, in_bias,
                        kind: str) -> bool:  # fmt: skip
    """peri_junction's arguments; returns True for RMSNorm."""
    is_rms = check_kind(kind)
    check_same_shape("peri_junction", f, residual, ("f", "residual"))
    check_params("peri_junction (out norm)", f.shape[-1], out_weight, out_bias, is_rms)
    check_params("peri_junction (in norm)", f.shape[-1], in_weight, in_bias, is_rms)
    return is_rms
