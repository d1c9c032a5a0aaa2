"""The stability study's report (issue 20): reads the runs of configs/sweeps/stability.yaml (each cell's
metrics.jsonl, sweep_cell.json and diverged.json) and writes REPORT.md, summary.json and the figures.

    python bench/stability_report.py configs/sweeps/stability.yaml --out-dir bench/stability
    python bench/stability_report.py --runs DIR --out-dir OUT       # any directory of cells (the tests)

What is measured (the papers' signals, logged by pretrain/diagnostics.py every train.diagnostics_every
steps on a fixed probe batch):
  final loss      the last validation loss (at max_steps); a run stopped on non-finite losses, or
                  without a finite final loss, is diverged and counts as the loss at initialization
  L0              the loss of step 1 (train.log_every 1: it is computed before the first update)
  LR sensitivity  Wortsman et al. 2023: mean over the LR grid of min(L, L0) - the best L, per seed
                  (pretrain/scaling/lrsearch.py: lr_sensitivity)
  attention logit the largest attention logit q.k/sqrt(d) over layers and heads (Wortsman et al.: it
                  grows without bound at high LR without QK-layernorm)
  log Z           the mean log partition function of the output logits (Wortsman et al.: the output
                  logits drift without weight decay; z-loss pulls log Z to 0)
  entropy         the attention entropy, min over heads, min over layers (Zhai et al. 2023: it
                  collapses before training diverges; sigma-Reparam prevents it)

Verdicts compare two groups of seeds (compare()): a difference counts only when it is outside the seeds'
spread (the ranges do not overlap and the means differ by more than the wider range); otherwise it is
"not resolved at this scale". A signal that should grow or be kept small must also change 2x.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from any directory

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pretrain.metrics import read_metrics
from pretrain.scaling.lrsearch import capped, lr_sensitivity
from pretrain.scaling.plots import DPI, STYLE  # one look for every plot we commit

HOLDS, FAILS, UNRESOLVED, NO_DATA = "holds", "does not hold", "not resolved at this scale", "no data"
# A signal that "grows", "diverges" or is "kept small" must change by at least this factor: the papers'
# effects are orders of magnitude, and two seeds can separate a 10% difference.
FACTOR = 2.0
WEAK = "weak"  # separated in the claimed direction, by less than FACTOR (compare(); callers name it)
NOT_REPRODUCED = f"not reproduced at this scale (less than {FACTOR:g}x)"
SMALL = f"holds, but by less than {FACTOR:g}x"
BASELINE = "baseline"
DEFAULT_HIGH_LR = 0.1
DEFAULT_UPPER_FROM = 1e-2  # the upper grid's LR sensitivity: from here up (100-step runs: 1e-3 is undertrained)
# A head whose entropy is below this puts more than ~98% of its weight on one key (the largest
# possible entropy at 128 positions is ln 128 = 4.85 nats): Zhai et al.'s "entropy collapse".
COLLAPSED_ENTROPY = 0.1
REMEDY_COLORS = {
    "baseline": "tab:red",
    "qk_norm": "tab:blue",
    "z_loss": "tab:green",
    "sigma_reparam": "tab:purple",
    "indep_wd": "tab:orange",
}
SEED_STYLES = ["-", "--", ":", "-."]

# Signal -> (diag keys to try, in order; how a per-layer list becomes one number). The first key found
# in a run's diag rows is used; a list value is reduced over layers, a number taken as it is.
SIGNALS = {
    "attn_logit_max": (("layer_attn_logit_max", "attn_logit_max"), max),
    "attn_entropy_min": (("layer_attn_entropy_min", "attn_entropy_min"), min),
    "attn_entropy_mean": (("layer_attn_entropy", "attn_entropy"), min),
    "log_z_mean": (("log_z_mean", "output_log_z_mean"), None),
    "logit_mean": (("logit_mean", "output_logit_mean"), None),
    "logit_max": (("logit_max", "output_logit_max"), None),
}


# ------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    name: str
    remedy: str
    placement: str
    lr: float
    seed: str
    initial_loss: float | None
    final_loss: float | None
    diverged: bool
    steps: int  # the last training step logged
    max_steps: int | None
    curves: dict = field(default_factory=dict)  # signal -> (steps, values)
    signal_keys: dict = field(default_factory=dict)  # signal -> the diag key it was read from

    @property
    def finished(self) -> bool:
        return self.diverged or self.final_loss is not None

    def final(self, signal: str) -> float | None:
        """The signal at the last diagnostics step (None when not logged)."""
        curve = self.curves.get(signal)
        return curve[1][-1] if curve and curve[1] else None

    def extreme(self, signal: str, fn) -> float | None:
        curve = self.curves.get(signal)
        vals = [v for v in curve[1] if math.isfinite(v)] if curve else []
        return fn(vals) if vals else None


def _number(v) -> float:
    """metrics.jsonl writes non-finite numbers as strings."""
    return float(v) if v is not None else float("nan")


def _reduce(value, fn) -> float:
    if isinstance(value, list):
        vals = [_number(v) for v in value]
        finite = [v for v in vals if math.isfinite(v)]
        return fn(finite) if len(finite) == len(vals) and vals else float("nan")
    return _number(value)


def read_run(cell_dir: Path) -> Run | None:
    """One cell: its labels from sweep_cell.json, its losses and signals from metrics.jsonl."""
    info_path, metrics_path = cell_dir / "sweep_cell.json", cell_dir / "metrics.jsonl"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    labels = info.get("labels", {})
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    train = [r for r in rows if r["kind"] == "train"]
    valid = [r for r in rows if r["kind"] == "valid"]
    # the signals are in `diag` rows (per-layer depth statistics) and `stability` rows (pretrain/loop.py)
    diag = [r for r in rows if r["kind"] in ("diag", "stability")]
    first = next((r for r in train if r["step"] == 1), None)
    initial = _number(first["loss"]) if first else None
    max_steps = info.get("max_steps")
    last_step = max((r["step"] for r in train), default=0)
    final = None
    if valid and (max_steps is None or valid[-1]["step"] >= max_steps):
        final = _number(valid[-1]["loss"])
    diverged = (cell_dir / "diverged.json").is_file() or (final is not None and not math.isfinite(final))
    curves, keys = {}, {}
    for signal, (candidates, fn) in SIGNALS.items():
        key = next((k for k in candidates if any(k in r for r in diag)), None)
        if key is None:
            continue
        pts = [(r["step"], _reduce(r[key], fn)) for r in diag if key in r]
        curves[signal] = ([s for s, _ in pts], [v for _, v in pts])
        keys[signal] = key
    return Run(
        name=info.get("name", cell_dir.name),
        remedy=str(labels.get("remedy", BASELINE)),
        placement=str(labels.get("placement", labels.get("model.placement", "?"))),
        lr=float(labels.get("train.lr", "nan")),
        seed=str(labels.get("run.seed", "1")),
        initial_loss=initial if initial is not None and math.isfinite(initial) else None,
        final_loss=None if diverged or final is None else final,
        diverged=diverged,
        steps=last_step,
        max_steps=max_steps,
        curves=curves,
        signal_keys=keys,
    )


def read_runs(runs_dir: Path) -> list[Run]:
    runs = [read_run(d) for d in sorted(Path(runs_dir).iterdir()) if d.is_dir()]
    return [r for r in runs if r is not None]


# --------------------------------------------------------------------------------- sensitivity


def _order(values, preferred) -> list:
    present = set(values)
    return [v for v in preferred if v in present] + sorted(present - set(preferred))


def high_lr_sensitivity(losses, initial: float, diverged, lrs, upper) -> float | None:
    """Mean over the `upper` LRs of min(L, L0) - the best L of the whole grid (`losses` per LR of `lrs`)."""
    finite = [x for x, d in zip(losses, diverged, strict=True) if not d and x is not None and math.isfinite(x)]
    if not upper or not finite:
        return None
    best = min(finite)
    return float(
        np.mean([capped(x, initial, d) - best for x, d, lr in zip(losses, diverged, lrs, strict=True) if lr in upper])
    )


def sensitivity_rows(runs: list[Run], lrs: list[float], upper_from: float | None = None) -> list[dict]:
    """Per placement and remedy: the LR sensitivity of each seed that has a finished run at every LR of
    the grid (its L0 = the mean step-1 loss of its runs), their mean and range, and the final loss per
    LR (mean and range over seeds, diverged runs at L0). `sensitivity_upper`, the high-LR sensitivity: the
    same mean taken over the LRs from `upper_from` up only, the best loss still that of the whole grid
    (short runs leave the smallest LRs undertrained, and they then dominate the whole-grid number although
    no instability is involved)."""
    upper = [lr for lr in lrs if upper_from is not None and lr >= upper_from]
    rows = []
    placements = _order({r.placement for r in runs}, ["pre", "peri"])
    remedies = _order({r.remedy for r in runs}, list(REMEDY_COLORS))
    present = {(r.placement, r.remedy) for r in runs}
    groups = [(p, m) for p in placements for m in remedies if (p, m) in present]
    for placement, remedy in groups:
        mine = [r for r in runs if (r.placement, r.remedy) == (placement, remedy) and r.finished]
        per_seed, incomplete = {}, []
        for seed in sorted({r.seed for r in mine}):
            by_lr = {r.lr: r for r in mine if r.seed == seed}
            initials = [r.initial_loss for r in by_lr.values() if r.initial_loss is not None]
            if set(lrs) - set(by_lr) or not initials:
                incomplete.append(seed)
                continue
            l0 = float(np.mean(initials))
            losses = [by_lr[lr].final_loss for lr in lrs]
            per_seed[seed] = {
                "initial_loss": l0,
                "losses": losses,
                "diverged": [by_lr[lr].diverged for lr in lrs],
                "sensitivity": lr_sensitivity(losses, l0, [by_lr[lr].diverged for lr in lrs]),
                "sensitivity_upper": high_lr_sensitivity(
                    [by_lr[lr].final_loss for lr in lrs], l0, [by_lr[lr].diverged for lr in lrs], lrs, upper
                ),
            }
        per_lr = []
        for lr in lrs:
            at = [r for r in mine if r.lr == lr]
            vals = [capped(r.final_loss, r.initial_loss or float("nan"), r.diverged) for r in at]
            vals = [v for v in vals if math.isfinite(v)]
            per_lr.append(
                {
                    "lr": lr,
                    "runs": len(at),
                    "diverged": sum(r.diverged for r in at),
                    "mean": float(np.mean(vals)) if vals else None,
                    "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None,
                }
            )
        sens = [s["sensitivity"] for s in per_seed.values()]
        sens_up = [s["sensitivity_upper"] for s in per_seed.values() if s["sensitivity_upper"] is not None]
        rows.append(
            {
                "placement": placement,
                "remedy": remedy,
                "seeds": sorted(per_seed),
                "incomplete_seeds": incomplete,
                "per_seed": per_seed,
                "sensitivity": float(np.mean(sens)) if sens else None,
                "sensitivity_range": [min(sens), max(sens)] if sens else None,
                "upper_lrs": upper,
                "sensitivity_upper": float(np.mean(sens_up)) if sens_up else None,
                "per_lr": per_lr,
            }
        )
    return rows


# ------------------------------------------------------------------------------------- verdicts


def compare(low: list[float], high: list[float], factor: float | None = None) -> str:
    """The claim "`low` is below `high`", one value per seed a side. Resolved only when the difference is
    outside the seeds' spread: the two ranges do not overlap AND the means differ by more than the wider
    range. Then: holds (with `factor`: every `low` at least `factor` times below every `high`, else WEAK),
    or does not hold (`low` is above). Otherwise not resolved. With `factor` the values are positive
    magnitudes spanning orders (logits, entropies) and the spread is judged on their logarithms. Needs two
    values a side: one seed has no spread to compare against."""
    low = [v for v in low if v is not None and math.isfinite(v)]
    high = [v for v in high if v is not None and math.isfinite(v)]
    if len(low) < 2 or len(high) < 2:
        return NO_DATA

    def scale(vals):
        return [math.log(max(v, 1e-30)) for v in vals] if factor is not None else vals

    a, b = scale(low), scale(high)
    spread = max(max(a) - min(a), max(b) - min(b))
    if abs(float(np.mean(a)) - float(np.mean(b))) <= spread:
        return UNRESOLVED
    if max(low) < min(high):
        return HOLDS if factor is None or max(low) * factor <= min(high) else WEAK
    if min(low) > max(high):
        return FAILS
    return UNRESOLVED


def _fmt(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    return "[" + ", ".join(f"{v:.3g}" for v in vals) + "]" if vals else "–"


def _signal_values(runs, placement, remedy, lr, signal, how) -> list[float]:
    """One number per seed: the signal's largest ("max") or smallest ("min") value over the run, or the
    absolute value at its last diagnostics step ("abs_final")."""
    out = []
    for r in runs:
        if (r.placement, r.remedy, r.lr) != (placement, remedy, lr):
            continue
        if how == "max":
            v = r.extreme(signal, max)
        elif how == "min":
            v = r.extreme(signal, min)
        else:
            v = r.final(signal)
            v = None if v is None else abs(v)
        if v is not None and math.isfinite(v):
            out.append(v)
    return out


def _claim(cid, claim, source, signal, rule, evidence, per_placement, verdict=None) -> dict:
    return {
        "id": cid,
        "claim": claim,
        "source": source,
        "signal": signal,
        "rule": rule,
        "evidence": evidence,
        "per_placement": per_placement,
        "verdict": verdict if verdict is not None else _overall(per_placement),
    }


def _named(verdict: str, weak: str) -> str:
    """compare()'s WEAK in the words of the claim at hand."""
    return weak if verdict == WEAK else verdict


