"""The sentencepiece tokenizer: training it on the training split, and using it.

Trained with identity normalization, no whitespace collapsing and byte fallback, so that
text -> tokens -> text is exact for any UTF-8 input (newlines and rare characters become byte
tokens instead of <unk>). The end-of-document token (EOD) is sentencepiece's </s>.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from pretrain.data.corpus import DataError, Document


def train_tokenizer(
    docs: Iterable[Document],
    model_prefix: str | Path,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    seed: int = 0,
    threads: int | None = None,
) -> Path:
    """Trains on `docs` cut into pieces of LINES_PER_SENTENCE lines (at most `max_sentences`
    pieces, sampled with `seed`). Keeping newlines inside the pieces lets the vocabulary learn
    line-initial words; the newline itself is one token."""
    lines = [piece for d in docs for piece in _line_groups(d.text)]
    if not lines:
        raise DataError("tokenizer: no training text")
    if len(lines) > max_sentences:
        lines = random.Random(seed).sample(lines, max_sentences)
    model_prefix = str(model_prefix)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return Path(model_prefix + ".model")


LINES_PER_SENTENCE = 16


def _line_groups(text: str) -> Iterable[str]:
    lines = text.split("\n")
    for i in range(0, len(lines), LINES_PER_SENTENCE):
        piece = "\n".join(lines[i : i + LINES_PER_SENTENCE])
        if piece.strip():
            yield piece


class Tokenizer:
    """A loaded sentencepiece model with what training and evaluation need from it.

    Also satisfies what megatron-core's GPTDataset reads from a tokenizer (eod, pad, vocab_size,
    unique_identifiers)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer '{path}' does not exist; run `python -m pretrain.data prepare` or set data.tokenizer"
            )
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # sentencepiece's parse error for a damaged or foreign file
            raise DataError(
                f"tokenizer '{path}' is not a sentencepiece model ({str(e).strip().splitlines()[-1]}); "
                "point data.tokenizer at the tokenizer.model the data was prepared with"
            ) from None
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id()
        self.pad = self.sp.pad_id()
        self.bos = self.sp.bos_id()
        self.unique_identifiers = {"class": "pretrain.Tokenizer", "sha256": self.sha256}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in (self.eod, self.pad, self.bos)])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (special tokens 0, byte tokens 1). Summed over the
        predicted tokens this gives the denominator of bits per byte."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            if self.sp.is_byte(i):
                out[i] = 1
            else:
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out
