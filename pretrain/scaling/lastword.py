"""Last-word prediction on held-out text, LAMBADA-style (Paperno et al. 2016): the model reads a
passage and must produce its final word by greedy decoding.

Passages are cut, deterministically, from the documents of a tokenized held-out split (the bundled
test split: State of the Union addresses). They are built in token space, so the context is exactly
the tokens the model would see in the document, and sentencepiece's leading-space convention is
respected: a target word is a run of tokens whose first piece is "▁" + letters and whose other pieces
are letters only, i.e. the word starts at a token boundary and the space before it belongs to the
target, not to the context. The target must end a sentence: it is followed by '.', '!' or '?' and
then by whitespace (optionally after closing quotes/brackets) or the end of the document, which rules
out "U.S." and, with a short list, abbreviations like "Mr.". Context = the `context_tokens` tokens
before the target inside the same document (passages with less context before them are not used).
`count` passages are drawn from all candidates with a fixed seed.

Scoring: greedy (argmax) continuation of the context, one token at a time, until the continuation
holds a complete word (a space, then word characters, then anything else or an end-of-document
token), at most `max_new_tokens` tokens. Correct iff that word equals the target exactly (case
included). The comparison is on text, so a different tokenization of the same word counts. A row
whose continuation can no longer become the target is stopped early; that changes no score.

Unlike LAMBADA, passages are not filtered for needing the broad context, so part of the score is
local (n-gram-like) prediction; it compares models on the same passages, which is what a sweep needs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

MAX_NEW_TOKENS = 8
MAX_TARGET_TOKENS = 6  # targets the cap leaves room for (the word's own tokens + the one ending it)
# Words that are followed by a period without ending a sentence.
ABBREVIATIONS = frozenset(
    "Mr Mrs Ms Dr St Jr Sr Sen Rep Gov Gen Lt Col Capt Sgt Prof Rev Hon Mt Ft No vs "
    "etc Inc Co Corp Ltd Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec".split()
)
SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(\s|$)")
WORD_EXTRA = "'\u2019-\ufffd"  # apostrophes, hyphen, and an incomplete UTF-8 byte sequence (still pending)


@dataclass(frozen=True)
class Passage:
    doc: int
    position: int  # token offset of the target's first token in its document
    context: tuple  # token ids
    target: str  # the word, without its leading space
    target_tokens: tuple


class PieceBytes:
    """The UTF-8 bytes of every token id (byte-fallback tokens: their byte; control tokens: None)."""

    def __init__(self, tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.table: list[bytes | None] = tokenizer.piece_bytes()

    def __getitem__(self, token: int) -> bytes | None:
        return self.table[token] if 0 <= token < self.vocab_size else None

    def text(self, tokens) -> str:
        return b"".join(self[int(t)] or b"" for t in tokens).decode("utf-8", errors="replace")


def _letters(b: bytes | None) -> bool:
    return bool(b) and b.isalpha()  # bytes.isalpha: ASCII letters only


def sentence_final_words(doc: np.ndarray, pieces: PieceBytes) -> list[tuple[int, int, str]]:
    """(first token, end token, word) of every sentence-final word in one document's tokens."""
    b = [pieces[int(t)] for t in doc]
    n = len(b)
    out = []
    for j in range(n):
        if not b[j] or b[j][:1] != b" " or not _letters(b[j][1:]):
            continue  # a word starts with a "▁letters" piece
        k = j + 1
        while k < n and _letters(b[k]):
            k += 1
        if k - j > MAX_TARGET_TOKENS or k >= n or not b[k] or b[k][:1] not in (b".", b"!", b"?"):
            continue
        word = b"".join(b[j:k])[1:].decode("ascii")
        if len(word) < 2 or word in ABBREVIATIONS:
            continue
        after = b""
        for piece in b[k : k + 3]:  # the punctuation and what follows it, up to an end-of-document token
            if piece is None:
                break
            after += piece
        if SENTENCE_END.match(after.decode("utf-8", errors="replace")):
            out.append((j, k, word))
    return out


