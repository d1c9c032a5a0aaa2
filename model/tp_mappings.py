"""The tensor-parallel mappings (Megatron's mappings.py): a collective over the tensor-parallel group in
forward and its adjoint in backward, for activations (or their gradients), which are on the compute
device, the group's, by construction. model/tensor_parallel.py builds its layers on them, and
model/sigma_reparam.py its sharded power iteration; pretrain/'s own collectives go through
pretrain.distributed.all_reduce (tests/test_collectives.py).
"""

from __future__ import annotations

import torch


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = torch.distributed.get_world_size(group)
    out = torch.empty((x.shape[0] * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = torch.distributed.get_world_size(group)
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    torch.distributed.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def tp_all_reduce(x: torch.Tensor, group, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    """In place. The model's collectives all live in this module and act on activations (or their
    gradients), which are on the compute device, the group's, by construction; pretrain/'s own
    collectives go through pretrain.distributed.all_reduce (tests/test_collectives.py)."""
    torch.distributed.all_reduce(x, op=op, group=group)
    return x


_all_reduce = tp_all_reduce


def _all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = torch.distributed.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _Region(torch.autograd.Function):
    """A collective in forward and its adjoint in backward."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        ctx.bwd = bwd
        return fwd(x, tp_group())

    @staticmethod
    def backward(ctx, grad):
        return ctx.bwd(grad.contiguous(), tp_group()), None, None


def _identity(x, group):
    return x


def copy_to_tp(x):  # column input without SP: every rank needs all of x; gradients sum
    return _Region.apply(x, _identity, lambda g, grp: _all_reduce(g.clone(), grp))


def reduce_from_tp(x):  # row output without SP: partial sums -> the full output on every rank
    return _Region.apply(x, lambda y, grp: _all_reduce(y.clone(), grp), _identity)


def gather_from_sequence(x):  # column input with SP: (S/tp, B, d) -> (S, B, d)
    return _Region.apply(x, _all_gather_first_dim, _reduce_scatter_first_dim)


def reduce_scatter_to_sequence(x):  # row output with SP: partial sums -> summed sequence shard
    return _Region.apply(x, _reduce_scatter_first_dim, _all_gather_first_dim)


def gather_last_dim(x):  # vocab-parallel logits -> full logits (for inference-style calls)
    return _Region.apply(x, _all_gather_last_dim, lambda g, grp: _split_last_dim(g, grp))


def _split_last_dim(x, group):
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    return x.chunk(world, dim=-1)[rank].contiguous()
