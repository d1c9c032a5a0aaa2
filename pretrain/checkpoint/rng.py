"""Every random stream a rank draws from (torch, CUDA, numpy, Python, the tensor-parallel stream),
saved with each checkpoint per rank, so that a resume on the same layout draws the same numbers."""

from __future__ import annotations

import random

import numpy as np
import torch

from model.parallel_rng import TP_RNG


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "tensor_parallel": TP_RNG.state_dict(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    TP_RNG.load_state_dict(state.get("tensor_parallel"))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int) -> None:
    """Fresh streams from one number (a resume on another layout, where the saved streams belong to
    ranks that no longer exist)."""
    seed %= 2**63
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if TP_RNG.state is not None:  # only where a tensor-parallel stream is in use
        TP_RNG.seed(seed + 1)
