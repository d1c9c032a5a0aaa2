"""`python -m pretrain.scaling report`: REPORT.md and its PNGs for a sweep, in one directory that can
be committed as it is (images referenced by relative paths).

What it shows: a summary table of every cell; the scaling-law fits (from pretrain/scaling/fit.py,
recomputed here and written next to the report as fit.json) with the held-out prediction; training
loss curves; and the depth diagnostics at the final checkpoint (residual variance and largest
activation per layer, angular distance between consecutive layers, loss increase when each block is
removed). Cells not evaluated yet are listed, not silently dropped.
"""
from __future__ import annotations

import time
from pathlib import Path

from pretrain.config import ConfigError
from pretrain.fsutil import atomic_write_text
from pretrain.scaling import claims, plots
from pretrain.scaling.fit import FIT_FILE, fit_sweep, write_fit
from pretrain.scaling.results import METRICS, CellResult, collect, size_label, size_order
from pretrain.scaling.spec import Sweep


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and abs(v) >= 1e4):
        return plots._human(v)
    return f"{v:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def summary_rows(results: list[CellResult], size_of) -> list[list[str]]:
    rows = []
    for r in results:
        ev = r.evaluation
        name = r.name + (" (held out)" if r.held_out else "")
        if ev is None:
            rows.append([name, r.label, size_of(r)] + ["–"] * 9 + [r.why_missing])
            continue
        d = ev.get("depth", {})
        acc = lambda key: (f"{100 * ev[key]['accuracy']:.1f}%"  # noqa: E731
                           if ev.get(key, {}).get("accuracy") is not None else "–")
        rows.append([name, r.label, size_of(r), _f(r.N), _f(r.D), f"{ev['test']['loss']:.4f}",
                     f"{ev['test']['bits_per_byte']:.4f}", f"{ev['valid']['loss']:.4f}", acc("last_word"),
                     acc("last_word_valid"), _f(max(d["max_abs"]), 3) if d.get("max_abs") else "–",
                     _f(claims.variance_growth(d.get("var") or []), 3), ""])
    return rows


def fit_rows(fit: dict) -> list[list[str]]:
    rows = []
    for f in fit["fits"] + fit["fits_nd"]:
        law = "L(N, D)" if "B" in (f.get("params") or {}) or f in fit["fits_nd"] else "L(N)"
        label = f["label"] + (f" ({', '.join(f'{k}={v}' for k, v in f['tokens'].items())})" if f.get("tokens") else "")
        if not f.get("params"):
            rows.append([label, law, "–", "–", "–", f["status"], "–", f["note"]])
            continue
        ci = f.get("ci95") or {}

        def with_ci(k):
            c = ci.get(k)
            return _f(f["params"][k], 3) + (f" [{_f(c[0], 3)}, {_f(c[1], 3)}]" if c else "")

        held = []
        for h in f.get("held_out", []):
            if h.get("predicted") is None:
                held.append(f"{h['cell']}: no prediction")
                continue
            ci_h = h.get("ci95")
            txt = f"{h['cell']}: predicted {h['predicted']:.4f}" + (f" [{ci_h[0]:.4f}, {ci_h[1]:.4f}]" if ci_h else "")
            if h.get("actual") is not None:
                txt += f", actual {h['actual']:.4f} ({100 * h['relative_error']:+.2f}%)"
            held.append(txt)
        extra = ", ".join(f"{k} = {with_ci(k)}" for k in ("B", "beta") if k in f["params"])
        rows.append([label, law, with_ci("E"), with_ci("A"), with_ci("alpha") + (f"; {extra}" if extra else ""),
                     f["status"], "<br>".join(held) or "–", f["note"]])
    return rows


