"""Tokenizing documents in parallel into megatron-core's mmap indexed dataset (.bin/.idx)."""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from pretrain.data.corpus import DataError, Document

_worker_tokenizer = None


def _init_worker(model_path: str) -> None:
    # (a worker whose initializer raises is respawned forever by multiprocessing: the parent has
    # loaded this same file already, so it loads here too)
    from pretrain.data.tokenizer import Tokenizer

    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)


def _encode(text: str) -> list[int]:
    return _worker_tokenizer.encode(text)


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
    """Opens a Megatron .bin/.idx pair, with an error that names what is missing or damaged (a
    truncated or foreign .idx, a .bin shorter or longer than its index says)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"dataset prefix '{prefix}': missing {', '.join(missing)}; prepare data with "
            "`python -m pretrain.data prepare` or point data.train/valid/test at existing .bin/.idx prefixes"
        )
    redo = "prepare it again (`python -m pretrain.data prepare --force`)"
    if os.path.getsize(prefix + ".bin") == 0:
        raise DataError(f"dataset prefix '{prefix}': {prefix}.bin is empty (no tokens: an empty corpus?); {redo}")
    _check_index_file(prefix, redo)  # before megatron-core, whose reader asserts (and then fails in __del__)
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, KeyError, OSError, struct.error) as e:
        # megatron-core asserts on the header; numpy refuses a short or empty file
        raise DataError(
            f"dataset prefix '{prefix}': {prefix}.idx/.bin cannot be read as a Megatron indexed dataset "
            f"({type(e).__name__}: {e}); {redo}"
        ) from None
    _check_consistent(prefix, dataset, redo)
    return dataset


def _check_index_file(prefix: str, redo: str) -> None:
    """The .idx header (magic, version, dtype code, counts) and the size the counts imply."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(34)
    problem = None
    if len(head) < 34 or head[:9] != _INDEX_HEADER:
        problem = f"{path} is not a Megatron index (no MMIDIDX header{'; truncated' if len(head) < 34 else ''})"
    else:
        version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
        if version != 1 or code not in {d.value for d in DType}:
            problem = f"{path}: unknown index version {version} or token dtype code {code}"
        elif size < (need := 34 + sequences * 12 + documents * 8):
            problem = f"{path} has {size:,} bytes, its header describes {need:,}: the .idx is truncated"
    if problem:
        raise DataError(f"dataset prefix '{prefix}': {problem}; {redo}")


def _check_consistent(prefix: str, dataset, redo: str) -> None:
    """The index must describe the .bin exactly: the last sequence ends where the file ends."""
    index = dataset.index
    lengths, pointers, docs = index.sequence_lengths, index.sequence_pointers, index.document_indices
    problem = None
    if len(lengths) != len(pointers) or (len(lengths) and (lengths.min() < 0 or pointers.min() < 0)):
        problem = "its index is damaged (sequence lengths and pointers disagree)"
    elif len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths) or (len(docs) > 1 and (np.diff(docs) < 0).any()):
        problem = "its index is damaged (document boundaries out of order)"
    else:
        end = int(pointers[-1]) + int(lengths[-1]) * index.dtype_size if len(lengths) else 0
        size = os.path.getsize(prefix + ".bin")
        if end != size:
            what = "truncated" if size < end else "longer than its index (another .idx?)"
            problem = f"{prefix}.bin has {size:,} bytes, its index describes {end:,}: the .bin is {what}"
    if problem:
        raise DataError(f"dataset prefix '{prefix}': {problem}; {redo}")


def token_count(prefix: str) -> int:
    ds = open_indexed(prefix)  # held in a name: its arrays are views into its mmap, closed when it dies
    return int(ds.sequence_lengths.sum())
