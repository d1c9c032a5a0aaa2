"""A Hugging Face `tokenizers` tokenizer (tokenizer.json) as a training tokenizer.

Existing Megatron .bin/.idx data is often GPT-2 BPE, and many models people continue from ship a
tokenizer.json only. What the trainer needs from a tokenizer is small (ids, the end-of-document id,
the UTF-8 bytes each id stands for, for bits per byte); this class gives it for a tokenizer.json,
with the `tokenizers` library (a dependency of transformers) doing the tokenizing.

Special ids are found by name: the end-of-document token (required) is the first of EOD_NAMES in the
vocabulary, the padding token the first of PAD_NAMES (else the EOD), beginning-of-sequence the first
of BOS_NAMES (else none).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pretrain.data.corpus import DataError

EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes every byte as one printable character: the printable Latin-1
    bytes stand for themselves, the other 68 are shifted to 256 + n. This is the inverse map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def _uses_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


class HFTokenizerFile:
    """The backend of pretrain.data.Tokenizer for a tokenizer.json."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.hf = HFTokenizer.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises its own Exception type for a damaged file
            raise DataError(
                f"tokenizer '{path}' is not a Hugging Face tokenizer.json ({str(e).strip().splitlines()[-1]}); "
                "point data.tokenizer at the tokenizer the data was prepared with"
            ) from None
        self.byte_level = _uses_byte_level(spec)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}

        def first(names):
            return next((i for i in (self.hf.token_to_id(n) for n in names) if i is not None), None)

        eod = first(EOD_NAMES)
        if eod is None:
            raise DataError(
                f"tokenizer '{path}' has no end-of-document token: looked for {', '.join(EOD_NAMES)}; add one "
                "(tokenizer.add_special_tokens) and save the tokenizer.json again"
            )
        self.eod = eod
        pad = first(PAD_NAMES)
        self.pad = eod if pad is None else pad
        bos = first(BOS_NAMES)
        self.bos = -1 if bos is None else bos

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def piece_bytes(self) -> list[bytes | None]:
        """The UTF-8 bytes of every id: special tokens None; byte-level BPE pieces through GPT-2's byte
        alphabet; otherwise (sentencepiece-style tokenizer.json) `▁` is a space and `<0xAB>` one byte."""
        alphabet = _byte_level_alphabet()
        table: list[bytes | None] = []
        for i in range(self.vocab_size):
            piece = self.hf.id_to_token(i)
            if (
                piece is None or i in self.special or i in (self.eod, self.pad, self.bos)
            ):  # GPT-2's EOD is not marked special
                table.append(None)
            elif self.byte_level:
                # an added (non-special) token is stored as its text, not in the byte alphabet
                in_alphabet = all(c in alphabet for c in piece)
                table.append(bytes(alphabet[c] for c in piece) if in_alphabet else piece.encode("utf-8"))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table