def write_report(sweep: Sweep, out_dir: Path, metric: str = "test_loss", resamples: int = 1000, seed: int = 0,
                 delta: float = 1e-3) -> Path:
    out_dir = Path(out_dir)
    results = collect(sweep)
    if not any(r.evaluation or r.curve for r in results):
        raise ConfigError(f"sweep '{sweep.name}': no cell in {sweep.out} has trained or been evaluated yet; nothing "
                          f"to report (run `python -m pretrain.scaling sweep {sweep.path}`)")
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = size_order(sweep) or sorted({size_label(sweep, r.cell) for r in results})
    size_of = lambda r: size_label(sweep, r.cell)  # noqa: E731
    groups = list(dict.fromkeys(r.label for r in results))
    evaluated = [r for r in results if r.evaluation]
    fit = None
    if evaluated:
        fit = fit_sweep(sweep, metric, resamples, seed, delta, results)
        write_fit(fit, out_dir / FIT_FILE)
    metric_label = METRICS[metric][1]
    figs = {
        "loss_vs_params": plots.loss_vs_params(results, fit, groups, metric, metric_label,
                                               out_dir / "loss_vs_params.png"),
        "metrics_vs_params": plots.metrics_vs_params(results, groups, out_dir / "metrics_vs_params.png"),
        "loss_curves": plots.loss_curves(results, groups, sizes, size_of, out_dir / "loss_curves.png"),
        "variance": plots.depth_panels(
            results, groups, sizes, size_of, lambda e: e["depth"]["var"], out_dir / "depth_variance.png",
            title="Residual-stream variance after each block (final checkpoint, validation probe)",
            ylabel="variance (log scale)", first_layer=0, yscale="log"),
        "max_abs": plots.depth_panels(
            results, groups, sizes, size_of, lambda e: e["depth"]["max_abs"], out_dir / "depth_max_activation.png",
            title="Largest |activation| of the residual stream per layer (final checkpoint)",
            ylabel="max |x| (log scale)", first_layer=0, yscale="log"),
        "angular": plots.depth_panels(
            results, groups, sizes, size_of, lambda e: e["depth"]["angular_distance"],
            out_dir / "depth_angular_distance.png",
            title="Angular distance between the residual stream entering and leaving each block "
                  "(arccos(cos)/π, token mean)", ylabel="angular distance (0 = unchanged)", first_layer=1),
        "removal": plots.depth_panels(
            results, groups, sizes, size_of, lambda e: e["depth"]["removal"]["increase"],
            out_dir / "depth_layer_removal.png",
            title="Loss increase when one block is removed (validation probe)",
            ylabel="loss increase (nats/token, symlog)", first_layer=1, yscale="symlog", hline=0.0),
    }
    lines = [f"# Scaling report: {sweep.name}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} from `{sweep.path}` with cells in `{sweep.out}`: "
             f"{len(evaluated)} of {len(results)} cells evaluated. "
             f"N = non-embedding parameters, D = trained tokens; losses in nats per token on the held-out test split "
             f"unless said otherwise.", ""]
    missing = [r for r in results if r.evaluation is None]
    if missing:
        lines += ["Not in the fits and depth plots yet: " + ", ".join(f"`{r.name}` ({r.why_missing})" for r in missing),
                  ""]
    lines += ["## Setup: model sizes and token budgets", ""]
    lines += _table(["size", "hidden", "layers", "heads", "N (non-embedding)", "all parameters", "steps",
                     "tokens D", "D / N", "batch x seq"], setup_rows(results, sizes, size_of))
    lines += ["", "N differs slightly between placements (Peri-LN has twice the norms); the range is shown.", ""]
    lines += ["## Summary", ""]
    lines += _table(["cell", "group", "size", "N", "D", "test loss", "test bpb", "valid loss", "last word (test)",
                     "last word (valid)", "max |x|", "var growth (last/first block)", "note"],
                    summary_rows(results, size_of))
    lines += ["", "Variance growth = residual variance after the last block / after the first block. Max |x| = "
              "largest residual-stream activation over all layers. Last word: LAMBADA-style accuracy (see the end).",
              ""]
    lines += ["## Scaling-law fits", ""]
    if fit is None:
        lines += ["No cell is evaluated yet: nothing to fit.", ""]
    else:
        held = held_out_rows(fit)
        if held:
            lines += ["### Held-out prediction", "",
                      "Each placement's law is fitted without the held-out cells and predicts them; error = "
                      "(predicted - actual) / actual.", ""]
            lines += _table(["group", "held-out cell", "N", "predicted", "95% interval", "actual", "error",
                             "actual inside interval", "fit status"], held) + [""]
        lines += [f"Fitted to **{fit['metric_description']}**. {fit['method']}.", ""]
        lines += _table(["group", "law", "E", "A", "alpha", "status", "held-out prediction vs actual", "note"],
                        fit_rows(fit))
        lines += [""]
        if fit["nd_note"]:
            lines += [fit["nd_note"] + ".", ""]
    captions = {
        "loss_vs_params": "Final loss against model size with the fitted laws; the held-out cell is predicted "
                          "from the others.",
        "metrics_vs_params": "Bits per byte and last-word accuracy against model size, on the test split (solid) "
                             "and the validation split (dashed).",
        "loss_curves": "Training loss (lines) and validation loss (circles) against tokens.",
        "variance": "Residual-stream variance per layer at the final checkpoint, one panel per size.",
        "max_abs": "Largest activation of the residual stream per layer.",
        "angular": "How far each block turns the residual stream (Gromov et al. 2024); 0 = direction unchanged.",
        "removal": "How much the probe loss rises when one block is skipped; near 0 = the block is redundant, "
                   "below 0 = the model is better without it.",
    }
    for key in ("loss_vs_params", "metrics_vs_params"):
        lines += _figure(figs, key, captions[key])
    checked = claims.check(results, size_of, sizes)
    if checked:
        lines += ["## The placement papers' claims at this scale", "",
                  "Verdicts from the rules stated with each claim, applied to the measured numbers (final checkpoint; "
                  "variance on the validation probe). One seed per cell: loss differences of a few hundredths "
                  "may be within seed-to-seed noise, which this sweep does not measure.", ""]
        for c in checked:
            lines += [f"**{c['claim']}**: {c['verdict']}. Rule: {c['rule']}.", ""]
            lines += _table(c["header"], c["rows"]) + [""]
    if figs.get("loss_curves") is not None:
        lines += ["## Training", ""] + _figure(figs, "loss_curves", captions["loss_curves"])
    if any(figs.get(k) is not None for k in ("variance", "max_abs", "angular", "removal")):
        lines += ["## Depth diagnostics (final checkpoint)", ""]
        for key in ("variance", "max_abs", "angular", "removal"):
            lines += _figure(figs, key, captions[key])
    for key, split in (("last_word_valid", "validation"), ("last_word", "test")):
        examples = _last_word_examples(evaluated, key)
        if examples:
            if key == "last_word_valid" or not _last_word_examples(evaluated, "last_word_valid"):
                lines += ["## Last-word prediction", ""]
            lines += [f"**{split.capitalize()} split.** " + examples[0], ""]
            lines += _table(["passage ends with …", "target", "greedy continuation", "correct"], examples[1]) + [""]
    path = out_dir / "REPORT.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _figure(figs: dict, key: str, caption: str) -> list[str]:
    return [] if figs.get(key) is None else [f"![{caption}]({figs[key].name})", "", caption, ""]


