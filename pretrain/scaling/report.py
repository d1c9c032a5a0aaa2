"""`python -m pretrain.scaling report`: REPORT.md, its PNGs and summary.json for a sweep, in one
directory that can be committed as it is (images referenced by relative paths).

What it shows, in order: the headline table (each placement at its best learning rate, validation
loss as mean +- sd over seeds per size, test bits per byte as a second figure); the claims' verdicts;
the learning-rate sweep (plot, chosen rates, LR sensitivity); the scaling-law fits with the held-out
prediction next to the 2-parameter power law and the naive baseline; the depth diagnostics (variance
at initialization and at the end, its growth through depth and across sizes, angular distance,
removal cost); training curves; the recipe of every cell; every cell's figures; the compute it took.
Cells not evaluated yet are listed, not silently dropped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from pretrain.config import ConfigError
from pretrain.fsutil import atomic_write_text
from pretrain.scaling import claims, hparam_laws, lrsearch, plots, summary
from pretrain.scaling.fit import DEFAULT_METRIC, FIT_FILE, fit_sweep, held_out_summary, write_fit
from pretrain.scaling.growth import growth_summary
from pretrain.scaling.results import METRICS, CellResult, collect, group_label, seed_noise, size_label, size_order


def _f(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and abs(v) >= 1e4):
        return plots._human(v)
    return f"{v:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _figure(figs: dict, key: str, caption: str) -> list[str]:
    return [] if figs.get(key) is None else [f"![{caption}]({figs[key].name})", "", caption, ""]


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def headline_rows(study: list[CellResult], sizes: list[str], size_of, groups: list[str], metric: str) -> list:
    rows = []
    for size in sizes:
        cells = [r for r in study if size_of(r) == size]
        usable = [r for r in cells if r.usable]
        if not cells:
            continue
        row = [
            size + (" (held out)" if any(r.held_out for r in cells) else ""),
            _f(usable[0].N) if usable else "–",
            f"{usable[0].D / usable[0].N:.1f}" if usable else "–",
        ]
        for g in groups:
            mine = [r for r in cells if r.label == g]
            diverged = sum(r.diverged for r in mine)
            text = _mean_sd([r.metric(metric) for r in mine if r.usable])
            row.append(text + (f", {diverged} diverged" if diverged else ""))
        rows.append(row)
    return rows


def recipe_rows(study: list[CellResult], sizes: list[str], size_of, groups: list[str]) -> list:
    """One row per (size, group): every seed of it shares the recipe (checked: a difference is shown)."""
    rows = []
    for size in sizes:
        for g in groups:
            cells = [r for r in study if size_of(r) == size and r.label == g]
            if not cells:
                continue
            recipes = [summary.recipe(r.cell) for r in cells]
            rec = recipes[0]
            same = all(x == rec for x in recipes)
            emb = rec["embedding_weight_decay"]
            n = cells[0].N if cells[0].evaluation else None
            rows.append(
                [
                    size,
                    g,
                    ", ".join(str(r.seed) for r in cells),
                    f"{rec['lr']:.3g}",
                    str(rec["warmup_steps"]),
                    f"{rec['schedule']} to {rec['min_lr_ratio']:g}x",
                    f"{rec['global_batch_size']} x {rec['seq_len']}",
                    str(rec["steps"]),
                    f"{rec['tokens']:,}",
                    f"{rec['tokens'] / n:.1f}" if n else "–",
                    f"{rec['weight_decay']:g}",
                    "–" if emb is None else "yes" if emb else "no",
                    f"{rec['grad_clip']:g}",
                    f"{rec['betas'][0]:g}/{rec['betas'][1]:g}",
                    rec["precision"] + ("" if same else " (seeds differ!)"),
                ]
            )
    return rows


def growth_rows(study: list[CellResult], sizes: list[str], size_of, groups: list[str]) -> list:
    """Per size and group (seed means): ln-variance slope and growth relative to linear, at
    initialization and at the end, and the last layer's variance."""
    rows = []
    for size in sizes:
        for g in groups:
            cells = [r for r in study if size_of(r) == size and r.label == g and r.usable and r.evaluation.get("depth")]
            if not cells:
                continue
            final = [growth_summary(r.evaluation["depth"]["var"]) for r in cells]
            init = [
                growth_summary(r.evaluation["init"]["depth"]["var"])
                for r in cells
                if (r.evaluation.get("init") or {}).get("depth")
            ]

            def mean(items, key):
                v = [x[key] for x in items if x.get(key) is not None]
                return float(np.mean(v)) if v else None

            rows.append(
                [
                    size,
                    g,
                    str(cells[0].evaluation["num_layers"]),
                    _f(mean(init, "log_slope"), 3),
                    _f(mean(final, "log_slope"), 3),
                    _f(mean(init, "linear_ratio"), 3),
                    _f(mean(final, "linear_ratio"), 3),
                    _f(mean(init, "last"), 3),
                    _f(mean(final, "last"), 3),
                ]
            )
    return rows


