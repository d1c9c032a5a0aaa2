"""The report's figures (matplotlib, Agg backend: no display needed). One function per figure; each
takes the sweep's CellResults (pretrain/scaling/results.py) and writes one PNG.

Colours are fixed per group (placement) across every figure and per size within a group's panel, so a
reader learns them once.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pretrain.scaling import laws

DPI = 110
STYLE = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 8,
    "legend.framealpha": 0.85,
}


def group_colors(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def size_colors(sizes: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("viridis")
    n = max(1, len(sizes) - 1)
    return {s: cmap(0.9 * i / n) for i, s in enumerate(sizes)}


def _human(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _grid(n: int, max_cols: int = 4, width: float = 4.0, height: float = 3.2, sharey: bool = False):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False, sharey=sharey)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _log_params_axis(ax) -> None:
    """Log-x for parameter counts, ticks at 1-2-5 with readable labels (250k, 1M, ...)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("non-embedding parameters N (log scale)")


def _suptitle(fig, title: str) -> None:
    """A figure title wrapped to the figure's width (a one-panel figure is narrow)."""
    import textwrap

    fig.suptitle(textwrap.fill(title, max(40, int(fig.get_figwidth() * 13))), fontsize=11)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loss_curves(results, groups: list[str], sizes: list[str], size_of, path: Path) -> Path | None:
    """Training loss against tokens, one panel per group, one line per size; validation losses as dots.
    One legend for the sizes under the panels (the same colours in every panel)."""
    from matplotlib.lines import Line2D

    with plt.rc_context(STYLE):
        cells = [r for r in results if r.curve]
        if not cells:
            return None
        fig, axes = _grid(len(groups), max_cols=2, width=5.2, height=3.4)
        colors = size_colors(sizes)
        finals = [v for r in cells for _, v in r.curve[-max(1, len(r.curve) // 10) :]]
        early = [r.curve[min(len(r.curve) - 1, max(1, len(r.curve) // 8))][1] for r in cells]
        valid = [v for r in cells for _, v in r.valid_curve]
        lo, hi = min(finals + valid) - 0.15, max(early + valid) + 0.1
        for ax, group in zip(axes, groups, strict=True):
            for r in sorted((r for r in cells if r.label == group), key=lambda r: sizes.index(size_of(r))):
                t, v = zip(*r.curve, strict=True)
                c = colors[size_of(r)]
                ax.plot(np.array(t) / 1e6, v, color=c, lw=1.4)
                if r.valid_curve:
                    vt, vv = zip(*r.valid_curve, strict=True)
                    ax.plot(np.array(vt) / 1e6, vv, "o", color=c, ms=4, mfc="white", mew=1.2)
            ax.set_title(f"{group}")
            ax.set_xlabel("training tokens (millions)")
            ax.set_ylabel("loss (nats/token)")
            ax.set_ylim(lo, hi)
        n_of = {}
        for r in cells:
            if r.evaluation:
                n_of.setdefault(size_of(r), r.N)
        handles = [
            Line2D([], [], color=colors[s], lw=2, label=f"{s}" + (f" (N {_human(n_of[s])})" if s in n_of else ""))
            for s in sizes
            if any(size_of(r) == s for r in cells)
        ]
        handles += [
            Line2D([], [], color="grey", lw=1.4, label="training loss"),
            Line2D([], [], color="grey", ls="", marker="o", mfc="white", label="validation loss"),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False)
        _suptitle(fig, "Training loss by placement and model size")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        return path


def loss_vs_params(
    results, fit: dict | None, groups: list[str], metric: str, metric_label: str, path: Path
) -> Path | None:
    """Final metric against non-embedding parameters with each group's fitted law and the held-out
    cells' predictions (with their interval) next to what they actually reached."""
    with plt.rc_context(STYLE):
        ev = [r for r in results if r.usable]
        if not ev:
            return None
        fig, ax = plt.subplots(figsize=(7.5, 5.0))
        colors = group_colors(groups)
        fits = (fit or {}).get("fits", [])
        budgets = sorted({str(f.get("tokens")) for f in fits})
        held_ns = [h["N"] for f in fits for h in f.get("held_out", []) if h.get("N")]
        all_n = [r.N for r in ev] + held_ns
        n_lo, n_hi = min(all_n) / 1.4, max(all_n) * 1.4
        for group in groups:
            pts = [r for r in ev if r.label == group]
            if pts:
                ax.plot(
                    [r.N for r in pts if not r.held_out],
                    [r.metric(metric) for r in pts if not r.held_out],
                    "o",
                    color=colors[group],
                    ms=6,
                    label=group,
                )
                for r in (r for r in pts if r.held_out):
                    ax.plot([r.N], [r.metric(metric)], "*", color=colors[group], ms=13, mec="black", mew=0.6)
        for f in fits:
            c = colors.get(f["label"], "black")
            if not f.get("params"):
                continue
            p = f["params"]
            budget = f" @ {f['tokens']}" if len(budgets) > 1 else ""
            n = np.logspace(math.log10(n_lo), math.log10(n_hi), 100)
            flag = f" (at bound: {', '.join(f['at_bound'])})" if f.get("at_bound") else ""
            ax.plot(
                n,
                laws.predict(p, n),
                "--",
                color=c,
                lw=1.2,
                label=f"  {f['label']}{budget} fit: {p['E']:.3g} + {p['A']:.3g}·N^-{p['alpha']:.3g}{flag}",
            )
            if f.get("power_law"):
                ax.plot(n, laws.predict_power_law(f["power_law"], n), ":", color=c, lw=1.0)
            for h in f.get("held_out", []):
                if h.get("predicted") is None:
                    continue
                ci = h.get("ci95")
                yerr = None if not ci else [[h["predicted"] - ci[0]], [ci[1] - h["predicted"]]]
                ax.errorbar(
                    [h["N"]], [h["predicted"]], yerr=yerr, fmt="D", color=c, mfc="white", ms=7, capsize=4, lw=1.2
                )
                if h.get("actual") is not None:
                    ax.annotate(
                        f"{100 * h['relative_error']:+.1f}%",
                        (h["N"], h["actual"]),
                        textcoords="offset points",
                        xytext=(9, -3),
                        fontsize=8,
                        color=c,
                    )
        _log_params_axis(ax)
        ax.set_ylabel(metric_label)
        ax.set_title(
            f"Final {metric_label} vs model size: fits of {laws.LN_FORMULA} (dashed), A·N^-alpha "
            "(dotted)\no fitted cells (every seed)   \u25c7 held-out prediction (95% bootstrap interval)   "
            "\u2605 held-out actual",
            fontsize=9,
        )
        ax.legend(loc="upper right")
        return _save(fig, path)


def metrics_vs_params(results, groups: list[str], path: Path) -> Path | None:
    """Bits per byte and last-word accuracy against parameters, per group: test split solid,
    validation split dashed."""
    from matplotlib.lines import Line2D

    with plt.rc_context(STYLE):
        ev = [r for r in results if r.usable]
        if not ev:
            return None
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        colors = group_colors(groups)

        def seed_mean(pts, value):  # one point per size (its seeds share N): the mean over the seeds
            by_n: dict[int, list] = {}
            for r in pts:
                v = value(r)
                by_n.setdefault(r.N, []).append(np.nan if v is None else v)
            ns = sorted(by_n)
            return ns, [np.nan if np.all(np.isnan(by_n[n])) else float(np.nanmean(by_n[n])) for n in ns]

        for group in groups:
            pts = [r for r in ev if r.label == group]
            if not pts:
                continue
            for split, lw_key, style in (("test", "last_word", "o-"), ("valid", "last_word_valid", "s--")):
                n, bpb = seed_mean(pts, lambda r, s=split: r.evaluation.get(s, {}).get("bits_per_byte"))
                a1.plot(n, bpb, style, color=colors[group], ms=4, lw=1.3)
                n, acc = seed_mean(pts, lambda r, k=lw_key: r.evaluation.get(k, {}).get("accuracy"))
                if not np.all(np.isnan(acc)):
                    a2.plot(n, [100 * v for v in acc], style, color=colors[group], ms=4, lw=1.3)
        handles = [Line2D([], [], color=colors[g], lw=2, label=g) for g in groups]
        handles += [
            Line2D([], [], color="grey", ls="-", marker="o", ms=4, label="test split"),
            Line2D([], [], color="grey", ls="--", marker="s", ms=4, label="validation split"),
        ]
        for ax in (a1, a2):
            _log_params_axis(ax)
            ax.legend(handles=handles, fontsize=7)
        a1.set_ylabel("bits per byte")
        a1.set_title("Held-out bits per byte (tokenizer-independent)")
        a2.set_ylabel("last-word accuracy (%)")
        a2.set_title("LAMBADA-style last-word accuracy (greedy)")
        a2.set_ylim(bottom=0)
        return _save(fig, path)


def depth_panels(
    results,
    groups: list[str],
    sizes: list[str],
    size_of,
    key,
    path: Path,
    *,
    title: str,
    ylabel: str,
    first_layer: int,
    yscale: str = "linear",
    hline: float | None = None,
    linthresh: float = 1e-2,
    init_key=None,
) -> Path | None:
    """One panel per size, one line per group and seed: a per-layer statistic against depth. `key(evaluation)`
    gives the list; `first_layer` is the index of its first value (0: embedding output, 1: block 1);
    `init_key(evaluation)`, when given, the same statistic at initialization (dashed)."""
    with plt.rc_context(STYLE):
        ev = [r for r in results if r.usable and r.evaluation.get("depth")]
        present = [s for s in sizes if any(size_of(r) == s for r in ev)]
        if not present:
            return None
        # One y scale for every size, so magnitudes compare across panels.
        fig, axes = _grid(len(present), max_cols=5, width=3.4, height=3.0, sharey=True)
        colors = group_colors(groups)
        for ax, size in zip(axes, present, strict=True):
            layers = 0
            for group in groups:
                for i, r in enumerate(r for r in ev if r.label == group and size_of(r) == size):
                    values = key(r.evaluation)
                    xs = np.arange(first_layer, first_layer + len(values))
                    layers = max(layers, int(xs[-1]))
                    ax.plot(xs, values, "o-", color=colors[group], ms=3, lw=1.3, label=None if i else group)
                    initial = init_key(r.evaluation) if init_key else None
                    if initial:
                        ax.plot(xs, initial, "--", color=colors[group], lw=0.9, alpha=0.8)
            if hline is not None:
                ax.axhline(hline, color="grey", lw=0.8, ls=":")
            if yscale == "symlog":  # linear around 0 (negative values stay visible), logarithmic beyond
                ax.set_yscale("symlog", linthresh=linthresh)
            else:
                ax.set_yscale(yscale)
            ax.set_title(f"size {size}")
            ax.set_xlabel("layer (0 = embedding output)" if first_layer == 0 else "block")
            ax.set_xticks(range(first_layer, layers + 1, max(1, (layers + 1) // 8)))
        axes[0].set_ylabel(ylabel)
        axes[0].legend()
        _suptitle(fig, title)
        return _save(fig, path)


def lr_sweep(rows: list[dict], groups: list[str], sizes: list[str], chosen: dict, path: Path) -> Path | None:
    """Final validation loss against the learning rate, one panel per searched size, one line per group;
    a diverged run is an x at the loss at initialization (the dotted line), where the LR sensitivity
    counts it; the learning rate each group trains the study at is circled."""
    from matplotlib.lines import Line2D

    with plt.rc_context(STYLE):
        present = [s for s in sizes if any(r["size"] == s for r in rows)]
        if not present:
            return None
        fig, axes = _grid(len(present), max_cols=3, width=4.6, height=3.6, sharey=True)
        colors = group_colors(groups)
        for ax, size in zip(axes, present, strict=True):
            for row in (r for r in rows if r["size"] == size):
                c = colors.get(row["group"], "black")
                lrs = np.array(row["lrs"])
                losses = np.array([np.nan if x is None else min(x, row["initial_loss"]) for x in row["losses"]])
                ax.plot(
                    lrs,
                    losses,
                    "o-",
                    color=c,
                    ms=4,
                    lw=1.4,
                    label=f"{row['group']} (sensitivity {row['sensitivity']:.3f})",
                )
                div = np.array(row["diverged"])
                if div.any():
                    ax.plot(lrs[div], [row["initial_loss"]] * int(div.sum()), "x", color=c, ms=8, mew=2)
                best = chosen.get(row["group"])
                if best in row["lrs"] and row["losses"][row["lrs"].index(best)] is not None:
                    ax.plot([best], [row["losses"][row["lrs"].index(best)]], "o", ms=12, mfc="none", mec=c, mew=1.5)
                ax.axhline(row["initial_loss"], color="grey", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("peak learning rate (log scale)")
            ax.set_title(f"size {size}")
        extra = [
            Line2D([], [], color="grey", ls=":", label="loss at initialization L0"),
            Line2D([], [], color="grey", ls="", marker="x", mew=2, label="diverged (counted as L0)"),
            Line2D([], [], color="grey", ls="", marker="o", ms=10, mfc="none", label="the study's learning rate"),
        ]
        for i, ax in enumerate(axes):
            handles, _ = ax.get_legend_handles_labels()
            ax.legend(handles=handles + (extra if i == 0 else []), fontsize=7)
        axes[0].set_ylabel("final validation loss (nats/token)")
        _suptitle(
            fig,
            "Learning-rate sweep: final validation loss per placement (LR sensitivity of Wortsman et al. "
            "2023 in the legend)",
        )
        return _save(fig, path)


def growth_across_sizes(results, groups: list[str], path: Path) -> Path | None:
    """How depth growth changes with model size: the variance after the last block (left) and the
    growth relative to linear, var_L / (var_0 + L (var_1 - var_0)) (right), against N; every seed a dot, final
    checkpoint solid, initialization dashed."""
    from pretrain.scaling.growth import linear_ratio

    with plt.rc_context(STYLE):
        ev = [r for r in results if r.usable and r.evaluation.get("depth")]
        if not ev:
            return None
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
        colors = group_colors(groups)
        for group in groups:
            pts = [r for r in ev if r.label == group]
            if not pts:
                continue
            c = colors[group]
            for which, style in (("final", "-"), ("init", "--")):
                get = (
                    (lambda r: r.evaluation["depth"]["var"])
                    if which == "final"
                    else (lambda r: ((r.evaluation.get("init") or {}).get("depth") or {}).get("var"))
                )
                by_n: dict[int, list] = {}
                for r in pts:
                    var = get(r)
                    if var and len(var) > 2:
                        by_n.setdefault(r.N, []).append((var[-1], linear_ratio(var)))
                if not by_n:
                    continue
                ns = sorted(by_n)
                for ax, k in ((a1, 0), (a2, 1)):
                    ax.plot(
                        ns,
                        [np.mean([v[k] for v in by_n[n]]) for n in ns],
                        style,
                        color=c,
                        lw=1.3,
                        label=f"{group} ({which})",
                    )
                    for n in ns:
                        ax.plot(
                            [n] * len(by_n[n]),
                            [v[k] for v in by_n[n]],
                            "o",
                            color=c,
                            ms=3,
                            mfc=c if which == "final" else "white",
                        )
        for ax in (a1, a2):
            _log_params_axis(ax)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        a1.set_ylabel("variance after the last block")
        a1.set_title("Last-layer residual variance vs size")
        a2.axhline(1.0, color="grey", ls=":", lw=0.8)
        a2.set_ylabel("var_L / (var_0 + L (var_1 - var_0))   (1 = linear)")
        a2.set_title("Variance growth through depth, relative to linear")
        return _save(fig, path)
