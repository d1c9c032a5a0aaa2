"""Hyperparameter scaling laws: the optimal peak learning rate and batch size as power laws of the
model size N and the data size D, the paper's and our own fitted from an LR x batch sweep.

The form (Li et al. 2025, "Predictable Scale: Part I -- Optimal Hyperparameter Scaling Law in Large
Language Model Pretraining", the "Step Law"):

    lr*(N, D) = 1.79 * N^-0.713 * D^0.307
    B*(D)     = 0.58 * D^0.571

with N the number of NON-embedding parameters, D the number of training tokens, lr* the peak learning
rate of AdamW, and B* the batch size IN TOKENS (the paper's "token-wise batch size"; our
train.global_batch_size is in sequences: B* / seq_len). The paper's batch law has no N term; we keep
the exponent of N in the form (0 for the paper) so that a fit can say whether our data show one.

`train.lr: auto` and `train.global_batch_size: auto` are resolved from STEP_LAW by
pretrain/config.py resolve(); `fit_laws` fits the same two log-linear laws

    log lr* = log c + alpha log N + beta log D          (and likewise for B*)

by least squares to the best cells of a sweep (the lowest final loss at each (N, D)), optionally
refined by a parabola in log lr (log B) through the best cell and its neighbours on the grid, and
`comparison_lines` renders the paper's law next to ours for the report.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    """y = c * N^alpha * D^beta."""

    c: float
    alpha: float  # exponent of N
    beta: float  # exponent of D

    def __call__(self, N: float, D: float) -> float:
        return self.c * N**self.alpha * D**self.beta

    def formula(self, y: str) -> str:
        terms = [f"{self.c:.4g}"]
        if self.alpha:
            terms.append(f"N^{self.alpha:.4g}")
        if self.beta:
            terms.append(f"D^{self.beta:.4g}")
        return f"{y} = " + " * ".join(terms)


@dataclass(frozen=True)
class HparamLaws:
    name: str
    source: str
    lr: PowerLaw  # peak learning rate
    batch: PowerLaw  # batch size in tokens


STEP_LAW = HparamLaws(
    name="Step Law",
    source="Li et al. 2025, Predictable Scale: Part I",
    lr=PowerLaw(1.79, -0.713, 0.307),
    batch=PowerLaw(0.58, 0.0, 0.571),
)


# ------------------------------------------------------------------------ resolving `auto`


def non_embedding_parameters(model_cfg) -> int:
    """N of the laws for a resolved ModelConfig: every parameter but the token embedding and an untied
    output layer, counted on the meta device by the model's own code (model/inventory.py)."""
    from model.inventory import model_inventory

    inv = model_inventory(model_cfg)
    return inv.total - inv.numel["embed.weight"] - inv.numel.get("head.weight", 0)


def round_batch(batch_tokens: float, seq_len: int, micro_batch_size: int, data_parallel: int) -> tuple[int, str]:
    """B* in tokens -> sequences per step: micro_batch_size x data_parallel x a power of two, the nearest in
    log space (a batch that stays divisible when the data-parallel size doubles). Returns (sequences, how)."""
    unit = micro_batch_size * data_parallel
    sequences = batch_tokens / seq_len
    k = 2 ** max(0, round(math.log2(max(sequences / unit, 1e-12))))
    how = (
        f"{batch_tokens:,.0f} tokens = {sequences:,.1f} sequences of {seq_len} -> {unit * k} "
        f"(micro {micro_batch_size} x dp {data_parallel} x {k}, the nearest power-of-two multiple)"
    )
    return unit * k, how


# ---------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class SweepPoint:
    """One finished run of an LR x batch sweep."""

    N: float  # non-embedding parameters
    D: float  # training tokens
    lr: float  # peak learning rate
    batch: float  # tokens per optimizer step
    loss: float  # final loss (NaN / inf: diverged)


@dataclass
class Optimum:
    """The best cell of one (N, D), and the optimum after refinement."""

    N: float
    D: float
    lr: float
    batch: float
    loss: float
    cells: int
    at_edge: list = field(default_factory=list)  # "lr" / "batch" when the best value is at the grid's edge
    not_swept: list = field(default_factory=list)  # "lr" / "batch" when the grid has one value of it here


