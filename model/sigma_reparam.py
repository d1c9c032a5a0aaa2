"""sigma-Reparam (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse"): a linear layer uses

    W_hat = (gamma / sigma(W)) * W

with sigma(W) the spectral norm of W, estimated by power iteration, and gamma a learned scalar.

    u, v     persistent buffers (left/right singular vector estimates), in the state dict. One power-
             iteration step (v <- W^T u / |.|, u <- W v / |.|) runs per training forward, without grad;
             none in eval mode, none while model/recompute.py recomputes a block (so a recomputed forward
             sees the sigma of the original one).
    sigma    u^T W v with u, v constants: the gradient flows through sigma, as in the paper.
    gamma    initialised to sigma(W_init) (the paper initialises it to 1 with its own weight init; here the
             model's init is kept and the initial function is unchanged). The same estimate (INIT_ITERATIONS
             steps from a fixed start) gives gamma at init (model/init.py) and u, v at the first forward.

u, v start as zeros and are filled at the first forward from a fixed start vector (a private generator:
the global RNG stream, hence every other initial value, is untouched). Doing it there, inside the linear's
forward, means the weight is present: under ZeRO-3 (gathered for the forward), under tensor parallelism
(every rank holds its shard), under sharded initialisation (materialised by then).

Tensor parallelism: a column-parallel W holds rows (u sharded along the output dim, `split="out"`), a
row-parallel W holds columns (v sharded along the input dim, `split="in"`). The power iteration and
sigma are those of the FULL matrix: W^T u is summed over the tensor-parallel group for a column shard,
W v for a row shard, and every norm of a sharded vector too; every rank gets the same sigma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.tp_mappings import copy_to_tp, reduce_from_tp, tp_all_reduce, tp_group

INIT_ITERATIONS = 64  # power-iteration steps of the initial estimate (gamma at init; u, v at the first forward)
_START_SEED = 0  # the fixed start vector's generator
_EPS = 1e-12


def start_vector(in_features: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The fixed start of the right singular vector (fp32, CPU), or this rank's contiguous slice of it
    (shard = (rank, ranks) of a row-parallel layer)."""
    g = torch.Generator().manual_seed(_START_SEED)
    v = torch.randn(in_features, generator=g)
    rank, ranks = shard
    return v.chunk(ranks)[rank].clone()


def _tp_sum(x: torch.Tensor) -> torch.Tensor:
    return tp_all_reduce(x, tp_group())


class SigmaReparam(nn.Module):
    """gamma, u, v of one weight matrix; forward(W) = W * gamma / sigma(W). split: None (a whole
    matrix), "out" (this rank holds rows: column-parallel) or "in" (columns: row-parallel)."""

    def __init__(self, out_features: int, in_features: int, split: str | None = None):
        super().__init__()
        if split not in (None, "out", "in"):
            raise ValueError(f"SigmaReparam: split '{split}'; allowed: None, out, in")
        self.split = split
        self.gamma = nn.Parameter(torch.ones(1))  # 1-d: DeepSpeed broadcasts parameters as bytes (no 0-d)
        # Buffers are never on the meta device: sharded initialisation materialises parameters only, and
        # these are two vectors per matrix.
        device = torch.empty(0).device
        device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer("u", torch.zeros(out_features, device=device))
        self.register_buffer("v", torch.zeros(in_features, device=device))
        self._ready = False  # u, v hold an estimate (checked once, then known)

    # -- sums over the tensor-parallel group, where the vector is sharded
    def _sum_out(self, x: torch.Tensor) -> torch.Tensor:  # a reduction over the output dim (W^T u)
        return _tp_sum(x) if self.split == "out" else x

    def _sum_in(self, x: torch.Tensor) -> torch.Tensor:  # a reduction over the input dim (W v)
        return _tp_sum(x) if self.split == "in" else x

    def _normalized(self, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        sq = x.square().sum()
        if sharded:
            sq = _tp_sum(sq)
        return x / sq.sqrt().clamp_min(_EPS)

    @torch.no_grad()
    def _step_u(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._normalized(self._sum_in(w @ v), self.split == "out")

    @torch.no_grad()
    def _step_v(self, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._normalized(self._sum_out(w.t() @ u), self.split == "in")

    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor, steps: int = 1) -> None:
        """`steps` updates of u, v (fp32 arithmetic, whatever the weight's dtype)."""
        w = weight.detach().float()
        u, v = self.u.float(), self.v.float()
        for _ in range(steps):
            v = self._step_v(w, u)
            u = self._step_u(w, v)
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """u, v from the fixed start vector after INIT_ITERATIONS steps (the estimate gamma was set to)."""
        w = weight.detach().float()
        shard = (0, 1)
        if self.split == "in":
            from megatron.core import parallel_state

            shard = (
                parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size(),
            )
        v = start_vector(self.v.numel() * shard[1], shard).to(w.device)
        v = self._normalized(v, self.split == "in")
        u = self._step_u(w, v)
        for _ in range(INIT_ITERATIONS):
            v = self._step_v(w, u)
            u = self._step_u(w, v)
        self.u.copy_(u)
        self.v.copy_(v)
        self._ready = True

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """u^T W v of the full matrix (fp32, differentiable in W; u, v constants)."""
        partial = torch.dot(self.u.float(), torch.mv(weight, self.v.to(weight.dtype)).float())
        return reduce_from_tp(partial) if self.split else partial

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        from model.recompute import recomputing

        fresh = not self._ready and not bool(self._replicated_vector().any())  # one check, same on every rank
        if fresh:  # the initial estimate, which gamma was set to: this forward is the initial function
            self.initialize(weight)
        self._ready = True
        if self.training and torch.is_grad_enabled() and not recomputing() and not fresh:
            self.power_iteration(weight)
        scale = self.gamma.float() / self.sigma(weight)
        if self.split:  # scale is used by every rank for its own shard: its gradient is summed over them
            scale = copy_to_tp(scale)
        return weight * scale.to(weight.dtype)

    def _replicated_vector(self) -> torch.Tensor:
        return self.u if self.split == "in" else self.v

    def _load_from_state_dict(self, *args, **kwargs):
        self._ready = False  # look again at the loaded vectors
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"split={self.split}"


class ReparamLinear(nn.Linear):
    """nn.Linear whose weight is used as (gamma / sigma(W)) * W."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.sigma = SigmaReparam(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sigma(self.weight), self.bias)


def linear(in_features: int, out_features: int, bias: bool, sigma_reparam: bool) -> nn.Linear:
    """The plain model's linear layer: nn.Linear, or ReparamLinear with model.sigma_reparam."""
    return (ReparamLinear if sigma_reparam else nn.Linear)(in_features, out_features, bias=bias)


@torch.no_grad()
def initial_sigma(weight: torch.Tensor) -> torch.Tensor:
    """The initial estimate of sigma(W) for a whole matrix: what gamma is initialised to, and what u, v give
    at the first forward (the same start vector and steps; model/init.py)."""
    est = SigmaReparam(*weight.shape).to(weight.device)
    est.initialize(weight)
    return torch.dot(est.u, weight.float() @ est.v)


@torch.no_grad()
def effective_weight(weight: torch.Tensor, gamma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(gamma / u^T W v) * W for a whole matrix, as the model computes it in eval mode (HF export folds this in)."""
    w = weight.float()
    sigma = torch.dot(u.float(), w @ v.float())
    return (w * (gamma.float() / sigma)).to(weight.dtype)


def reparam_modules(model: nn.Module) -> list[SigmaReparam]:
    return [m for m in model.modules() if isinstance(m, SigmaReparam)]
