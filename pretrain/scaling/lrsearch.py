"""Learning-rate search: a sweep trains `train.lr` on a log grid at some of its cells, then trains every
cell at its group's best learning rate; and the LR-sensitivity number of Wortsman et al. 2023
("Small-scale proxies for large-scale Transformer training instabilities", section 3.1):

    LR sensitivity = E_{lr in grid}[ min(L(lr), L0) - min_lr L(lr) ]

L0 is the loss at initialization; a run that diverged (training stopped on non-finite losses) or ends
with a non-finite loss counts as L0, and so does one that ends above L0 (the min). 0 = every learning
rate of the grid is as good as the best one; the larger, the more a wrong learning rate costs.

Sweep file keys (pretrain/scaling/spec.py parses them):

    lr_search:
      values: [1.0e-4, 3.16e-4, 1.0e-3, 3.16e-3, 1.0e-2, 3.16e-2]   # the grid (half-decade steps)
      at: {size: [xs, m], run.seed: [1]}   # which cells of the grid are searched (axis -> value names)
      per: [placement]                      # one best learning rate per value of these axes
    lr_from: {sweep: other.yaml}            # or: take the best learning rates of another sweep's search
    lr_from: {sweep: other.yaml, out: DIR}  # ... read from its cells in DIR (e.g. its committed archive)

The best learning rate of a group is the grid value with the lowest mean capped loss (min(L, L0))
over the group's searched cells (sizes x seeds), on the validation split. It is resolved from the
evaluated search cells every time the sweep is loaded, so it is reproducible from the run
directories alone; the learning rate is part of every cell's name, so a changed choice makes new
cells instead of resuming runs trained at another rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEARCH_METRIC = ("valid", "loss")


@dataclass(frozen=True)
class LrSearch:
    values: tuple  # floats, ascending
    at: dict  # axis -> tuple of value names (the searched subset of the grid)
    per: tuple  # axes whose values each get their own best learning rate


@dataclass(frozen=True)
class LrFrom:
    sweep: Path  # another sweep file whose lr_search decides
    per: tuple
    out: Path | None = None  # where that sweep's cells are, when not at its own `out` (e.g. an archive)


@dataclass
class Choice:
    """The outcome of the search for one group (a value of the `per` axes)."""

    key: tuple  # ((axis, value name), ...)
    lr: float | None = None
    why_pending: str = ""
    table: list = field(default_factory=list)  # [{lr, mean_capped_loss, cells, diverged}]
    at_edge: bool = False  # the best value is the smallest or largest of the grid

    @property
    def label(self) -> str:
        return ", ".join(f"{a.split('.')[-1]}={v}" for a, v in self.key) or "all"


def capped(loss: float | None, initial: float, diverged: bool = False) -> float:
    """min(L, L0), with a diverged or non-finite run counted as L0."""
    if diverged or loss is None or not math.isfinite(loss):
        return initial
    return min(loss, initial)


def lr_sensitivity(losses, initial: float, diverged=None) -> float:
    """Wortsman et al.'s LR sensitivity over one grid: `losses` per learning rate (None or NaN = the run
    diverged), `initial` the loss at initialization. The min over the grid is taken over the finite
    losses; when every run diverged the sensitivity is 0 by the formula but meaningless: NaN."""
    diverged = diverged or [False] * len(losses)
    finite = [x for x, d in zip(losses, diverged, strict=True) if not d and x is not None and math.isfinite(x)]
    if not finite:
        return float("nan")
    best = min(finite)
    return float(np.mean([capped(x, initial, d) - best for x, d in zip(losses, diverged, strict=True)]))


def search_outcome(evaluation: dict | None) -> tuple[float | None, float | None, bool] | None:
    """(loss, initial loss, diverged) of an evaluated search cell; None when not evaluated."""
    if evaluation is None:
        return None
    initial = (evaluation.get("init") or {}).get("loss")
    if evaluation.get("diverged"):
        return None, initial, True
    section, key = SEARCH_METRIC
    loss = (evaluation.get(section) or {}).get(key)
    return loss, initial, loss is None or not math.isfinite(loss)


def choose(groups: dict[tuple, list[tuple[float, dict | None]]]) -> dict[tuple, Choice]:
    """groups: key -> [(lr, evaluation or None)] of its search cells. The best learning rate per key
    once every one of its cells is evaluated."""
    out = {}
    for key, runs in groups.items():
        choice = Choice(key)
        outcomes = [(lr, search_outcome(ev)) for lr, ev in runs]
        done = sum(o is not None for _, o in outcomes)
        if done < len(outcomes):
            choice.why_pending = f"{done} of {len(outcomes)} LR-search cells evaluated"
            out[key] = choice
            continue
        by_lr: dict[float, list] = {}
        for lr, (loss, initial, diverged) in outcomes:
            if initial is None:
                choice.why_pending = "an LR-search cell has no initial loss (evaluated by an older version)"
                break
            by_lr.setdefault(lr, []).append((capped(loss, initial, diverged), diverged))
        if choice.why_pending:
            out[key] = choice
            continue
        for lr in sorted(by_lr):
            values = by_lr[lr]
            choice.table.append(
                {
                    "lr": lr,
                    "mean_capped_loss": float(np.mean([v for v, _ in values])),
                    "cells": len(values),
                    "diverged": sum(d for _, d in values),
                }
            )
        best = min(choice.table, key=lambda r: (r["mean_capped_loss"], r["lr"]))
        choice.lr = best["lr"]
        choice.at_edge = len(choice.table) > 1 and best["lr"] in (choice.table[0]["lr"], choice.table[-1]["lr"])
        out[key] = choice
    return out


def choice_record(choices: dict[tuple, Choice]) -> list[dict]:
    """JSON-ready form, for lr_choice.json and the report."""
    return [
        {
            "group": dict(c.key),
            "label": c.label,
            "lr": c.lr,
            "pending": c.why_pending or None,
            "at_edge": c.at_edge,
            "table": c.table,
        }
        for c in choices.values()
    ]


def sensitivity_table(results, size_of) -> list[dict]:
    """Per group and size of the search cells: final loss (mean over seeds) per learning rate, the
    initial loss, the best learning rate and the LR sensitivity. `results`: CellResults
    (pretrain/scaling/results.py); only evaluated search cells count."""
    by_key: dict[tuple, dict[float, list]] = {}
    for r in results:
        if not r.cell.search or r.evaluation is None:
            continue
        loss, initial, diverged = search_outcome(r.evaluation)
        by_key.setdefault((r.label, size_of(r)), {}).setdefault(r.lr, []).append((loss, initial, diverged, r.seed))
    rows = []
    for (group, size), by_lr in by_key.items():
        lrs = sorted(by_lr)
        initial = float(np.mean([i for runs in by_lr.values() for _, i, _, _ in runs if i is not None]))
        losses, diverged, seeds = [], [], set()
        for lr in lrs:
            runs = by_lr[lr]
            seeds |= {s for *_, s in runs}
            # a learning rate at which any seed diverged counts as diverged; else the seeds' mean
            div = any(d for _, _, d, _ in runs)
            diverged.append(div)
            losses.append(None if div else float(np.mean([loss for loss, *_ in runs])))
        finite = [(loss, lr) for loss, lr in zip(losses, lrs, strict=True) if loss is not None]
        rows.append(
            {
                "group": group,
                "size": size,
                "lrs": lrs,
                "losses": losses,
                "diverged": diverged,
                "initial_loss": initial,
                "seeds": len(seeds),
                "best_lr": min(finite)[1] if finite else None,
                "sensitivity": lr_sensitivity(losses, initial, diverged),
            }
        )
    return rows