@dataclass
class FittedLaw:
    law: PowerLaw
    fitted: tuple  # which exponents were fitted ("N", "D"); the others are held at 0
    rms_log_residual: float
    points: int


@dataclass
class LawFit:
    lr: FittedLaw | None
    batch: FittedLaw | None
    optima: list
    notes: list = field(default_factory=list)


def _parabola_vertex(xs: list[float], ys: list[float]) -> float | None:
    """The vertex of the parabola through three points, if it is a minimum."""
    a, b, _ = np.polyfit(xs, ys, 2)
    if a <= 0:
        return None
    return float(-b / (2 * a))


def _refine(grid: dict, best: tuple, axis: int) -> tuple[float, bool | None]:
    """log of the optimum along one axis (0 = lr, 1 = batch) through the best cell and its two grid
    neighbours at the best value of the other axis; (log value of the best cell, True) at an edge, (.., None)
    when the axis has one value only (not swept)."""
    other = best[1 - axis]
    line = sorted((key[axis], loss) for key, loss in grid.items() if key[1 - axis] == other)
    values = [v for v, _ in line]
    i = values.index(best[axis])
    if len(values) == 1:
        return math.log(best[axis]), None
    if i == 0 or i == len(values) - 1:
        return math.log(best[axis]), True
    xs = [math.log(values[j]) for j in (i - 1, i, i + 1)]
    vertex = _parabola_vertex(xs, [line[j][1] for j in (i - 1, i, i + 1)])
    if vertex is None or not xs[0] <= vertex <= xs[2]:
        return math.log(best[axis]), False
    return vertex, False


def optima(points: list[SweepPoint], refine: bool = True) -> list[Optimum]:
    """The best (lr, batch) of every (N, D): the cell with the lowest finite loss; with `refine`, each
    coordinate moved to the vertex of the parabola (in log lr or log batch) through the best cell and its
    grid neighbours along that axis. A best value at the grid's edge is flagged and left as it is."""
    # Seeds of one (N, D, lr, batch) are averaged: the optimum is chosen on the mean, not on the lucky seed.
    by_cell: dict[tuple, list] = defaultdict(list)
    for p in points:
        if math.isfinite(p.loss):
            by_cell[(p.N, p.D, p.lr, p.batch)].append(p.loss)
    by_nd: dict[tuple, dict] = defaultdict(dict)
    for (N, D, lr, batch), losses in by_cell.items():
        by_nd[(N, D)][(lr, batch)] = sum(losses) / len(losses)
    out = []
    for (N, D), grid in sorted(by_nd.items()):
        best = min(grid, key=grid.get)
        opt = Optimum(N, D, best[0], best[1], grid[best], len(grid))
        for axis, name in ((0, "lr"), (1, "batch")):
            log_v, edge = _refine(grid, best, axis)
            if edge is None:
                opt.not_swept.append(name)
            elif edge:
                opt.at_edge.append(name)
            if not refine:
                log_v = math.log(best[axis])
            setattr(opt, name, math.exp(log_v))
        out.append(opt)
    return out


def _fit_log_linear(N, D, y) -> FittedLaw | None:
    """log y = log c + alpha log N + beta log D by least squares, over the variables that vary."""
    if not y:
        return None
    N, D, y = (np.log(np.asarray(v, dtype=float)) for v in (N, D, y))
    columns, names = [np.ones_like(y)], []
    for name, v in (("N", N), ("D", D)):
        if np.ptp(v) > 0:
            columns.append(v)
            names.append(name)
    X = np.stack(columns, axis=1)
    if len(names) == 2 and np.linalg.matrix_rank(X) < 3:
        # D proportional to N (a sweep at fixed tokens per parameter): only the law along that line is
        # determined; its N exponent is alpha + beta of a law in N and D.
        X, names = X[:, :2], ["N"]
    if len(y) < X.shape[1] or np.linalg.matrix_rank(X) < X.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    exps = dict(zip(names, coef[1:], strict=True))
    law = PowerLaw(float(math.exp(coef[0])), float(exps.get("N", 0.0)), float(exps.get("D", 0.0)))
    residual = y - X @ coef
    return FittedLaw(law, tuple(names), float(np.sqrt(np.mean(residual**2))), len(y))


