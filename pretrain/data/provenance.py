"""Which tokenizer made the data and the weights a run starts from: token ids only mean text
through the tokenizer that produced them, so a run refuses to mix tokenizers it can tell apart.

- A prepared data directory records its tokenizer's sha256 in manifest.json (pretrain/data/prepare.py);
  every split the run reads from such a directory must have been made by the run's tokenizer.
- checkpoint.init_from's weights come with theirs: a checkpoint records it (meta.json, and a copy
  of tokenizer.model), an imported model (python -m pretrain.import_hf) has tokenizer.model beside
  model.pt when the Hugging Face model had one.
Megatron .bin/.idx prefixes from elsewhere carry no record; they are the user's responsibility
(data.tokenizer must be the one they were made with).
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.data.corpus import DataError
from pretrain.data.tokenizer import tokenizer_file_in
from pretrain.fsutil import sha256_file


def _manifest_tokenizer(prefix: str) -> tuple[Path, str] | None:
    manifest = Path(prefix).parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return manifest, json.loads(manifest.read_text())["tokenizer"]["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def check_data_tokenizer(prefixes: list[str], tokenizer) -> None:
    """Refuses splits prepared with another tokenizer than `tokenizer` (a pretrain.data.Tokenizer)."""
    for prefix in prefixes:
        found = _manifest_tokenizer(prefix)
        if found and found[1] != tokenizer.sha256:
            manifest, sha = found
            raise DataError(
                f"{prefix} was tokenized with a tokenizer of sha256 {sha[:12]}… ({manifest}), but this run's tokenizer "
                f"{tokenizer.path} has sha256 {tokenizer.sha256[:12]}…: its token ids would mean other text. Tokenize "
                f"the data with the run's tokenizer (python -m pretrain.data prepare --tokenizer {tokenizer.path} "
                "--out data/NAME, then --set data.dir=data/NAME), or set data.tokenizer to the data's"
            )


def init_from_tokenizer_sha(path: Path) -> tuple[str, str] | None:
    """(sha256, where it was found) of the tokenizer that checkpoint.init_from's weights were trained
    with, or None when nothing records it."""
    if path.is_dir():
        meta = path / "meta.json"
        if meta.is_file():
            sha = json.loads(meta.read_text()).get("tokenizer_sha256")
            if sha:
                return sha, str(meta)
        candidate = tokenizer_file_in(path)
    else:
        candidate = tokenizer_file_in(path.parent)
    return (sha256_file(candidate), str(candidate)) if candidate else None


def check_init_from_tokenizer(init_from: str, tokenizer) -> None:
    if not init_from:
        return
    found = init_from_tokenizer_sha(Path(init_from))
    if found and found[0] != tokenizer.sha256:
        sha, where = found
        fix = ("Tokenize your data with the model's tokenizer (python -m pretrain.data prepare --tokenizer "
               "<its tokenizer.model> --out data/NAME) and train with --set data.dir=data/NAME")  # fmt: skip
        raise DataError(
            f"checkpoint.init_from {init_from} was trained with the tokenizer recorded in {where} (sha256 "
            f"{sha[:12]}…), but this run's tokenizer {tokenizer.path} has sha256 {tokenizer.sha256[:12]}…: the "
            f"weights would read ids that mean other text. {fix}"
        )
