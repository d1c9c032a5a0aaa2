"""A checkpoint's manifest (size and sha256 of every file, written last) and its verification.

A checkpoint is trusted only when every file the manifest lists is there with its size (and, at
checkpoint.verify=sha256, its digest). Large checkpoints are hashed and verified by all ranks
together, each taking a share of the files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from pretrain.checkpoint.layout import MANIFEST, CheckpointError, complete_checkpoints
from pretrain.checkpoint.safe_load import unexpected_globals
from pretrain.fsutil import atomic_write_text, sha256_file


def payload_files(ckpt: Path) -> list[str]:
    """Every file of a checkpoint but its manifest, as sorted relative paths (the same list on every
    rank of a shared filesystem)."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def share(items: list, rank: int, world: int) -> list:
    """This rank's share of a list every rank holds in the same order."""
    return items[rank::world]


def digest_and_sync(path: Path) -> dict:
    """Size and sha256 of a file, and fsync it: a checkpoint is renamed into place only once its
    bytes are on disk, so a machine crash cannot leave a 'complete' checkpoint with lost data."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(ckpt: Path, entries: dict | None = None) -> None:
    """manifest.json with the size and sha256 of every file (hashed here unless `entries` is given,
    e.g. hashed by every rank for its share of the files)."""
    if entries is None:
        entries = {rel: digest_and_sync(ckpt / rel) for rel in payload_files(ckpt)}
    atomic_write_text(
        ckpt / MANIFEST,
        json.dumps({"files": dict(sorted(entries.items())), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1),
    )


def manifest_files(ckpt: Path) -> dict:
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST}; the checkpoint is partial (a save did not finish)")
    try:
        return json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: unreadable manifest ({e})") from None


def verify(ckpt: Path, level: str = "sha256", rank: int = 0, world: int = 1) -> None:
    """Raises CheckpointError naming the first missing, truncated or corrupt file. With world > 1,
    checks this rank's share of the files only (see verify_on_all_ranks)."""
    files = manifest_files(ckpt)
    for rel in share(sorted(files), rank, world):
        info, p = files[rel], ckpt / rel
        if level != "none":
            if not p.is_file():
                raise CheckpointError(f"{ckpt}: file {rel} listed in the manifest is missing")
            size = p.stat().st_size
            if size != info["size"]:
                raise CheckpointError(
                    f"{ckpt}: file {rel} has {size} bytes, the manifest says {info['size']} (truncated?)"
                )
            if level == "sha256" and sha256_file(p) != info["sha256"]:
                raise CheckpointError(f"{ckpt}: file {rel} does not match its sha256 in the manifest (corrupt)")
        # whatever the level: DeepSpeed unpickles these files with weights_only=False
        if rel.endswith(".pt") and p.is_file() and (bad := unexpected_globals(p)):
            raise CheckpointError(
                f"{ckpt}: file {rel} would import {', '.join(bad)} when loaded, which no "
                "checkpoint of this stack contains; refusing to load it (a tampered or foreign file)"
            )


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def verify_on_all_ranks(ckpt: Path, level: str) -> str | None:
    """Every rank checks a share of the files (hashing a large checkpoint is split across the job);
    returns the first problem any rank found, the same on every rank, or None. A collective."""
    rank, world = rank_world()
    try:
        verify(ckpt, level, rank, world)
        error = None
    except CheckpointError as e:
        error = str(e)
    return next((e for e in all_gather(error) if e), None)


def find_resumable(root: Path, level: str, log) -> Path | None:
    """The newest checkpoint that verifies (one process); older ones are tried when a newer one is
    damaged."""
    for ckpt in reversed(complete_checkpoints(root)):
        try:
            verify(ckpt, level)
            return ckpt
        except CheckpointError as e:
            log(f"[checkpoint] skipping damaged checkpoint: {e}")
    return None
