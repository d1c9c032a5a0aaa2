"""The evaluated cells of a sweep, as the fit and the report read them.

Every axis of the grid gets a role:
  size    an axis whose values set the model's shape (hidden size, layers, heads, FFN): gives N
  tokens  the token budget (`tokens`, train.max_steps): gives D
  seed    run.seed: replicates, kept as separate points (the bootstrap resamples them with the rest)
  group   anything else (placement, learning rate, norm, ...): one scaling curve per combination
N is the number of non-embedding parameters, D the number of trained tokens, both read from the
cell's evaluation (what was actually trained, not what the grid asked for).

With an LR search (pretrain/scaling/lrsearch.py) every cell also carries its learning rate (a label,
not an axis: a recipe setting chosen per group) and whether it belongs to the study proper
(`cell.study`) or is only a point of the search. `seed_noise` pools the seed-to-seed spread of the
study cells: what decides whether a difference between two cells is resolved.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.scaling.cell_files import EVAL_FILE, EVAL_VERSION
from pretrain.scaling.spec import Cell, Sweep

SIZE_KEYS = {
    "model.hidden_size",
    "model.num_layers",
    "model.num_heads",
    "model.num_kv_heads",
    "model.ffn_hidden_size",
    "model.ffn_multiple",
    "model.mlp",
    "model.vocab_size",
}
TOKEN_KEYS = {"tokens", "train.max_steps"}
SEED_KEYS = {"run.seed"}
METRICS = {  # --metric name -> (path in scaling_eval.json, what it is)
    "test_loss": (("test", "loss"), "test loss (nats/token)"),
    "test_bpb": (("test", "bits_per_byte"), "test bits per byte"),
    "valid_loss": (("valid", "loss"), "validation loss (nats/token)"),
    "valid_bpb": (("valid", "bits_per_byte"), "validation bits per byte"),
}


def axis_roles(sweep: Sweep) -> dict[str, str]:
    roles = {}
    for axis, values in sweep.axes.items():
        keys = {str(k) for overrides in values.values() for k in overrides}
        if keys & SIZE_KEYS:
            roles[axis] = "size"
        elif keys & TOKEN_KEYS:
            roles[axis] = "tokens"
        elif keys <= SEED_KEYS:
            roles[axis] = "seed"
        else:
            roles[axis] = "group"
    return roles


@dataclass
class CellResult:
    cell: Cell
    dir: Path
    held_out: bool
    group: tuple  # ((axis, value), ...) of the group axes
    evaluation: dict | None = None
    why_missing: str = ""
    curve: list = field(default_factory=list)  # [(tokens, training loss)]
    valid_curve: list = field(default_factory=list)  # [(tokens, validation loss)]

    @property
    def name(self) -> str:
        return self.cell.name

    @property
    def label(self) -> str:
        return group_label(self.group)

    @property
    def N(self) -> int:
        return self.evaluation["non_embedding_parameters"]

    @property
    def D(self) -> int:
        return self.evaluation["trained_tokens"]

    @property
    def diverged(self) -> bool:
        return bool(self.evaluation and self.evaluation.get("diverged"))

    @property
    def usable(self) -> bool:
        """Evaluated, trained to the end without diverging: a point for tables and fits."""
        return self.evaluation is not None and not self.diverged

    @property
    def lr(self) -> float:
        return self.cell.config.train.lr

    @property
    def seed(self) -> int:
        return self.cell.config.run.seed

    @property
    def initial_loss(self) -> float | None:
        return ((self.evaluation or {}).get("init") or {}).get("loss")

    def metric(self, name: str) -> float:
        """The metric's value; NaN for a cell that diverged (it has no final figures)."""
        (section, key), _ = METRICS[name]
        value = (self.evaluation.get(section) or {}).get(key)
        return float("nan") if value is None else float(value)


def group_label(group: tuple) -> str:
    """'pre' for a single group axis, 'placement=pre, lr=0.002' for several, 'all' for none."""
    if not group:
        return "all"
    if len(group) == 1:
        return str(group[0][1])
    from pretrain.scaling.spec import AXIS_LABELS

    return ", ".join(f"{AXIS_LABELS.get(a, a.split('.')[-1])}={v}" for a, v in group)


def _read_curves(cell_dir: Path, tokens_per_step: int) -> tuple[list, list]:
    path = cell_dir / "metrics.jsonl"
    train, valid = {}, {}
    if not path.is_file():
        return [], []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "lr" in r and "loss" in r:
            train[int(r["step"])] = float(r["loss"])  # a resumed run logs some steps twice: the last wins
        elif "perplexity" in r and "loss" in r:
            valid[int(r["step"])] = float(r["loss"])
    return (
        [(s * tokens_per_step, v) for s, v in sorted(train.items())],
        [(s * tokens_per_step, v) for s, v in sorted(valid.items())],
    )