def _overall(verdicts: dict) -> str:
    """One verdict over placements: the same everywhere, else each placement's."""
    vals = [v for v in verdicts.values() if v != NO_DATA]
    if not vals:
        return NO_DATA
    if len(set(vals)) == 1 and len(vals) == len(verdicts):
        return vals[0]
    return "; ".join(f"{p}: {v}" for p, v in verdicts.items())


def _remedy_claim(runs, cid, claim, source, signal, how, low, high, placements, lr, what) -> dict:
    """ "`low` (a remedy or the baseline) has a smaller `signal` than `high` at `lr`", per placement."""
    evidence, verdicts = [], {}
    for placement in placements:
        a = _signal_values(runs, placement, low, lr, signal, how)
        b = _signal_values(runs, placement, high, lr, signal, how)
        verdicts[placement] = _named(compare(a, b, FACTOR), SMALL)
        evidence.append(f"{placement}: {low} {_fmt(a)} vs {high} {_fmt(b)} -> {verdicts[placement]}")
    rule = (
        f"{what} at lr {lr:g}, one value per seed; holds when outside the seeds' spread and differ by at "
        f"least {FACTOR:g}x"
    )
    return _claim(cid, claim, source, signal, rule, evidence, verdicts)


def _growth_claim(runs, cid, claim, source, signal, how, ref_lrs, lr, placements, what) -> dict:
    """ "Without the remedy the signal is larger at `lr` than at the baseline's best learning rate"."""
    evidence, verdicts = [], {}
    for placement in placements:
        ref = ref_lrs.get(placement)
        if ref is None or ref == lr:
            verdicts[placement] = NO_DATA
            evidence.append(f"{placement}: the baseline's best learning rate is {ref}; nothing to compare")
            continue
        a = _signal_values(runs, placement, BASELINE, ref, signal, how)
        b = _signal_values(runs, placement, BASELINE, lr, signal, how)
        verdicts[placement] = _named(compare(a, b, FACTOR), NOT_REPRODUCED)
        evidence.append(f"{placement}: best lr {ref:g} {_fmt(a)} vs lr {lr:g} {_fmt(b)} -> {verdicts[placement]}")
    rule = (
        f"{what}, baseline, at its best learning rate against lr {lr:g}, one value per seed; holds when the "
        f"difference is outside the seeds' spread and the signal grows at least {FACTOR:g}x"
    )
    return _claim(cid, claim, source, signal, rule, evidence, verdicts)


