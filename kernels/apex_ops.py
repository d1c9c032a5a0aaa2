"""The apex backend: NVIDIA apex's fused CUDA norms (apex.normalization functional forms).

Optional: apex is built from source on CUDA clusters and is never a requirement. Only its
functional forms are used (no modules), so parameters stay ours and checkpoints are unchanged.
apex has no LNS scale, no residual fusion and no Peri junction: those are compositions here
(the scale is one extra elementwise multiply, in the output dtype).
"""

from __future__ import annotations

import importlib

import torch

from kernels.checks import check_params
from kernels.torch_ops import compose_fused

APEX_MODULE = "apex.normalization.fused_layer_norm"
# apex's Python functions import this compiled extension lazily, on first call; apex built
# without --cuda_ext imports fine and then fails mid-training, so we probe it up front.
APEX_EXTENSION = "fused_layer_norm_cuda"


def apex_missing() -> str | None:
    """None when apex's fused norms can be imported, else what is missing (for error messages)."""
    try:
        mod = importlib.import_module(APEX_MODULE)
    except ImportError as e:
        return f"'{APEX_MODULE}' is not importable ({type(e).__name__}: {e})"
    for fn in ("fused_rms_norm_affine", "fused_layer_norm_affine"):
        if not hasattr(mod, fn):
            return f"'{APEX_MODULE}' has no '{fn}' (apex too old for RMSNorm?)"
    try:
        importlib.import_module(APEX_EXTENSION)
    except ImportError as e:
        return f"apex's CUDA extension '{APEX_EXTENSION}' is not importable (apex built without --cuda_ext?): {e}"
    return None


def _apex():
    return importlib.import_module(APEX_MODULE)


def _scaled(y: torch.Tensor, x_dtype: torch.dtype, scale: float) -> torch.Tensor:
    y = y.to(x_dtype)  # the mixed-dtype forms already return x's dtype; no-op then
    return y if scale == 1.0 else y * scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float = 1.0) -> torch.Tensor:
    check_params("rms_norm", x.shape[-1], weight, None, True)
    m = _apex()
    shape = (x.shape[-1],)
    if weight.dtype == x.dtype:
        y = m.fused_rms_norm_affine(x, weight, shape, eps)
    else:
        # e.g. bf16 activations with fp32 gains: the mixed form keeps the output in x's dtype.
        y = m.mixed_dtype_fused_rms_norm_affine(x, weight, shape, eps)
    return _scaled(y, x.dtype, scale)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, scale: float = 1.0
) -> torch.Tensor:
    check_params("layer_norm", x.shape[-1], weight, bias, False)
    m = _apex()
    shape = (x.shape[-1],)
    if bias is None:
        # apex's affine LayerNorm always takes a bias; a constant zero one gets no gradient.
        bias = torch.zeros_like(weight)
    if weight.dtype == x.dtype:
        y = m.fused_layer_norm_affine(x, weight, bias, shape, eps)
    else:
        y = m.mixed_dtype_fused_layer_norm_affine(x, weight, bias, shape, eps)
    return _scaled(y, x.dtype, scale)


# apex has no residual or Peri fusion: compose them from its norms, exactly as the torch backend does.
add_norm, peri_junction = compose_fused(rms_norm, layer_norm)
