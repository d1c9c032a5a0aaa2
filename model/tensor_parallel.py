"""Megatron-style tensor- and sequence-parallel layers that run on CPU (gloo) and GPU (NCCL).

Same semantics as megatron-core's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding
and its sequence-parallel mappings. Those allocate their sequence-parallel buffers with
`torch.cuda.current_device()` and cannot run on CPU, so the layers are written here (plain
`F.linear` plus one collective each); the process groups and the vocab-parallel cross-entropy are
megatron-core's own. The collectives themselves (copy / reduce / gather / scatter regions) are in
model/tp_mappings.py.

Activations are sequence-first (S, B, d). With sequence parallelism the residual stream lives in
sequence shards (S/tp, B, d): a column-parallel layer all-gathers the sequence on its input
(reduce-scatter in backward), a row-parallel layer reduce-scatters its output (all-gather in
backward). Without it, a column layer's input is copied (all-reduce in backward) and a row layer's
output all-reduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.sigma_reparam import SigmaReparam
from model.tp_mappings import (  # noqa: F401  (re-exported: the layers' users import them from here)
    copy_to_tp,
    gather_from_sequence,
    gather_last_dim,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    tp_all_reduce,
    tp_group,
)


def _mark_sharded(p: nn.Parameter, dim: int) -> None:
    # The attributes megatron-core and DeepSpeed read: a shard is counted once per rank in the
    # gradient norm; replicated parameters once in all.
    p.tensor_model_parallel = True
    p.partition_dim = dim


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; the output stays split (gather_output=False)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: int, sequence_parallel: bool, sigma_reparam=False
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features // tp)) if bias else None
        _mark_sharded(self.weight, 0)
        if self.bias is not None:
            _mark_sharded(self.bias, 0)
        # sigma-Reparam of the full matrix: u is sharded with the rows (model/sigma_reparam.py)
        self.sigma = SigmaReparam(out_features // tp, in_features, split="out") if sigma_reparam else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_from_sequence(x) if self.sequence_parallel else copy_to_tp(x)
        return F.linear(x, self.weight if self.sigma is None else self.sigma(self.weight), self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns and x already split the same way; the partial
    products are summed over the tensor-parallel group; the bias is replicated and added after."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: int, sequence_parallel: bool, sigma_reparam=False
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        _mark_sharded(self.weight, 1)
        # sigma-Reparam of the full matrix: v is sharded with the columns (model/sigma_reparam.py)
        self.sigma = SigmaReparam(out_features, in_features // tp, split="in") if sigma_reparam else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight if self.sigma is None else self.sigma(self.weight))
        y = reduce_scatter_to_sequence(y) if self.sequence_parallel else reduce_from_tp(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; ids outside it give zeros, and the sum
    over ranks is the embedding (reduce-scattered to sequence shards under SP)."""

    def __init__(self, vocab_size: int, dim: int, tp: int, tp_rank: int, sequence_parallel: bool):
        super().__init__()
        self.per_rank = vocab_size // tp
        self.start = tp_rank * self.per_rank
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        _mark_sharded(self.weight, 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence(out) if self.sequence_parallel else reduce_from_tp(out)


def vocab_parallel_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy from vocab-split logits (megatron-core's, fp32)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), labels.contiguous())  # it views the labels flat


def all_reduce_grad_over_tp(param: nn.Parameter) -> None:
    """Replicated parameters that see only this rank's share of the data (norm gains under
    sequence parallelism, per-head QK-norm gains under TP) get their gradient summed over the
    tensor-parallel group as it is produced, before DeepSpeed reduces it over data parallelism."""
    param.register_hook(lambda g: tp_all_reduce(g.clone(), tp_group()))
    param.sequence_parallel_grad = True
