"""Tokenizing documents in parallel into megatron-core's mmap indexed dataset (.bin/.idx)."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pretrain.data.corpus import DataError, Document

_worker_sp = None


def _init_worker(model_path: str) -> None:
    import sentencepiece as spm

    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def _encode(text: str) -> list[int]:
    return _worker_sp.encode(text)


def write_indexed(docs: Sequence[Document], tokenizer, prefix: str | Path, workers: int = 0) -> dict:
    """Writes `prefix`.bin/.idx with one document per input, each ending with EOD.

    The files are written under temporary names and renamed at the end, so a crash never leaves
    a half-written dataset that looks complete. Returns {documents, tokens, bytes}."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = str(prefix)
    tmp = prefix + ".tmp"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    workers = workers or min(8, os.cpu_count() or 1)
    texts = [d.text for d in docs]
    tokens = 0
    if workers > 1 and len(texts) > 1:
        ctx = mp.get_context("spawn")  # the parent may hold torch/OpenMP state that fork would copy
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
            encoded = pool.imap(_encode, texts, chunksize=4)
            tokens = _add_all(builder, encoded, tokenizer.eod, dtype)
    else:
        tokens = _add_all(builder, (tokenizer.encode(t) for t in texts), tokenizer.eod, dtype)
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return {"documents": len(docs), "tokens": tokens, "bytes": sum(len(t.encode("utf-8")) for t in texts)}


def _add_all(builder, encoded, eod: int, dtype) -> int:
    import torch

    total = 0
    for ids in encoded:
        ids = np.asarray(list(ids) + [eod], dtype=dtype)
        builder.add_document(torch.from_numpy(ids.astype(np.int64)), [len(ids)])
        total += len(ids)
    return total


def open_indexed(prefix: str):
    """Opens a Megatron .bin/.idx pair, with an error that names what is missing."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"dataset prefix '{prefix}': missing {', '.join(missing)}; prepare data with "
            "`python -m pretrain.data prepare` or point data.train/valid/test at existing .bin/.idx prefixes"
        )
    return IndexedDataset(prefix, mmap=True)


def token_count(prefix: str) -> int:
    ds = open_indexed(prefix)  # held in a name: its arrays are views into its mmap, closed when it dies
    return int(ds.sequence_lengths.sum())
