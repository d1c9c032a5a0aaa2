"""Samples for training and windows for evaluation.

Training draws from megatron-core's GPTDataset (one epoch of shuffled sequences built from the
.bin/.idx prefixes, blended with weights when there are several). The run sees a single global
stream of samples: sample i is epoch i // n, position in a per-epoch permutation seeded by the run
seed. The data position is therefore one integer (`consumed_samples`), independent of the number
of ranks and of max_steps, so resuming (even on another data-parallel size) continues the stream.

Evaluation reads a split in order, in non-overlapping windows, so every token is predicted once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.data.corpus import DataError
from pretrain.data.indexed import open_indexed, token_count


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64
    loss_mask: torch.Tensor  # (B, T) float32


def build_train_dataset(blend: list[tuple[float, str]], tokenizer, seq_len: int, seed: int, cache_dir: str):
    """One epoch of megatron-core GPT samples over `blend` [(weight, prefix)], cached in cache_dir."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from pretrain.distributed import ensure_process_group

    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    ensure_process_group()
    prefixes = [p for _, p in blend]
    for p in prefixes:
        open_indexed(p)  # clear error before megatron's asserts
    weights = None if len(blend) == 1 else [w for w, _ in blend]
    size = None
    if weights is not None:
        tokens = sum(token_count(p) for p in prefixes)
        size = max(1, tokens // seq_len)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend_per_split=[(prefixes, weights), None, None],
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [size, None, None], lambda: True, config).build()
    if train is None or len(train) == 0:
        raise DataError(f"training data {prefixes} holds fewer than {seq_len + 1} tokens")
    return train


class SampleStream:
    """The run's global sample order over a one-epoch dataset; stateless apart from the seed."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch_size = len(dataset)
        self._perm_epoch, self._perm = -1, None

    def index(self, i: int) -> int:
        epoch, pos = divmod(i, self.epoch_size)
        if epoch == 0:
            return pos  # the dataset is already shuffled by megatron with the same seed
        if epoch != self._perm_epoch:
            rng = np.random.RandomState((self.seed * 1_000_003 + epoch) % (2**32))
            self._perm, self._perm_epoch = rng.permutation(self.epoch_size), epoch
        return int(self._perm[pos])

    def batch(self, start: int, count: int) -> Batch:
        items = [self.dataset[self.index(i)] for i in range(start, start + count)]
        batch = Batch(
            tokens=torch.stack([it["tokens"] for it in items]),
            labels=torch.stack([it["labels"] for it in items]),
            loss_mask=torch.stack([it["loss_mask"] for it in items]).float(),
        )
        self._check_ids(batch, start)
        return batch

    def _check_ids(self, batch: Batch, start: int) -> None:
        """Ids outside the vocabulary would index past the embedding (preflight scans small files in
        full; this catches the rest, batch by batch, for the cost of a max)."""
        vocab = getattr(getattr(getattr(self.dataset, "config", None), "tokenizer", None), "vocab_size", None)
        if vocab is None:
            return
        largest = int(torch.maximum(batch.tokens.max(), batch.labels.max()))
        if largest >= vocab:
            error = DataError(
                f"training samples {start}..{start + len(batch.tokens) - 1} hold token id {largest}, outside "
                f"the tokenizer's vocabulary of {vocab}: the data was tokenized with another tokenizer; use that "
                "one, or prepare the data again with this one"
            )
            error.rank_local = True  # other ranks read other samples: this rank says it
            raise error


def micro_batch_start(step: int, micro: int, dp_rank: int, global_batch: int, micro_batch: int, dp_size: int) -> int:
    """First global sample index of a rank's micro-batch. Within one optimizer step the global batch
    is laid out micro-step by micro-step, rank by rank, so the set of samples in a step does not
    depend on how it is split across ranks and accumulation steps."""
    return step * global_batch + (micro * dp_size + dp_rank) * micro_batch


class TokenStream:
    """A split's tokens in order (the .bin files of its prefixes, concatenated), cut into
    non-overlapping windows of seq_len predictions; the last window may be shorter (masked)."""

    def __init__(self, prefixes: list[str], seq_len: int, max_tokens: int = 0):
        self.parts = []
        for p in prefixes:
            ds = open_indexed(p)
            n = int(ds.sequence_lengths.sum())
            self.parts.append(np.memmap(p + ".bin", dtype=ds.index.dtype, mode="r", shape=(n,)))
        self.total = sum(len(a) for a in self.parts)
        if self.total < 2:
            raise DataError(f"evaluation data {prefixes} holds fewer than 2 tokens")
        self.seq_len = seq_len
        predictions = self.total - 1 if not max_tokens else min(max_tokens, self.total - 1)
        self.num_windows = math.ceil(predictions / seq_len)
        self.predictions = predictions
        self._flat = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)

    def window(self, i: int) -> tuple[np.ndarray, int]:
        start = i * self.seq_len
        n = min(self.seq_len, self.predictions - start)
        return np.asarray(self._flat[start : start + n + 1], dtype=np.int64), n

    def batch(self, indices: list[int], pad_id: int = 0) -> Batch:
        tokens = torch.full((len(indices), self.seq_len), pad_id, dtype=torch.long)
        labels = torch.zeros((len(indices), self.seq_len), dtype=torch.long)
        mask = torch.zeros((len(indices), self.seq_len), dtype=torch.float32)
        for row, i in enumerate(indices):
            if i >= self.num_windows:
                continue  # an empty row: ranks pad their last batch so all run the same passes
            w, n = self.window(i)
            tokens[row, :n] = torch.from_numpy(w[:n])
            labels[row, :n] = torch.from_numpy(w[1 : n + 1])
            mask[row, :n] = 1.0
        return Batch(tokens, labels, mask)