def _seed_sensitivities(sens_rows, placement, remedy, key: str = "sensitivity") -> list[float]:
    row = next((r for r in sens_rows if (r["placement"], r["remedy"]) == (placement, remedy)), None)
    return [s[key] for s in row["per_seed"].values() if s[key] is not None] if row else []


def _upper_short(sens_rows) -> str:
    upper = next((r["upper_lrs"] for r in sens_rows if r["upper_lrs"]), [])
    return f"lr >= {min(upper):g}" if upper else "upper grid"


def _upper_text(sens_rows) -> str:
    upper = next((r["upper_lrs"] for r in sens_rows if r["upper_lrs"]), [])
    return f"the LRs from {min(upper):g} up, against the best of the whole grid" if upper else "the upper grid"


def _sensitivity_claims(sens_rows, remedy, source, placements) -> list[dict]:
    """ "The remedy lowers the LR sensitivity", over the whole grid and over its upper part."""
    out = []
    for key, suffix, where, title in (
        ("sensitivity", "", "the whole grid", "LR sensitivity"),
        ("sensitivity_upper", "_upper", _upper_text(sens_rows), f"high-LR sensitivity ({_upper_short(sens_rows)})"),
    ):
        evidence, verdicts = [], {}
        for placement in placements:
            a = _seed_sensitivities(sens_rows, placement, remedy, key)
            b = _seed_sensitivities(sens_rows, placement, BASELINE, key)
            verdicts[placement] = compare(a, b)
            evidence.append(f"{placement}: {remedy} {_fmt(a)} vs baseline {_fmt(b)} -> {verdicts[placement]}")
        out.append(
            _claim(
                f"{remedy}_sensitivity{suffix}",
                f"{remedy} lowers the {title}",
                source,
                "lr_sensitivity",
                f"LR sensitivity per seed over {where}; resolved when outside the seeds' spread",
                evidence,
                verdicts,
            )
        )
    return out