def setup_rows(results: list[CellResult], sizes: list[str], size_of) -> list[list[str]]:
    """One row per size: shape, parameters (range over the groups), steps and token budget."""
    rows = []
    for size in sizes:
        cells = [r for r in results if size_of(r) == size]
        if not cells:
            continue
        m, t = cells[0].cell.config.model, cells[0].cell.config.train
        ns = sorted({r.N for r in cells if r.evaluation})
        totals = sorted({r.evaluation["parameters"] for r in cells if r.evaluation})
        span = lambda v: "–" if not v else _f(v[0]) if v[0] == v[-1] else f"{_f(v[0])}–{_f(v[-1])}"  # noqa: E731
        budgets = sorted({r.cell.tokens for r in cells})
        steps = sorted({r.cell.max_steps for r in cells})
        ratio = f"{budgets[0] / ns[0]:.2g}" if ns and len(budgets) == 1 else "–"
        rows.append([size, str(m.hidden_size), str(m.num_layers), str(m.num_heads), span(ns), span(totals),
                     ", ".join(map(str, steps)), ", ".join(f"{b:,}" for b in budgets), ratio,
                     f"{t.global_batch_size} x {m.seq_len}"])
    return rows


def held_out_rows(fit: dict) -> list[list[str]]:
    rows = []
    for f in fit["fits"] + fit["fits_nd"]:
        for h in f.get("held_out", []):
            if h.get("predicted") is None:
                rows.append([f["label"], h["cell"], "–", "–", "–", "–", "–", "–", f["status"]])
                continue
            ci = h.get("ci95")
            actual = h.get("actual")
            rows.append([f["label"] + (" (N, D)" if f in fit["fits_nd"] else ""), h["cell"], _f(h["N"]),
                         f"{h['predicted']:.4f}", f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "–",
                         "–" if actual is None else f"{actual:.4f}",
                         "–" if actual is None else f"{100 * h['relative_error']:+.2f}%",
                         "–" if h.get("inside_ci") is None else "yes" if h["inside_ci"] else "no", f["status"]])
    return rows


def _last_word_examples(evaluated: list[CellResult], key: str = "last_word"):
    """The method and a few passages with the answers of the cell that scored best (ties: the largest)."""
    with_lw = [r for r in evaluated if r.evaluation.get(key)]
    if not with_lw:
        return None
    r = max(with_lw, key=lambda r: (r.evaluation[key]["accuracy"], r.N))
    lw = r.evaluation[key]
    rows = []
    for e in lw.get("examples", []):
        context = e["context_end"][-70:].replace("\n", " ").replace("|", "\\|")
        cont = e.get("continuation", e.get("prediction", "")).replace("\n", "\\n").replace("|", "\\|")
        rows.append([f"…{context}", f"`{e['target']}`", f"`{cont}`", "yes" if e["correct"] else "no"])
    return (f"{lw['method']} Best: `{r.name}`, {100 * lw['accuracy']:.1f}% ({lw['correct']}/{lw['passages']}); "
            "its first passages:", rows)
