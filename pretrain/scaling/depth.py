"""Depth diagnostics of a trained model on a fixed probe of held-out sequences (dropout off):

  var, rms, max_abs  the residual stream after each block (layer 0 = the embedding output), as the
                     training-time diagnostics define them (pretrain.diagnostics.activation_stats)
  attn_entropy       mean entropy of each block's attention distributions (same source)
  angular_distance   per token, arccos(cos(x_l, x_{l+1})) / pi between the residual streams entering
                     and leaving block l+1, averaged over tokens (Gromov et al. 2024, "The
                     Unreasonable Ineffectiveness of the Deeper Layers"); 0 = the block leaves the
                     direction unchanged, 0.5 = orthogonal
  removal            the probe loss with each block removed, and its increase over the full model

Removing a block: the residual stream passes block l unchanged. The model's blocks hand each other
(x, h), h being the next sublayer's normed input computed inside the previous block's junction; a
skipped block's h is dropped and the block after it computes its own from x (Block.forward(x, None));
when the last block is skipped the final norm is applied to x here. `run_blocks` mirrors GPT.forward
for the plain (single-process) model, and `depth_profile` checks that it still does.
"""

from __future__ import annotations

import math

import torch

from model.gpt import token_losses
from pretrain.diagnostics import activation_stats


@torch.no_grad()
def run_blocks(model, tokens: torch.Tensor, skip: int | None = None, keep: bool = False):
    """tokens (B, T). Returns (h, xs): h (T, B, d) is what the output layer reads (the final norm of
    the residual stream), xs the residual stream entering block 1 and leaving every block
    ([x_0 .. x_L], sequence-first) when `keep`. `skip`: the 1-based index of a block to remove."""
    x = model.embed_norm(model.embed(tokens.t()))
    h = None
    xs = [x] if keep else None
    for block in model.blocks:
        if block.layer == skip:
            h = None  # the skipped block's junction would have produced the next block's input norm
        else:
            x, h = block(x, h)
        if keep:
            xs.append(x)
    if h is None:  # the last block was skipped: its junction applied the final norm
        h = model.final_norm(x)
    return h, xs


def probe_loss(
    model, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, skip: int | None = None
) -> tuple[float, float]:
    """(summed token NLL, number of tokens) of the probe, optionally with one block removed."""
    h, _ = run_blocks(model, tokens, skip)
    losses = token_losses(model.head(h), labels.t())
    m = torch.ones_like(losses) if mask is None else mask.t().to(losses.dtype)
    return float((losses * m).sum()), float(m.sum())


def angular_distances(xs: list[torch.Tensor]) -> tuple[list[float], int]:
    """Per consecutive pair (x_l, x_{l+1}): the sum over tokens of arccos(cosine)/pi, and the token count.
    Float64: arccos is steep near cosine 1, where deep layers of a trained model sit."""
    sums = []
    for a, b in zip(xs[:-1], xs[1:], strict=True):
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
        sums.append(float(torch.arccos(cos).sum()) / math.pi)
    return sums, xs[0].shape[0] * xs[0].shape[1]


@torch.no_grad()
def depth_profile(model, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int = 8) -> dict:
    """Every statistic of the module docstring on the probe (tokens, labels: (B, T), all positions
    real). The model must be the plain single-process GPT in eval mode."""
    if model.training:
        raise ValueError("depth_profile: put the model in eval mode (dropout off)")
    num_layers = len(model.blocks)
    device = next(model.parameters()).device
    tokens, labels = tokens.to(device), labels.to(device)
    # Residual-stream statistics over the whole probe in one pass, defined as during training.
    stats = activation_stats(model, model.blocks, tokens)
    ang = [0.0] * num_layers
    ang_tokens = 0
    nll = [0.0] * (num_layers + 1)  # index 0: the full model; l: block l removed
    count = 0.0
    reference = 0.0
    for start in range(0, tokens.shape[0], batch_size):
        tok, lab = tokens[start : start + batch_size], labels[start : start + batch_size]
        h, xs = run_blocks(model, tok, keep=True)
        sums, n = angular_distances(xs)
        ang = [a + s for a, s in zip(ang, sums, strict=True)]
        ang_tokens += n
        losses = token_losses(model.head(h), lab.t())
        nll[0] += float(losses.sum())
        count += losses.numel()
        reference += float(model(tok, lab)) * losses.numel()
        for layer in range(1, num_layers + 1):
            nll[layer] += probe_loss(model, tok, lab, skip=layer)[0]
    base = nll[0] / count
    if not math.isclose(base, reference / count, rel_tol=1e-4, abs_tol=1e-5):
        raise RuntimeError(
            f"depth_profile: the layer-skipping forward gives loss {base:.6f} but the model's own "
            f"forward {reference / count:.6f}; pretrain/scaling/depth.py:run_blocks no longer mirrors "
            "GPT.forward"
        )
    without = [v / count for v in nll[1:]]
    return {
        "var": stats["var"],
        "rms": stats["rms"],
        "max_abs": stats["max_abs"],
        "attn_entropy": stats["attn_entropy"],
        "angular_distance": [a / ang_tokens for a in ang],
        "removal": {"base_loss": base, "loss": without, "increase": [w - base for w in without]},
    }
