"""The placement papers' claims, checked against a sweep's measurements, each with its evidence and one
verdict: holds / does not hold / not resolved (or not measured, when the sweep cannot test it).

Claims (source in brackets):
  loss order       Peri-LN below Pre-LN [Peri-LN, Kim et al. 2025]; LNS below Pre-LN [The Curse of Depth,
                   Sun et al. 2025]; Post-LN above Pre-LN [both], and tuned Post-LN within 5% of Pre-LN at
                   these depths (the expectation of the issue that asked for this study)
  variance growth  Pre-LN's residual variance grows faster than linearly with depth [Curse of Depth:
                   exponentially]; Peri-LN's and LNS's grow more slowly than Pre-LN's [both]; across sizes,
                   Pre-LN's last-layer variance rises faster with N than Peri-LN's and LNS's [Peri-LN]
  late layers      LNS's and Peri-LN's deeper blocks contribute more than Pre-LN's: removing one of the
                   deeper half costs more loss [Curse of Depth]
  LR sensitivity   Peri-LN is less sensitive to the learning rate than Pre-LN [Peri-LN]

How a verdict is decided. Every claim compares a per-cell number (a loss, a log growth, ...) between
placements, size by size, as a difference of seed means d_s. Its noise comes from the seed-to-seed
spread of that same number at that size, pooled over the placements (pretrain/scaling/results.py:
seed_noise): the spread shrinks with size (the placement study's validation-loss sd is 0.17 at its
smallest size and 0.009 at its largest), so one sd pooled over every size would hide a difference at
the large sizes behind the small sizes' noise. A difference is resolved when |d_s| exceeds t standard
errors, t the two-sided 95% Student-t quantile at the pooled sd's degrees of freedom (2.78 for 2 seeds
x 4 placements). Over the S sizes the mean difference has a threshold sqrt(sum of the per-size squared
thresholds) / S. Verdict:
  holds           the mean difference is resolved in the claimed direction, and no size is resolved
                  against it
  does not hold   the mean difference is resolved against the claim
  not resolved    anything else (within the noise, or sizes that disagree); also when the seed spread
                  is unknown (one seed per cell)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pretrain.scaling.growth import linear_ratio
from pretrain.scaling.lrsearch import sensitivity_table
from pretrain.scaling.results import seed_noise, t_critical

HOLDS, FAILS, UNRESOLVED, UNMEASURED = "holds", "does not hold", "not resolved", "not measured"
POST_LN_TOLERANCE = 0.05  # "tuned Post-LN within 5% of Pre-LN"
METRIC_WORDS = {
    "valid_loss": "validation loss",
    "test_loss": "test loss",
    "valid_bpb": "validation bits per byte",
    "test_bpb": "test bits per byte",
}


@dataclass
class Comparison:
    size: str
    diff: float  # claimed direction: negative (see `verdict`)
    threshold: float | None  # t standard errors of diff (95%, two-sided)


def verdict(comparisons: list[Comparison]) -> tuple[str, str]:
    """(verdict, the numbers that decided it) for differences whose claimed sign is negative."""
    if not comparisons:
        return UNMEASURED, "no size has both placements evaluated"
    mean = float(np.mean([c.diff for c in comparisons]))
    if any(c.threshold is None for c in comparisons):
        return UNRESOLVED, (
            f"mean difference {mean:+.4g}; the seed-to-seed spread is not measured (one seed per "
            "cell), so no difference is resolved"
        )
    overall = math.sqrt(sum(c.threshold**2 for c in comparisons)) / len(comparisons)
    against = [c.size for c in comparisons if c.diff > c.threshold]
    claimed = [c.size for c in comparisons if c.diff < -c.threshold]
    decided = (
        f"mean difference over {len(comparisons)} size(s) {mean:+.4g} (the claim says negative), resolved "
        f"beyond +-{overall:.3g} (t standard errors from each size's seed spread)"
    )
    if claimed:
        decided += f"; resolved as claimed at {', '.join(claimed)}"
    if against:
        decided += f"; resolved against the claim at {', '.join(against)}"
    if mean > overall:
        return FAILS, decided
    if mean < -overall and not against:
        return HOLDS, decided
    return UNRESOLVED, decided


def _seed_mean(cells, value) -> tuple[float | None, int]:
    values = [v for v in (value(r) for r in cells) if v is not None and math.isfinite(v)]
    return (float(np.mean(values)), len(values)) if values else (None, 0)


def _log_growth(r) -> float | None:
    var = ((r.evaluation or {}).get("depth") or {}).get("var") or []
    return math.log(var[-1] / var[1]) if len(var) > 2 and var[1] > 0 and var[-1] > 0 else None


def _log_linear_ratio(r) -> float | None:
    var = ((r.evaluation or {}).get("depth") or {}).get("var") or []
    ratio = linear_ratio(var)
    return math.log(ratio) if ratio and ratio > 0 else None


def _late_removal(r) -> float | None:
    """Mean loss increase when one of the deeper half of the blocks is removed."""
    inc = (((r.evaluation or {}).get("depth") or {}).get("removal") or {}).get("increase") or []
    if len(inc) < 2:
        return None
    return float(np.mean(inc[len(inc) // 2 :]))


class Evidence:
    """The usable study cells by (placement, size), and the seed noise of any per-cell number."""

    def __init__(self, results, size_of, sizes: list[str]):
        self.results, self.size_of = results, size_of
        self.cells: dict[tuple, list] = {}
        for r in results:
            if r.cell.study and r.usable:
                self.cells.setdefault((r.evaluation.get("placement"), size_of(r)), []).append(r)
        self.sizes = [s for s in sizes if any(k[1] == s for k in self.cells)]
        self._noise = {}

    def noise(self, name: str, value) -> dict:
        """{size: SeedNoise of value(cell) at that size, pooled over the placements}."""
        if name not in self._noise:
            self._noise[name] = {
                size: seed_noise(self.results, "", self.size_of, value, size=size) for size in self.sizes
            }
        return self._noise[name]

    def compare(self, name: str, value, other: str, base: str, sign: float = 1.0):
        """Per size: (row numbers, Comparison) of sign * (value(other) - value(base)), seed means."""
        noise = self.noise(name, value)
        rows, comparisons = [], []
        for size in self.sizes:
            a, na = _seed_mean(self.cells.get((other, size), []), value)
            b, nb = _seed_mean(self.cells.get((base, size), []), value)
            if a is None or b is None:
                continue
            thr = noise[size].difference_threshold(na, nb)
            c = Comparison(size, sign * (a - b), thr)
            comparisons.append(c)
            rows.append((size, a, b, na, nb, c))
        return rows, comparisons, noise


def _state(c: Comparison) -> str:
    if c.threshold is None:
        return "spread unknown"
    return "as claimed" if c.diff < -c.threshold else "against" if c.diff > c.threshold else "within noise"


def _noise_text(noise: dict, what: str) -> str:
    measured = {size: n for size, n in noise.items() if n.sd is not None}
    if not measured:
        return f"{what}: one seed per cell, spread not measured"
    per_size = ", ".join(f"{size} {n.sd:.3g} ({n.dof} dof, t {n.critical:.2f})" for size, n in measured.items())
    return f"{what}: seed-to-seed sd per size, pooled over the placements: {per_size}"


def _claim(claim: str, source: str, rule: str, rows, comparisons, noise, what: str, header, fmt) -> dict:
    v, decided = verdict(comparisons)
    return {
        "claim": claim,
        "source": source,
        "rule": rule,
        "verdict": v,
        "decided_by": decided,
        "spread": _noise_text(noise, what),
        "header": header,
        "rows": [fmt(size, a, b, na, nb) + [_state(c)] for size, a, b, na, nb, c in rows],
    }


def check(results, size_of, sizes: list[str], metric: str = "valid_loss") -> list[dict]:
    """[{claim, source, rule, verdict, decided_by, spread, header, rows}] for every claim."""
    ev = Evidence(results, size_of, sizes)
    out = []
    loss = lambda r: r.metric(metric)
    names = {"pre": "Pre-LN", "post": "Post-LN", "peri": "Peri-LN", "lns": "LNS"}
    words = METRIC_WORDS.get(metric, metric)

    def loss_row(size, a, b, na, nb):
        return [size, f"{b:.4f} ({nb})", f"{a:.4f} ({na})", f"{a - b:+.4f}", f"{100 * (a - b) / b:+.2f}%"]

    for other, source, sign in (
        ("peri", "Peri-LN", 1.0),
        ("lns", "The Curse of Depth", 1.0),
        ("post", "Peri-LN; The Curse of Depth", -1.0),
    ):
        rows, comps, noise = ev.compare("loss", loss, other, "pre", sign)
        direction = "below" if sign > 0 else "above"
        out.append(
            _claim(
                f"{names[other]} reaches a {'lower' if sign > 0 else 'higher'} {words} than Pre-LN",
                source,
                f"{words} of {other} {direction} pre's, difference of seed means per size",
                rows,
                comps,
                noise,
                words,
                ["size", "Pre-LN (seeds)", f"{names[other]} (seeds)", "difference", "relative", "state"],
                loss_row,
            )
        )
    out.append(_post_within(ev, loss, metric))

    def growth_row(size, a, b, na, nb):
        return [size, f"{math.exp(b):.3g}x", f"{math.exp(a):.3g}x", f"{a - b:+.3f}"]

    # Faster than linear: compare ln(linear_ratio) of pre against 0 (a placement-free reference).
    noise = ev.noise("log_linear_ratio", _log_linear_ratio)
    rows, comps = [], []
    for size in ev.sizes:
        m, n = _seed_mean(ev.cells.get(("pre", size), []), _log_linear_ratio)
        if m is None:
            continue
        thr = None if noise[size].sd is None else noise[size].critical * noise[size].sd / math.sqrt(n)
        c = Comparison(size, -m, thr)
        comps.append(c)
        rows.append((size, m, 0.0, n, 0, c))
    out.append(
        _claim(
            "Pre-LN's residual variance grows faster than linearly with depth",
            "The Curse of Depth",
            "ln of the growth relative to linear, var_L / (var_0 + L (var_1 - var_0)), above 0 (0 = every "
            "block adds the same variance), final checkpoint",
            rows,
            comps,
            noise,
            "ln linear ratio",
            ["size", "linear ratio (seeds)", "ln", "state"],
            lambda size, a, b, na, nb: [size, f"{math.exp(a):.3g} ({na})", f"{a:+.3f}"],
        )
    )
    for other, source in (("peri", "Peri-LN"), ("lns", "The Curse of Depth")):
        rows, comps, noise = ev.compare("log_growth", _log_growth, other, "pre")
        out.append(
            _claim(
                f"{names[other]}'s residual variance grows more slowly with depth than Pre-LN's",
                source,
                "ln(var after the last block / var after block 1) below pre's, final checkpoint",
                rows,
                comps,
                noise,
                "ln growth",
                ["size", "Pre-LN growth", f"{names[other]} growth", "ln difference", "state"],
                growth_row,
            )
        )
    out += _growth_across_sizes(ev)
    for other in ("lns", "peri"):
        rows, comps, noise = ev.compare("late_removal", _late_removal, other, "pre", -1.0)
        out.append(
            _claim(
                f"{names[other]}'s deeper blocks contribute more than Pre-LN's",
                "The Curse of Depth",
                "mean loss increase when one block of the deeper half is removed, above pre's",
                rows,
                comps,
                noise,
                "late-block removal cost",
                ["size", "Pre-LN", names[other], "difference", "state"],
                lambda size, a, b, na, nb: [size, f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f}"],
            )
        )
    out.append(_lr_sensitivity(ev, metric))
    return out


def _post_within(ev: Evidence, loss, metric: str) -> dict:
    noise = ev.noise("loss", loss)
    rows, comps = [], []
    for size in ev.sizes:
        post, n_post = _seed_mean(ev.cells.get(("post", size), []), loss)
        pre, n_pre = _seed_mean(ev.cells.get(("pre", size), []), loss)
        if post is None or pre is None:
            continue
        thr = noise[size].difference_threshold(n_post, n_pre)
        # Claimed: post - pre < 5% of pre.
        c = Comparison(size, (post - pre) - POST_LN_TOLERANCE * pre, thr)
        comps.append(c)
        rows.append((size, post, pre, n_post, n_pre, c))
    words = METRIC_WORDS.get(metric, metric)
    return _claim(
        f"Tuned Post-LN lands within {POST_LN_TOLERANCE:.0%} of Pre-LN at these depths",
        "issue 17's expectation",
        f"{words} of post below 1.05 x pre's",
        rows,
        comps,
        noise,
        words,
        ["size", "Pre-LN", "Post-LN", "relative gap", "state"],
        lambda size, a, b, na, nb: [size, f"{b:.4f}", f"{a:.4f}", f"{100 * (a - b) / b:+.2f}%"],
    )


def _growth_across_sizes(ev: Evidence) -> list[dict]:
    """Slope of ln(last-layer variance) against ln N per placement, from every seed: Pre-LN's against
    Peri-LN's and LNS's, with the slopes' standard errors (least squares)."""

    def last_var(r):
        var = ((r.evaluation or {}).get("depth") or {}).get("var") or []
        return var[-1] if var and var[-1] > 0 else None

    slopes = {}
    for placement in ("pre", "peri", "lns"):
        pts = [
            (math.log(r.N), math.log(v))
            for (p, _), cells in ev.cells.items()
            if p == placement
            for r in cells
            if (v := last_var(r)) is not None
        ]
        if len({x for x, _ in pts}) >= 3:
            x, y = np.array(pts).T
            coef, cov = np.polyfit(x, y, 1, cov=True)
            slopes[placement] = (float(coef[0]), float(math.sqrt(cov[0, 0])), len(pts))
    rule = (
        "slope of ln(variance after the last block) against ln N, least squares over every seed; "
        "the slopes differ by more than t standard errors (95%, the fits' residual degrees of freedom)"
    )
    out = []
    for other, source in (("peri", "Peri-LN"), ("lns", "The Curse of Depth")):
        claim = f"Across sizes, Pre-LN's last-layer variance rises faster with N than {other}'s"
        if "pre" not in slopes or other not in slopes:
            out.append(
                {
                    "claim": claim,
                    "source": source,
                    "rule": rule,
                    "verdict": UNMEASURED,
                    "decided_by": "fewer than 3 sizes evaluated",
                    "spread": "",
                    "header": [],
                    "rows": [],
                }
            )
            continue
        (sp, ep, n_pre), (so, eo, n_other) = slopes["pre"], slopes[other]
        # t at the smaller fit's residual degrees of freedom (points - 2)
        diff, thr = so - sp, t_critical(min(n_pre, n_other) - 2) * math.sqrt(ep**2 + eo**2)
        v = HOLDS if diff < -thr else FAILS if diff > thr else UNRESOLVED
        out.append(
            {
                "claim": claim,
                "source": source,
                "rule": rule,
                "verdict": v,
                "decided_by": f"slope difference {diff:+.3f}, resolved beyond +-{thr:.3f}",
                "spread": "standard errors of the slopes (residual scatter, seeds included)",
                "header": ["placement", "slope d ln var / d ln N", "standard error", "points"],
                "rows": [[p, f"{s:.3f}", f"{e:.3f}", str(n)] for p, (s, e, n) in slopes.items()],
            }
        )
    return out


