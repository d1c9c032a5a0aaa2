"""Norm modules (RMSNorm, LayerNorm, CRMSNorm) that run on the selected kernel backend.

The module owns the parameters (gain, and a bias where the norm has one) and a constant `scale`
(LayerNorm Scaling's 1/sqrt(l)): a plain Python float, so it is neither trained nor saved in the
state dict. The computation itself is delegated to `kernels` so fused backends can replace it.

CRMSNorm (kernels/torch_ops.py) is RMSNorm of the zero-mean vector stored in the first d - 1
coordinates; it belongs where its input is such a vector: the residual stream of a Pre-LN model whose
writers are centred (pretrain/convert_norm.py), or one trained so from the start (the last coordinate
of the stream is then never read). `check_norm_switches` says where each kind may go.

A bias ("shift") on RMSNorm / CRMSNorm (model.norm_bias) carries a LayerNorm's shift over exactly when a
Pre-LN model is converted (LN(x) = RMSNorm(x) * g + b on a zero-mean x). The kernels' RMSNorm has no
bias and the junctions (model/junction.py) pass one for LayerNorm only, so such a norm holds ops bound
to its own shift (`_Shifted`): every path that normalises with it, fused junction or module call,
adds it after the kernel, (N(x) * g + b) * scale, as LayerNorm does.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernels import NormOps
from kernels.errors import ConfigError

NORM_KINDS = ("rmsnorm", "layernorm", "crmsnorm")


class _Shifted:
    """A backend's ops with a norm's shift added to every normalised output (times the scale, like LayerNorm's
    bias). An object holding the parameter, not closures: a deep copy of the model then binds the copy's."""

    def __init__(self, ops: NormOps, shift: nn.Parameter):
        self.base, self.shift = ops, shift

    def ops(self) -> NormOps:
        return dataclasses.replace(
            self.base,
            name=f"{self.base.name} + shift",
            rms_norm=self.rms_norm,
            crms_norm=self.crms_norm,
            add_norm=self.add_norm,
            peri_junction=self.peri_junction,
        )

    def _add(self, y: torch.Tensor, scale: float) -> torch.Tensor:
        return y + (self.shift if scale == 1.0 else self.shift * scale).to(y.dtype)

    def rms_norm(self, x, weight, eps, scale=1.0):
        return self._add(self.base.rms_norm(x, weight, eps, scale), scale)

    def crms_norm(self, x, weight, eps, scale=1.0):
        return self._add(self.base.crms_norm(x, weight, eps, scale), scale)

    def add_norm(self, x, residual, weight, bias, eps, scale=1.0, kind="rmsnorm"):
        if bias is not None:
            raise ValueError("add_norm: this norm adds its own shift; the caller passed a bias as well")
        s, y = self.base.add_norm(x, residual, weight, None, eps, scale, kind)
        return s, self._add(y, scale)

    def peri_junction(self, *args, **kwargs):
        raise ValueError("a shifted RMSNorm / CRMSNorm has no Peri-LN junction (model.norm_bias with placement peri)")


class Norm(nn.Module):
    def __init__(
        self,
        kind: str,
        dim: int,
        eps: float,
        ops: NormOps,
        *,
        zero_centered_gain: bool = False,
        scale: float = 1.0,
        bias: bool | None = None,
    ):
        """bias: a learnable shift after the gain; None = LayerNorm has one, RMSNorm and CRMSNorm do not."""
        super().__init__()
        if kind not in NORM_KINDS:
            raise ValueError(f"norm kind '{kind}': allowed {', '.join(NORM_KINDS)}")
        self.kind = kind
        self.eps = eps
        self.scale = float(scale)
        self.zero_centered_gain = zero_centered_gain
        # (1 + w) parameterisation starts at w = 0 so the effective gain starts at 1.
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered_gain else torch.ones(dim))
        has_bias = kind == "layernorm" if bias is None else bias
        self.bias = nn.Parameter(torch.zeros(dim)) if has_bias else None
        # LayerNorm's kernels take the bias; RMSNorm's and CRMSNorm's do not: their shift is bound to the ops.
        self.ops = _Shifted(ops, self.bias).ops() if has_bias and kind != "layernorm" else ops

    def gain(self) -> torch.Tensor:
        return self.weight + 1.0 if self.zero_centered_gain else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return self.ops.rms_norm(x, self.gain(), self.eps, self.scale)
        if self.kind == "crmsnorm":
            return self.ops.crms_norm(x, self.gain(), self.eps, self.scale)
        return self.ops.layer_norm(x, self.gain(), self.bias, self.eps, self.scale)

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, dim={self.weight.shape[0]}, eps={self.eps}, scale={self.scale:.4g}, "
            f"backend={self.ops.name}"
            + (", zero_centered" if self.zero_centered_gain else "")
            + (", bias" if self.bias is not None else "")
        )


class NormFactory:
    """Builds the norms of one model with the same kind, eps, gain style, bias and backend."""

    def __init__(self, kind: str, eps: float, ops: NormOps, zero_centered_gain: bool, bias: bool | None = None):
        self.kind, self.eps, self.ops, self.zero_centered_gain, self.bias = kind, eps, ops, zero_centered_gain, bias

    def __call__(self, dim: int, scale: float = 1.0) -> Norm:
        return Norm(
            self.kind, dim, self.eps, self.ops, zero_centered_gain=self.zero_centered_gain, scale=scale, bias=self.bias
        )

    def optional(self, present: bool, dim: int, scale: float = 1.0) -> nn.Module:
        """A norm where a slot is filled, an identity (no parameters) where it is empty."""
        return self(dim, scale) if present else nn.Identity()


# Placements whose every norm reads the residual stream (and nothing else does): where CRMSNorm's input is the
# zero-mean stream of the Pre-CRMSNorm Transformer.
CRMSNORM_PLACEMENTS = ("pre", "lns")


def check_norm_switches(m) -> None:
    """The rules of model.norm and model.norm_bias for a ModelConfig `m` (model/config.py validate_model)."""
    if m.norm == "crmsnorm":
        why = "CRMSNorm normalises the zero-mean residual stream of a Pre-LN model (Jiang et al. 2023)"
        if m.placement not in CRMSNORM_PLACEMENTS:
            raise ConfigError(
                f"model.norm: 'crmsnorm' with placement '{m.placement}': {why}; allowed placements: "
                f"{', '.join(CRMSNORM_PLACEMENTS)}"
            )
        if m.qk_norm:
            raise ConfigError(
                f"model.qk_norm: true with model.norm 'crmsnorm': queries and keys are not zero-mean; {why}"
            )
        if m.embedding_norm:
            raise ConfigError(
                f"model.embedding_norm: true with model.norm 'crmsnorm': the token embedding is not zero-mean; {why}"
            )
    if m.norm_bias and m.norm != "layernorm" and m.placement == "peri":
        raise ConfigError(
            f"model.norm_bias: true with model.norm '{m.norm}' and placement 'peri': the fused Peri-LN junction has "
            "no shift for RMSNorm / CRMSNorm; use layernorm, or another placement"
        )
