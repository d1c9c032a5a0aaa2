"""Kernel tests run the Triton kernels for real on a GPU and under the Triton interpreter on CPU.

Triton decides interpreted vs compiled when a kernel is *defined* (`@triton.jit` reads
TRITON_INTERPRET at import time), and a triton imported before the variable is set runs kernels defined
after it wrongly, so the variable is set before any test module imports kernels.triton_* or triton: here
and in tests/conftest.py (for runs of the top-level test files alone).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

# The repo root (for `kernels`) and this folder (for the norm_reference helper), whatever the
# invocation (`pytest` from elsewhere, --import-mode=importlib).
for _p in (str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

if not HAS_CUDA and "kernels.triton_norm" in sys.modules:
    from kernels.triton_norm import interpreter_active

    if not interpreter_active():
        raise RuntimeError(
            "kernels.triton_norm was imported (compiled mode) before tests/kernels/conftest.py could "
            "set TRITON_INTERPRET=1; run the kernel tests on their own or import them lazily"
        )

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def device():
    return DEVICE
