"""Activation checkpointing: recompute instead of storing, per block.

    full       a whole block's activations are recomputed in backward (only its input is kept)
    selective  only the attention core (softmax(QK^T)V, the part whose memory grows with the
               sequence length squared on naive kernels) is recomputed, as Megatron's selective mode

`checkpoint_blocks` limits either mode to the first N blocks (0 = all), trading memory for compute
block by block. torch's non-reentrant checkpoint restores the default RNG for the recomputation;
the tensor-parallel dropout stream (model/parallel_rng.py) is restored here, so dropout masks match.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from torch.utils.checkpoint import checkpoint

from model.parallel_rng import TP_RNG

MODES = ("none", "full", "selective")
_RECOMPUTING = [0]  # depth of recomputations in progress (read by model/sigma_reparam.py)


def recomputing() -> bool:
    """True while a checkpointed forward is being recomputed in backward: state a forward updates (sigma-Reparam's
    power iteration) must not be updated a second time."""
    return _RECOMPUTING[0] > 0


def _rng_contexts():
    snapshot = TP_RNG.state  # replaced, never mutated, by fork(): holding it is a snapshot

    @contextmanager
    def recompute():
        current, TP_RNG.state = TP_RNG.state, snapshot
        _RECOMPUTING[0] += 1
        try:
            yield
        finally:
            _RECOMPUTING[0] -= 1
            TP_RNG.state = current

    return nullcontext(), recompute()


def recomputed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_rng_contexts)


def apply_activation_checkpointing(blocks, mode: str, first_n: int = 0) -> None:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing '{mode}': allowed {', '.join(MODES)}")
    for i, block in enumerate(blocks):
        chosen = mode != "none" and (first_n == 0 or i < first_n)
        block.recompute = chosen and mode == "full"
        block.attn.fn.recompute_core = chosen and mode == "selective"
