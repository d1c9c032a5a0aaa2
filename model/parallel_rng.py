"""A second RNG stream for dropout inside tensor-parallel regions, on CPU and GPU.

Dropout on replicated activations must draw the same mask on every tensor-parallel rank (the
ranks hold copies), so the default generators are seeded alike across tp. Dropout on split data
(this rank's attention heads; the residual stream's sequence shard under sequence parallelism) must
draw different masks per rank. Megatron keeps a separate CUDA generator state for the latter and
swaps it in with a context manager; megatron-core's tracker is CUDA-only, this one swaps the CPU
generator and, when present, the current CUDA device's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class TensorParallelRNG:
    def __init__(self):
        self.state: dict | None = None  # None: no tensor parallelism, fork() is a no-op

    @staticmethod
    def _get() -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def _set(state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])

    def seed(self, seed: int) -> None:
        saved = self._get()
        torch.manual_seed(seed)
        self.state = self._get()
        self._set(saved)

    @contextmanager
    def fork(self):
        if self.state is None:
            yield
            return
        saved = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(saved)

    def state_dict(self) -> dict | None:
        return self.state

    def load_state_dict(self, state: dict | None) -> None:
        self.state = state


TP_RNG = TensorParallelRNG()