def cell_rows(results: list[CellResult], size_of) -> list[list[str]]:
    rows = []
    for r in results:
        ev = r.evaluation
        role = "study" if r.cell.study else "LR search"
        name = f"`{r.name}`" + (" (held out)" if r.held_out else "")
        head = [name, role, r.label, size_of(r), f"{r.lr:.3g}"]
        if ev is None:
            rows.append(head + ["–"] * 6 + [r.why_missing])
        elif r.diverged and not ev.get("valid"):
            why = f"diverged: {ev.get('diverged_reason', '')}"
            rows.append(head + [_f(r.N), "–", "–", "–", "–", _f(r.initial_loss), why])
        else:
            losses = [f"{r.metric(m):.4f}" for m in ("valid_loss", "test_loss", "test_bpb")]
            why = "diverged: " + ev.get("diverged_reason", "") if r.diverged else ""
            rows.append(head + [_f(r.N), _f(r.D), *losses, _f(r.initial_loss), why])
    return rows


def fit_rows(fit: dict) -> list[list[str]]:
    rows = []
    for f in fit["fits"] + fit["fits_nd"]:
        law = "L(N, D)" if f in fit["fits_nd"] else "L(N)"
        if not f.get("params"):
            rows.append([f["label"], law, "–", "–", "–", f["status"], f["note"]])
            continue
        with_ci = lambda k, f=f: _with_ci(f, k)
        extra = ", ".join(f"{k} = {with_ci(k)}" for k in ("B", "beta") if k in f["params"])
        rows.append(
            [
                f["label"],
                law,
                with_ci("E"),
                with_ci("A"),
                with_ci("alpha") + (f"; {extra}" if extra else ""),
                f["status"] + (f" (at bound: {', '.join(f['at_bound'])})" if f.get("at_bound") else ""),
                f["note"],
            ]
        )
    return rows


def _with_ci(f: dict, k: str) -> str:
    c = (f.get("ci95") or {}).get(k)
    return _f(f["params"][k], 3) + (f" [{_f(c[0], 3)}, {_f(c[1], 3)}]" if c else "")


def held_out_rows(fit: dict) -> list[list[str]]:
    rows = []
    for f in fit["fits"]:
        for h in f.get("held_out", []):
            if h.get("actual") is None:
                rows.append([f["label"], h["size"], "–", "–", "–", "–", "–", "–", h.get("note", "")])
                continue
            ci = h.get("ci95")
            pct = lambda v: f"{100 * v:+.2f}%"
            winner = {"law": "law", "power_law": "power law", "naive": "naive"}[h["winner"]]
            if h.get("winner_resolved") is False:
                winner += " (not resolved)"
            rows.append(
                [
                    f["label"] + (f" (at bound: {', '.join(f['at_bound'])})" if f.get("at_bound") else ""),
                    h["size"],
                    _mean_sd(h["actual_seeds"]),
                    f"{h['predicted']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""),
                    pct(h["relative_error"]),
                    pct(h["power_law"]["relative_error"]) if h.get("power_law") else "–",
                    pct(h["naive"]["relative_error"]) if h.get("naive") else "–",
                    winner,
                    "yes" if h.get("inside_ci") else "no" if h.get("inside_ci") is False else "–",
                ]
            )
    return rows


