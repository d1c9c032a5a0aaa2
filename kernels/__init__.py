"""Norm kernels behind one backend interface (DESIGN.md §5).

The model never calls a norm implementation directly: it asks `resolve_backend` for a
`NormOps` once, at build time, and calls its functions. Backends: `torch` (reference, runs
everywhere), `triton` (our fused kernels: kernels.triton_norm / triton_peri, their autograd
Functions in kernels.autograd, functional API in kernels.functional) and `apex` (optional,
kernels.apex_ops). Nothing here imports triton: see kernels.backend for why.
"""
from kernels.backend import BACKEND_CHOICES, BackendUnavailableError, NormOps, resolve_backend

__all__ = ["BACKEND_CHOICES", "BackendUnavailableError", "NormOps", "resolve_backend"]
