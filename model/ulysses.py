"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al. 2023) applied to a plain GPT, as a separate step
like tensor parallelism (model/parallelize.py).

Each of the `ulysses` ranks of a group reads the same micro-batch and keeps one contiguous slice of every
sequence: embeddings, norms, MLPs and the output layer run on S/N tokens. Attention needs the whole
sequence: DeepSpeed's DistributedAttention (deepspeed/sequence/layer.py) all-to-alls q, k, v from
(S/N, B, H, hd) to (S, B, H/N, hd), our attention core runs on whole sequences for H/N heads, and a fourth
all-to-all brings the output back to (S/N, B, H, hd). DeepSpeed's all-to-all is torch's all_to_all_single,
which gloo implements, so the same code runs on CPU. Queries and keys are rotated at their global positions
before the exchange (model/attention.py).

The loss. Rank r's loss must be its share of the micro-batch's mean, sum over its tokens of mask * loss /
(mask count of the whole sequence), so that the sum over the group is the single-process loss: DeepSpeed
sums gradients over the Ulysses ranks and averages them over data parallelism (pretrain/parallel.py). The
model computes the masked mean over its own tokens; `_shard_loss` rescales it by (local count / group
count) and reports, as the value, the whole micro-batch's loss (the group's sum), so logs, the bad-step
guard and evaluation see the same number on every rank while the gradient stays the local share.
"""

from __future__ import annotations

import torch
from torch import nn


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 1 (B, T/N, ...) -> (B, T, ...); backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = torch.distributed.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        rank, world = torch.distributed.get_rank(ctx.group), torch.distributed.get_world_size(ctx.group)
        return grad.chunk(world, dim=1)[rank].contiguous(), None


def shard_of(x: torch.Tensor | None, rank: int, size: int) -> torch.Tensor | None:
    """This rank's contiguous slice of dim 1 (the sequence of a (B, T) batch)."""
    if x is None:
        return None
    if x.shape[1] % size:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by parallel.ulysses={size}")
    return x.chunk(size, dim=1)[rank]


class SequenceShard:
    """The forward hooks that put a GPT's inputs on this rank's sequence slice and its outputs back."""

    def __init__(self, group):
        self.group = group
        self.rank = torch.distributed.get_rank(group)
        self.size = torch.distributed.get_world_size(group)
        self.mask = None  # the loss mask of the call in flight (for the loss weights)

    def before(self, module: nn.Module, args: tuple, kwargs: dict):
        names = ("tokens", "labels", "loss_mask")
        given = dict(zip(names, args))
        given.update(kwargs)
        sharded = {name: shard_of(value, self.rank, self.size) for name, value in given.items()}
        self.mask = sharded.get("loss_mask")
        self.tokens = sharded["tokens"]
        return (), sharded

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if "labels" not in kwargs or kwargs["labels"] is None:
            return _GatherSequence.apply(output, self.group)  # logits (B, T/N, V) -> (B, T, V)
        return self._shard_loss(output, self.mask, self.tokens.numel())

    def _shard_loss(self, local_mean: torch.Tensor, mask: torch.Tensor | None, tokens: int) -> torch.Tensor:
        count = mask.sum().to(torch.float64) if mask is not None else torch.tensor(float(tokens), dtype=torch.float64)
        count = count.to(local_mean.device)
        total = count.clone()
        torch.distributed.all_reduce(total, group=self.group)
        share = local_mean * (count / total.clamp(min=1.0)).to(local_mean.dtype)
        whole = share.detach().clone()
        torch.distributed.all_reduce(whole, group=self.group)
        return share + (whole - share.detach())  # value: the micro-batch's loss; gradient: this rank's share


def apply_ulysses(model, group) -> None:
    """Converts a plain (or tensor-parallel) GPT in place to run its sequences split over `group`."""
    from deepspeed.sequence.layer import DistributedAttention

    shard = SequenceShard(group)
    for block in model.blocks:
        attn = block.attn.fn
        attn.sequence_shard = (shard.rank, shard.size)
        # scatter the heads (dim 2), gather the sequence (dim 0) of (S, B, H, hd); and back for the output
        attn.ulysses = DistributedAttention(attn.attend, group, scatter_idx=2, gather_idx=0)
    model.register_forward_pre_hook(shard.before, with_kwargs=True)
    model.register_forward_hook(shard.after, with_kwargs=True)
    model.sequence_shard = shard
