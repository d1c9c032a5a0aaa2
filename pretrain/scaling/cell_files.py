"""What a finished sweep cell's directory holds besides an ordinary run, and how to read it:
its evaluation (eval/scaling_eval.json, written by pretrain/scaling/cell_eval.py) and, for a run
that diverged, diverged.json (written by the sweep). A leaf module: the sweep, the LR search and the
evaluation all read these files, none of them through another."""

from __future__ import annotations

import json
from pathlib import Path

EVAL_VERSION = 3  # 3: init (L0, depth at initialization), diverged, level, growth
EVAL_FILE = "scaling_eval.json"
DIVERGED_FILE = "diverged.json"
ARCHIVE_FILE = "archived.json"  # an archived cell (pretrain/scaling/archive.py): results kept, checkpoints not


def read_evaluation(cell_dir: Path) -> dict | None:
    """The cell's current evaluation, or None (missing, unreadable or of an older version)."""
    path = Path(cell_dir) / "eval" / EVAL_FILE
    if not path.is_file():
        return None
    try:
        ev = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return ev if ev.get("version") == EVAL_VERSION else None


def evaluation_current(cell_dir: Path, full: bool = True) -> bool:
    """Whether the cell's evaluation is of this version (and full, when `full`)."""
    ev = read_evaluation(cell_dir)
    return ev is not None and (not full or ev.get("level") == "full")


def diverged(cell_dir: Path) -> dict | None:
    """The record of a run stopped by non-finite losses, or None."""
    path = Path(cell_dir) / DIVERGED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def archived_step(cell_dir: Path) -> int:
    """The step an archived cell's training finished at (0 for a cell that is not archived)."""
    path = Path(cell_dir) / ARCHIVE_FILE
    return int(json.loads(path.read_text())["step"]) if path.is_file() else 0
