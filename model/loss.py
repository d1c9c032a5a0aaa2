"""The training loss from the final hidden states: the output layer and the cross-entropy, fused.

    loss = sum_t w_t * (lse_t - z_t[y_t] + z_loss * lse_t^2),   z_t = W h_t,  lse_t = logsumexp(z_t)
    w_t  = mask_t / max(1, sum(mask))     (the mean over the tokens the mask keeps)

The plain path builds the logits [tokens x vocab], their fp32 copy, log-softmax and its gradient:
four tensors of that size. The fused path never does: it walks over chunks of tokens, computes a
chunk's logits, its loss and its gradient at once, and keeps only the gradients of h and W (the
same idea as Liger-Kernel's fused linear cross-entropy, torch's F.linear_cross_entropy with chunking
options, and Apple's cut-cross-entropy). Gradients are computed in the forward (the loss is a
weighted sum, so its gradient is known there up to the scalar that backward brings), which saves
recomputing each chunk's logits in backward: three matmuls in all, as in the plain path. Between the
matmuls, a chunk's softmax, loss and logit gradient are one C++ pass over each row on fp32 CPU tensors
(kernels/cpu_kernels.py: cross_entropy_rows), torch's ops otherwise.

Vocab-parallel tensor parallelism: each rank holds a contiguous slice of the vocabulary
(vocab_start ... vocab_start + V_local) and the full hidden states; per chunk the row maxima are
all-reduced (MAX), then the target logit and the sum of exponentials (SUM), as megatron-core's
vocab_parallel_cross_entropy does for whole logits. The gradient of h is this rank's partial sum;
the tensor-parallel input mapping (copy_to_tp / gather_from_sequence) all-reduces it in backward.

The op is a torch.library custom op: torch.compile treats it as one opaque call (no graph break),
and the collectives inside it stay eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kernels import cpu_kernels
from model.tensor_parallel import copy_to_tp, gather_from_sequence, tp_all_reduce, tp_group, vocab_parallel_token_losses

# Chunk size: as many tokens as keep one chunk's fp32 logits near this many elements, but at least
# MIN_CHUNK_TOKENS so the matmuls stay efficient. CPU: 16 MiB, measured at the quickstart shape
# (bench/RESULTS.md, issue 19: chunks that stay in cache beat larger ones). GPU: 256 MiB, because each
# chunk costs about twenty kernel launches from Python, against a whole step of some tens of ms for a
# 125M model (16K tokens, vocabulary 50K: 13 chunks, not 128); still ~1/20 of the plain path's logits,
# their fp32 copy and gradient. The GPU figure is reasoned, not measured: bench/gpu_check.sh measures
# the fused loss against the plain one at 125M.
CHUNK_ELEMENTS = 4 * 2**20
CHUNK_ELEMENTS_GPU = 64 * 2**20
MIN_CHUNK_TOKENS = 128


@dataclass(frozen=True)
class LossSpec:
    """How the model turns its final hidden states into the training loss (train.fused_loss, train.z_loss)."""

    fused: bool = True
    z_loss: float = 0.0
    chunk_tokens: int = 0  # 0 = chosen from CHUNK_ELEMENTS(_GPU) and the local vocabulary size


def chunk_tokens_for(n_tokens: int, local_vocab: int, requested: int = 0, device_type: str = "cpu") -> int:
    if requested > 0:
        return min(requested, max(1, n_tokens))
    elements = CHUNK_ELEMENTS_GPU if device_type == "cuda" else CHUNK_ELEMENTS
    return max(1, min(n_tokens, max(MIN_CHUNK_TOKENS, elements // max(1, local_vocab))))


def token_weights(loss_mask: Tensor | None, n_tokens: int, device, dtype=torch.float32) -> Tensor:
    """w_t of the masked mean (flat): 1/n without a mask."""
    if loss_mask is None:
        return torch.full((n_tokens,), 1.0 / max(1, n_tokens), dtype=dtype, device=device)
    mask = loss_mask.reshape(-1).to(dtype)
    return mask / mask.sum().clamp(min=1.0)


def _group(name: str):
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and sums in fp32 at least (fp64 stays fp64, for tests against float64)."""
    return torch.promote_types(dtype, torch.float32)