def train_seconds(cell_dir: Path) -> float:
    """Seconds spent in training steps (metrics.jsonl: step_time x steps per logged interval)."""
    path = cell_dir / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    steps: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "lr" in r and r.get("step_time") is not None:
            steps[int(r["step"])] = float(r["step_time"])  # a resumed run logs some steps twice: the last wins
    total, previous = 0.0, 0
    for step in sorted(steps):
        total += steps[step] * (step - previous)
        previous = step
    return total


def _vocabulary(results: list[CellResult]) -> str:
    sizes = sorted({r.evaluation["vocab_size"] for r in results if r.evaluation and "vocab_size" in r.evaluation})
    return f" of a {', '.join(map(str, sizes))}-token vocabulary" if sizes else ""


def compute_line(sweep, results: list[CellResult]) -> str:
    cpus = sweep.resources.cell_cpus()
    train = sum(train_seconds(r.dir) for r in results) * cpus / 3600
    evaluation = sum((r.evaluation or {}).get("seconds", 0.0) for r in results) * cpus / 3600
    return (
        f"Compute: {train:.2f} CPU-hours of training steps and {evaluation:.2f} of evaluation "
        f"({cpus} CPU(s) per cell; process start-up and checkpointing not counted)."
    )


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is under it (reports are committed)."""
    path = Path(path)
    try:
        return f"`{path.resolve().relative_to(Path.cwd())}`"
    except ValueError:
        return f"`{path}`"


def lr_section(
    sweep, results: list[CellResult], sizes: list[str], size_of, groups: list[str], out_dir: Path, figs: dict
) -> tuple[list[str], dict]:
    table = lrsearch.sensitivity_table(results, size_of)
    choices = lrsearch.choice_record(sweep.lr_choices)
    source = None
    if sweep.lr_from:
        source = _shown_path(sweep.lr_from.sweep)
        if sweep.lr_from.out is not None:
            source += f" (its cells in {_shown_path(sweep.lr_from.out)})"
    record = {"choices": choices, "sensitivity": table, "source": source}
    if not choices:
        return [], record
    chosen = {group_label(tuple(c["group"].items())): c["lr"] for c in choices}
    figs["lr_sweep"] = plots.lr_sweep(table, groups, sizes, chosen, out_dir / "lr_sweep.png")
    lines = ["## Learning rates", ""]
    if sweep.lr_from:
        lines += [f"Each placement trains at the best learning rate of the LR search of {source}.", ""]
    else:
        s = sweep.lr_search
        lines += [
            f"LR search: `train.lr` in {', '.join(f'{v:g}' for v in s.values)} at "
            + ", ".join(f"{a} in {{{', '.join(v)}}}" for a, v in s.at.items())
            + f"; one best learning rate per {', '.join(s.per) or 'sweep'}: the grid value with the lowest "
            "mean of min(final validation loss, L0) over the searched cells (a diverged run counts as L0, "
            "the loss at initialization). Every study cell then trains at its group's best rate; the "
            "searched cells at that rate are study cells too (their loss is slightly favoured by the "
            "selection).",
            "",
        ]
        unsearched = [size for size in sizes if not any(size in v for v in s.at.values())]
        if unsearched and any(len(v) for v in s.at.values()):
            lines += [
                f"The rate is held fixed at the unsearched sizes ({', '.join(unsearched)}). Where a placement's "
                "best rate moves with size (the per-size optima in the tables below), its larger cells train "
                "off their optimum, so a difference between placements at those sizes can be the rate's "
                "transfer rather than the placement's; a claim decided only there says so by naming the sizes.",
                "",
            ]
    rows = []
    for c in choices:
        best = next((t for t in c["table"] if t["lr"] == c["lr"]), None)
        rows.append(
            [
                c["label"],
                "pending: " + c["pending"] if c["pending"] else f"{c['lr']:.3g}",
                "yes: widen the grid" if c["at_edge"] else "no",
                f"{best['mean_capped_loss']:.4f}" if best else "–",
                ", ".join(
                    f"{t['lr']:.3g}: {t['mean_capped_loss']:.4f}"
                    + (f" ({t['diverged']} diverged)" if t["diverged"] else "")
                    for t in c["table"]
                ),
            ]
        )
    lines += _table(
        ["group", "best lr", "at the grid's edge", "mean capped loss", "every lr: mean capped loss"], rows
    ) + [""]
    if table:
        lines += _figure(
            figs,
            "lr_sweep",
            "Final validation loss against the learning rate, per searched size; x = "
            "diverged (counted at L0, dotted); circled: the study's rate.",
        )
        sens_rows = []
        for size in [s for s in sizes if any(t["size"] == s for t in table)]:
            by_group = {t["group"]: t for t in table if t["size"] == size}
            sens_rows.append(
                [size]
                + [
                    f"{by_group[g]['sensitivity']:.4f} (best {by_group[g]['best_lr']:.3g})"
                    if g in by_group and by_group[g]["best_lr"]
                    else "–"
                    for g in groups
                ]
            )
        lines += [
            "LR sensitivity (Wortsman et al. 2023): E over the grid of [min(L(lr), L0) - min_lr L(lr)], "
            "in nats; 0 = every rate of the grid is as good as the best.",
            "",
        ]
        lines += _table(["size"] + groups, sens_rows) + [""]
    lines += law_comparison_lines(results, groups)
    return lines, record


def law_comparison_lines(results: list[CellResult], groups: list[str]) -> list[str]:
    """The Step Law's lr* and B* next to the laws fitted on the LR search, one table per group (a law is
    a property of the architecture: placements are not pooled)."""
    searched = [r for r in results if r.cell.search and r.evaluation]
    if not searched:
        return []
    lines = [
        "### The paper's learning-rate law against the search",
        "",
        "The LR search is the data for our own lr*(N, D) law (pretrain/scaling/hparam_laws.py); the paper's "
        "law was fitted on much larger models, so this checks how far it transfers down to these sizes.",
        "",
    ]
    for g in groups:
        points = hparam_laws.points_from_results([r for r in searched if r.label == g])
        if points:
            lines += hparam_laws.comparison_lines(hparam_laws.fit_laws(points), title=f"#### {g}")
    return lines


def write_report(
    sweep, out_dir: Path, metric: str = DEFAULT_METRIC, resamples: int = 1000, seed: int = 0, delta: float = 1e-3
) -> Path:
    out_dir = Path(out_dir)
    results = collect(sweep)
    if not any(r.evaluation or r.curve for r in results):
        raise ConfigError(
            f"sweep '{sweep.name}': no cell in {sweep.out} has trained or been evaluated yet; nothing "
            f"to report (run `python -m pretrain.scaling sweep {sweep.path}`)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = size_order(sweep) or sorted({size_label(sweep, r.cell) for r in results})
    size_of = lambda r: size_label(sweep, r.cell)
    study = [r for r in results if r.cell.study]
    groups = list(dict.fromkeys(r.label for r in results))
    evaluated = [r for r in study if r.evaluation]
    metric_label = METRICS[metric][1]
    fit = None
    if evaluated and sweep.kind == "scaling":
        fit = fit_sweep(sweep, metric, resamples, seed, delta, results)
        write_fit(fit, out_dir / FIT_FILE)
    checked = claims.check(results, size_of, sizes, metric)
    figs: dict = {}
    lr_lines, lr_record = lr_section(sweep, results, sizes, size_of, groups, out_dir, figs)
    var = lambda e: e["depth"]["var"]
    figs.update(
        {
            "loss_vs_params": plots.loss_vs_params(
                study, fit, groups, metric, metric_label, out_dir / "loss_vs_params.png"
            )
            if fit
            else None,
            "metrics_vs_params": plots.metrics_vs_params(study, groups, out_dir / "metrics_vs_params.png"),
            "loss_curves": plots.loss_curves(study, groups, sizes, size_of, out_dir / "loss_curves.png"),
            "variance": plots.depth_panels(
                study,
                groups,
                sizes,
                size_of,
                var,
                out_dir / "depth_variance.png",
                title="Residual-stream variance after each block: final checkpoint (solid), initialization (dashed)",
                ylabel="variance (log scale)",
                first_layer=0,
                yscale="log",
                init_key=lambda e: ((e.get("init") or {}).get("depth") or {}).get("var"),
            ),
            "growth": plots.growth_across_sizes(study, groups, out_dir / "depth_growth_vs_size.png"),
            "max_abs": plots.depth_panels(
                study,
                groups,
                sizes,
                size_of,
                lambda e: e["depth"]["max_abs"],
                out_dir / "depth_max_activation.png",
                title="Largest |activation| of the residual stream per layer (final checkpoint)",
                ylabel="max |x| (log scale)",
                first_layer=0,
                yscale="log",
            ),
            "angular": plots.depth_panels(
                study,
                groups,
                sizes,
                size_of,
                lambda e: e["depth"]["angular_distance"],
                out_dir / "depth_angular_distance.png",
                title="Angular distance between the residual stream entering and leaving each block "
                "(arccos(cos)/π, token mean)",
                ylabel="angular distance (0 = unchanged)",
                first_layer=1,
            ),
            "removal": plots.depth_panels(
                study,
                groups,
                sizes,
                size_of,
                lambda e: e["depth"]["removal"]["increase"],
                out_dir / "depth_layer_removal.png",
                title="Loss increase when one block is removed (validation probe)",
                ylabel="loss increase (nats/token, symlog)",
                first_layer=1,
                yscale="symlog",
                hline=0.0,
            ),
        }
    )
    seeds = sorted({r.seed for r in study})
    lines = [
        f"# {'Depth' if sweep.kind == 'depth' else 'Scaling'} report: {sweep.name}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from `{sweep.path}` with cells in `{sweep.out}`: "
        f"{len(evaluated)} of {len(study)} study cells evaluated"
        + (
            f", {sum(1 for r in results if r.cell.search and r.evaluation)} of "
            f"{sum(1 for r in results if r.cell.search)} LR-search cells"
            if any(r.cell.search for r in results)
            else ""
        )
        + f"; seeds {', '.join(map(str, seeds)) or 'none evaluated yet'}. N = non-embedding parameters, "
        f"D = trained tokens; losses in nats per token{_vocabulary(results)}. " + compute_line(sweep, results),
        "",
    ]
    missing = [r for r in study if r.evaluation is None]
    if missing:
        lines += ["Not evaluated yet: " + ", ".join(f"`{r.name}` ({r.why_missing})" for r in missing), ""]
    if sweep.waiting:
        lines += [
            "Waiting for their best learning rate: "
            + ", ".join(f"{', '.join(f'{a}={v}' for a, v in k)} ({n} cells)" for k, n in sweep.waiting.items()),
            "",
        ]
    lines += [
        "## Headline: each placement at its best learning rate",
        "",
        f"{metric_label.capitalize()}, mean ± sd over seeds"
        + (" (the held-out size is not in the fits):" if sweep.kind == "scaling" else ":"),
        "",
    ]
    header = ["size", "N", "D/N"] + groups
    lines += _table(header, headline_rows(study, sizes, size_of, groups, metric)) + [""]
    lines += ["Test split (State of the Union 2000-2026, never trained on), bits per byte:", ""]
    lines += _table(header, headline_rows(study, sizes, size_of, groups, "test_bpb")) + [""]
    per_size = [(size, seed_noise(results, metric, size_of, size=size)) for size in sizes]
    per_size = [(size, n) for size, n in per_size if n.sd is not None]
    n = max(1, len(seeds))
    lines += [
        (
            f"Seed-to-seed spread of the {metric_label} per size, pooled over the placements (it shrinks with "
            f"size, so each size is judged by its own): a difference between two cells' means of n = {n} seeds "
            "is resolved when it exceeds t x sd x sqrt(2/n), t the 95% Student-t quantile at the sd's degrees "
            "of freedom: "
            + "; ".join(
                f"{size} sd {ns.sd:.4f} ({ns.dof} dof), resolved beyond {ns.difference_threshold(n, n):.4f}"
                for size, ns in per_size
            )
            + "."
        )
        if per_size
        else "One seed per cell: the seed-to-seed spread is not measured and no difference is resolved.",
        "",
    ]
    lines += [
        "## The papers' claims at this scale",
        "",
        "Each verdict follows the rule stated with it (pretrain/scaling/claims.py): a difference counts only "
        "when it exceeds t standard errors (95% Student-t at the spread's degrees of freedom) from the "
        "seed-to-seed spread of the same number at the same size. A claim holds when the mean over the sizes "
        "is resolved as claimed and no size is resolved against it; the sizes where it is resolved either way "
        "are named.",
        "",
    ]
    lines += _table(
        ["claim", "source", "verdict", "decided by"],
        [[c["claim"], c["source"], f"**{c['verdict']}**", c["decided_by"]] for c in checked],
    ) + [""]
    lines += lr_lines
    if fit is not None:
        lines += fit_section(fit, figs)
    lines += depth_section(study, sizes, size_of, groups, figs)
    lines += ["## Evidence for each claim", ""]
    for c in checked:
        parts = [f"**{c['claim']}** ({c['source']}): {c['verdict']}"]
        parts += [f"Rule: {c['rule']}"] * bool(c["rule"]) + [c["spread"]] * bool(c["spread"])
        lines += [". ".join(parts) + ".", ""]
        if c["rows"]:
            lines += _table(c["header"], c["rows"]) + [""]
    if figs.get("loss_curves") is not None:
        lines += ["## Training", ""] + _figure(
            figs, "loss_curves", "Training loss (lines) and validation loss (circles) against tokens, every seed."
        )
    lines += [
        "## Recipe of every cell",
        "",
        "One row per size and placement (its seeds share it). Warmup is linear; the schedule decays to the "
        "given fraction of the peak; embedding decay: whether weight decay applies to the token embedding "
        "(– = this version of the trainer has no such switch).",
        "",
    ]
    lines += _table(
        [
            "size",
            "group",
            "seeds",
            "lr",
            "warmup",
            "schedule",
            "batch x seq",
            "steps",
            "tokens",
            "D/N",
            "weight decay",
            "embedding decay",
            "grad clip",
            "betas",
            "precision",
        ],
        recipe_rows(study, sizes, size_of, groups),
    ) + [""]
    lines += ["## Every cell", ""]
    lines += _table(
        ["cell", "role", "group", "size", "lr", "N", "D", "valid loss", "test loss", "test bpb", "L0", "note"],
        cell_rows(results, size_of),
    ) + [""]
    for key, split in (("last_word_valid", "validation"), ("last_word", "test")):
        examples = _last_word_examples([r for r in evaluated if r.usable], key)
        if examples:
            if key == "last_word_valid" or not _last_word_examples(
                [r for r in evaluated if r.usable], "last_word_valid"
            ):
                lines += ["## Last-word prediction", ""]
            lines += [f"**{split.capitalize()} split.** " + examples[0], ""]
            lines += _table(["passage ends with …", "target", "greedy continuation", "correct"], examples[1]) + [""]
    path = out_dir / "REPORT.md"
    atomic_write_text(path, "\n".join(lines))
    summary.write(summary.build(results, size_of, fit, checked, lr_record), out_dir)
    return path


def fit_section(fit: dict, figs: dict) -> list[str]:
    lines = ["## Scaling-law fits", "", f"Fitted to **{fit['metric_description']}**. {fit['method']}.", ""]
    held = held_out_rows(fit)
    if held:
        lines += [
            "### Held-out size: the law against the 2-parameter power law and the naive baseline",
            "",
            "Relative error = (predicted - actual) / actual, actual = the mean of the held-out size's seeds. "
            "Naive: the largest fitted size's loss. Best: the smallest |error|; not resolved when the two "
            "best differ by less than 2 standard errors of the actual mean.",
            "",
        ]
        lines += _table(
            [
                "placement",
                "held-out size",
                "actual (mean ± sd)",
                "law [95% interval]",
                "law error",
                "power-law error",
                "naive error",
                "best",
                "actual inside interval",
            ],
            held,
        ) + [""]
        lines += [f"- {f['label']}: " + held_out_summary(h) for f in fit["fits"] for h in f["held_out"]] + [""]
    lines += _table(["group", "law", "E", "A", "alpha", "status", "note"], fit_rows(fit)) + [""]
    if fit["nd_note"]:
        lines += [fit["nd_note"] + ".", ""]
    lines += _figure(
        figs,
        "loss_vs_params",
        "Final loss against size with the fitted laws; the held-out size is predicted from the others.",
    )
    lines += _figure(
        figs,
        "metrics_vs_params",
        "Bits per byte and last-word accuracy against size (seed means), "
        "test split (solid) and validation split (dashed).",
    )
    return lines


def depth_section(study, sizes, size_of, groups, figs) -> list[str]:
    lines = [
        "## Depth",
        "",
        "Residual-stream variance after each block on a fixed validation probe, at initialization (the "
        "cell's model rebuilt from its config and seed) and at the final checkpoint. Growth through depth: "
        "the slope of ln(variance) over blocks 1..L (the growth rate per block) and var_L / (var_0 + L (var_1 - "
        "var_0)), the last layer against linear growth at the first block's increment, "
        "which is 1 for linear growth (Peri-LN adds one normalized output per block, so about linear is its "
        "expectation), above 1 for faster growth (the papers' claim for Pre-LN), below for slower (LNS). Seed "
        "means.",
        "",
    ]
    rows = growth_rows(study, sizes, size_of, groups)
    if rows:
        lines += _table(
            [
                "size",
                "group",
                "layers",
                "ln-var slope (init)",
                "ln-var slope (final)",
                "vs linear (init)",
                "vs linear (final)",
                "last-layer var (init)",
                "last-layer var (final)",
            ],
            rows,
        ) + [""]
    captions = {
        "variance": "Residual-stream variance per layer, one panel per size: final (solid), initialization (dashed).",
        "growth": "Across sizes: the last layer's variance and the growth relative to linear, per placement.",
        "max_abs": "Largest activation of the residual stream per layer.",
        "angular": "How far each block turns the residual stream (Gromov et al. 2024); 0 = direction unchanged.",
        "removal": "How much the probe loss rises when one block is skipped; near 0 = the block is redundant, "
        "below 0 = the model is better without it.",
    }
    for key in ("variance", "growth", "angular", "removal", "max_abs"):
        lines += _figure(figs, key, captions[key])
    return lines


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
    return (
        f"{lw['method']} Best: `{r.name}`, {100 * lw['accuracy']:.1f}% ({lw['correct']}/{lw['passages']}); "
        "its first passages:",
        rows,
    )
