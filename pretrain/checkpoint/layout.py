"""What a run's checkpoint folder looks like, and how to read it back after a crash.

runs/<name>/checkpoints/
    step_000123/        a complete checkpoint (DeepSpeed's files, rng_rankNNNNN.pt, meta.json,
                        the tokenizer, manifest.json written last)
    latest              the newest complete checkpoint's name (replaced atomically)
    .tmp-step_N/        a save in progress (or one a crash interrupted: deleted at the next save)
    .old-step_N/        the previous copy of step_N during a re-save (restored if the swap died)
    .del-step_N/        a checkpoint retention is deleting (a half-deleted one never looks complete)
    universal/step_N/   DeepSpeed's universal conversion of step_N, for a resume on another layout
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from kernels.errors import PretrainError

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
UNIVERSAL_DIR = "universal"


class CheckpointError(PretrainError, RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""

    exit_code = 3


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed (hence fully written) checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def recover_interrupted(root: Path, log) -> None:
    """Finishes what a killed save or retention left half-done: a re-save swaps step_N for a new one
    through .old-step_N (if the process died between the two renames, the old, complete one is put
    back); retention renames to .del-step_N before deleting (leftovers are deleted)."""
    if not root.is_dir():
        return
    for old in root.glob(".old-step_*"):
        final = root / old.name.removeprefix(".old-")
        if not final.exists():
            os.replace(old, final)
            log(f"[checkpoint] restored {final.name} from an interrupted re-save")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for doomed in root.glob(".del-*"):
        shutil.rmtree(doomed, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