def _cross_entropy_rows(
    logits: Tensor, y: Tensor, w: Tensor, z_loss: float, vocab_start: int, compute_grad: bool, group=None
) -> Tensor:
    """What the CPU kernel pretrain_cpu::cross_entropy_rows computes, on torch's ops and across the ranks of a
    vocab-parallel group: the rows' w (lse - z_y + z_loss lse^2), and (compute_grad) the logits' gradient
    w (softmax (1 + 2 z_loss lse) - [k == y]) written over this rank's slice of the logits."""
    v_local = logits.shape[-1]
    row_max = logits.amax(dim=-1)
    if group is not None:
        tp_all_reduce(row_max, group, torch.distributed.ReduceOp.MAX)
    logits.sub_(row_max.unsqueeze(-1))
    local = y - vocab_start
    mine = (local >= 0) & (local < v_local)
    local = local.clamp(0, v_local - 1).unsqueeze(-1)
    target = logits.gather(-1, local).squeeze(-1) * mine  # the target's shifted logit, on its rank only
    logits.exp_()
    sum_exp = logits.sum(dim=-1)
    if group is not None:
        both = tp_all_reduce(torch.stack([target, sum_exp]), group)
        target, sum_exp = both[0], both[1]
    log_sum = sum_exp.log()
    lse = row_max + log_sum
    per_token = log_sum - target
    if z_loss:
        per_token = per_token + z_loss * lse.square()
    if compute_grad:
        logits.mul_((w * (1.0 + 2.0 * z_loss * lse) / sum_exp).unsqueeze(-1))
        logits.scatter_add_(-1, local, -(w * mine).unsqueeze(-1))
    return w * per_token


@torch.library.custom_op("pretrain::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    weights: Tensor,
    z_loss: float,
    chunk: int,
    vocab_start: int,
    group_name: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dhidden, dloss/dweight), all in fp32 at least; the gradients are empty when not asked
    for. hidden [N, d], weight [V_local, d], labels [N] (global ids), weights [N]."""
    group = _group(group_name)
    n, v_local = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    weights = weights.to(acc)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    dh = hidden.new_empty(hidden.shape if compute_grad else 0, dtype=acc)
    dw = weight.new_empty(weight.shape if compute_grad else 0, dtype=acc)  # the first chunk writes it, not a fill
    if compute_grad and n == 0:
        dw.zero_()
    # In bf16/fp16 the logit gradients w_t * (p - onehot) are scaled by 1/max(w) (about the token count)
    # before the cast, so they do not underflow (fp16) or lose their low bits, and unscaled in fp32 after
    # the matmuls: the loss scaler's factor only arrives in backward.
    rescale = hidden.dtype != acc
    scale = 1.0 / weights.max().clamp(min=torch.finfo(acc).tiny) if rescale and n else None
    # One logits buffer for every chunk: a fresh [chunk x V_local] tensor per chunk costs its page faults
    # again on CPU (glibc hands large blocks back to the system when they are freed).
    buffer = torch.empty((min(chunk, n), v_local), dtype=acc, device=hidden.device)
    # The softmax, loss and logit gradient of a chunk in one C++ pass per row, on fp32 CPU without tensor
    # parallelism (whose row maxima and sums are all-reduced between the passes); torch's ops otherwise.
    fused = None if group is not None or rescale else cpu_kernels.usable(buffer, weights)
    if fused is not None:
        labels = labels.to(torch.int64).contiguous()
        cross_entropy_rows = fused.cross_entropy_rows
    else:
        cross_entropy_rows = partial(_cross_entropy_rows, group=group)
    for i in range(0, n, chunk):
        h, y, w = hidden[i : i + chunk], labels[i : i + chunk], weights[i : i + chunk]
        logits = buffer[: h.shape[0]]  # [c, V_local], computed in the input dtype, as the plain head
        if rescale:
            logits.copy_(h @ weight.t())
        else:
            torch.mm(h, weight.t(), out=logits)
        total += cross_entropy_rows(logits, y, w, z_loss, vocab_start, compute_grad).sum()
        if compute_grad:
            if rescale:
                g = logits.mul_(scale).to(hidden.dtype)
                dh[i : i + chunk] = (g @ weight).to(acc) / scale
                part_w = (g.t() @ h).to(acc) / scale
                if i == 0:
                    dw.copy_(part_w)
                else:
                    dw.add_(part_w)
            else:
                torch.mm(logits, weight, out=dh[i : i + chunk])
                if i == 0:
                    torch.mm(logits.t(), h, out=dw)
                else:
                    dw.addmm_(logits.t(), h)
    return total, dh, dw


@_linear_cross_entropy.register_fake
def _(hidden, weight, labels, weights, z_loss, chunk, vocab_start, group_name, compute_grad):
    acc = _acc_dtype(hidden.dtype)
    total = hidden.new_empty((), dtype=acc)
    if not compute_grad:
        return total, hidden.new_empty(0, dtype=acc), weight.new_empty(0, dtype=acc)
    return total, hidden.new_empty(hidden.shape, dtype=acc), weight.new_empty(weight.shape, dtype=acc)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs are not differentiated through
    ctx.computed_grad = inputs[-1]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, _grad_dh, _grad_dw):
    if not ctx.computed_grad:
        raise RuntimeError(
            "pretrain::linear_cross_entropy ran with compute_grad=False and cannot be differentiated; "
            "call linear_cross_entropy() with grad mode on and inputs that require grad"
        )
    dh, dw = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None, None, None
    g = grad_loss.to(dh.dtype)  # fp32 products, then the inputs' dtypes (the loss scale arrives here)
    h_dtype, w_dtype = ctx.dtypes
    return (dh * g).to(h_dtype), (dw * g).to(w_dtype), None, None, None, None, None, None, None


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.pretrain.linear_cross_entropy)
def _linear_cross_entropy_flops(
    hidden_shape, weight_shape, labels_shape, weights_shape, z_loss, chunk, vocab_start, group_name, compute_grad,
    out_shape=None, **kwargs,
) -> int:  # fmt: skip
    """The plain head's matmul FLOPs, as FlopCounterMode counts them: logits 2NdV, and with the gradients
    (computed here, in forward) dhidden and dweight 2NdV each. Without a formula the op counts as free,
    and inductor's activation memory budget would recompute the whole loss rather than keep its output."""
    (n, d), v = hidden_shape, weight_shape[0]
    return 2 * n * d * v * (3 if compute_grad else 1)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor | None = None,
    *,
    z_loss: float = 0.0,
    chunk_tokens: int = 0,
    vocab_start: int = 0,
    group=None,
) -> Tensor:
    """The masked-mean cross-entropy (+ z-loss) of logits = hidden @ weight.T, without the logits.

    hidden [..., d] and labels/loss_mask of the same leading shape (flattened alike); weight
    [V_local, d] is this rank's vocabulary slice starting at vocab_start (the whole vocabulary
    without tensor parallelism, group None). Returns a scalar in fp32 (fp64 for fp64 inputs)."""
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    if h.stride(-1) != 1:
        h = h.contiguous()
    y = labels.reshape(-1)
    w = token_weights(loss_mask, y.numel(), h.device, _acc_dtype(h.dtype))
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = chunk_tokens_for(y.numel(), weight.shape[0], chunk_tokens, h.device.type)
    group_name = "" if group is None else group.group_name
    loss, _, _ = _linear_cross_entropy(
        h, weight, y, w, float(z_loss), chunk, int(vocab_start), group_name, bool(needs_grad)
    )
    return loss


