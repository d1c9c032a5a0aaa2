"""Depth diagnostics: what the Peri-LN and Curse-of-Depth papers plot, per layer, every k steps.

On a fixed probe batch (the first validation sequences, so steps compare), with dropout off:
  var       variance of the residual stream after each block (layer 0 = the embedding output)
  rms       its root mean square
  max_abs   its largest absolute activation ("massive activations")
  attn_entropy  mean entropy (nats) of each layer's causal attention distributions
and, from the step's real gradients (all-reduced, before clipping and the update):
  grad_norm L2 norm of each block's parameter gradients.

Cheap: one extra no-grad forward of one micro-batch, one explicit attention-probability
computation per layer, and one pass over the gradients. Works under any ZeRO stage: gradients are
read with DeepSpeed's safe_get_full_grad, activations through forward hooks that call modules
(so ZeRO-3 gathers their parameters).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from pretrain.distributed import all_gather_object, all_reduce


def _over(t: torch.Tensor, group, op=torch.distributed.ReduceOp.SUM) -> list[float]:
    """A few statistics (a float64 tensor on any device) combined over `group` (None: this rank's own),
    read back with one device-to-host copy."""
    return (t if group is None else all_reduce(t, op, group)).tolist()


def _residual_stats(x: torch.Tensor, shard_group=None) -> dict[str, float]:
    """Statistics of all elements of x; with shard_group (sequence parallelism) x is this rank's
    shard and the sums are combined over the group."""
    xf = x.detach().double()
    n, total, sq = _over(torch.stack([xf.new_tensor(xf.numel()), xf.sum(), xf.pow(2).sum()]), shard_group)
    (peak,) = _over(xf.abs().max().reshape(1), shard_group, torch.distributed.ReduceOp.MAX)
    mean = total / n
    var = (sq - n * mean * mean) / max(1.0, n - 1)  # unbiased, like torch.var
    return {"var": var, "rms": (sq / n) ** 0.5, "max_abs": peak}


def attention_entropy(q: torch.Tensor, k: torch.Tensor) -> float:
    """Mean entropy of softmax(q k^T / sqrt(d)) under a causal mask. q: (B, T, H, d), k: (B, T, Hkv, d)."""
    q, k = q.detach().float().transpose(1, 2), k.detach().float().transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    logp = torch.log_softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    ent = -(logp.exp() * logp.masked_fill(~causal, 0.0)).sum(-1)  # (B, H, T)
    return float(ent.mean())


@contextmanager
def _recording(blocks, tp_group=None, sequence_parallel: bool = False):
    """Hooks that record the residual stream after every block and each layer's attention entropy."""
    per_layer: dict[int, dict[str, float]] = {}
    handles = []

    shard_group = tp_group if sequence_parallel else None

    def embed_hook(module, args, kwargs):
        per_layer[0] = _residual_stats(args[0] if args else kwargs["x"], shard_group)

    def block_hook(block):
        def hook(module, args, output):
            per_layer.setdefault(block.layer, {}).update(_residual_stats(output[0], shard_group))

        return hook

    def attn_hook(block):
        def hook(module, args):
            q, k, _ = module.split_qkv(args[0])  # module calls: ZeRO-3 gathers their parameters
            # Under tensor parallelism this rank holds a share of the heads: average over all of them.
            heads = float(q.shape[2])
            local = [attention_entropy(q.transpose(0, 1), k.transpose(0, 1)) * heads, heads]
            ent, count = _over(torch.tensor(local, dtype=torch.float64), tp_group)
            per_layer.setdefault(block.layer, {})["attn_entropy"] = ent / count

        return hook

    blocks = list(blocks)
    if blocks and blocks[0].layer == 1:  # this rank holds the first block: its input is the embedding
        handles.append(blocks[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
    for block in blocks:
        handles.append(block.register_forward_hook(block_hook(block)))
        handles.append(block.attn.fn.register_forward_pre_hook(attn_hook(block)))
    try:
        yield per_layer
    finally:
        for h in handles:
            h.remove()


def _merge_stages(per_layer: dict, pp_group) -> dict:
    """Pipeline stages each hold some layers; every rank gets them all."""
    if pp_group is None:
        return per_layer
    merged = {}
    for part in all_gather_object(per_layer, pp_group):
        for layer, stats in part.items():
            merged.setdefault(layer, {}).update(stats)
    return merged


@torch.no_grad()
def activation_stats(
    forward, blocks, tokens: torch.Tensor, tp_group=None, sequence_parallel: bool = False, pp_group=None
) -> dict[str, list[float]]:
    """Runs forward(tokens) once with recording hooks on `blocks` (this rank's transformer blocks,
    also when `forward` is a DeepSpeed engine) and returns per-layer lists. With tensor parallelism,
    pass the tp group (statistics cover all heads and sequence shards); with pipeline parallelism,
    the pipeline group (every stage's layers are collected)."""
    with _recording(blocks, tp_group, sequence_parallel) as per_layer:
        forward(tokens)
    per_layer = _merge_stages(per_layer, pp_group)
    layers = sorted(per_layer)
    out = {key: [per_layer[l][key] for l in layers] for key in ("var", "rms", "max_abs")}
    out["attn_entropy"] = [per_layer[l]["attn_entropy"] for l in layers if l > 0]
    return out


def _grad_sq(params, get_grad, tp_group) -> float:
    """Sum of squared gradients; tensor-parallel shards are summed over the tp group, replicated
    parameters counted once. Summed on the gradients' device: one host copy, not one per parameter."""
    sums = {True: [], False: []}
    for p in params:
        g = get_grad(p)
        if g is not None:
            sums[bool(getattr(p, "tensor_model_parallel", False))].append(g.detach().double().pow(2).sum())

    def total(parts):
        return torch.stack(parts).sum().reshape(1) if parts else torch.zeros(1, dtype=torch.float64)

    (sharded,) = _over(total(sums[True]), tp_group)
    return sharded + total(sums[False]).item()


def layer_grad_norms(blocks, tp_group=None, pp_group=None) -> list[float]:
    """Per-block gradient norms of the current (all-reduced, unclipped) gradients. A collective
    under ZeRO: every rank must call it, between backward() and step() of a boundary micro-step."""
    from deepspeed.utils import safe_get_full_grad

    local = {b.layer: {"g": math.sqrt(_grad_sq(b.parameters(), safe_get_full_grad, tp_group))} for b in blocks}
    merged = _merge_stages(local, pp_group)
    return [merged[layer]["g"] for layer in sorted(merged)]


def global_grad_norm(model, tp_group=None, pp_group=None) -> float:
    """The whole model's gradient norm (for ZeRO-0 in fp32, where DeepSpeed does not report one).
    Parameters that a later pipeline stage holds a tied copy of are counted once."""
    params = [p for p in model.parameters() if not getattr(p, "ds_pipe_replicated", False)]
    sq = _grad_sq(params, lambda p: p.grad, tp_group)
    (sq,) = _over(torch.tensor([sq], dtype=torch.float64), pp_group)
    return math.sqrt(sq)
