"""Depth and stability diagnostics: what the Peri-LN, Curse-of-Depth and training-stability papers
plot, per layer, every k steps.

On a fixed probe batch (the first validation sequences, so steps compare), with dropout off:
  var       variance of the residual stream after each block (layer 0 = the embedding output)
  rms       its root mean square
  max_abs   its largest absolute activation ("massive activations")
  attn_entropy      mean entropy (nats) of each layer's causal attention distributions
  attn_entropy_min  the smallest per-head mean entropy of the layer: the collapsing head (Zhai et al. 2023,
                    "Stabilizing Transformer Training by Preventing Attention Entropy Collapse")
  attn_logit_max    the layer's largest pre-softmax attention logit q.k/sqrt(d) over the positions the
                    causal mask keeps, after QK-norm and RoPE: exactly what SDPA softmaxes (Wortsman et al.
                    2023, "Small-scale proxies for large-scale Transformer training instabilities")
and of the output layer on the same batch (the logits the loss's z-loss term acts on):
  logit_mean  mean output logit over vocabulary, positions and batch
  logit_max   largest output logit
  log_z_mean  mean over positions of log Z = logsumexp of the logits over the vocabulary
and, from the step's real gradients (all-reduced, before clipping and the update):
  grad_norm L2 norm of each block's parameter gradients.

Cheap: one extra no-grad forward of one micro-batch, one explicit attention-probability computation per
layer, a pass over the probe's logits in chunks, and one pass over the gradients. Works under any ZeRO
stage: gradients are read with DeepSpeed's safe_get_full_grad, activations through forward hooks that
call modules (so ZeRO-3 gathers their parameters).

Layouts. Tensor parallelism: each rank holds a share of the heads and a vocabulary slice of the logits;
statistics are combined over the tp group (sums, MIN, MAX; logsumexp over slices as global max, then
the sum of exponentials). Megatron sequence parallelism: the residual stream is a sequence shard (sums
combined over tp); attention and the vocab-parallel logits see the whole sequence (the column layers
gather it). DeepSpeed-Ulysses: the residual stream and the logits are sequence slices (combined over the
Ulysses group); for attention each rank gathers its slice's q and k into whole sequences and takes
1/ulysses of its heads, as Ulysses' all-to-all does. Pipeline parallelism: each stage records its own
layers (and the last stage the logits); the stages' records are merged so every rank has them all.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from pretrain.distributed import all_gather, all_gather_object, all_reduce

SUM, MIN, MAX = torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.MIN, torch.distributed.ReduceOp.MAX
SCORE_CHUNK_ELEMENTS = 16 * 2**20  # attention probabilities computed for this many (query, key) pairs at a time
LOGIT_CHUNK_ELEMENTS = 4 * 2**20  # logits read in chunks of about this size: no fp32 copy of them all


def _reduced(t: torch.Tensor, group, op=SUM) -> torch.Tensor:
    """t combined over `group` (None: this rank's own; a list: each group in turn, for data split along
    two axes), on t's device."""
    for g in group if isinstance(group, (list, tuple)) else [group]:
        if g is not None:
            t = all_reduce(t, op, g)
    return t


def _over(t: torch.Tensor, group, op=SUM) -> list[float]:
    """A few statistics (a float64 tensor on any device) combined over `group` (see _reduced), read back
    with one device-to-host copy."""
    return _reduced(t, group, op).tolist()


def _residual_stats(x: torch.Tensor, shard_group=None) -> dict[str, float]:
    """Statistics of all elements of x; with shard_group (sequence parallelism) x is this rank's
    shard and the sums are combined over the group."""
    xf = x.detach().double()
    n, total, sq = _over(torch.stack([xf.new_tensor(xf.numel()), xf.sum(), xf.pow(2).sum()]), shard_group)
    (peak,) = _over(xf.abs().max().reshape(1), shard_group, MAX)
    mean = total / n
    var = (sq - n * mean * mean) / max(1.0, n - 1)  # unbiased, like torch.var
    return {"var": var, "rms": (sq / n) ** 0.5, "max_abs": peak}


