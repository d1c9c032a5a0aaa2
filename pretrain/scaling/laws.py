"""Scaling laws and their robust fits (numpy + scipy only; nothing here knows about sweeps).

  L(N)    = E + A * N^-alpha                    one token budget, several sizes
  L(N, D) = E + A * N^-alpha + B * D^-beta      several sizes and token budgets (Chinchilla's form)

Fitted like Chinchilla (Hoffmann et al. 2022, approach 3): the residuals are log(predicted) - log(L),
the loss is Huber on them (delta 1e-3 by default: nearly L1, so one bad run does not drag the curve),
parameters live in log space (E = exp(e), A = exp(a), so they stay positive) and N, D are divided
by their geometric mean (a well-conditioned problem), the fit is started from a grid and the best
optimum kept.

Honesty:
- `at_bound` names the parameters that sit at an edge of their range: E or A (or B) so small that the
  term is below 0.1% of every loss (the fit says the term is not there: a floor of 0, or no dependence
  on N), an exponent at 0 or at EXPONENT_MAX. Such a fit has not found the law's parameters, whatever
  the optimizer reports.
- `bootstrap_residuals`: intervals from a residual bootstrap: the fitted curve plus log-residuals
  resampled with replacement (centred, inflated by sqrt(n / (n - p)) for the p fitted parameters),
  refitted from the point estimate. With several seeds per size the residuals hold the seed-to-seed
  noise and any lack of fit, so the interval reflects both; it never drops a size, unlike a case
  bootstrap over 4-5 sizes (`bootstrap`, kept for L(N, D) grids).
- `fit_power_law`: the 2-parameter baseline L = A N^-alpha (a straight line in log-log), to compare the
  3-parameter law's extrapolation against.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

LN_PARAMS = ("E", "A", "alpha")
LND_PARAMS = ("E", "A", "alpha", "B", "beta")
LN_FORMULA = "L(N) = E + A * N^(-alpha)"
LND_FORMULA = "L(N, D) = E + A * N^(-alpha) + B * D^(-beta)"
EXPONENT_MAX = 4.0


def predict(params: dict, N, D=None) -> np.ndarray:
    N = np.asarray(N, dtype=float)
    out = params["E"] + params["A"] * N ** -params["alpha"]
    if "B" in params:
        out = out + params["B"] * np.asarray(D, dtype=float) ** -params["beta"]
    return out


NEGLIGIBLE = 1e-3  # a term below this fraction of every loss counts as absent (its parameter at 0)


@dataclass
class FitResult:
    params: dict  # in natural units: E, A, alpha (, B, beta)
    cost: float
    rms_log_residual: float  # root mean square of log(pred) - log(L) over the points
    converged: bool  # the optimizer's own verdict; see at_bound
    at_bound: tuple = ()  # names of the parameters at an edge of their range (see the module docstring)


def _scaled(v: np.ndarray) -> tuple[np.ndarray, float]:
    ref = float(np.exp(np.mean(np.log(v))))
    return np.log(v / ref), ref


def _terms(theta: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    terms = [np.full_like(x, theta[0]), theta[1] - theta[2] * x]
    if y is not None:
        terms.append(theta[3] - theta[4] * y)
    return np.stack(terms)


def _log_pred(theta: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    return np.logaddexp.reduce(_terms(theta, x, y), axis=0)


def _jacobian(theta: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """d log(pred) / d theta: each term's share of the prediction times the term's derivative."""
    terms = _terms(theta, x, y)
    w = np.exp(terms - np.logaddexp.reduce(terms, axis=0))
    cols = [w[0], w[1], -w[1] * x]
    if y is not None:
        cols += [w[2], -w[2] * y]
    return np.stack(cols, axis=1)


EXPONENT_GRID = np.linspace(0.02, 2.0, 100)


def _starts(L: np.ndarray, x: np.ndarray, y: np.ndarray | None, count: int = 3) -> list[np.ndarray]:
    """Starting points by variable projection: for fixed exponents the law is linear in E, A (, B), so
    a grid over the exponents with a non-negative least-squares solve at each point (relative errors,
    like the log residuals) finds the basins; the `count` best grid points start the real fit."""
    from scipy.optimize import nnls

    grid = [(a,) for a in EXPONENT_GRID] if y is None else list(itertools.product(EXPONENT_GRID[::4], repeat=2))
    scored = []
    for exps in grid:
        cols = [np.ones_like(x), np.exp(-exps[0] * x)] + ([np.exp(-exps[1] * y)] if y is not None else [])
        basis = np.stack(cols, axis=1) / L[:, None]
        coef, resid = nnls(basis, np.ones_like(L))
        scored.append((resid, exps, coef))
    scored.sort(key=lambda t: t[0])
    floor = 1e-6 * float(L.min())  # a zero coefficient as a log-space start
    starts = []
    for _, exps, coef in scored[:count]:
        theta = [math.log(max(coef[0], floor)), math.log(max(coef[1], floor)), exps[0]]
        if y is not None:
            theta += [math.log(max(coef[2], floor)), exps[1]]
        starts.append(np.array(theta))
    return starts


def at_bound(params: dict, N, L, D=None) -> tuple:
    """The parameters of a fit that sit at an edge of their range (module docstring)."""
    N, L = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    floor = NEGLIGIBLE * float(L.min())
    out = []
    if params["E"] < floor:
        out.append("E")
    terms = [("A", "alpha", N)] + ([("B", "beta", np.asarray(D, dtype=float))] if "B" in params else [])
    for coef, exponent, v in terms:
        if float(np.max(params[coef] * v ** -params[exponent])) < floor:
            out.append(coef)
        if params[exponent] < NEGLIGIBLE or params[exponent] > EXPONENT_MAX * (1 - NEGLIGIBLE):
            out.append(exponent)
    return tuple(out)


def _theta(params: dict, n_ref: float, d_ref: float, floor: float) -> np.ndarray:
    """The log-space parameters of a natural-units parameter dict (the inverse of fit_law's mapping)."""
    t = [
        math.log(max(params["E"], floor)),
        math.log(max(params["A"], floor)) - params["alpha"] * math.log(n_ref),
        params["alpha"],
    ]
    if "B" in params:
        t += [math.log(max(params["B"], floor)) - params["beta"] * math.log(d_ref), params["beta"]]
    return np.array(t)


def fit_law(N, L, D=None, delta: float = 1e-3, start: dict | None = None) -> FitResult:
    """Fits L(N) (D None) or L(N, D) to the points. `start`: parameters to start from instead of the
    grid (a bootstrap refit starts from the point estimate)."""
    N, L = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    x, n_ref = _scaled(N)
    y, d_ref = (None, 1.0) if D is None else _scaled(np.asarray(D, dtype=float))
    log_l = np.log(L)
    k = 3 if y is None else 5
    lo = np.array([-30.0, -30.0, 0.0] + ([-30.0, 0.0] if k == 5 else []))
    hi = np.array([math.log(float(L.max())) + 1.0, 30.0, EXPONENT_MAX] + ([30.0, EXPONENT_MAX] if k == 5 else []))

    def solve(s, loss):
        return least_squares(
            lambda t: _log_pred(t, x, y) - log_l,
            np.clip(s, lo + 1e-9, hi - 1e-9),
            jac=lambda t: _jacobian(t, x, y),
            loss=loss,
            f_scale=delta if loss == "huber" else 1.0,
            bounds=(lo, hi),
            method="trf",
            x_scale="jac",
            max_nfev=1000,
        )

    # Least squares from the grid's best points, then Huber from the best optimum: the robust loss
    # converges slowly from far away, and its optimum lies near the least-squares one.
    if start is None:
        ls = min((solve(s, "linear") for s in _starts(L, x, y)), key=lambda r: r.cost)
        best = solve(ls.x, "huber")
    else:
        best = solve(_theta(start, n_ref, d_ref, 1e-12), "huber")
    t = best.x
    params = {"E": math.exp(t[0]), "A": math.exp(t[1]) * n_ref ** t[2], "alpha": float(t[2])}
    if k == 5:
        params.update({"B": math.exp(t[3]) * d_ref ** t[4], "beta": float(t[4])})
    resid = _log_pred(t, x, y) - log_l
    return FitResult(
        params, float(best.cost), float(np.sqrt(np.mean(resid**2))), bool(best.success), at_bound(params, N, L, D)
    )


def identifiable(N, D=None) -> bool:
    """Whether the points can pin the law's parameters down at all: three distinct sizes for L(N);
    for L(N, D) also two token budgets and five distinct (N, D) points."""
    if len(set(np.asarray(N).tolist())) < 3:
        return False
    if D is None:
        return True
    pairs = set(zip(np.asarray(N).tolist(), np.asarray(D).tolist(), strict=True))
    return len(set(np.asarray(D).tolist())) >= 2 and len(pairs) >= 5


def bootstrap(N, L, D=None, resamples: int = 1000, seed: int = 0, delta: float = 1e-3) -> tuple[list[dict], int]:
    """Case bootstrap: refit on `resamples` resamplings (with replacement) of the points. Resamples
    that cannot identify the law (too few distinct sizes/budgets) are discarded and counted.
    Returns (parameter dicts of the kept refits, number discarded)."""
    N, L = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    D = None if D is None else np.asarray(D, dtype=float)
    rng = np.random.default_rng(seed)
    kept, discarded = [], 0
    for _ in range(resamples):
        idx = rng.integers(0, len(N), len(N))
        if not identifiable(N[idx], None if D is None else D[idx]):
            discarded += 1
            continue
        kept.append(fit_law(N[idx], L[idx], None if D is None else D[idx], delta).params)
    return kept, discarded


def bootstrap_residuals(
    N, L, D=None, resamples: int = 1000, seed: int = 0, delta: float = 1e-3, fit: FitResult | None = None
) -> list[dict]:
    """Residual bootstrap (module docstring): parameter dicts of `resamples` refits. Empty when there are
    no more points than parameters (the residuals are all 0: nothing to resample)."""
    N, L = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    D = None if D is None else np.asarray(D, dtype=float)
    fit = fit or fit_law(N, L, D, delta)
    n, p = len(L), len(fit.params)
    if n <= p:
        return []
    log_fit = np.log(predict(fit.params, N, D))
    resid = np.log(L) - log_fit
    resid = (resid - resid.mean()) * math.sqrt(n / (n - p))
    rng = np.random.default_rng(seed)
    return [
        fit_law(N, np.exp(log_fit + rng.choice(resid, n)), D, delta, start=fit.params).params for _ in range(resamples)
    ]


def fit_power_law(N, L) -> dict:
    """L = A N^-alpha by least squares on log L = log A - alpha log N (np.polyfit)."""
    slope, intercept = np.polyfit(np.log(np.asarray(N, dtype=float)), np.log(np.asarray(L, dtype=float)), 1)
    return {"A": float(math.exp(intercept)), "alpha": float(-slope)}


def predict_power_law(params: dict, N) -> np.ndarray:
    return params["A"] * np.asarray(N, dtype=float) ** -params["alpha"]


def percentile_ci(values, level: float = 0.95) -> list[float] | None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    q = (1 - level) / 2 * 100
    return [float(np.percentile(values, q)), float(np.percentile(values, 100 - q))]