def collect(sweep: Sweep) -> list[CellResult]:
    """Every cell of the sweep with its evaluation (None, and why, where there is none yet)."""
    roles = axis_roles(sweep)
    out = []
    for cell in sweep.cells:
        d = sweep.out / cell.name
        group = tuple((a, cell.labels[a]) for a in sweep.axes if roles[a] == "group")
        r = CellResult(cell, d, sweep.is_held_out(cell), group)
        path = d / "eval" / EVAL_FILE
        if not path.is_file():
            r.why_missing = "not evaluated" if d.is_dir() else "not run"
        else:
            try:
                ev = json.loads(path.read_text())
            except json.JSONDecodeError:
                ev = None
                r.why_missing = f"{path} is not valid JSON"
            if ev is not None and ev.get("version") != EVAL_VERSION:
                r.why_missing = (
                    f"evaluated by an older version ({ev.get('version')} != {EVAL_VERSION}); "
                    "re-run the sweep to re-evaluate"
                )
            elif ev is not None:
                r.evaluation = ev
        tokens_per_step = cell.config.train.global_batch_size * cell.config.model.seq_len
        r.curve, r.valid_curve = _read_curves(d, tokens_per_step)
        out.append(r)
    return out


@dataclass
class SeedNoise:
    """The seed-to-seed spread of a metric, pooled over every (group, size) with two or more seeds:
    sd = sqrt(sum of squared deviations from each cell's mean / sum of (seeds - 1))."""

    sd: float | None
    dof: int
    cells: int  # (group, size) combinations that contributed
    ranges: dict  # (group label, size) -> max - min over the seeds

    @property
    def critical(self) -> float | None:
        """t_critical at this sd's degrees of freedom."""
        return None if self.sd is None else t_critical(self.dof)

    def difference_threshold(self, n_a: int, n_b: int) -> float | None:
        """The smallest difference between two means (of n_a and n_b seeds) that is resolved: `critical`
        standard errors of the difference."""
        if self.sd is None:
            return None
        return self.critical * self.sd * math.sqrt(1 / max(1, n_a) + 1 / max(1, n_b))


def t_critical(dof: int) -> float:
    """Two-sided 95% Student-t quantile: how many standard errors a difference estimated with `dof`
    degrees of freedom must exceed (2.78 at 4, 2.06 at 24; about 2 for many)."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def seed_noise(results: list[CellResult], metric: str, size_of, value=None, size: str | None = None) -> SeedNoise:
    """Pooled seed-to-seed spread of `metric` (or of value(cell) when given: any per-cell number, e.g. a
    log variance growth) over the usable study cells, or over those of one size when given (the spread
    shrinks with size: 20x from the smallest to the largest of the placement study)."""
    value = value or (lambda r: r.metric(metric))
    by_cell: dict[tuple, list[float]] = {}
    for r in results:
        if not (r.cell.study and r.usable) or (size is not None and size_of(r) != size):
            continue
        v = value(r)
        if v is not None and math.isfinite(v):
            by_cell.setdefault((r.label, size_of(r)), []).append(v)
    ss, dof, ranges = 0.0, 0, {}
    for key, values in by_cell.items():
        if len(values) >= 2:
            v = np.asarray(values)
            ss += float(((v - v.mean()) ** 2).sum())
            dof += len(v) - 1
            ranges[key] = float(v.max() - v.min())
    return SeedNoise(math.sqrt(ss / dof) if dof else None, dof, len(ranges), ranges)


def size_order(sweep: Sweep) -> list[str]:
    """The size axis' value names in the order of the sweep file (small to large, by convention)."""
    roles = axis_roles(sweep)
    axes = [a for a in sweep.axes if roles[a] == "size"]
    return list(sweep.axes[axes[0]]) if axes else []


def size_label(sweep: Sweep, cell: Cell) -> str:
    roles = axis_roles(sweep)
    parts = [cell.labels[a] for a in sweep.axes if roles[a] == "size"]
    return "/".join(parts) if parts else f"{cell.config.model.hidden_size}x{cell.config.model.num_layers}"


def planned_size(cell: Cell) -> tuple[int | None, int]:
    """(N, D) a cell will have, from its config (the model built on the meta device), for predicting
    a cell before it has run; N is None when the tokenizer that fixes the vocabulary is missing."""
    import torch

    from model import build_model
    from pretrain.config import resolve, tokenizer_path
    from pretrain.data import DataError, Tokenizer

    cfg = cell.config
    try:
        vocab = Tokenizer(tokenizer_path(cfg.data)).vocab_size if cfg.model.vocab_size == 0 else None
    except DataError:
        return None, cell.tokens
    with torch.device("meta"):
        model, _ = build_model(resolve(cfg, vocab).model, "torch", "meta")
    return model.num_params(embedding=False), cell.tokens
