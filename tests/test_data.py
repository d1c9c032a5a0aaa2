"""Data: the bundled corpus prepared for real, tokenizer round trips, split hygiene, deterministic
and resumable sampling, in-order evaluation windows, user corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.data import DataError, SampleStream, Tokenizer, TokenStream, build_train_dataset, micro_batch_start
from pretrain.data.corpus import bundled_corpus
from pretrain.data.indexed import open_indexed
from pretrain.data.prepare import PrepareArgs, prepare, split_by_document


@pytest.fixture(scope="module")
def tok(bundled_dir):
    return Tokenizer(bundled_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def corpus():
    return bundled_corpus(log=lambda *_: None)


def test_round_trip_on_real_documents_and_awkward_text(tok, corpus):
    train, test = corpus
    for doc in train[:5] + train[-5:] + test[:3]:
        assert tok.decode(tok.encode(doc.text)) == doc.text
    for text in [
        "  two leading spaces\n\n\ttab and trailing   ",
        "naïve café — “quotes” 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 漢字 🎭",
        "line one\r\nline two",
        "12345 67.89",
    ]:
        expected = text.replace("\r\n", "\n") if "\r" in text else text
        assert tok.decode(tok.encode(expected)) == expected


def test_prepared_splits_hold_exactly_their_documents(bundled_dir, tok, corpus):
    manifest = json.loads((bundled_dir / "manifest.json").read_text())
    train_docs, test_docs = corpus
    valid_ids, test_ids = set(manifest["documents"]["valid"]), set(manifest["documents"]["test"])
    # the test set is SOTU 2000 onwards and nothing else; validation is held out of the training sources
    assert {d.id for d in test_docs} == test_ids
    assert all(i.startswith("sotu/") and int(i.split("/")[1][:4]) >= 2000 for i in test_ids)
    assert valid_ids <= {d.id for d in train_docs} and not valid_ids & test_ids
    kept = [d for d in train_docs if d.id not in valid_ids]
    # the training .bin is exactly the kept documents, each tokenized and ended with EOD, in order
    ds = open_indexed(str(bundled_dir / "train"))
    assert len(ds.sequence_lengths) == len(kept)
    for i in (0, len(kept) // 2, len(kept) - 1):
        ids = list(ds[i])
        assert ids[-1] == tok.eod and tok.decode(ids) == kept[i].text
    assert manifest["splits"]["train"]["tokens"] == int(ds.sequence_lengths.sum())
    # no test speech text leaks into training: a distinctive 2000s phrase is absent
    train_text = tok.decode(np.fromfile(bundled_dir / "train.bin", dtype=np.uint16)[:3_000_000])
    assert "Al Qaeda" not in train_text and "September the 11th" not in train_text


def test_sotu_before_2000_is_training_text_with_its_own_validation_documents(bundled_dir, corpus):
    """The State of the Union addresses before 2000 are training text (in the genre of the test set),
    split by document like every source, so some are validation documents; from 2000 on they are the
    test set and nothing else."""
    train_docs, test_docs = corpus
    speeches = [d for d in train_docs if d.source == "sotu"]
    years = {int(d.id.split("/")[1][:4]) for d in speeches}
    assert len(speeches) > 200 and min(years) == 1790 and max(years) == 1999
    assert min(int(d.id.split("/")[1][:4]) for d in test_docs) == 2000
    assert not {d.id for d in speeches} & {d.id for d in test_docs}
    manifest = json.loads((bundled_dir / "manifest.json").read_text())
    assert manifest["splits"]["valid"]["sources"]["sotu"] >= 2
    sources = {split: manifest["splits"][split]["sources"]["sotu"] for split in ("train", "valid")}
    assert sources["train"] + sources["valid"] == len(speeches)
    valid_sotu = [i for i in manifest["documents"]["valid"] if i.startswith("sotu/")]
    assert all(int(i.split("/")[1][:4]) < 2000 for i in valid_sotu)


def test_a_change_of_the_bundled_corpus_makes_prepared_data_stale(monkeypatch):
    import pretrain.data.prepare as prep

    before = PrepareArgs(out="x").fingerprint()
    monkeypatch.setattr(prep, "BUNDLED_CORPUS_VERSION", prep.BUNDLED_CORPUS_VERSION + 1)
    assert PrepareArgs(out="x").fingerprint() != before
    assert PrepareArgs(out="x", bundled=False).fingerprint() == PrepareArgs(out="y", bundled=False).fingerprint()


def test_split_by_document_is_deterministic_and_per_source():
    from pretrain.data.corpus import Document

    docs = [Document(f"a/{i}", "a", "x") for i in range(100)] + [Document(f"b/{i}", "b", "y") for i in range(10)]
    kept, held = split_by_document(docs, 0.05, seed=1)
    kept2, held2 = split_by_document(docs, 0.05, seed=1)
    assert [d.id for d in held] == [d.id for d in held2]
    assert sum(d.source == "a" for d in held) == 5 and sum(d.source == "b" for d in held) == 1
    assert len(kept) + len(held) == len(docs) and not {d.id for d in kept} & {d.id for d in held}
    assert [d.id for d in split_by_document(docs, 0.05, seed=2)[1]] != [d.id for d in held]


def test_sampling_is_deterministic_and_position_restorable(bundled_dir, tok, tmp_path):
    blend = [(1.0, str(bundled_dir / "train"))]
    a = SampleStream(build_train_dataset(blend, tok, 64, 11, str(tmp_path / "c1")), seed=11)
    b = SampleStream(build_train_dataset(blend, tok, 64, 11, str(tmp_path / "c2")), seed=11)
    c = SampleStream(build_train_dataset(blend, tok, 64, 12, str(tmp_path / "c3")), seed=12)
    assert np.array_equal(a.batch(0, 8).tokens, b.batch(0, 8).tokens)
    assert not np.array_equal(a.batch(0, 8).tokens, c.batch(0, 8).tokens)
    # labels are the next tokens of the same stream
    batch = a.batch(5, 2)
    assert np.array_equal(batch.tokens[:, 1:], batch.labels[:, :-1])
    # "resuming" = a fresh stream asked for the same global indices; also across the epoch boundary
    n = a.epoch_size
    fresh = SampleStream(a.dataset, seed=11)
    for start in (123, n - 3, 2 * n + 7):
        assert np.array_equal(a.batch(start, 6).tokens, fresh.batch(start, 6).tokens)
    # the second epoch visits every sample once, in a different order
    second = [a.index(i) for i in range(n, 2 * n)]
    assert sorted(second) == list(range(n)) and second != list(range(n))


def test_global_batch_is_independent_of_the_layout():
    """The samples of optimizer step s are the same set for any dp x accumulation split."""
    gbs = 16

    def step_samples(dp, micro):
        ga = gbs // (dp * micro)
        return sorted(
            micro_batch_start(3, m, r, gbs, micro, dp) + j for m in range(ga) for r in range(dp) for j in range(micro)
        )

    assert step_samples(1, 16) == step_samples(2, 8) == step_samples(2, 2) == step_samples(4, 1) == list(range(48, 64))


def test_eval_windows_predict_every_token_once(bundled_dir):
    prefix = str(bundled_dir / "valid")
    flat = np.fromfile(prefix + ".bin", dtype=np.uint16).astype(np.int64)
    stream = TokenStream([prefix], seq_len=100)
    batch = stream.batch(list(range(stream.num_windows + 3)))  # extra indices are empty, masked rows
    mask = batch.loss_mask.bool()
    assert int(mask.sum()) == len(flat) - 1
    assert np.array_equal(batch.labels[mask].numpy(), flat[1:])
    assert np.array_equal(batch.tokens[mask].numpy(), flat[:-1])
    capped = TokenStream([prefix], seq_len=100, max_tokens=250)
    assert capped.num_windows == 3 and int(capped.batch([0, 1, 2]).loss_mask.sum()) == 250


def test_token_bytes_add_up_to_the_text(tok, corpus):
    _, test = corpus
    table = tok.token_bytes()
    for doc in test[:3]:
        ids = tok.encode(doc.text)
        # the only difference: sentencepiece's dummy-prefix space on the first token of a document
        assert int(table[ids].sum()) - len(doc.text.encode("utf-8")) in (0, 1)


def test_user_corpus_text_and_jsonl(tmp_path, corpus):
    train, test = corpus
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(train[:40]):
        (src / f"doc{i}.txt").write_text(d.text)
    with open(tmp_path / "more.jsonl", "w") as f:
        for d in train[40:80]:
            f.write(json.dumps({"body": d.text, "id": d.id}) + "\n")
    with open(tmp_path / "held.jsonl", "w") as f:
        for d in test[:2]:
            f.write(json.dumps({"body": d.text}) + "\n")
    args = PrepareArgs(
        out=str(tmp_path / "mine"),
        bundled=False,
        inputs=[str(src / "*.txt"), str(tmp_path / "more.jsonl")],
        test_inputs=[str(tmp_path / "held.jsonl")],
        jsonl_key="body",
        vocab_size=512,
        valid_fraction=0.1,
        workers=2,
    )
    out = prepare(args, log=lambda *_: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["documents"] + m["splits"]["valid"]["documents"] == 80
    assert m["splits"]["test"]["documents"] == 2 and m["tokenizer"]["vocab_size"] == 512
    tok = Tokenizer(out / "tokenizer.model")
    held = open_indexed(str(out / "test"))  # keep it alive: its items are views into its mmap
    assert tok.decode(list(held[1])) == test[1].text
    # prepared again with the same settings: nothing is rebuilt
    again = prepare(args, log=lambda *_: None)
    assert json.loads((again / "manifest.json").read_text())["created"] == m["created"]


def test_user_corpus_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no 'text' field \(has: content\); set --jsonl-key"):
        prepare(PrepareArgs(out=str(tmp_path / "o"), bundled=False, inputs=[str(bad)]), log=lambda *_: None)
    with pytest.raises(DataError, match=r"--input '.*nothing-\*.txt': no file matches"):
        prepare(
            PrepareArgs(out=str(tmp_path / "o"), bundled=False, inputs=[str(tmp_path / "nothing-*.txt")]),
            log=lambda *_: None,
        )
    with pytest.raises(DataError, match=r"missing .*nope.bin"):
        open_indexed(str(tmp_path / "nope"))


def test_weighted_blend_of_existing_prefixes(bundled_dir, tok, tmp_path):
    """Two Megatron prefixes blended 3:1 (here: the train and valid splits as if they were two
    user corpora): samples come from both in about that proportion, deterministically."""
    blend = [(3.0, str(bundled_dir / "train")), (1.0, str(bundled_dir / "valid"))]
    ds = build_train_dataset(blend, tok, 64, 5, str(tmp_path / "cache"))
    again = build_train_dataset(blend, tok, 64, 5, str(tmp_path / "cache2"))
    n = 400
    sources = np.asarray(ds.dataset_index[:n])
    assert np.array_equal(sources, np.asarray(again.dataset_index[:n]))
    assert abs(float((sources == 1).mean()) - 0.25) < 0.05
    stream = SampleStream(ds, seed=5)
    assert stream.batch(0, 4).tokens.shape == (4, 64)
