"""`prepare`: documents -> split by document -> tokenizer -> tokenized .bin/.idx per split + manifest.

The output directory is what `data.dir` points at:
    tokenizer.model, train.bin/.idx, valid.bin/.idx, test.bin/.idx, manifest.json
Validation documents are held out of the training sources by document (a deterministic
hash order per source, so every source, the pre-2000 State of the Union addresses included, has
validation documents), the test set comes from separate documents (SOTU 2000-2026 for the bundled
corpus) and is never trained on; the tokenizer is trained on the training split only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain.data.corpus import (
    BUNDLED_CORPUS_VERSION,
    PACKAGES,
    SOTU_TEST_FROM_YEAR,
    DataError,
    Document,
    bundled_corpus,
    user_documents,
)
from pretrain.data.indexed import write_indexed
from pretrain.data.tokenizer import TOKENIZER_FILES, Tokenizer, tokenizer_file_in, train_tokenizer
from pretrain.fsutil import atomic_write_text

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class PrepareArgs:
    out: str
    bundled: bool = True  # use the bundled corpus (else only --input files)
    inputs: list = field(default_factory=list)  # user text/JSONL files or globs
    test_inputs: list = field(default_factory=list)  # user held-out test files
    jsonl_key: str = "text"
    doc_split: str = "file"  # file | blankline
    valid_fraction: float = 0.02  # per source, at least one document
    test_fraction: float = 0.01  # only when there is no separate test set
    vocab_size: int = 8192
    tokenizer: str = ""  # reuse an existing tokenizer (sentencepiece .model or tokenizer.json) instead of training one
    seed: int = 1234
    workers: int = 0

    def fingerprint(self) -> str:
        d = asdict(self)
        d.pop("out"), d.pop("workers")
        d["packages"] = {k: v.sha256 for k, v in PACKAGES.items()} if self.bundled else {}
        if self.bundled:  # a change of what the bundled corpus trains on makes old prepared data stale
            d["bundled_corpus"] = BUNDLED_CORPUS_VERSION
        d["format"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def split_by_document(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(kept, held_out): per source, the `fraction` of documents first in a seeded hash order
    (at least one where a source has two or more documents)."""
    if fraction <= 0:
        return list(docs), []
    by_source = defaultdict(list)
    for d in docs:
        by_source[d.source].append(d)
    held = set()
    for group in by_source.values():
        if len(group) < 2:
            continue
        order = sorted(group, key=lambda d: hashlib.sha256(f"{seed}:{d.id}".encode()).hexdigest())
        k = max(1, round(fraction * len(group)))
        held.update(d.id for d in order[:k])
    return [d for d in docs if d.id not in held], [d for d in docs if d.id in held]


def _summary(docs: list[Document]) -> dict:
    sources = defaultdict(int)
    for d in docs:
        sources[d.source] += 1
    return dict(sources)


def prepare(args: PrepareArgs, force: bool = False, log=print) -> Path:
    out = Path(args.out)
    manifest_path = out / MANIFEST
    if manifest_path.exists() and not force:
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == args.fingerprint():
            log(
                f"[data] {out} is already prepared with these settings ({old['splits']['train']['tokens']:,} "
                "training tokens); use --force to rebuild"
            )
            return out
        raise DataError(f"{out} holds data prepared with other settings; use another --out or --force")
    if not args.bundled and not args.inputs:
        raise DataError("nothing to prepare: give --input files, or drop --no-bundled to use the bundled corpus")
    t0 = time.time()
    pool: list[Document] = []
    test: list[Document] = []
    if args.bundled:
        train_docs, test = bundled_corpus(log=log)
        pool += train_docs
    if args.inputs:
        pool += list(user_documents(args.inputs, args.jsonl_key, args.doc_split, source="user"))
    if args.test_inputs:
        test += list(user_documents(args.test_inputs, args.jsonl_key, args.doc_split, source="user-test"))
    elif not args.bundled:
        pool, test = split_by_document(pool, args.test_fraction, args.seed + 1)
        log(f"[data] no --test-input: held out {len(test)} documents ({args.test_fraction:.1%} per source) as test")
    train, valid = split_by_document(pool, args.valid_fraction, args.seed)
    if not train:
        raise DataError("no training documents left after the validation split")
    log(
        f"[data] documents: train {len(train)} {_summary(train)}, valid {len(valid)} {_summary(valid)}, "
        f"test {len(test)} {_summary(test)}"
    )

    out.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        manifest_path.unlink()  # from here on the directory is incomplete until the new manifest lands
    tok_path = out / "tokenizer.model"
    if args.tokenizer:
        given = Path(args.tokenizer)
        if given.is_dir() and tokenizer_file_in(given):
            given = tokenizer_file_in(given)
        if not given.is_file():
            raise DataError(
                f"--tokenizer '{args.tokenizer}' does not exist (give a sentencepiece .model, a Hugging Face "
                "tokenizer.json, or a directory holding one)"
            )
        tok_path = out / Tokenizer(given).filename  # loading it first refuses a file that is neither
        for stale in TOKENIZER_FILES:  # an earlier prepare's tokenizer of the other kind must not be found
            (out / stale).unlink(missing_ok=True)
        shutil.copyfile(given, tok_path)
        log(f"[data] using the existing tokenizer {given}")
    else:
        log(f"[data] training a {args.vocab_size}-token sentencepiece BPE tokenizer on the training split")
        trained = train_tokenizer(train, out / "tokenizer.tmp", vocab_size=args.vocab_size, seed=args.seed)
        os.replace(trained, tok_path)
        os.replace(out / "tokenizer.tmp.vocab", out / "tokenizer.vocab")
        (out / "tokenizer.json").unlink(missing_ok=True)  # an earlier prepare's, which would be found first
    tokenizer = Tokenizer(tok_path)

    splits = {}
    for name, docs in (("train", train), ("valid", valid), ("test", test)):
        log(f"[data] tokenizing {name}: {len(docs)} documents")
        splits[name] = write_indexed(docs, tokenizer, out / name, workers=args.workers)
        splits[name]["sources"] = _summary(docs)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": args.fingerprint(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "args": asdict(args),
        "packages": {k: asdict(v) for k, v in PACKAGES.items()} if args.bundled else {},
        "test_set": f"SOTU {SOTU_TEST_FROM_YEAR}-" if args.bundled and not args.test_inputs else "user",
        "bundled_corpus": BUNDLED_CORPUS_VERSION if args.bundled else None,
        "tokenizer": {
            "path": tok_path.name,
            "vocab_size": tokenizer.vocab_size,
            "sha256": tokenizer.sha256,
            "eod": tokenizer.eod,
            "pad": tokenizer.pad,
        },
        "splits": splits,
        "documents": {"valid": [d.id for d in valid], "test": [d.id for d in test]},
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    log(
        f"[data] prepared {out} in {time.time() - t0:.1f}s: "
        + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in splits.items())
    )
    return out


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"'{directory}' is not a prepared dataset (no {MANIFEST}); run "
            f"`python -m pretrain.data prepare --out {directory}`"
        )
    return json.loads(path.read_text())
