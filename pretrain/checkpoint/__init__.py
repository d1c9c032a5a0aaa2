"""Checkpoints users can trust (DESIGN.md §7), one module per job:

    layout.py        what the checkpoint folder holds, names, listing, recovery after a crash
    manifest.py      sizes and sha256 of every file; verification (split across ranks)
    checkpointer.py  saving and loading a DeepSpeed engine, atomically (Checkpointer)
    rng.py           every rank's random streams
    retention.py     keep-last-k
    universal.py     resuming on another layout through DeepSpeed's universal checkpoint
    consolidate.py   the plain model's weights from any checkpoint (eval, export, init_from)

The arrows point one way: layout <- manifest <- checkpointer <- universal; consolidate reads files only.
"""

from pretrain.checkpoint.checkpointer import Checkpointer, read_meta
from pretrain.checkpoint.layout import (
    MANIFEST,
    META,
    CheckpointError,
    complete_checkpoints,
    recover_interrupted,
    step_name,
)
from pretrain.checkpoint.manifest import find_resumable, verify, write_manifest

__all__ = [
    "MANIFEST",
    "META",
    "CheckpointError",
    "Checkpointer",
    "complete_checkpoints",
    "find_resumable",
    "read_meta",
    "recover_interrupted",
    "step_name",
    "verify",
    "write_manifest",
]