def attention_stats(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head mean entropy (H,), largest logit (0-d)) of softmax(q k^T / sqrt(d)) under a causal mask,
    the logit taken over unmasked positions only. q: (B, T, H, d), k: (B, T, Hkv, d); fp32. A few heads at a
    time, so the (B, heads, T, T) probabilities stay near SCORE_CHUNK_ELEMENTS at long sequences."""
    q, k = q.detach().float().transpose(1, 2), k.detach().float().transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    b, h, t = q.shape[:3]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    heads = max(1, SCORE_CHUNK_ELEMENTS // (b * t * t))
    entropy, peaks = [], []
    for i in range(0, h, heads):
        scores = q[:, i : i + heads] @ k[:, i : i + heads].transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~causal, float("-inf"))
        logp = torch.log_softmax(scores, dim=-1)
        ent = -(logp.exp() * logp.masked_fill(~causal, 0.0)).sum(-1)  # (B, heads, T)
        entropy.append(ent.mean(dim=(0, 2)))
        peaks.append(scores.amax())
    return torch.cat(entropy), torch.stack(peaks).amax()


def attention_entropy(q: torch.Tensor, k: torch.Tensor) -> float:
    """Mean entropy of softmax(q k^T / sqrt(d)) under a causal mask. q: (B, T, H, d), k: (B, T, Hkv, d)."""
    return float(attention_stats(q, k)[0].mean())


def _whole_sequences_own_heads(q: torch.Tensor, k: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses: (S/u, B, heads, hd) slices -> (S, B, heads/u, hd), this rank's share of the heads (each kv
    group's query heads stay with it: both head counts divide by u, pretrain/config.py)."""
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)

    def gather(x):
        return torch.cat(all_gather(x, group), dim=0).chunk(world, dim=2)[rank]

    return gather(q), gather(k)


