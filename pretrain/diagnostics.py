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


def _residual_stats(x: torch.Tensor) -> dict[str, float]:
    xf = x.detach().float()
    return {"var": float(xf.var()), "rms": float(xf.pow(2).mean().sqrt()), "max_abs": float(xf.abs().max())}


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
def _recording(model):
    """Hooks that record the residual stream after every block and each layer's attention entropy."""
    per_layer: dict[int, dict[str, float]] = {}
    handles = []

    def embed_hook(module, args, kwargs):
        per_layer[0] = _residual_stats(args[0] if args else kwargs["x"])

    def block_hook(block):
        def hook(module, args, output):
            per_layer.setdefault(block.layer, {}).update(_residual_stats(output[0]))
        return hook

    def attn_hook(block):
        def hook(module, args):
            q, k, _ = module.split_qkv(args[0])  # module calls: ZeRO-3 gathers their parameters
            per_layer.setdefault(block.layer, {})["attn_entropy"] = attention_entropy(q, k)
        return hook

    blocks = list(model.blocks)
    handles.append(blocks[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
    for block in blocks:
        handles.append(block.register_forward_hook(block_hook(block)))
        handles.append(block.attn.fn.register_forward_pre_hook(attn_hook(block)))
    try:
        yield per_layer
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_stats(forward, model, tokens: torch.Tensor) -> dict[str, list[float]]:
    """Runs forward(tokens) once with recording hooks on `model` (the plain module, also when
    `forward` is a DeepSpeed engine) and returns per-layer lists."""
    with _recording(model) as per_layer:
        forward(tokens)
    layers = sorted(per_layer)
    out = {key: [per_layer[l][key] for l in layers] for key in ("var", "rms", "max_abs")}
    out["attn_entropy"] = [per_layer[l]["attn_entropy"] for l in layers if l > 0]
    return out


def layer_grad_norms(model) -> list[float]:
    """Per-block gradient norms of the current (all-reduced, unclipped) gradients. A collective
    under ZeRO: every rank must call it, between backward() and step() of a boundary micro-step."""
    from deepspeed.utils import safe_get_full_grad

    norms = []
    for block in model.blocks:
        sq = 0.0
        for p in block.parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                sq += float(g.detach().float().pow(2).sum())
        norms.append(math.sqrt(sq))
    return norms