def fit_laws(points: list[SweepPoint], refine: bool = True) -> LawFit:
    """Our lr*(N, D) and B*(N, D) from a sweep. An exponent is fitted only when its variable takes two or
    more values (else it is held at 0 and said); optima at the grid's edge are left out of the fit (the
    true optimum lies beyond the grid) and said."""
    found = optima(points, refine)
    notes = []
    fits = {}
    for name in ("lr", "batch"):
        if found and all(name in o.not_swept for o in found):
            notes.append(f"{name}: one value per (N, D) in the sweep: no law to fit")
            fits[name] = None
            continue
        inside = [o for o in found if name not in o.at_edge and name not in o.not_swept]
        dropped = len(found) - len(inside)
        if dropped:
            notes.append(f"{name}: {dropped} of {len(found)} optima at the grid's edge, left out (widen the grid)")
        fit = _fit_log_linear([o.N for o in inside], [o.D for o in inside], [getattr(o, name) for o in inside])
        if fit is None:
            notes.append(f"{name}: {len(inside)} usable optima do not determine the law")
        else:
            held = [v for v in ("N", "D") if v not in fit.fitted]
            if held == ["D"] and len({o.D for o in inside}) > 1:
                notes.append(
                    f"{name}: D is proportional to N in the sweep: fitted along that line, the N exponent "
                    "stands for the sum of the N and D exponents"
                )
            elif held:
                notes.append(f"{name}: one value of {' and '.join(held)} in the sweep: its exponent is held at 0")
        fits[name] = fit
    return LawFit(fits["lr"], fits["batch"], found, notes)


def points_from_results(results, metric: str = "valid_loss") -> list[SweepPoint]:
    """SweepPoints from a sweep's evaluated cells (pretrain/scaling/results.py CellResult): N and D as
    evaluated, the cell's learning rate and batch (global_batch_size x seq_len tokens), `metric` (a
    diverged cell counts as an infinite loss: never the best)."""
    out = []
    for r in results:
        if r.evaluation is None:
            continue
        t, m = r.cell.config.train, r.cell.config.model
        loss = math.inf if r.diverged else r.metric(metric)
        out.append(SweepPoint(r.N, r.D, float(t.lr), float(t.global_batch_size * m.seq_len), loss))
    return out


# ---------------------------------------------------------------------------------- report


def _g(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.3g}"


def comparison_lines(
    fit: LawFit, paper: HparamLaws = STEP_LAW, title: str = "## Hyperparameter laws: the paper's and ours"
) -> list[str]:
    """A markdown section: the paper's laws and ours side by side, then each (N, D) of the sweep with its
    best observed (lr, batch) against both laws' predictions."""
    lines = [
        title,
        "",
        f"Optimal peak learning rate and batch size (tokens) as power laws of the non-embedding parameters N "
        f"and the training tokens D. Paper: {paper.name} ({paper.source}). Ours: least squares in log space "
        "on the best cell of each (N, D) of the sweep (refined by a parabola through its grid neighbours).",
        "",
        "| law | paper | ours | points | rms log residual |",
        "|---|---|---|---|---|",
    ]
    for name, what in (("lr", "lr*"), ("batch", "B* (tokens)")):
        ours = getattr(fit, name)
        lines.append(
            f"| {what} | {getattr(paper, name).formula(what)} | "
            + (f"{ours.law.formula(what)} | {ours.points} | {ours.rms_log_residual:.3f} |" if ours else "– | – | – |")
        )
    lines += [
        "",
        "| N | D | cells | best lr | paper lr | our lr | best batch | paper batch | our batch | best loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in fit.optima:
        edge = f" (edge: {', '.join(o.at_edge)})" if o.at_edge else ""
        lines.append(
            f"| {o.N:.3g} | {o.D:.3g} | {o.cells} | {_g(o.lr)}{edge} | {_g(paper.lr(o.N, o.D))} | "
            f"{_g(fit.lr.law(o.N, o.D) if fit.lr else None)} | {_g(o.batch)} | {_g(paper.batch(o.N, o.D))} | "
            f"{_g(fit.batch.law(o.N, o.D) if fit.batch else None)} | {o.loss:.4f} |"
        )
    lines.append("")
    lines += [f"- {n}" for n in fit.notes]
    return lines + ([""] if fit.notes else [])
