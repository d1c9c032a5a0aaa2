"""Scaling-law fits of a sweep's evaluated cells (`python -m pretrain.scaling fit`), written to fit.json.

Per group (the sweep's non-size axes, e.g. placement; see pretrain/scaling/results.py) and token
budget, L(N) = E + A * N^-alpha is fitted to the cells that are not held out; with several token
budgets per group, L(N, D) = E + A N^-alpha + B D^-beta as well. Seeds are kept as separate points
(the spread between them is part of what the bootstrap sees), not averaged.

Confidence intervals: case bootstrap over the cells (resampled with replacement, refitted; resamples
with too few distinct sizes to identify the law are discarded and counted), 95% percentile
intervals for every parameter and for the prediction of each held-out cell. That interval is the
uncertainty of the fitted curve; a new run also has its own seed-to-seed noise on top.

The held-out cells (`hold_out` of the sweep, typically the largest size) are predicted from the fit
and compared with their actual value: relative error = (predicted - actual) / actual.

Honesty about small sweeps: 3 parameters need 3 sizes; with exactly 3 the curve interpolates them and
no interval can be estimated; with 4 the fit is barely determined (1 residual degree of freedom) and
the bootstrap mostly shows which sizes a resample happened to draw. The output says so.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from pretrain.config import ConfigError
from pretrain.fsutil import atomic_write_text
from pretrain.scaling import laws
from pretrain.scaling.results import METRICS, CellResult, axis_roles, collect, group_label, planned_size
from pretrain.scaling.spec import Sweep

FIT_FILE = "fit.json"


def _status(distinct: int, points: int, params: int, what: str) -> tuple[str, str]:
    """distinct: distinct sizes (L(N)) or distinct (N, D) points (L(N, D))."""
    if distinct < 3:
        return "insufficient", (f"{distinct} distinct {what} evaluated; fitting {params} parameters needs at least 3")
    dof = points - params
    if dof <= 0:
        return "exact", (f"{points} points for {params} parameters: the curve passes through them exactly; "
                         "no confidence interval can be estimated and the prediction is untested")
    if distinct <= params + 1 or dof == 1:
        return "barely determined", (f"{points} points ({distinct} distinct {what}) for {params} parameters: "
                                     "barely determined, so the intervals mostly reflect which points a resample "
                                     "happens to include; treat E and the extrapolation with caution")
    return "ok", f"{points} points ({distinct} distinct {what}), {dof} residual degrees of freedom"


def _ci_block(samples: list[dict], names) -> dict:
    return {k: laws.percentile_ci([s[k] for s in samples]) for k in names}


def _fit_points(train: list[CellResult], held: list[CellResult], metric: str, use_d: bool, resamples: int,
                seed: int, delta: float) -> dict:
    names = laws.LND_PARAMS if use_d else laws.LN_PARAMS
    N = np.array([r.N for r in train], dtype=float)
    D = np.array([r.D for r in train], dtype=float)
    L = np.array([r.metric(metric) for r in train], dtype=float)
    sizes = len(set(N.tolist()))
    distinct = len(set(zip(N.tolist(), D.tolist()))) if use_d else sizes
    status, note = _status(distinct, len(train), len(names), "(N, D) points" if use_d else "model sizes")
    if use_d and status != "insufficient" and not laws.identifiable(N, D):
        status, note = "insufficient", "L(N, D) needs at least 3 sizes, 2 token budgets and 5 distinct (N, D) points"
    out = {"status": status, "note": note, "distinct_sizes": sizes,
           "points": [{"cell": r.name, "N": r.N, "D": r.D, "L": r.metric(metric)} for r in train]}
    if status == "insufficient":
        out["held_out"] = [{"cell": r.name, "predicted": None, "note": "no fit for this group"} for r in held]
        return out
    fit = laws.fit_law(N, L, D if use_d else None, delta)
    out.update(params=fit.params, rms_log_residual=fit.rms_log_residual, converged=fit.converged)
    samples, discarded = ([], 0) if status == "exact" else laws.bootstrap(N, L, D if use_d else None, resamples,
                                                                          seed, delta)
    out["bootstrap"] = {"resamples": resamples if status != "exact" else 0, "kept": len(samples),
                        "discarded_unidentifiable": discarded}
    out["ci95"] = _ci_block(samples, names) if samples else {k: None for k in names}
    out["held_out"] = [_predict(r, fit.params, samples, metric, use_d) for r in held]
    return out


def _predict(r: CellResult, params: dict, samples: list[dict], metric: str, use_d: bool) -> dict:
    if r.evaluation is not None:
        N, D = r.N, r.D
    else:  # not trained or evaluated yet: predict it at the size and budget the grid gives it
        N, D = planned_size(r.cell)
        if N is None:
            return {"cell": r.name, "predicted": None, "note": f"{r.why_missing}; its size could not be computed"}
    pred = float(laws.predict(params, N, D if use_d else None))
    boot = [float(laws.predict(s, N, D if use_d else None)) for s in samples]
    ci = laws.percentile_ci(boot) if boot else None
    out = {"cell": r.name, "N": N, "D": D, "predicted": pred, "ci95": ci, "actual": None, "relative_error": None,
           "inside_ci": None}
    if r.evaluation is None:
        out["note"] = f"{r.why_missing}: predicted ahead of its run"
        return out
    actual = r.metric(metric)
    out.update(actual=actual, relative_error=(pred - actual) / actual,
               inside_ci=None if ci is None else bool(ci[0] <= actual <= ci[1]))
    return out


def fit_sweep(sweep: Sweep, metric: str = "test_loss", resamples: int = 1000, seed: int = 0,
              delta: float = 1e-3, results: list[CellResult] | None = None) -> dict:
    """Every fit of the sweep (the content of fit.json). Raises ConfigError when nothing is evaluated."""
    if metric not in METRICS:
        raise ConfigError(f"--metric '{metric}' is not allowed; allowed: {', '.join(METRICS)}")
    results = collect(sweep) if results is None else results
    evaluated = [r for r in results if r.evaluation is not None]
    if not evaluated:
        reasons = sorted({r.why_missing for r in results})
        raise ConfigError(f"sweep '{sweep.name}': none of its {len(results)} cells in {sweep.out} is evaluated "
                          f"({'; '.join(reasons)}); run `python -m pretrain.scaling sweep {sweep.path}` "
                          "(it evaluates cells after training them)")
    roles = axis_roles(sweep)
    token_axes = [a for a in sweep.axes if roles[a] == "tokens"]
    by_group: dict[tuple, list[CellResult]] = defaultdict(list)
    for r in results:
        by_group[r.group].append(r)
    fits, fits_nd = [], []
    for group, members in by_group.items():
        ev = [r for r in members if r.evaluation is not None]
        train = [r for r in ev if not r.held_out]
        held = [r for r in members if r.held_out]
        budget_of = lambda r: tuple(r.cell.labels[a] for a in token_axes)  # noqa: E731
        for budget in sorted({budget_of(r) for r in members}):
            sel = lambda rs: [r for r in rs if budget_of(r) == budget]  # noqa: E731
            entry = {"group": dict(group), "label": group_label(group),
                     "tokens": dict(zip(token_axes, budget)) if token_axes else None}
            entry.update(_fit_points(sel(train), sel(held), metric, False, resamples, seed, delta))
            fits.append(entry)
        if len({r.D for r in train}) > 1:  # several token budgets: the joint law too
            entry = {"group": dict(group), "label": group_label(group)}
            entry.update(_fit_points(train, held, metric, True, resamples, seed, delta))
            fits_nd.append(entry)
    return {
        "sweep": sweep.name, "cells_dir": str(sweep.out), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "metric": metric, "metric_description": METRICS[metric][1],
        "law": laws.LN_FORMULA, "law_nd": laws.LND_FORMULA,
        "N": "non-embedding parameters", "D": "trained tokens",
        "method": (f"nonlinear least squares on log L with a Huber loss (delta {delta}), parameters in log space, "
                   "started by variable projection over the exponents; 95% percentile intervals from a case "
                   f"bootstrap over the cells ({resamples} resamples, seed {seed}); seeds are separate points"),
        "hold_out": sweep.hold_out,
        "cells": {"total": len(results), "evaluated": len(evaluated),
                  "missing": [{"cell": r.name, "why": r.why_missing} for r in results if r.evaluation is None]},
        "fits": fits,
        "fits_nd": fits_nd,
        "nd_note": None if fits_nd else "every group has a single token budget: L(N, D) is not fitted",
    }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def summary_lines(result: dict) -> list[str]:
    lines = [f"[fit] {result['sweep']}: {result['law']} of {result['metric_description']}, N = {result['N']}; "
             f"{result['cells']['evaluated']}/{result['cells']['total']} cells evaluated"]
    for m in result["cells"]["missing"]:
        lines.append(f"[fit]   missing {m['cell']}: {m['why']}")
    for kind, fits in (("L(N)", result["fits"]), ("L(N,D)", result["fits_nd"])):
        for f in fits:
            head = f"[fit] {kind} {f['label']}" + (f" tokens {f['tokens']}" if f.get("tokens") else "")
            if "params" not in f:
                lines.append(f"{head}: not fitted: {f['note']}")
                continue
            ci = f["ci95"]
            params = "  ".join(f"{k} = {_fmt(v)}" + (f" [{_fmt(ci[k][0])}, {_fmt(ci[k][1])}]" if ci.get(k) else "")
                               for k, v in f["params"].items())
            lines.append(f"{head}: {params}  ({f['status']})")
            if f["status"] != "ok":
                lines.append(f"[fit]     note: {f['note']}")
            for h in f["held_out"]:
                if h.get("predicted") is None:
                    lines.append(f"[fit]     held out {h['cell']}: no prediction ({h.get('note', '')})")
                    continue
                ci_txt = f" [{_fmt(h['ci95'][0])}, {_fmt(h['ci95'][1])}]" if h.get("ci95") else ""
                if h["actual"] is None:
                    lines.append(f"[fit]     held out {h['cell']}: predicted {_fmt(h['predicted'])}{ci_txt} "
                                 f"({h.get('note', '')})")
                else:
                    inside = {None: "", True: " (inside the interval)", False: " (outside the interval)"}[h["inside_ci"]]
                    lines.append(f"[fit]     held out {h['cell']}: predicted {_fmt(h['predicted'])}{ci_txt}, actual "
                                 f"{_fmt(h['actual'])}, error {100 * h['relative_error']:+.2f}%{inside}")
    if result["nd_note"]:
        lines.append(f"[fit] {result['nd_note']}")
    return lines


def write_fit(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    return path