def _collapse_claim(runs, placements, best: dict) -> dict:
    """Zhai et al.: low attention entropy goes with instability. Over the baseline's runs at its best LR
    and above (below it a run is worse for training too slowly, not for instability): whether the
    entropy collapsed (its minimum over the run below COLLAPSED_ENTROPY), and the final loss; holds when
    every collapsed run ends worse than every run that did not collapse."""
    evidence, verdicts = [], {}
    for placement in placements:
        floor = best.get(placement, 0.0)
        mine = [r for r in runs if (r.placement, r.remedy) == (placement, BASELINE) and r.finished and r.lr >= floor]
        sig = "attn_entropy_min" if any("attn_entropy_min" in r.curves for r in mine) else "attn_entropy_mean"
        collapsed, healthy = [], []
        for r in mine:
            low = r.extreme(sig, min)
            if low is None:
                continue
            loss = capped(r.final_loss, r.initial_loss or float("nan"), r.diverged)
            (collapsed if low < COLLAPSED_ENTROPY else healthy).append(loss)
        verdicts[placement] = compare(healthy, collapsed) if collapsed and healthy else NO_DATA
        evidence.append(
            f"{placement} (lr >= {floor:g}): {len(collapsed)} baseline runs collapsed (final losses "
            f"{_fmt(sorted(collapsed))}), {len(healthy)} did not ({_fmt(sorted(healthy))}) -> {verdicts[placement]}"
        )
    return _claim(
        "entropy_collapse",
        "attention-entropy collapse goes with a worse final loss (the runs that collapse train worse)",
        "Zhai et al. 2023",
        "attn_entropy_min",
        f"baseline runs at its best LR and above: collapsed = attention entropy (min over heads and layers) below "
        f"{COLLAPSED_ENTROPY} nats at some diagnostics step; holds when every collapsed run ends with a higher "
        "final loss (capped at L0) than every run that did not collapse",
        evidence,
        verdicts,
    )


def _placement_claim(runs_or_rows, cid, claim, signal, how, lr, what) -> dict:
    """ "Peri-LN has a smaller `signal` than Pre-LN" (baseline)."""
    if signal.startswith("lr_sensitivity"):
        key = "sensitivity_upper" if signal.endswith("_upper") else "sensitivity"
        a = _seed_sensitivities(runs_or_rows, "peri", BASELINE, key)
        b = _seed_sensitivities(runs_or_rows, "pre", BASELINE, key)
        where = _upper_text(runs_or_rows) if key == "sensitivity_upper" else "the whole grid"
        rule = f"LR sensitivity per seed over {where}, baseline; resolved when outside the seeds' spread"
    else:
        a = _signal_values(runs_or_rows, "peri", BASELINE, lr, signal, how)
        b = _signal_values(runs_or_rows, "pre", BASELINE, lr, signal, how)
        rule = (
            f"{what} at lr {lr:g}, baseline, one value per seed; holds when outside the seeds' spread and "
            f"differ by at least {FACTOR:g}x"
        )
    verdict = _named(compare(a, b, None if signal.startswith("lr_sensitivity") else FACTOR), SMALL)
    evidence = [f"baseline: peri {_fmt(a)} vs pre {_fmt(b)} -> {verdict}"]
    return _claim(cid, claim, "Kim et al. 2025 (Peri-LN)", signal, rule, evidence, {}, verdict)


def best_lrs(sens_rows: list[dict], remedy: str = BASELINE) -> dict:
    """placement -> the learning rate with the lowest mean final loss of `remedy`."""
    out = {}
    for row in sens_rows:
        pts = [p for p in row["per_lr"] if p["mean"] is not None]
        if row["remedy"] == remedy and pts:
            out[row["placement"]] = min(pts, key=lambda p: p["mean"])["lr"]
    return out


LOGIT_TEXT = "largest attention logit over the run (max over layers and heads)"
LOG_Z_TEXT = "|mean log Z| of the output logits at the last diagnostics step"
LOGIT_MEAN_TEXT = "|mean output logit| at the last diagnostics step"
ENTROPY_TEXT = "lowest attention entropy over the run (min over heads and layers)"


# claim -> the instability it is about: a remedy (or a placement) can only be said to fix what appeared
DEPENDS = {
    "qk_norm_logits": "attn_logit_growth",
    "peri_logits": "attn_logit_growth",
    "z_loss_log_z": "output_logit_divergence",
    "peri_log_z": "output_logit_divergence",
}


def _note_dependencies(claim_list: list[dict]) -> None:
    """Says so in the evidence when the instability a claim is about did not appear."""
    by_id = {c["id"]: c for c in claim_list}
    for c in claim_list:
        dep = by_id.get(DEPENDS.get(c["id"], ""))
        if dep is not None and dep["verdict"] != HOLDS:
            c["evidence"].append(
                f"note: the instability itself ('{dep['claim']}') is '{dep['verdict']}' here; where it did not "
                "appear, this comparison is not about it"
            )