# ------------------------------------------------------------------------- the plain path


def token_losses(logits: Tensor, labels: Tensor, z_loss: float = 0.0) -> Tensor:
    """Per-token cross-entropy (+ z_loss * logsumexp^2) in fp32, shaped like labels."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    losses = F.cross_entropy(flat, labels.reshape(-1), reduction="none")
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(flat, dim=-1).square()
    return losses.view_as(labels)


def masked_mean(losses: Tensor, loss_mask: Tensor | None) -> Tensor:
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def output_loss(head, h: Tensor, labels: Tensor, loss_mask: Tensor | None, spec: LossSpec, vocab_parallel: bool):
    """The training loss of the output layer `head` (nn.Linear, or a vocab-parallel ColumnParallelLinear)
    on the final hidden states h (T, B, d), sequence-first; labels and loss_mask are (B, T)."""
    labels = labels.t()
    loss_mask = None if loss_mask is None else loss_mask.t()
    if vocab_parallel:
        return vocab_parallel_loss(head, h, labels, loss_mask, spec)
    if spec.fused:
        return linear_cross_entropy(
            h, head.weight, labels, loss_mask, z_loss=spec.z_loss, chunk_tokens=spec.chunk_tokens
        )
    return masked_mean(token_losses(head(h), labels, spec.z_loss), loss_mask)


def vocab_parallel_loss(head, h: Tensor, labels: Tensor, loss_mask: Tensor | None, spec: LossSpec) -> Tensor:
    """The training loss of the vocab-parallel output layer on h (its sequence shard under SP).

    Fused: the chunked loss above on this rank's vocabulary slice, its statistics
    all-reduced over the tp group per chunk; plain: the logits, then megatron-core's vocab-parallel
    cross-entropy. Either way h goes through the head's own input mapping, whose backward sums the
    ranks' partial gradients of h. labels / loss_mask are sequence-first (T, B), like h."""
    if not spec.fused:
        if spec.z_loss:
            raise ValueError("train.z_loss > 0 with parallel.tp > 1 needs train.fused_loss: true")
        return masked_mean(vocab_parallel_token_losses(head(h), labels), loss_mask)
    h = gather_from_sequence(h) if head.sequence_parallel else copy_to_tp(h)
    group = tp_group()
    start = torch.distributed.get_rank(group) * head.weight.shape[0]
    return linear_cross_entropy(
        h,
        head.weight,
        labels,
        loss_mask,
        z_loss=spec.z_loss,
        chunk_tokens=spec.chunk_tokens,
        vocab_start=start,
        group=group,
    )