def logit_stats(logits: torch.Tensor, vocab_group=None, sequence_group=None) -> dict[str, float]:
    """logit_mean, logit_max and log_z_mean of output logits (..., V_local): this rank's vocabulary slice
    (vocab_group: the ranks holding the other slices) of this rank's positions (sequence_group: the ranks
    holding the other positions). Read in one pass, in chunks of rows in fp32 at least; sums in fp64."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    acc = torch.promote_types(flat.dtype, torch.float32)
    step = max(1, LOGIT_CHUNK_ELEMENTS // flat.shape[-1])
    row_max, sum_exp, total = [], [], torch.zeros((), dtype=torch.float64, device=flat.device)
    for i in range(0, flat.shape[0], step):  # one pass: this slice's row maxima and sums of exp below them
        c = flat[i : i + step].to(acc)
        m = c.amax(dim=-1)
        row_max.append(m)
        sum_exp.append((c - m[:, None]).exp().sum(dim=-1))
        total += c.sum(dim=-1).double().sum()
    local_max = torch.cat(row_max)
    row_max = _reduced(local_max, vocab_group, MAX)  # per position, over the whole vocabulary
    sum_exp = _reduced(torch.cat(sum_exp) * (local_max - row_max).exp(), vocab_group)  # rescaled to the global max
    log_z = row_max.double() + sum_exp.double().log()
    n, total = _over(torch.stack([total.new_tensor(flat.numel()), total]), [vocab_group, sequence_group])
    (peak,) = _over(row_max.max().double().reshape(1), sequence_group, MAX)
    positions, log_z_sum = _over(torch.stack([log_z.new_tensor(flat.shape[0]), log_z.sum()]), sequence_group)
    return {"logit_mean": total / n, "logit_max": peak, "log_z_mean": log_z_sum / positions}


def _ulysses_group(blocks):
    """The group sharing each sequence under DeepSpeed-Ulysses (model/ulysses.py), None without it."""
    for block in blocks:
        if getattr(block.attn.fn, "ulysses", None) is not None:
            return block.attn.fn.ulysses.spg
    return None


def _output_layer(model):
    """(module whose forward output the probe reads, head to apply to it first or None): for the GPT its
    output layer (the logits); for a PipelineModule its last stage's output, which under the fused loss is
    the final hidden state (the loss builds no logits) and the head is called on it. None on other stages."""
    if not hasattr(model, "stage_id"):
        return model.head, None
    if model.stage_id != model.num_stages - 1:
        return None
    from model.pipeline import EmbeddingStage, HeadStage

    # the untied output layer, or the tied embedding this stage holds for it
    last = [m for m in model.modules() if isinstance(m, HeadStage)] or [
        m for m in model.modules() if isinstance(m, EmbeddingStage)
    ]
    return model, (last[0].head if last[0].fused_loss else None)


@contextmanager
def _recording(blocks, tp_group=None, sequence_parallel: bool = False, model=None):
    """Hooks that record the residual stream after every block, each layer's attention statistics and,
    with `model`, the output logits' statistics (under key "output")."""
    per_layer: dict = {}
    handles = []
    ulysses = _ulysses_group(blocks)
    residual_groups = [tp_group if sequence_parallel else None, ulysses]  # residual stream shards
    head_groups = [tp_group, ulysses]  # each rank holds a share of every layer's heads

    def embed_hook(module, args, kwargs):
        per_layer[0] = _residual_stats(args[0] if args else kwargs["x"], residual_groups)

    def block_hook(block):
        def hook(module, args, output):
            per_layer.setdefault(block.layer, {}).update(_residual_stats(output[0], residual_groups))

        return hook

    def attn_hook(block):
        def hook(module, args):
            q, k, _ = module.split_qkv(args[0])  # module calls: ZeRO-3 gathers their parameters
            if getattr(module, "ulysses", None) is not None:
                q, k = _whole_sequences_own_heads(q, k, module.ulysses.spg)
            per_head, peak = attention_stats(q.transpose(0, 1), k.transpose(0, 1))
            sums = torch.stack([per_head.sum(), per_head.new_tensor(float(per_head.numel()))]).double()
            ent_sum, heads = _over(sums, head_groups)
            peak, neg_min = _over(torch.stack([peak, -per_head.min()]).double(), head_groups, MAX)
            per_layer.setdefault(block.layer, {}).update(
                {"attn_entropy": ent_sum / heads, "attn_entropy_min": -neg_min, "attn_logit_max": peak}
            )

        return hook

    blocks = list(blocks)
    if blocks and blocks[0].layer == 1:  # this rank holds the first block: its input is the embedding
        handles.append(blocks[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
    for block in blocks:
        handles.append(block.register_forward_hook(block_hook(block)))
        handles.append(block.attn.fn.register_forward_pre_hook(attn_hook(block)))
    output = None if model is None else _output_layer(model)
    if output is not None:
        module, head = output

        def output_hook(_module, args, out):
            logits = out if head is None else head(out)  # vocab slices under tensor parallelism
            per_layer["output"] = logit_stats(logits, tp_group, ulysses)

        handles.append(module.register_forward_hook(output_hook))
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


OUTPUT_STATS = ("logit_mean", "logit_max", "log_z_mean")


@torch.no_grad()
def activation_stats(
    forward,
    blocks,
    tokens: torch.Tensor,
    tp_group=None,
    sequence_parallel: bool = False,
    pp_group=None,
    model: nn.Module | None = None,
) -> dict:
    """Runs forward(tokens) once with recording hooks on `blocks` (this rank's transformer blocks,
    also when `forward` is a DeepSpeed engine) and returns per-layer lists (attention statistics from
    layer 1 on) and, with `model` (the GPT or this rank's PipelineModule, whatever the engine wraps),
    the output logits' statistics (OUTPUT_STATS). With tensor parallelism, pass the tp group
    (statistics cover all heads, vocabulary slices and sequence shards); with pipeline parallelism,
    the pipeline group (every stage's layers are collected)."""
    with _recording(blocks, tp_group, sequence_parallel, model) as per_layer:
        forward(tokens)
    per_layer = _merge_stages(per_layer, pp_group)
    output = per_layer.pop("output", None)
    layers = sorted(per_layer)
    out = {key: [per_layer[l][key] for l in layers] for key in ("var", "rms", "max_abs")}
    for key in ("attn_entropy", "attn_entropy_min", "attn_logit_max"):
        out[key] = [per_layer[l][key] for l in layers if l > 0]
    if model is not None:
        if output is None:
            raise RuntimeError("diagnostics: no pipeline stage recorded the output logits of the probe batch")
        out.update(output)
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
