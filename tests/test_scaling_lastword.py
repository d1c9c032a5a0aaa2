"""Last-word passages on real tokenizer output, and their scoring with stub models whose greedy
prediction the test controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data import Tokenizer
from pretrain.scaling.lastword import PieceBytes, build_passages, score, sentence_final_words

TEXT = (
    "Mr. Smith went to Washington. The U.S. economy grew! Did the harvest grow? Yes, said the "
    "farmer, and we will win.\nThe committee adjourned early. Everyone went home to their families."
)
EXPECTED = ["Washington", "grew", "grow", "win", "early", "families"]  # not "Mr", "U", "S"


@pytest.fixture(scope="module")
def tok(bundled_dir) -> Tokenizer:
    return Tokenizer(bundled_dir / "tokenizer.model")


def _doc(tok: Tokenizer, text: str = TEXT) -> np.ndarray:
    return np.array(tok.encode(text) + [tok.eod], dtype=np.int64)


def test_sentence_final_words_split_context_and_target_at_the_space(tok):
    doc = _doc(tok)
    pieces = PieceBytes(tok)
    found = sentence_final_words(doc, pieces)
    assert [w for _, _, w in found] == EXPECTED
    assert any(k - j > 1 for j, k, _ in found), "no multi-token target: the test would not cover one"
    for j, k, word in found:
        context, target = tok.decode(doc[:j]), pieces.text(doc[j:k])
        assert target == " " + word  # the space before the word belongs to the target (sentencepiece's ▁)
        end = TEXT.index(" " + word + TEXT[TEXT.index(" " + word) + len(word) + 1])
        assert TEXT[:end] == context and not context.endswith(" ")
        assert tok.sp.id_to_piece(int(doc[j])).startswith("\u2581")


def test_build_passages_is_deterministic_and_keeps_full_contexts(tok):
    doc = _doc(tok)
    pieces = PieceBytes(tok)
    passages, candidates = build_passages([doc, doc], pieces, context_tokens=6, count=5, seed=7)
    expected_candidates = sum(j >= 6 for j, _, _ in sentence_final_words(doc, pieces)) * 2
    assert candidates == expected_candidates and len(passages) == 5
    assert passages == build_passages([doc, doc], pieces, 6, 5, seed=7)[0]
    for p in passages:
        assert len(p.context) == 6
        assert p.context == tuple(int(t) for t in doc[p.position - 6 : p.position])
        assert pieces.text(p.target_tokens) == " " + p.target
    everything, _ = build_passages([doc], pieces, 6, 1000)
    assert [p.target for p in everything] == [w for j, _, w in sentence_final_words(doc, pieces) if j >= 6]


class Stub:
    """A 'model' that continues each passage with tokens the test chooses: next_tokens(passage,
    generated so far) -> the id to emit."""

    def __init__(self, passages, vocab: int, next_tokens, padded: int = 0):
        self.by_context = {p.context: p for p in passages}
        self.vocab, self.next_tokens, self.padded = vocab, next_tokens, padded
        self.calls = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(tokens.shape[0], self.vocab + self.padded)
        logits[:, self.vocab :] = 1e9  # padded vocabulary rows must never be emitted
        for row, seq in enumerate(tokens.tolist()):
            n = len(next(iter(self.by_context)))
            p = self.by_context[tuple(seq[:n])]
            logits[row, self.next_tokens(p, seq[n:])] = 100.0
        return logits


@pytest.fixture(scope="module")
def setup(tok):
    doc = _doc(tok)
    pieces = PieceBytes(tok)
    passages, _ = build_passages([doc], pieces, context_tokens=5, count=100)
    assert len(passages) >= 4
    return doc, pieces, passages


def _letters_piece(tok) -> int:
    return next(i for i in range(tok.vocab_size) if tok.sp.id_to_piece(i).isascii() and tok.sp.id_to_piece(i).isalpha())


def _byte_id(tok, b: int) -> int:
    return tok.sp.piece_to_id(f"<0x{b:02X}>")


def test_oracle_continuation_scores_every_passage(tok, setup):
    doc, pieces, passages = setup
    oracle = Stub(passages, tok.vocab_size, lambda p, gen: int(doc[p.position + len(gen)]), padded=7)
    result = score(oracle, passages, pieces, batch_size=3)
    assert result["accuracy"] == 1.0 and result["correct"] == result["passages"] == len(passages)


def test_same_word_in_other_tokens_counts_and_a_longer_word_does_not(tok, setup):
    doc, pieces, passages = setup
    spelled = lambda p: [_byte_id(tok, b) for b in (" " + p.target + ".").encode()]
    by_bytes = Stub(passages, tok.vocab_size, lambda p, gen: spelled(p)[len(gen)])
    assert score(by_bytes, passages, pieces, max_new_tokens=16)["accuracy"] == 1.0
    # ... within the token cap: one byte per character does not fit 8 tokens for the long words
    capped = score(by_bytes, passages, pieces, max_new_tokens=8)
    assert capped["correct"] == sum(len(p.target) + 2 <= 8 for p in passages) < len(passages)
    extra = _letters_piece(tok)  # the target, then more letters: a different (longer) word
    longer = Stub(
        passages, tok.vocab_size, lambda p, gen: p.target_tokens[len(gen)] if len(gen) < len(p.target_tokens) else extra
    )
    result = score(longer, passages, pieces, examples=2)
    assert result["accuracy"] == 0.0
    assert result["examples"][0]["prediction"].startswith(passages[0].target)
    assert len(result["examples"][0]["prediction"]) > len(passages[0].target)


def test_end_of_document_and_no_space_are_wrong_and_half_right_is_half(tok, setup):
    doc, pieces, passages = setup
    assert score(Stub(passages, tok.vocab_size, lambda p, gen: tok.eod), passages, pieces)["accuracy"] == 0.0
    no_space = Stub(
        passages, tok.vocab_size, lambda p, gen: [_byte_id(tok, b) for b in (p.target + ".").encode()][len(gen)]
    )
    assert score(no_space, passages, pieces)["accuracy"] == 0.0
    right = {p.context for i, p in enumerate(passages) if i % 2 == 0}
    half = Stub(
        passages, tok.vocab_size, lambda p, gen: int(doc[p.position + len(gen)]) if p.context in right else tok.eod
    )
    result = score(half, passages, pieces, batch_size=2)
    assert result["correct"] == len(right)


def test_rows_stop_once_they_cannot_match(tok, setup):
    """A continuation that diverges from the target on its first token needs no second step."""
    doc, pieces, passages = setup
    wrong = _byte_id(tok, ord(" "))  # a space, then another space: can never become " target"
    stub = Stub(passages, tok.vocab_size, lambda p, gen: wrong)
    score(stub, passages, pieces, batch_size=len(passages), examples=0)
    assert stub.calls == 2  # " " is still pending, "  " has diverged
