"""Scaling-law fits of a sweep's evaluated cells (`python -m pretrain.scaling fit`), written to fit.json.

Per group (the sweep's non-size axes, e.g. placement; see pretrain/scaling/results.py) and token
budget, L(N) = E + A * N^-alpha is fitted to the study cells that are not held out and did not
diverge, every seed a point of its own (by default on the in-domain validation loss). With several
token budgets at one size, L(N, D) = E + A N^-alpha + B D^-beta as well.

Intervals (95%, percentile): a residual bootstrap (pretrain/scaling/laws.py), so the seed-to-seed
noise and any lack of fit both widen them. A fit whose parameters sit at a bound (E = 0, A = 0, an
exponent at 0 or at its maximum) is flagged with them ("at bound: E") and its status says so: it is
never reported as a converged fit of the law.

The held-out sizes (`hold_out` of the sweep, typically the largest) are predicted three ways and
compared with the mean of their seeds, relative error = (predicted - actual) / actual:
  law         the fitted 3-parameter law (with its bootstrap interval)
  power law   the 2-parameter L = A N^-alpha fitted to the same points
  naive       the loss of the largest fitted size (mean of its seeds): "bigger does not help"
The winner is the one with the smallest |error|; when the gap between the two best is within the
seed-to-seed noise of the held-out size's mean, the comparison is not resolved and the output says so.

Honesty about small sweeps: 3 parameters need 3 sizes; with exactly 3 the curve interpolates them and
no interval can be estimated; with 4 sizes it is barely determined. The status says so.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from pretrain.config import ConfigError
from pretrain.fsutil import atomic_write_text
from pretrain.scaling import laws
from pretrain.scaling.results import (
    METRICS,
    CellResult,
    axis_roles,
    collect,
    group_label,
    planned_size,
    seed_noise,
    size_label,
)
from pretrain.scaling.spec import Sweep

FIT_FILE = "fit.json"
DEFAULT_METRIC = "valid_loss"


def _status(distinct: int, points: int, params: int, what: str) -> tuple[str, str]:
    """distinct: distinct sizes (L(N)) or distinct (N, D) points (L(N, D))."""
    if distinct < 3:
        return "insufficient", (f"{distinct} distinct {what} evaluated; fitting {params} parameters needs at least 3")
    dof = points - params
    if dof <= 0:
        return "exact", (
            f"{points} points for {params} parameters: the curve passes through them exactly; "
            "no confidence interval can be estimated and the prediction is untested"
        )
    if distinct <= params + 1 or dof == 1:
        return "barely determined", (
            f"{points} points ({distinct} distinct {what}) for {params} parameters: "
            "barely determined; treat E and the extrapolation with caution"
        )
    return "ok", f"{points} points ({distinct} distinct {what}), {dof} residual degrees of freedom"


def _ci_block(samples: list[dict], names) -> dict:
    return {k: laws.percentile_ci([s[k] for s in samples]) if samples else None for k in names}


def _mean(values) -> float:
    return float(np.mean(values))


def _held_out_sizes(held: list[CellResult], size_of) -> list[tuple[str, list[CellResult]]]:
    by_size: dict[str, list[CellResult]] = defaultdict(list)
    for r in held:
        by_size[size_of(r)].append(r)
    return list(by_size.items())


def _predict_size(
    size: str,
    cells: list[CellResult],
    fit: laws.FitResult | None,
    samples: list[dict],
    power: dict | None,
    naive: float | None,
    metric: str,
    threshold,
) -> dict:
    """The three predictions of one held-out size against the mean of its evaluated seeds."""
    done = [r for r in cells if r.usable]
    out = {"size": size, "cells": [r.name for r in cells], "predicted": None, "actual": None}
    if done:
        N = done[0].N
    else:  # not trained or evaluated yet: predict it at the size the grid gives it
        N, _ = planned_size(cells[0].cell)
        if N is None:
            out["note"] = f"{cells[0].why_missing}; its size could not be computed"
            return out
    out["N"] = N
    if fit is None:
        out["note"] = "no fit for this group"
        return out
    boot = [float(laws.predict(s, N)) for s in samples]
    out.update(
        predicted=float(laws.predict(fit.params, N)),
        ci95=laws.percentile_ci(boot) if boot else None,
        power_law={"predicted": float(laws.predict_power_law(power, N))} if power else None,
        naive={"predicted": naive} if naive is not None else None,
    )
    if not done:
        out["note"] = f"{cells[0].why_missing}: predicted ahead of its run"
        return out
    actual_seeds = [r.metric(metric) for r in done]
    actual = _mean(actual_seeds)
    out.update(
        actual=actual,
        actual_seeds=actual_seeds,
        relative_error=(out["predicted"] - actual) / actual,
        inside_ci=None if out["ci95"] is None else bool(out["ci95"][0] <= actual <= out["ci95"][1]),
    )
    errors = {"law": out["relative_error"]}
    for name in ("power_law", "naive"):
        if out[name]:
            out[name]["relative_error"] = (out[name]["predicted"] - actual) / actual
            errors[name] = out[name]["relative_error"]
    ranked = sorted(errors, key=lambda k: abs(errors[k]))
    out["winner"] = ranked[0]
    # The actual value is a mean of a few seeds: it is known to within its own noise, so a gap between
    # the two best predictions smaller than that is not a win.
    noise = None if threshold is None else threshold(len(done))
    out["winner_resolved"] = None
    if len(ranked) > 1 and noise is not None:
        gap = abs(abs(errors[ranked[1]]) - abs(errors[ranked[0]])) * actual
        out["winner_resolved"] = bool(gap > noise)
        out["resolution"] = noise
    return out


def _fit_group(
    train: list[CellResult],
    held: list[CellResult],
    metric: str,
    resamples: int,
    seed: int,
    delta: float,
    size_of,
    threshold,
) -> dict:
    names = laws.LN_PARAMS
    N = np.array([r.N for r in train], dtype=float)
    L = np.array([r.metric(metric) for r in train], dtype=float)
    sizes = sorted(set(N.tolist()))
    status, note = _status(len(sizes), len(train), len(names), "model sizes")
    out = {
        "status": status,
        "note": note,
        "distinct_sizes": len(sizes),
        "at_bound": [],
        "points": [{"cell": r.name, "N": r.N, "D": r.D, "L": r.metric(metric), "seed": r.seed} for r in train],
    }
    fit = power = naive = None
    samples: list[dict] = []
    if status != "insufficient":
        fit = laws.fit_law(N, L, None, delta)
        out.update(
            params=fit.params,
            rms_log_residual=fit.rms_log_residual,
            optimizer_converged=fit.converged,
            at_bound=list(fit.at_bound),
        )
        if fit.at_bound:
            out["status"] = "at bound"
            out["note"] = (
                f"at bound: {', '.join(fit.at_bound)} (a parameter at the edge of its range: the points "
                f"do not determine the law; {note})"
            )
        samples = [] if status == "exact" else laws.bootstrap_residuals(N, L, None, resamples, seed, delta, fit)
        out["bootstrap"] = {"method": "residual", "resamples": len(samples)}
        out["ci95"] = _ci_block(samples, names)
        power = laws.fit_power_law(N, L)
        out["power_law"] = power
        largest = max(sizes)
        naive = _mean([loss for n, loss in zip(N, L, strict=True) if n == largest])
        out["naive"] = {"N": int(largest), "loss": naive}
    out["held_out"] = [
        _predict_size(size, cells, fit, samples, power, naive, metric, threshold)
        for size, cells in _held_out_sizes(held, size_of)
    ]
    return out


def _fit_points_nd(
    train: list[CellResult], held: list[CellResult], metric: str, resamples: int, seed: int, delta: float
) -> dict:
    """L(N, D) over several token budgets, with a case bootstrap over the cells."""
    names = laws.LND_PARAMS
    N = np.array([r.N for r in train], dtype=float)
    D = np.array([r.D for r in train], dtype=float)
    L = np.array([r.metric(metric) for r in train], dtype=float)
    distinct = len(set(zip(N.tolist(), D.tolist(), strict=True)))
    status, note = _status(distinct, len(train), len(names), "(N, D) points")
    if status != "insufficient" and not laws.identifiable(N, D):
        status, note = "insufficient", "L(N, D) needs at least 3 sizes, 2 token budgets and 5 distinct (N, D) points"
    out = {
        "status": status,
        "note": note,
        "at_bound": [],
        "points": [{"cell": r.name, "N": r.N, "D": r.D, "L": r.metric(metric)} for r in train],
    }
    if status == "insufficient":
        out["held_out"] = [{"cell": r.name, "predicted": None, "note": "no fit for this group"} for r in held]
        return out
    fit = laws.fit_law(N, L, D, delta)
    out.update(params=fit.params, rms_log_residual=fit.rms_log_residual, at_bound=list(fit.at_bound))
    if fit.at_bound:
        out["status"], out["note"] = "at bound", f"at bound: {', '.join(fit.at_bound)}; {note}"
    samples, discarded = ([], 0) if status == "exact" else laws.bootstrap(N, L, D, resamples, seed, delta)
    out["bootstrap"] = {"method": "case", "resamples": resamples, "kept": len(samples), "discarded": discarded}
    out["ci95"] = _ci_block(samples, names)
    out["held_out"] = []
    for r in held:
        if not r.usable:
            out["held_out"].append({"cell": r.name, "predicted": None, "note": r.why_missing or "diverged"})
            continue
        pred = float(laws.predict(fit.params, r.N, r.D))
        boot = [float(laws.predict(s, r.N, r.D)) for s in samples]
        actual = r.metric(metric)
        out["held_out"].append(
            {
                "cell": r.name,
                "N": r.N,
                "D": r.D,
                "predicted": pred,
                "ci95": laws.percentile_ci(boot) if boot else None,
                "actual": actual,
                "relative_error": (pred - actual) / actual,
            }
        )
    return out


def _budget(r: CellResult, token_axes: list[str]) -> tuple:
    return tuple(r.cell.labels[a] for a in token_axes)


def fit_sweep(
    sweep: Sweep,
    metric: str = DEFAULT_METRIC,
    resamples: int = 1000,
    seed: int = 0,
    delta: float = 1e-3,
    results: list[CellResult] | None = None,
) -> dict:
    """Every fit of the sweep (the content of fit.json). Raises ConfigError when nothing is evaluated."""
    if metric not in METRICS:
        raise ConfigError(f"--metric '{metric}' is not allowed; allowed: {', '.join(METRICS)}")
    results = [r for r in (collect(sweep) if results is None else results) if r.cell.study]
    evaluated = [r for r in results if r.evaluation is not None]
    if not evaluated:
        reasons = sorted({r.why_missing for r in results})
        raise ConfigError(
            f"sweep '{sweep.name}': none of its {len(results)} cells in {sweep.out} is evaluated "
            f"({'; '.join(reasons)}); run `python -m pretrain.scaling sweep {sweep.path}` "
            "(it evaluates cells after training them)"
        )
    roles = axis_roles(sweep)
    size_of = lambda r: size_label(sweep, r.cell)
    noise = seed_noise(results, metric, size_of)
    # Resolution of a held-out size's mean of n seeds against a prediction: 2 standard errors.
    threshold = None if noise.sd is None else (lambda n: 2 * noise.sd / math.sqrt(n))
    token_axes = [a for a in sweep.axes if roles[a] == "tokens"]
    by_group: dict[tuple, list[CellResult]] = defaultdict(list)
    for r in results:
        by_group[r.group].append(r)
    fits, fits_nd = [], []
    for group, members in by_group.items():
        train = [r for r in members if r.usable and not r.held_out]
        held = [r for r in members if r.held_out]
        for budget in sorted({_budget(r, token_axes) for r in members}):

            def sel(rs, budget=budget):
                return [r for r in rs if _budget(r, token_axes) == budget]

            entry = {
                "group": dict(group),
                "label": group_label(group),
                "tokens": dict(zip(token_axes, budget, strict=True)) if token_axes else None,
                "diverged": [r.name for r in sel(members) if r.diverged],
            }
            entry.update(_fit_group(sel(train), sel(held), metric, resamples, seed, delta, size_of, threshold))
            fits.append(entry)
        budgets_per_size = defaultdict(set)
        for r in train:
            budgets_per_size[r.N].add(r.D)
        if any(len(b) > 1 for b in budgets_per_size.values()):  # several budgets at one size: the joint law
            entry = {"group": dict(group), "label": group_label(group)}
            entry.update(_fit_points_nd(train, held, metric, resamples, seed, delta))
            fits_nd.append(entry)
    return {
        "sweep": sweep.name,
        "cells_dir": str(sweep.out),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "metric": metric,
        "metric_description": METRICS[metric][1],
        "law": laws.LN_FORMULA,
        "law_nd": laws.LND_FORMULA,
        "N": "non-embedding parameters",
        "D": "trained tokens",
        "method": (
            f"nonlinear least squares on log L with a Huber loss (delta {delta}), parameters in log space, "
            "started by variable projection over the exponents; seeds are separate points; 95% percentile "
            f"intervals from a residual bootstrap ({resamples} resamples, seed {seed}; log-residuals "
            "centred and inflated by sqrt(n/(n-3))); a parameter at the edge of its range is flagged "
            "'at bound'. Held-out sizes are predicted by the law, by the 2-parameter power law A N^-alpha "
            "and by the naive baseline (the largest fitted size's loss)"
        ),
        "seed_noise": {"sd": noise.sd, "dof": noise.dof, "cells": noise.cells},
        "hold_out": sweep.hold_out,
        "cells": {
            "total": len(results),
            "evaluated": len(evaluated),
            "diverged": [r.name for r in evaluated if r.diverged],
            "missing": [{"cell": r.name, "why": r.why_missing} for r in results if r.evaluation is None],
        },
        "fits": fits,
        "fits_nd": fits_nd,
        "nd_note": None if fits_nd else "no size has two token budgets: L(N, D) is not fitted",
    }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f}%"


def held_out_summary(h: dict) -> str:
    """One line: the three predictions of a held-out size and which wins."""
    if h.get("predicted") is None:
        return f"held out {h['size']}: no prediction ({h.get('note', '')})"
    ci = f" [{_fmt(h['ci95'][0])}, {_fmt(h['ci95'][1])}]" if h.get("ci95") else ""
    if h.get("actual") is None:
        return f"held out {h['size']}: predicted {_fmt(h['predicted'])}{ci} ({h.get('note', '')})"
    parts = [f"law {_fmt(h['predicted'])}{ci} ({_pct(h['relative_error'])})"]
    for name, label in (("power_law", "power law"), ("naive", "naive")):
        if h.get(name):
            parts.append(f"{label} {_fmt(h[name]['predicted'])} ({_pct(h[name]['relative_error'])})")
    verdict = {"law": "the law", "power_law": "the power law", "naive": "the naive baseline"}[h["winner"]]
    resolved = {True: "", False: " (within the seed noise: not resolved)", None: ""}[h.get("winner_resolved")]
    return (
        f"held out {h['size']}: actual {_fmt(h['actual'])} (mean of {len(h['actual_seeds'])} seeds); "
        + ", ".join(parts)
        + f"; best: {verdict}{resolved}"
    )


def summary_lines(result: dict) -> list[str]:
    lines = [
        f"[fit] {result['sweep']}: {result['law']} of {result['metric_description']}, N = {result['N']}; "
        f"{result['cells']['evaluated']}/{result['cells']['total']} cells evaluated"
    ]
    if result["seed_noise"]["sd"] is not None:
        lines.append(
            f"[fit] seed-to-seed sd (pooled, {result['seed_noise']['dof']} dof): {result['seed_noise']['sd']:.4g}"
        )
    for m in result["cells"]["missing"]:
        lines.append(f"[fit]   missing {m['cell']}: {m['why']}")
    for name in result["cells"]["diverged"]:
        lines.append(f"[fit]   diverged (left out of the fits) {name}")
    for kind, fits in (("L(N)", result["fits"]), ("L(N,D)", result["fits_nd"])):
        for f in fits:
            head = f"[fit] {kind} {f['label']}" + (f" tokens {f['tokens']}" if f.get("tokens") else "")
            if "params" not in f:
                lines.append(f"{head}: not fitted: {f['note']}")
                continue
            ci = f["ci95"]
            params = "  ".join(
                f"{k} = {_fmt(v)}" + (f" [{_fmt(ci[k][0])}, {_fmt(ci[k][1])}]" if ci.get(k) else "")
                for k, v in f["params"].items()
            )
            lines.append(f"{head}: {params}  ({f['status']})")
            if f["status"] != "ok":
                lines.append(f"[fit]     note: {f['note']}")
            for h in f["held_out"]:
                if "size" in h:
                    lines.append("[fit]     " + held_out_summary(h))
                elif h.get("predicted") is not None:
                    lines.append(
                        f"[fit]     held out {h['cell']}: predicted {_fmt(h['predicted'])}, actual "
                        f"{_fmt(h['actual'])} ({_pct(h['relative_error'])})"
                    )
    if result["nd_note"]:
        lines.append(f"[fit] {result['nd_note']}")
    return lines


def write_fit(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    return path