def claims(runs: list[Run], sens_rows: list[dict], high_lr: float, output_lr: float, remedies: list[str]) -> list:
    """Every claim the study tests, with its evidence and verdict. Attention claims at `high_lr`,
    output-logit claims at `output_lr` (the top of the grid: output logits drift later than attention
    logits grow)."""
    placements = _order({r.placement for r in runs}, ["pre", "peri"])
    best = best_lrs(sens_rows)
    wortsman = "Wortsman et al. 2023"
    out = [
        _growth_claim(
            runs,
            "attn_logit_growth",
            "without QK-norm the largest attention logit grows at a high learning rate",
            f"{wortsman}, sec. 3.1",
            "attn_logit_max",
            "max",
            best,
            high_lr,
            placements,
            LOGIT_TEXT,
        )
    ]
    if "qk_norm" in remedies:
        out.append(
            _remedy_claim(
                runs,
                "qk_norm_logits",
                "QK-norm keeps the attention logits small at a high learning rate",
                f"{wortsman}, sec. 3.1",
                "attn_logit_max",
                "max",
                "qk_norm",
                BASELINE,
                placements,
                high_lr,
                LOGIT_TEXT,
            )
        )
        out += _sensitivity_claims(sens_rows, "qk_norm", f"{wortsman}, sec. 3.1", placements)
    out.append(
        _growth_claim(
            runs,
            "output_logit_divergence",
            "without weight decay or z-loss the output logits drift (diverge) at a high learning rate",
            f"{wortsman}, sec. 3.2",
            "logit_mean",
            "abs_final",
            best,
            output_lr,
            placements,
            LOGIT_MEAN_TEXT,
        )
    )
    if "z_loss" in remedies:
        out.append(
            _remedy_claim(
                runs,
                "z_loss_log_z",
                "z-loss keeps log Z closer to 0 than the baseline at a high learning rate",
                f"{wortsman}, sec. 3.2",
                "log_z_mean",
                "abs_final",
                "z_loss",
                BASELINE,
                placements,
                output_lr,
                LOG_Z_TEXT,
            )
        )
        out += _sensitivity_claims(sens_rows, "z_loss", f"{wortsman}, sec. 3.2", placements)
    out.append(_collapse_claim(runs, placements, best))
    if "sigma_reparam" in remedies:
        out.append(
            _remedy_claim(
                runs,
                "sigma_reparam_entropy",
                "sigma-Reparam prevents the attention-entropy collapse at a high learning rate",
                "Zhai et al. 2023",
                "attn_entropy_min",
                "min",
                BASELINE,
                "sigma_reparam",
                placements,
                high_lr,
                ENTROPY_TEXT + " (the claim: the baseline's is lower)",
            )
        )
        out += _sensitivity_claims(sens_rows, "sigma_reparam", "Zhai et al. 2023", placements)
    if "indep_wd" in remedies:
        out += _sensitivity_claims(sens_rows, "indep_wd", f"{wortsman}, sec. 3.2.2", placements)
    if {"pre", "peri"} <= set(placements):
        out.append(
            _placement_claim(
                runs,
                "peri_logits",
                "Peri-LN keeps the attention logits smaller than Pre-LN (baseline, high learning rate)",
                "attn_logit_max",
                "max",
                high_lr,
                LOGIT_TEXT,
            )
        )
        out.append(
            _placement_claim(
                runs,
                "peri_log_z",
                "Peri-LN keeps |log Z| smaller than Pre-LN (baseline, high learning rate)",
                "log_z_mean",
                "abs_final",
                output_lr,
                LOG_Z_TEXT,
            )
        )
        out.append(
            _placement_claim(
                sens_rows,
                "peri_sensitivity",
                "Peri-LN has a lower LR sensitivity than Pre-LN (baseline)",
                "lr_sensitivity",
                None,
                None,
                "",
            )
        )
        out.append(
            _placement_claim(
                sens_rows,
                "peri_sensitivity_upper",
                f"Peri-LN has a lower high-LR sensitivity ({_upper_short(sens_rows)}) than Pre-LN (baseline)",
                "lr_sensitivity_upper",
                None,
                None,
                "",
            )
        )
    _note_dependencies(out)
    return out