def _lr_sensitivity(ev: Evidence, metric: str) -> dict:
    table = {(r["group"], r["size"]): r for r in sensitivity_table(ev.results, ev.size_of)}
    claim = "Peri-LN is less sensitive to the learning rate than Pre-LN"
    source = "Peri-LN"
    sizes = [s for s in dict.fromkeys(k[1] for k in table) if ("pre", s) in table and ("peri", s) in table]
    if not sizes:
        return {
            "claim": claim,
            "source": source,
            "rule": "",
            "verdict": UNMEASURED,
            "decided_by": "the sweep has no LR search of both placements",
            "spread": "",
            "header": [],
            "rows": [],
        }
    noise = ev.noise("loss", lambda r: r.metric(metric))
    comps, rows = [], []
    for size in sizes:
        pre, peri = table[("pre", size)], table[("peri", size)]
        k = len(pre["lrs"])
        # Each sensitivity is a mean of K capped losses minus their minimum: its noise is about
        # sd * sqrt(1 + 1/K) / sqrt(seeds); the difference of two has sqrt(2) times that.
        at = noise.get(size)
        thr = (
            None
            if at is None or at.sd is None
            else at.critical * at.sd * math.sqrt(2 * (1 + 1 / k) / min(pre["seeds"], peri["seeds"]))
        )
        c = Comparison(size, peri["sensitivity"] - pre["sensitivity"], thr)
        comps.append(c)
        rows.append(
            [size]
            + [
                f"{table[(p, size)]['sensitivity']:.4f}" if (p, size) in table else "–"
                for p in ("pre", "post", "peri", "lns")
            ]
            + [f"{c.diff:+.4f}", _state(c)]
        )
    v, decided = verdict(comps)
    return {
        "claim": claim,
        "source": source,
        "rule": "LR sensitivity (Wortsman et al. 2023: mean over the grid of min(L, L0) - the best L) of peri "
        "below pre's",
        "verdict": v,
        "decided_by": decided,
        "spread": _noise_text({size: noise[size] for size in sizes if size in noise}, METRIC_WORDS.get(metric, metric))
        + "; a sensitivity's noise is taken as sd x sqrt(1 + 1/K)",
        "header": ["size", "Pre-LN", "Post-LN", "Peri-LN", "LNS", "peri - pre", "state"],
        "rows": rows,
    }
