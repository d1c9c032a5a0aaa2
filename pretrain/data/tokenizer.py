"""The tokenizer: training a sentencepiece model on the training split, and using it (or a tokenizer.json).

Trained with identity normalization, no whitespace collapsing and byte fallback, so that
text -> tokens -> text is exact for any UTF-8 input (newlines and rare characters become byte
tokens instead of <unk>). The end-of-document token (EOD) is sentencepiece's </s>.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
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
    try:
        _train_sentencepiece(lines, model_prefix, vocab_size, model_type, seed, threads)
    except RuntimeError as e:
        raise _vocab_error(str(e), vocab_size) from None
    return Path(model_prefix + ".model")


def _vocab_error(message: str, vocab_size: int) -> DataError:
    """sentencepiece's trainer errors (a C++ check with its source line) as one line that says what to do."""
    need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if need:  # every character that covers 99.95% of the text needs a piece, beside the specials
        return DataError(
            f"--vocab-size {vocab_size}: this corpus needs a vocabulary of at least {need.group(1)} tokens (one "
            f"per character of 99.95% of its text, plus the special tokens); use --vocab-size {need.group(1)} or more"
        )
    too_big = re.search(r"Vocabulary size is too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_big:
        return DataError(
            f"--vocab-size {vocab_size}: this corpus is too small for that many tokens; use --vocab-size "
            f"{too_big.group(2)} or less, or give more text"
        )
    return DataError(f"training the tokenizer failed: {message.splitlines()[-1].split('] ', 1)[-1]}")


def _train_sentencepiece(lines, model_prefix, vocab_size, model_type, seed, threads) -> None:
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


LINES_PER_SENTENCE = 16


def _line_groups(text: str) -> Iterable[str]:
    lines = text.split("\n")
    for i in range(0, len(lines), LINES_PER_SENTENCE):
        piece = "\n".join(lines[i : i + LINES_PER_SENTENCE])
        if piece.strip():
            yield piece


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # sentencepiece, Hugging Face tokenizers


def tokenizer_file_in(directory: str | Path) -> Path | None:
    """The tokenizer a prepared data directory or a checkpoint holds, if any."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


class Tokenizer:
    """A loaded tokenizer with what training and evaluation need from it: a sentencepiece model
    (`*.model`, what `prepare` trains) or a Hugging Face tokenizer.json (pretrain/data/hf_tokenizer.py).

    Also satisfies what megatron-core's GPTDataset reads from a tokenizer (eod, pad, vocab_size,
    unique_identifiers)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir() and tokenizer_file_in(path):
            path = tokenizer_file_in(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer '{path}' does not exist; run `python -m pretrain.data prepare` or set data.tokenizer"
            )
        self.path = path
        self.sp = None
        self.hf = None
        if path.suffix == ".json":
            from pretrain.data.hf_tokenizer import HFTokenizerFile

            self.hf = HFTokenizerFile(path)
            self.vocab_size, self.eod, self.pad, self.bos = self.hf.vocab_size, self.hf.eod, self.hf.pad, self.hf.bos
        else:
            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as e:  # sentencepiece's parse error for a damaged or foreign file
                raise DataError(
                    f"tokenizer '{path}' is not a sentencepiece model ({str(e).strip().splitlines()[-1]}); "
                    "point data.tokenizer at the tokenizer.model (or tokenizer.json) the data was prepared with"
                ) from None
            self.vocab_size = self.sp.get_piece_size()
            self.eod = self.sp.eos_id()
            self.pad = self.sp.pad_id()
            self.bos = self.sp.bos_id()
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.unique_identifiers = {"class": "pretrain.Tokenizer", "sha256": self.sha256}

    @property
    def filename(self) -> str:
        """The name its copy gets in a prepared directory or a checkpoint."""
        return "tokenizer.json" if self.hf else "tokenizer.model"

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text) if self.hf else self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.eod, self.pad, self.bos)]
        return self.hf.decode(ids) if self.hf else self.sp.decode(ids)

    def piece_bytes(self) -> list[bytes | None]:
        """The UTF-8 bytes each token id stands for (control and special tokens: None; byte tokens:
        their byte)."""
        if self.hf:
            return self.hf.piece_bytes()
        table: list[bytes | None] = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                table.append(None)
            elif self.sp.is_byte(i):
                table.append(bytes([int(piece[3:-1], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def token_bytes(self) -> np.ndarray:
        """How many UTF-8 bytes each token id stands for (special tokens 0, byte tokens 1). Summed over
        the predicted tokens this gives the denominator of bits per byte."""
        return np.array([len(b) if b is not None else 0 for b in self.piece_bytes()], dtype=np.int64)
