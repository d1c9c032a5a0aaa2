"""A run refuses data and init_from weights made with another tokenizer than its own."""

from __future__ import annotations

import json
import shutil

import pytest

from pretrain.data import DataError, Tokenizer
from pretrain.data.prepare import PrepareArgs, prepare
from pretrain.data.provenance import check_data_tokenizer, check_init_from_tokenizer


@pytest.fixture(scope="module")
def two_tokenizers(bundled_dir, tmp_path_factory):
    """The bundled data (2048-token tokenizer) and a second tokenizer of another vocabulary."""
    other = tmp_path_factory.mktemp("other")
    src = other / "src"
    src.mkdir()
    (src / "a.txt").write_text((bundled_dir / "manifest.json").read_text() * 20)  # any text will do
    out = prepare(PrepareArgs(out=str(other / "data"), bundled=False, inputs=[str(src / "*.txt")], vocab_size=512,
                              valid_fraction=0.0, test_fraction=0.0), log=lambda *_: None)  # fmt: skip
    return Tokenizer(bundled_dir / "tokenizer.model"), Tokenizer(out / "tokenizer.model")


def test_data_prepared_with_another_tokenizer_is_refused(bundled_dir, two_tokenizers):
    ours, other = two_tokenizers
    check_data_tokenizer([str(bundled_dir / "train")], ours)  # the data's own tokenizer: fine
    with pytest.raises(DataError, match=r"was tokenized with a tokenizer of sha256 .* prepare --tokenizer"):
        check_data_tokenizer([str(bundled_dir / "train")], other)
    manifest = json.loads((bundled_dir / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == ours.sha256 != other.sha256  # what the check reads


def test_init_from_weights_with_another_tokenizer_are_refused(tmp_path, two_tokenizers):
    ours, other = two_tokenizers
    imported = tmp_path / "imported"
    imported.mkdir()
    (imported / "model.pt").write_bytes(b"")
    shutil.copy(other.path, imported / "tokenizer.model")  # what import_hf copies beside the weights
    with pytest.raises(DataError, match="checkpoint.init_from .* was trained with the tokenizer"):
        check_init_from_tokenizer(str(imported / "model.pt"), ours)
    check_init_from_tokenizer(str(imported / "model.pt"), other)
    ckpt = tmp_path / "step_000010"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"tokenizer_sha256": other.sha256}))
    with pytest.raises(DataError, match="meta.json"):
        check_init_from_tokenizer(str(ckpt), ours)
    check_init_from_tokenizer(str(tmp_path / "no-record.pt"), ours)  # nothing recorded: nothing to compare
