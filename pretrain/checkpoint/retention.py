"""Keep-last-k retention: older complete checkpoints (and universal conversions of checkpoints that
are gone) are deleted through a rename, so a half-deleted checkpoint never looks complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pretrain.checkpoint.layout import STEP_DIR, UNIVERSAL_DIR, complete_checkpoints


def apply_retention(root: Path, keep_last: int, keep: Path) -> None:
    """Deletes all but the newest `keep_last` checkpoints (0 = keep all); `keep` always stays."""
    if keep_last > 0:
        ckpts = [c for c in complete_checkpoints(root) if c != keep]
        for old in ckpts[: max(0, len(ckpts) - (keep_last - 1))]:
            doomed = root / f".del-{old.name}"
            os.replace(old, doomed)  # atomic: a half-deleted checkpoint never looks complete
            shutil.rmtree(doomed, ignore_errors=True)
    universal = root / UNIVERSAL_DIR
    if universal.is_dir():
        for conv in universal.iterdir():
            if STEP_DIR.match(conv.name) and not (root / conv.name).exists():
                shutil.rmtree(conv, ignore_errors=True)
