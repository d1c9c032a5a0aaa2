"""Held-out evaluation: loss per token, perplexity and bits per byte over a split read in order.

bits_per_byte = (sum of the per-token NLL in nats) / (ln 2 * UTF-8 bytes of the predicted tokens),
which does not depend on the tokenizer, so runs with different vocabularies compare. The
end-of-document token is predicted like any other and stands for 0 bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pretrain.data import TokenStream
from pretrain.distributed import all_reduce_sum


@torch.no_grad()
def evaluate_stream(
    loss_fn,
    stream: TokenStream,
    token_bytes: np.ndarray,
    batch_size: int,
    rank: int,
    world: int,
    device: torch.device,
    pad_id: int = 0,
    group=None,
) -> dict:
    """loss_fn(tokens, labels, loss_mask) -> mean NLL over the masked tokens. rank and world are the
    data-parallel coordinates; `group` the data-parallel group (model-parallel ranks hold copies).

    Every rank runs the same number of forward passes (padding with empty rows), which ZeRO-3's
    parameter gathering requires."""
    per_round = world * batch_size
    rounds = math.ceil(stream.num_windows / per_round)
    nll = tokens = nbytes = 0.0
    for k in range(rounds):
        start = k * per_round + rank * batch_size
        batch = stream.batch(list(range(start, start + batch_size)), pad_id)
        count = float(batch.loss_mask.sum())
        loss = loss_fn(batch.tokens.to(device), batch.labels.to(device), batch.loss_mask.to(device))
        if count:
            nll += float(loss) * count
            tokens += count
            targets = batch.labels[batch.loss_mask.bool()].numpy()
            nbytes += float(token_bytes[targets].sum())
    nll, tokens, nbytes = all_reduce_sum([nll, tokens, nbytes], device, group)
    loss = nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / (math.log(2) * nbytes) if nbytes else float("nan"),
        "tokens": int(tokens),
        "bytes": int(nbytes),
    }
