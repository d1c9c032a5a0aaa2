"""A sweep's results without its checkpoints: the files `fit`, `report` and the LR search read, per
finished cell, copied into a directory small enough to commit (a few KB per cell).

    python -m pretrain.scaling archive configs/sweeps/placement-study.yaml --to bench/scaling-study/cells
    python -m pretrain.scaling report configs/sweeps/placement-study.yaml --out bench/scaling-study/cells

The archived directory has the sweep's layout (<dir>/<cell>/...), so `--out DIR` makes `fit` and
`report` read it as they read a live sweep, and `sweep --out DIR` counts its cells as finished: a
study can be continued on another machine from the committed results, training only what is missing.
Each archived cell holds ARCHIVE_FILE, the step its training finished at; the sweep takes that in place
of a checkpoint (pretrain/scaling/sweep.py: trained_step). Unfinished cells are left out and listed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pretrain.config import ConfigError
from pretrain.fsutil import atomic_write_text
from pretrain.scaling.cell_files import ARCHIVE_FILE, DIVERGED_FILE, EVAL_FILE, diverged, evaluation_current
from pretrain.scaling.spec import Sweep
from pretrain.scaling.sweep import trained_step

# What the readers need (results.collect, report.train_seconds, the LR choice, summary's recipe); the
# run's config.yaml and the sweep's record of the cell make the archive self-describing.
RESULT_FILES = ("config.yaml", "sweep_cell.json", "metrics.jsonl", f"eval/{EVAL_FILE}", DIVERGED_FILE)


def archive_sweep(sweep: Sweep, dest: Path) -> tuple[list[str], list[str]]:
    """Copies every finished cell's RESULT_FILES (all text) from sweep.out to dest; returns (archived,
    left out)."""
    dest = Path(dest)
    if dest.resolve() == Path(sweep.out).resolve():
        raise ConfigError(f"--to {dest}: that is the sweep's own directory (--out); archive into another one")
    archived, left_out = [], []
    for cell in sweep.cells:
        src = Path(sweep.out) / cell.name
        stopped = diverged(src)
        step = trained_step(src)
        if not (evaluation_current(src, full=cell.study) and (stopped or step >= cell.max_steps)):
            left_out.append(cell.name)
            continue
        out = dest / cell.name
        (out / "eval").mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            if (src / name).is_file():
                atomic_write_text(out / name, (src / name).read_text())
        record = {
            "step": step,
            "max_steps": cell.max_steps,
            "diverged": bool(stopped),
            "from": str(src.resolve()),
            "archived_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(out / ARCHIVE_FILE, json.dumps(record, indent=1) + "\n")
        archived.append(cell.name)
    return archived, left_out
