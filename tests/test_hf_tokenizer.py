"""A Hugging Face tokenizer.json as the training tokenizer: GPT-2-style byte-level BPE (what existing
Megatron data is often made with) and a sentencepiece-style tokenizer.json, checked against the
tokenizers library, sentencepiece and the UTF-8 length of the text; then prepare -> train -> checkpoint
-> evaluate -> export with one."""

from __future__ import annotations

import json
import re

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFLibTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pretrain.data import DataError, Tokenizer
from tests.conftest import ROOT, check, run_module, tiny_args

TEXT = "Thus conscience does make cowards of us all;\nnaïve café — 東京 🚀 1234\n\n  indented\tand tabbed."


def byte_level_bpe(path, lines, vocab_size=400, eod="<|endoftext|>"):
    """What GPT-2's tokenizer is: byte-level pre-tokenization, BPE merges, one special end-of-text token."""
    tok = HFLibTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [eod] if eod else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def gpt2_style(bundled_dir, tmp_path_factory):
    lines = (ROOT / "README.md").read_text().splitlines() * 3
    return byte_level_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", lines)


def test_byte_level_tokenizer_json_encodes_like_the_library_and_counts_bytes_exactly(gpt2_style):
    tok = Tokenizer(gpt2_style)
    lib = HFLibTokenizer.from_file(str(gpt2_style))
    ids = tok.encode(TEXT)
    assert ids == lib.encode(TEXT, add_special_tokens=False).ids
    assert tok.decode(ids) == TEXT
    assert tok.eod == lib.token_to_id("<|endoftext|>") == tok.pad and tok.bos == -1
    assert tok.filename == "tokenizer.json" and tok.vocab_size == lib.get_vocab_size()
    bytes_per_id = tok.token_bytes()
    assert sum(int(bytes_per_id[i]) for i in ids) == len(TEXT.encode("utf-8"))  # bits per byte's denominator
    assert bytes_per_id[tok.eod] == 0
    assert b"".join(tok.piece_bytes()[i] for i in ids).decode("utf-8") == TEXT


def test_sentencepiece_style_tokenizer_json_agrees_with_sentencepiece(bundled_dir, tmp_path):
    """Our export writes the bundled sentencepiece model as a tokenizer.json: trained on that, the ids and
    the bytes per id are sentencepiece's."""
    from pretrain.export import build_hf_tokenizer

    sp_path = bundled_dir / "tokenizer.model"
    build_hf_tokenizer(sp_path).backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok, sp = Tokenizer(tmp_path / "tokenizer.json"), spm.SentencePieceProcessor(model_file=str(sp_path))
    assert tok.encode(TEXT) == sp.encode(TEXT)
    assert tok.eod == sp.eos_id() and tok.bos == sp.bos_id() and tok.pad == sp.pad_id()
    reference = [
        None
        if sp.is_control(i) or sp.is_unknown(i)
        else bytes([int(sp.id_to_piece(i)[3:-1], 16)])
        if sp.is_byte(i)
        else sp.id_to_piece(i).replace("\u2581", " ").encode()
        for i in range(sp.get_piece_size())
    ]
    assert tok.piece_bytes() == reference


def test_a_tokenizer_json_without_an_end_of_document_token_is_refused(tmp_path):
    path = byte_level_bpe(tmp_path / "tokenizer.json", ["just some text"] * 10, vocab_size=300, eod=None)
    with pytest.raises(DataError, match=r"no end-of-document token: looked for <\|endoftext\|>"):
        Tokenizer(path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
        Tokenizer(tmp_path / "broken.json")


@pytest.mark.distributed
def test_prepare_train_evaluate_export_with_a_gpt2_style_tokenizer(gpt2_style, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, chunk in enumerate(re.split(r"\n## ", (ROOT / "README.md").read_text())):
        (src / f"{i:02d}.txt").write_text(chunk * 4)
    data, run = tmp_path / "data", tmp_path / "run"
    check(
        run_module(
            ["-m", "pretrain.data", "prepare", "--no-bundled", "--input", str(src / "*.txt"), "--tokenizer",
             str(gpt2_style), "--out", str(data), "--valid-fraction", "0.2", "--test-fraction", "0.2"]
        )
    )  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["path"] == "tokenizer.json" and not (data / "tokenizer.model").exists()
    assert manifest["tokenizer"]["sha256"] == Tokenizer(gpt2_style).sha256
    check(
        run_module(
            tiny_args(
                data, run, "train.max_steps=4", "train.warmup_steps=1", "checkpoint.every=4", "train.eval_every=4"
            )
        )
    )
    ckpt = run / "checkpoints" / "step_000004"
    assert (ckpt / "tokenizer.json").read_bytes() == gpt2_style.read_bytes()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "valid" and float(r["bits_per_byte"]) > 0 for r in rows)

    out = tmp_path / "hf"
    check(run_module(["-m", "pretrain.export", "--checkpoint", str(run), "--out", str(out)]))
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out, local_files_only=True, trust_remote_code=True)
    assert hf.encode(TEXT, add_special_tokens=False) == Tokenizer(gpt2_style).encode(TEXT)
    assert hf.eos_token == "<|endoftext|>"