def build_passages(
    docs: list[np.ndarray], pieces: PieceBytes, context_tokens: int, count: int, seed: int = 1234
) -> tuple[list[Passage], int]:
    """`count` passages (fewer if there are fewer candidates) in document order, and the number of
    candidates they were drawn from."""
    candidates = []
    for d, doc in enumerate(docs):
        for j, k, word in sentence_final_words(doc, pieces):
            if j >= context_tokens:
                candidates.append((d, j, k, word))
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), min(count, len(candidates))))
    passages = []
    for i in chosen:
        d, j, k, word = candidates[i]
        doc = docs[d]
        passages.append(
            Passage(d, j, tuple(int(t) for t in doc[j - context_tokens : j]), word, tuple(int(t) for t in doc[j:k]))
        )
    return passages, len(candidates)


def _judge(text: str, ended: bool, target: str) -> tuple[str, str]:
    """(verdict, word so far) for a continuation: 'correct' | 'wrong' | 'pending' (needs more tokens)
    | 'diverged' (pending, but it can no longer become the target)."""
    if not text:
        return ("wrong" if ended else "pending"), ""
    if text[0] != " ":
        return "wrong", ""
    body = text[1:]
    run = 0
    while run < len(body) and (body[run].isalnum() or body[run] in WORD_EXTRA):
        run += 1
    word = body[:run]
    if run < len(body) or ended:  # the word is complete
        return ("correct" if word == target else "wrong"), word
    return ("pending" if target.startswith(word) else "diverged"), word


@torch.no_grad()
def score(
    next_token_logits: Callable[[torch.Tensor], torch.Tensor],
    passages: list[Passage],
    pieces: PieceBytes,
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
    examples: int = 8,
    device: torch.device | str = "cpu",
) -> dict:
    """next_token_logits(tokens (B, T)) -> logits (B, V) of the token after each row. All contexts have
    the same length, so rows are batched without padding. The first `examples` passages are decoded to
    the end of their word (for the report); the others stop as soon as they are decided."""
    verdicts = ["wrong"] * len(passages)
    words = [""] * len(passages)
    texts = [""] * len(passages)
    for start in range(0, len(passages), batch_size):
        rows = list(range(start, min(start + batch_size, len(passages))))
        generated = {r: [] for r in rows}
        active = list(rows)
        for _ in range(max_new_tokens):
            if not active:
                break
            tokens = torch.tensor(
                [list(passages[r].context) + generated[r] for r in active], dtype=torch.long, device=device
            )
            logits = next_token_logits(tokens).float()
            if logits.shape[-1] > pieces.vocab_size:  # padded vocabulary rows are no tokens
                logits[:, pieces.vocab_size :] = float("-inf")
            nxt = logits.argmax(-1).tolist()
            still = []
            for r, t in zip(active, nxt, strict=True):
                generated[r].append(int(t))
                ended = pieces[int(t)] is None  # end-of-document (or another control token)
                texts[r] = pieces.text(generated[r])
                verdict, words[r] = _judge(texts[r], ended, passages[r].target)
                if verdict == "diverged" and r < examples:
                    verdict = "pending"  # keep decoding the examples to show the whole word
                if verdict in ("correct", "wrong"):
                    verdicts[r] = verdict
                elif verdict == "diverged":
                    verdicts[r] = "wrong"
                elif not ended:
                    still.append(r)
            active = still
    correct = sum(v == "correct" for v in verdicts)
    return {
        "accuracy": correct / len(passages) if passages else float("nan"),
        "correct": correct,
        "passages": len(passages),
        "examples": [
            {
                "context_end": pieces.text(p.context)[-160:],
                "target": p.target,
                "prediction": words[i],
                "continuation": texts[i],
                "correct": verdicts[i] == "correct",
            }
            for i, p in enumerate(passages[:examples])
        ],
    }


METHOD = (
    "LAMBADA-style last-word prediction: passages cut from the held-out split's documents, ending "
    "just before a sentence-final word (followed by . ! or ?, abbreviations excluded); context = the "
    "{context_tokens} preceding tokens of the same document; correct iff the greedy (argmax) "
    "continuation, at most {max_new_tokens} tokens, spells exactly ' ' + the word followed by a "
    "non-word character; {count} passages drawn with seed {seed} from {candidates} candidates."
)