# ---------------------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_lr_sweep(sens_rows: list[dict], placements: list[str], remedies: list[str], path: Path) -> Path:
    """(a) final loss against the learning rate, one panel per placement, one line per remedy (the mean
    over seeds, the band their range; a diverged run sits at L0)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(placements), figsize=(5.2 * len(placements), 5.6), sharey=True, squeeze=False)
        for ax, placement in zip(axes[0], placements, strict=True):
            for remedy in remedies:
                row = next((r for r in sens_rows if (r["placement"], r["remedy"]) == (placement, remedy)), None)
                if row is None:
                    continue
                pts = [p for p in row["per_lr"] if p["mean"] is not None]
                if not pts:
                    continue
                c = REMEDY_COLORS.get(remedy, "black")
                lrs = [p["lr"] for p in pts]
                s, rng, up = row["sensitivity"], row["sensitivity_range"], row["sensitivity_upper"]
                label = remedy + (
                    f" (sens. {s:.3f} [{rng[0]:.3f}-{rng[1]:.3f}]" + (f", high-LR {up:.3f})" if up is not None else ")")
                    if s is not None
                    else " (sens. n/a)"
                )
                ax.plot(lrs, [p["mean"] for p in pts], "o-", color=c, ms=4, lw=1.4, label=label)
                ax.fill_between(lrs, [p["min"] for p in pts], [p["max"] for p in pts], color=c, alpha=0.18)
                div = [p for p in pts if p["diverged"]]
                if div:
                    ax.plot([p["lr"] for p in div], [p["max"] for p in div], "x", color=c, ms=8, mew=2)
            ax.set_xscale("log")
            ax.set_xlabel("peak learning rate (log scale)")
            ax.set_title(f"{placement}")
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: no curve hidden
        axes[0][0].set_ylabel("final validation loss (nats/token; diverged = L0, x)")
        fig.suptitle("Final loss vs learning rate (band: range over seeds; LR sensitivity of Wortsman et al. 2023)")
        return _save(fig, path)


def plot_signal_vs_lr(
    runs: list[Run], signal: str, fn, placements: list[str], remedies: list[str], path: Path, title: str, ylabel: str
) -> Path | None:
    """A signal's extreme over each run (`fn`: max or min) against the learning rate, one panel per placement,
    one line per remedy through the seeds' mean, every seed a dot."""
    if not any(signal in r.curves for r in runs):
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(placements), figsize=(5.2 * len(placements), 3.8), sharey=True, squeeze=False)
        for ax, placement in zip(axes[0], placements, strict=True):
            for remedy in remedies:
                pts = [
                    (r.lr, v)
                    for r in runs
                    if (r.placement, r.remedy) == (placement, remedy) and (v := r.extreme(signal, fn)) is not None
                ]
                if not pts:
                    continue
                c = REMEDY_COLORS.get(remedy, "black")
                lrs = sorted({lr for lr, _ in pts})
                means = [float(np.exp(np.mean([np.log(max(v, 1e-12)) for x, v in pts if x == lr]))) for lr in lrs]
                ax.plot(lrs, means, "-", color=c, lw=1.3, label=remedy)
                ax.plot([lr for lr, _ in pts], [v for _, v in pts], "o", color=c, ms=3, alpha=0.7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("peak learning rate (log scale)")
            ax.set_title(placement)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel(ylabel)
        fig.suptitle(title)
        return _save(fig, path)


def plot_curves(
    runs: list[Run],
    signal: str,
    remedies: list[str],
    placements: list[str],
    lr: float,
    path: Path,
    title: str,
    ylabel: str,
    log: bool = False,
    threshold: float | None = None,
) -> Path | None:
    """One panel per placement: `signal` against the step at `lr`, one colour per remedy, one line style
    per seed. None when no run at `lr` logged the signal."""
    chosen = [r for r in runs if r.lr == lr and r.remedy in remedies and signal in r.curves]
    if not chosen:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(placements), figsize=(5.2 * len(placements), 3.8), sharey=True, squeeze=False)
        for ax, placement in zip(axes[0], placements, strict=True):
            for remedy in remedies:
                mine = sorted(
                    (r for r in chosen if (r.placement, r.remedy) == (placement, remedy)), key=lambda r: r.seed
                )
                for i, r in enumerate(mine):
                    steps, vals = r.curves[signal]
                    color = REMEDY_COLORS.get(remedy, "black")
                    ax.plot(
                        steps,
                        vals,
                        SEED_STYLES[i % len(SEED_STYLES)],
                        marker=".",
                        ms=3,
                        color=color,
                        lw=1.3,
                        label=f"{remedy} seed {r.seed}" + (" (diverged: x)" if r.diverged else ""),
                    )
                    if r.diverged and steps:  # where a stopped run's curve ends
                        ax.plot(steps[-1:], vals[-1:], "x", color=color, ms=8, mew=2)
            if threshold is not None:
                ax.axhline(threshold, color="grey", ls=":", lw=0.8, label=f"{threshold:g}")
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(f"{placement}, lr {lr:g}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel(ylabel)
        fig.suptitle(title)
        return _save(fig, path)


# --------------------------------------------------------------------------------------- report


def _run_record(r: Run) -> dict:
    return {
        "name": r.name,
        "remedy": r.remedy,
        "placement": r.placement,
        "lr": r.lr,
        "seed": r.seed,
        "initial_loss": r.initial_loss,
        "final_loss": r.final_loss,
        "diverged": r.diverged,
        "steps": r.steps,
        "max_steps": r.max_steps,
        "signals_final": {s: r.final(s) for s in r.curves},
        "attn_logit_max_over_run": r.extreme("attn_logit_max", max),
        "attn_entropy_min_over_run": r.extreme("attn_entropy_min", min),
        "signal_keys": r.signal_keys,
    }


def _expected_cells(sweep_file: Path | None) -> tuple[list[str], object]:
    """The cell names of the sweep (to name the missing ones) and the sweep (None without a file)."""
    if sweep_file is None:
        return [], None
    from pretrain.scaling.spec import load_sweep

    sweep = load_sweep(sweep_file)
    return [c.name for c in sweep.cells], sweep


def write_report(
    runs_dir: Path,
    out_dir: Path,
    sweep_file: Path | None = None,
    high_lr: float = DEFAULT_HIGH_LR,
    output_lr: float | None = None,
    notes: str = "",
    upper_from: float = DEFAULT_UPPER_FROM,
) -> dict:
    """Reads the cells under runs_dir and writes REPORT.md, summary.json and the figures to out_dir.
    output_lr: the learning rate of the output-logit claims and figure (default: the top of the grid)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = read_runs(runs_dir) if runs_dir.is_dir() else []
    expected, sweep = _expected_cells(sweep_file)
    by_name = {r.name: r for r in runs}
    missing = [n for n in expected if n not in by_name or not by_name[n].finished]
    unfinished = [r.name for r in runs if not r.finished]
    placements = _order({r.placement for r in runs}, ["pre", "peri"])
    remedies = _order({r.remedy for r in runs}, list(REMEDY_COLORS))
    lrs = sorted({r.lr for r in runs})
    if sweep:
        lr_axis = sweep.axes.get("train.lr", {})
        lrs = sorted({float(v) for v in lr_axis} | set(lrs)) if lr_axis else lrs
    output_lr = output_lr if output_lr is not None else (max(lrs) if lrs else high_lr)
    finished = [r for r in runs if r.finished]
    sens = sensitivity_rows(finished, lrs, upper_from)
    claim_list = claims(finished, sens, high_lr, output_lr, remedies)
    figures = {}
    if finished:
        figures["lr_sweep"] = plot_lr_sweep(sens, placements, remedies, out_dir / "loss_vs_lr.png")
    figures["attn_logit_vs_lr"] = plot_signal_vs_lr(
        finished,
        "attn_logit_max",
        max,
        placements,
        remedies,
        out_dir / "attn_logit_max_vs_lr.png",
        "Largest attention logit over each run against the learning rate (dots: seeds; line: geometric mean)",
        "max attention logit (log scale)",
    )
    figures["attn_logits"] = plot_curves(
        finished,
        "attn_logit_max",
        [m for m in (BASELINE, "qk_norm") if m in remedies],
        placements,
        high_lr,
        out_dir / "attn_logit_max.png",
        f"Largest attention logit (max over layers and heads) at lr {high_lr:g}: baseline vs QK-norm",
        "max attention logit (log scale)",
        log=True,
    )
    figures["log_z"] = plot_curves(
        finished,
        "log_z_mean",
        [m for m in (BASELINE, "z_loss") if m in remedies],
        placements,
        output_lr,
        out_dir / "output_log_z.png",
        f"Output logits: mean log Z over the probe tokens at lr {output_lr:g}: baseline vs z-loss",
        "mean log Z (nats)",
    )
    figures["logit_mean"] = plot_curves(
        finished,
        "logit_mean",
        [m for m in (BASELINE, "z_loss") if m in remedies],
        placements,
        output_lr,
        out_dir / "output_logit_mean.png",
        f"Output logits: mean logit over the vocabulary and probe tokens at lr {output_lr:g}: baseline vs z-loss",
        "mean output logit",
    )
    entropy_signal = (
        "attn_entropy_min" if any("attn_entropy_min" in r.curves for r in finished) else "attn_entropy_mean"
    )
    fix = "sigma_reparam" if "sigma_reparam" in remedies else "qk_norm"
    figures["entropy"] = plot_curves(
        finished,
        entropy_signal,
        [m for m in (BASELINE, fix) if m in remedies],
        placements,
        high_lr,
        out_dir / "attn_entropy.png",
        f"Attention entropy ({'min over heads' if entropy_signal == 'attn_entropy_min' else 'mean over heads'}, "
        f"min over layers) at lr {high_lr:g}: baseline vs {fix}",
        "attention entropy (nats, log scale)",
        log=True,
        threshold=COLLAPSED_ENTROPY,
    )
    figures = {k: v.name for k, v in figures.items() if v is not None}
    summary = {
        "runs_dir": str(runs_dir),
        "high_lr": high_lr,
        "output_lr": output_lr,
        "lrs": lrs,
        "placements": placements,
        "remedies": remedies,
        "collapsed_entropy_threshold": COLLAPSED_ENTROPY,
        "runs": [_run_record(r) for r in runs],
        "missing_cells": missing,
        "unfinished_runs": unfinished,
        "sensitivity": sens,
        "claims": claim_list,
        "figures": figures,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    (out_dir / "REPORT.md").write_text(render_markdown(summary, finished, sweep, notes))
    return summary


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    raise TypeError(type(v))


def _setup_lines(finished: list[Run], sweep) -> list[str]:
    if not sweep:
        return []
    from pretrain.scaling.spec import non_embedding_parameters

    c = sweep.cells[0].config
    m, t = c.model, c.train
    tokens = t.max_steps * t.global_batch_size * m.seq_len
    return [
        f"Model: GPT ({m.placement if len(sweep.axes.get('placement', {})) < 2 else 'pre or peri'}), "
        f"d={m.hidden_size}, {m.num_layers} layers, {m.num_heads} heads, SwiGLU, {m.norm}, "
        f"{non_embedding_parameters(c):,} non-embedding parameters (Pre-LN), sequence {m.seq_len}; "
        f"{t.max_steps} steps of {t.global_batch_size} x {m.seq_len} tokens ({tokens:,} tokens), "
        f"{t.schedule} schedule with {t.warmup_steps} warmup steps, "
        f"AdamW (betas {t.beta1}, {t.beta2}), weight decay {t.weight_decay} (baseline), gradient clipping "
        f"{t.grad_clip}, {t.precision}; data `{c.data.dir}`; diagnostics every {t.diagnostics_every} steps.",
        "",
        "Remedies (each on top of the baseline): "
        + "; ".join(
            f"`{name}`: " + (", ".join(f"{k}={v}" for k, v in ov.items()) or "nothing")
            for name, ov in sweep.axes.get("remedy", {}).items()
        )
        + ".",
    ]


def render_markdown(summary: dict, finished: list[Run], sweep, notes: str = "") -> str:
    lrs, high = summary["lrs"], summary["high_lr"]
    lines = [
        "# Training stability at small scale: attention logits, output logits, attention entropy",
        "",
        "Generated by `python bench/stability_report.py configs/sweeps/stability.yaml --out-dir bench/stability` "
        "from the runs of `configs/sweeps/stability.yaml` (issue 20). Papers: Wortsman et al. 2023, "
        '"Small-scale proxies for large-scale Transformer training instabilities"; Zhai et al. 2023, '
        '"Stabilizing Transformer Training by Preventing Attention Entropy Collapse"; Kim et al. 2025, "Peri-LN".',
        "",
        "## Setup",
        "",
        *_setup_lines(finished, sweep),
        "",
        f"Grid: placements {', '.join(summary['placements'])} x remedies {', '.join(summary['remedies'])} x "
        f"learning rates {', '.join(f'{x:g}' for x in lrs)} x seeds; {len(finished)} finished runs"
        f" ({sum(r.diverged for r in finished)} diverged).",
        "",
    ]
    if summary["missing_cells"] or summary["unfinished_runs"]:
        lines += [
            f"**Missing or unfinished cells ({len(summary['missing_cells'])}):** "
            + ", ".join(f"`{n}`" for n in summary["missing_cells"][:40])
            + (" ..." if len(summary["missing_cells"]) > 40 else ""),
            "",
        ]
    lines += [
        "## Verdicts",
        "",
        "A difference counts only when it is outside the seeds' spread: the seeds' ranges do not overlap and the "
        "means differ by more than the wider range (on a log scale for logits, log Z and entropies); otherwise "
        f"it is *not resolved at this scale*. Signal claims (grows, kept small) also need a {FACTOR:g}x "
        "difference: a smaller one, resolved, reads *holds, but by less than 2x* or, for an instability, *not "
        "reproduced at this scale*. *no data*: the signal was not logged, or fewer than 2 seeds a side.",
        "",
        "| claim | source | verdict |",
        "|---|---|---|",
    ]
    for c in summary["claims"]:
        lines.append(f"| {c['claim']} | {c['source']} | **{c['verdict']}** |")
    lines += ["", "### Evidence", ""]
    for c in summary["claims"]:
        lines += [f"**{c['claim']}** ({c['source']}): **{c['verdict']}**. Rule: {c['rule']}.", ""]
        lines += [f"- {e}" for e in c["evidence"]] + [""]
    lines += [
        "## LR sensitivity",
        "",
        "Final validation loss per learning rate (mean over seeds, [min, max]; diverged runs count as L0, the "
        "step-1 loss) and the LR sensitivity of Wortsman et al. (mean over the grid of min(L, L0) - best L; "
        "per seed, then mean and range), over the whole grid, and the high-LR sensitivity: the same mean over the "
        "upper part of the grid only (the best loss still the whole grid's). Short runs leave the smallest "
        "learning rates undertrained, and they then dominate the whole-grid number without any instability "
        "involved; the high-LR number is what a remedy against instability should lower.",
        "",
        "| placement | remedy | "
        + " | ".join(f"lr {x:g}" for x in lrs)
        + f" | sensitivity (seeds) | high-LR sensitivity, {_upper_short(summary['sensitivity'])} (seeds) |",
        "|---|---|" + "---|" * len(lrs) + "---|---|",
    ]
    for row in summary["sensitivity"]:
        cells = []
        for p in row["per_lr"]:
            if p["mean"] is None:
                cells.append("–")
            else:
                d = f", {p['diverged']} div." if p["diverged"] else ""
                cells.append(f"{p['mean']:.3f} [{p['min']:.3f}, {p['max']:.3f}]{d}")
        s = row["sensitivity"]
        seeds = ", ".join(f"{row['per_seed'][k]['sensitivity']:.3f}" for k in row["seeds"])
        up = row["sensitivity_upper"]
        seeds_up = ", ".join(
            f"{row['per_seed'][k]['sensitivity_upper']:.3f}"
            for k in row["seeds"]
            if row["per_seed"][k]["sensitivity_upper"] is not None
        )
        lines.append(
            f"| {row['placement']} | {row['remedy']} | "
            + " | ".join(cells)
            + f" | {'–' if s is None else f'{s:.3f}'} ({seeds or 'no complete seed'})"
            + f" | {'–' if up is None else f'{up:.3f}'} ({seeds_up or '–'}) |"
        )
    lines += ["", "## Figures", ""]
    out_lr = summary["output_lr"]
    captions = {
        "lr_sweep": "(a) Final loss against the learning rate, per remedy; one panel per placement, band = "
        "range over seeds, x = a diverged run (at L0).",
        "attn_logits": f"(b) Largest attention logit (max over layers and heads) over training at lr {high:g}: "
        "baseline vs QK-norm; one line style per seed.",
        "attn_logit_vs_lr": "(b') The largest attention logit of each run against the learning rate, per "
        "remedy: where the growth starts and which remedy stops it.",
        "log_z": f"(c) Mean log Z of the output logits over training at lr {out_lr:g}: baseline vs z-loss.",
        "logit_mean": f"(c') Mean output logit over training at lr {out_lr:g}: baseline vs z-loss.",
        "entropy": f"(d) Attention entropy (min over layers) over training at lr {high:g}; dotted: the collapse "
        f"threshold {COLLAPSED_ENTROPY} nats.",
    }
    for key in (k for k in captions if k in summary["figures"]):
        lines += [captions[key], "", f"![{key}]({summary['figures'][key]})", ""]
    absent = [k for k in captions if k not in summary["figures"]]
    if absent:
        lines += [f"Not drawn (no run logged the signal): {', '.join(absent)}.", ""]
    lines += guidance(summary)
    if notes:
        lines += ["", "## Notes on these runs", "", notes.strip()]
    return "\n".join(lines) + "\n"


def guidance(summary: dict) -> list[str]:
    """The section the README links: which signal to watch, and what to switch on, with what this study
    measured for each."""
    verdicts = {c["id"]: c["verdict"] for c in summary["claims"]}

    def measured(cid: str) -> str:
        return verdicts.get(cid, "not run")

    return [
        "## Which signal to watch, and what to switch on",
        "",
        "All of these are logged every `train.diagnostics_every` steps on a fixed probe batch (`kind: stability` "
        "and `kind: diag` rows of metrics.jsonl, TensorBoard `stability/...`, and the `[stability]` log line). "
        "In brackets: what this study measured (verdict ids in summary.json).",
        "",
        "| watch | a problem when | switch on |",
        "|---|---|---|",
        "| `attn_logit_max` (largest attention logit) | it keeps growing, into the hundreds, at a high learning "
        "rate | `model.qk_norm: true` (Wortsman et al.) [grows without it: "
        f"{measured('attn_logit_growth')}; QK-norm keeps it small: {measured('qk_norm_logits')}] |",
        "| `attn_entropy_min` (attention entropy of the lowest head) | it falls towards 0 (one key takes all the "
        f"weight; below {COLLAPSED_ENTROPY} nats here) | `model.qk_norm: true` or `model.sigma_reparam: true`, or a "
        f"lower learning rate (Zhai et al.) [collapse goes with a worse loss: {measured('entropy_collapse')}; "
        f"sigma-Reparam prevents it: {measured('sigma_reparam_entropy')}] |",
        "| `log_z_mean`, `logit_mean` (output logits) | log Z and the mean logit drift away from 0 (output-logit "
        "divergence), mostly without weight decay | `train.z_loss: 1e-4` (Wortsman et al.) [drift at the top "
        f"learning rate: {measured('output_logit_divergence')}; z-loss keeps log Z nearer 0: "
        f"{measured('z_loss_log_z')}] |",
        "| the final loss at a few learning rates | it degrades steeply above the best one (high-LR sensitivity) "
        "| the remedies above; `train.weight_decay_mode: independent` (Wortsman et al.) [lower high-LR "
        f"sensitivity: QK-norm {measured('qk_norm_sensitivity_upper')}; z-loss "
        f"{measured('z_loss_sensitivity_upper')}; sigma-Reparam {measured('sigma_reparam_sensitivity_upper')}; "
        f"independent decay {measured('indep_wd_sensitivity_upper')}] |",
        "",
        "Peri-LN (`model.placement: peri`, the default) normalizes every sublayer's output [attention logits "
        f"smaller than Pre-LN's: {measured('peri_logits')}; |log Z| smaller: {measured('peri_log_z')}; LR "
        f"sensitivity lower: {measured('peri_sensitivity')}; high-LR sensitivity lower: "
        f"{measured('peri_sensitivity_upper')}].",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="the sweep file (configs/sweeps/stability.yaml): cells and setup")
    p.add_argument("--runs", help="directory of the cells (default: the sweep's `out`)")
    p.add_argument("--out-dir", default="bench/stability", help="where REPORT.md, summary.json and PNGs go")
    p.add_argument(
        "--high-lr", type=float, default=DEFAULT_HIGH_LR, help="the learning rate of the attention claims and curves"
    )
    p.add_argument("--output-lr", type=float, help="the learning rate of the output-logit claims (default: the top LR)")
    p.add_argument(
        "--upper-from",
        type=float,
        default=DEFAULT_UPPER_FROM,
        help="the second LR sensitivity covers the LRs from this up (default 1e-2)",
    )
    p.add_argument(
        "--notes", help="a markdown file appended to REPORT.md (what the numbers cannot say: the code state)"
    )
    args = p.parse_args(argv)
    if not args.sweep and not args.runs:
        p.error("give the sweep file or --runs DIR")
    sweep_file = Path(args.sweep) if args.sweep else None
    runs_dir = Path(args.runs) if args.runs else None
    if runs_dir is None:
        from pretrain.scaling.spec import load_sweep

        runs_dir = load_sweep(sweep_file).out
    notes = Path(args.notes).read_text() if args.notes else ""
    summary = write_report(
        runs_dir, Path(args.out_dir), sweep_file, args.high_lr, args.output_lr, notes, args.upper_from
    )
    print(f"[stability] {len(summary['runs'])} runs; wrote {Path(args.out_dir) / 'REPORT.md'}")
    for c in summary["claims"]:
        print(f"  {c['verdict']:<28} {c['claim']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
