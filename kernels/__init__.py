"""Norm kernels behind one backend interface (DESIGN.md §5).

The model never calls a norm implementation directly: it asks `resolve_backend` for a
`NormOps` once, at build time, and calls its functions. Backends: `torch` (reference, runs
everywhere), `triton` (our fused kernels: kernels.triton_norm / triton_peri, their autograd
Functions in kernels.autograd, functional API in kernels.functional) and `apex` (optional,
kernels.apex_ops). Nothing here imports triton: see kernels.backend for why.

The names below are loaded on first use, so that `kernels.errors` (imported by every room,
including the launch tools) does not pull in torch.
"""

from __future__ import annotations

import importlib

__all__ = ["BACKEND_CHOICES", "BackendUnavailableError", "NormOps", "resolve_backend"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("kernels.backend"), name)
    raise AttributeError(f"module 'kernels' has no attribute '{name}'")
