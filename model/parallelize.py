"""Tensor parallelism applied to a plain GPT as a separate step (as torchtitan does).

Every rank builds the same plain model from the same seed (so any layout starts from the same
weights), then `apply_tensor_parallel` swaps each linear layer for its Megatron-style parallel
version holding this rank's shard of the plain weights:

    qkv      column-parallel, split by KV-head group (the grouped layout makes that contiguous)
    proj     row-parallel, split by heads
    fc1      column-parallel; SwiGLU's [gate; up] rows are split so each rank holds [gate_r; up_r]
    fc2      row-parallel
    embed    vocab-parallel rows; the output layer is column-parallel over the vocabulary (the same
             tensor when embeddings are tied) and the loss is megatron-core's vocab-parallel CE
    norms    replicated

`SHARDING` says how each parameter is split; `shard` and `unshard` use it both ways, so a
checkpoint written with tp > 1 can be put back into the plain layout (for evaluation, export).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from model.norms import Norm
from model.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_reduce_grad_over_tp,
)

# How each parameter of the plain model is split across tensor-parallel ranks, by name.
SHARDING = [
    (re.compile(r"(^|\.)attn\.fn\.qkv\.(weight|bias)$"), "rows"),
    (re.compile(r"(^|\.)attn\.fn\.proj\.weight$"), "cols"),
    (re.compile(r"(^|\.)mlp\.fn\.fc1\.(weight|bias)$"), "fc1"),
    (re.compile(r"(^|\.)mlp\.fn\.fc2\.weight$"), "cols"),
    (re.compile(r"^(embed|head)\.weight$"), "rows"),
    # sigma-Reparam's vectors of a sharded dimension: u of a column-parallel layer, v of a row-parallel one
    (re.compile(r"(^|\.)attn\.fn\.qkv\.sigma\.u$"), "rows"),
    (re.compile(r"(^|\.)mlp\.fn\.fc1\.sigma\.u$"), "fc1"),
    (re.compile(r"(^|\.)(attn\.fn\.proj|mlp\.fn\.fc2)\.sigma\.v$"), "rows"),
]


def sharding_of(name: str) -> str:
    for pattern, kind in SHARDING:
        if pattern.search(name):
            return kind
    return "replicated"


def shard(name: str, tensor: torch.Tensor, tp: int, rank: int, swiglu: bool) -> torch.Tensor:
    kind = sharding_of(name)
    if kind == "rows" or (kind == "fc1" and not swiglu):
        return tensor.chunk(tp, dim=0)[rank]
    if kind == "cols":
        return tensor.chunk(tp, dim=1)[rank]
    if kind == "fc1":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return tensor


def unshard(name: str, shards: list[torch.Tensor], swiglu: bool) -> torch.Tensor:
    """The plain-layout tensor from the tp shards of one parameter (inverse of `shard`)."""
    kind = sharding_of(name)
    if kind == "rows" or (kind == "fc1" and not swiglu):
        return torch.cat(shards, dim=0)
    if kind == "cols":
        return torch.cat(shards, dim=1)
    if kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return shards[0]


def unshard_state_dicts(states: list[dict], swiglu: bool) -> dict:
    return {name: unshard(name, [s[name] for s in states], swiglu) for name in states[0]}


def _copy_sigma(linear: nn.Linear, out, tp: int, rank: int, name: str, swiglu: bool) -> None:
    """sigma-Reparam's gamma (replicated) and this rank's share of u, v (model/sigma_reparam.py)."""
    if out.sigma is None:
        return
    out.sigma.gamma.copy_(linear.sigma.gamma)
    for vec in ("u", "v"):
        full = getattr(linear.sigma, vec)
        getattr(out.sigma, vec).copy_(shard(f"{name}.sigma.{vec}", full, tp, rank, swiglu).to(full.device))


def _column(linear: nn.Linear, tp: int, rank: int, sp: bool, name: str, swiglu: bool) -> ColumnParallelLinear:
    reparam = getattr(linear, "sigma", None) is not None
    out = ColumnParallelLinear(linear.in_features, linear.out_features, linear.bias is not None, tp, sp, reparam)
    with torch.no_grad():
        out.weight.copy_(shard(name + ".weight", linear.weight, tp, rank, swiglu))
        if linear.bias is not None:
            out.bias.copy_(shard(name + ".bias", linear.bias, tp, rank, swiglu))
        _copy_sigma(linear, out, tp, rank, name, swiglu)
    return out


def _row(linear: nn.Linear, tp: int, rank: int, sp: bool, name: str) -> RowParallelLinear:
    reparam = getattr(linear, "sigma", None) is not None
    out = RowParallelLinear(linear.in_features, linear.out_features, linear.bias is not None, tp, sp, reparam)
    with torch.no_grad():
        out.weight.copy_(shard(name + ".weight", linear.weight, tp, rank, False))
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        _copy_sigma(linear, out, tp, rank, name, False)
    return out


def apply_tensor_parallel(model, tp: int, rank: int, sequence_parallel: bool):
    """Converts `model` (a plain GPT) in place into this rank's tensor-parallel shard."""
    if tp == 1:
        return model
    swiglu = model.cfg.mlp == "swiglu"
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn.fn, block.mlp.fn
        attn.qkv = _column(attn.qkv, tp, rank, sequence_parallel, f"blocks.{i}.attn.fn.qkv", swiglu)
        attn.proj = _row(attn.proj, tp, rank, sequence_parallel, f"blocks.{i}.attn.fn.proj")
        attn.num_heads //= tp
        attn.num_kv_heads //= tp
        mlp.fc1 = _column(mlp.fc1, tp, rank, sequence_parallel, f"blocks.{i}.mlp.fn.fc1", swiglu)
        mlp.fc2 = _row(mlp.fc2, tp, rank, sequence_parallel, f"blocks.{i}.mlp.fn.fc2")
        for qk in (attn.q_norm, attn.k_norm):  # one gain shared by heads that are now split
            for p in qk.parameters():
                all_reduce_grad_over_tp(p)
        for junction in (block.attn_exit, block.mlp_exit):
            junction.sequence_parallel = sequence_parallel
    embed = VocabParallelEmbedding(model.cfg.vocab_size, model.cfg.hidden_size, tp, rank, sequence_parallel)
    with torch.no_grad():
        embed.weight.copy_(shard("embed.weight", model.embed.weight, tp, rank, swiglu))
    head = ColumnParallelLinear(model.cfg.hidden_size, model.cfg.vocab_size, False, tp, sequence_parallel)
    if model.cfg.tie_embeddings:
        head.weight = embed.weight
    else:
        with torch.no_grad():
            head.weight.copy_(shard("head.weight", model.head.weight, tp, rank, swiglu))
    model.embed, model.head = embed, head
    if sequence_parallel:  # norms see only this rank's tokens: sum their gradients over tp
        for module in model.modules():
            if isinstance(module, Norm) and not getattr(module.weight, "sequence_parallel_grad", False):
                for p in module.parameters():
                    all_reduce_grad_over_tp(p)
    model.vocab_parallel = True
    return model
