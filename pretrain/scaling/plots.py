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
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from pretrain.scaling import laws  # noqa: E402

DPI = 110
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "legend.framealpha": 0.85}


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
        finals = [v for r in cells for _, v in r.curve[-max(1, len(r.curve) // 10):]]
        early = [r.curve[min(len(r.curve) - 1, max(1, len(r.curve) // 8))][1] for r in cells]
        valid = [v for r in cells for _, v in r.valid_curve]
        lo, hi = min(finals + valid) - 0.15, max(early + valid) + 0.1
        for ax, group in zip(axes, groups):
            for r in sorted((r for r in cells if r.label == group), key=lambda r: sizes.index(size_of(r))):
                t, v = zip(*r.curve)
                c = colors[size_of(r)]
                ax.plot(np.array(t) / 1e6, v, color=c, lw=1.4)
                if r.valid_curve:
                    vt, vv = zip(*r.valid_curve)
                    ax.plot(np.array(vt) / 1e6, vv, "o", color=c, ms=4, mfc="white", mew=1.2)
            ax.set_title(f"{group}")
            ax.set_xlabel("training tokens (millions)")
            ax.set_ylabel("loss (nats/token)")
            ax.set_ylim(lo, hi)
        n_of = {}
        for r in cells:
            if r.evaluation:
                n_of.setdefault(size_of(r), r.N)
        handles = [Line2D([], [], color=colors[s], lw=2,
                          label=f"{s}" + (f" (N {_human(n_of[s])})" if s in n_of else ""))
                   for s in sizes if any(size_of(r) == s for r in cells)]
        handles += [Line2D([], [], color="grey", lw=1.4, label="training loss"),
                    Line2D([], [], color="grey", ls="", marker="o", mfc="white", label="validation loss")]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False)
        _suptitle(fig, "Training loss by placement and model size")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        return path


def loss_vs_params(results, fit: dict | None, groups: list[str], metric: str, metric_label: str,
                   path: Path) -> Path | None:
    """Final metric against non-embedding parameters with each group's fitted law and the held-out
    cells' predictions (with their interval) next to what they actually reached."""
    with plt.rc_context(STYLE):
        ev = [r for r in results if r.evaluation]
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
                ax.plot([r.N for r in pts if not r.held_out], [r.metric(metric) for r in pts if not r.held_out],
                        "o", color=colors[group], ms=6, label=group)
                for r in (r for r in pts if r.held_out):
                    ax.plot([r.N], [r.metric(metric)], "*", color=colors[group], ms=13, mec="black", mew=0.6)
        for f in fits:
            c = colors.get(f["label"], "black")
            if not f.get("params"):
                continue
            p = f["params"]
            budget = f" @ {f['tokens']}" if len(budgets) > 1 else ""
            n = np.logspace(math.log10(n_lo), math.log10(n_hi), 100)
            ax.plot(n, laws.predict(p, n), "--", color=c, lw=1.2,
                    label=f"  {f['label']}{budget} fit: {p['E']:.3g} + {p['A']:.3g}·N^-{p['alpha']:.3g}")
            for h in f.get("held_out", []):
                if h.get("predicted") is None:
                    continue
                ci = h.get("ci95")
                yerr = None if not ci else [[h["predicted"] - ci[0]], [ci[1] - h["predicted"]]]
                ax.errorbar([h["N"]], [h["predicted"]], yerr=yerr, fmt="D", color=c, mfc="white", ms=7, capsize=4,
                            lw=1.2)
                if h.get("actual") is not None:
                    ax.annotate(f"{100 * h['relative_error']:+.1f}%", (h["N"], h["actual"]),
                                textcoords="offset points", xytext=(9, -3), fontsize=8, color=c)
        _log_params_axis(ax)
        ax.set_ylabel(metric_label)
        ax.set_title(f"Final {metric_label} vs model size, fits of {laws.LN_FORMULA}\n"
                     "o fitted cells   \u25c7 held-out prediction (95% bootstrap interval)   \u2605 held-out actual")
        ax.legend(loc="upper right")
        return _save(fig, path)


def metrics_vs_params(results, groups: list[str], path: Path) -> Path | None:
    """Bits per byte and last-word accuracy against parameters, per group: test split solid,
    validation split dashed."""
    from matplotlib.lines import Line2D

    with plt.rc_context(STYLE):
        ev = [r for r in results if r.evaluation]
        if not ev:
            return None
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        colors = group_colors(groups)
        for group in groups:
            pts = sorted((r for r in ev if r.label == group), key=lambda r: r.N)
            if not pts:
                continue
            n = [r.N for r in pts]
            for split, lw_key, style in (("test", "last_word", "o-"), ("valid", "last_word_valid", "s--")):
                bpb = [r.evaluation.get(split, {}).get("bits_per_byte", np.nan) for r in pts]
                a1.plot(n, bpb, style, color=colors[group], ms=4, lw=1.3)
                acc = [r.evaluation.get(lw_key, {}).get("accuracy") for r in pts]
                if any(v is not None for v in acc):
                    a2.plot(n, [100 * v if v is not None else np.nan for v in acc], style, color=colors[group],
                            ms=4, lw=1.3)
        handles = [Line2D([], [], color=colors[g], lw=2, label=g) for g in groups]
        handles += [Line2D([], [], color="grey", ls="-", marker="o", ms=4, label="test split"),
                    Line2D([], [], color="grey", ls="--", marker="s", ms=4, label="validation split")]
        for ax in (a1, a2):
            _log_params_axis(ax)
            ax.legend(handles=handles, fontsize=7)
        a1.set_ylabel("bits per byte")
        a1.set_title("Held-out bits per byte (tokenizer-independent)")
        a2.set_ylabel("last-word accuracy (%)")
        a2.set_title("LAMBADA-style last-word accuracy (greedy)")
        a2.set_ylim(bottom=0)
        return _save(fig, path)


def depth_panels(results, groups: list[str], sizes: list[str], size_of, key, path: Path, *, title: str,
                 ylabel: str, first_layer: int, yscale: str = "linear", hline: float | None = None,
                 linthresh: float = 1e-2) -> Path | None:
    """One panel per size, one line per group: a per-layer statistic against depth. `key(evaluation)`
    gives the list; `first_layer` is the index of its first value (0: embedding output, 1: block 1)."""
    with plt.rc_context(STYLE):
        ev = [r for r in results if r.evaluation and r.evaluation.get("depth")]
        present = [s for s in sizes if any(size_of(r) == s for r in ev)]
        if not present:
            return None
        # One y scale for every size, so magnitudes compare across panels.
        fig, axes = _grid(len(present), max_cols=5, width=3.4, height=3.0, sharey=True)
        colors = group_colors(groups)
        for ax, size in zip(axes, present):
            layers = 0
            for group in groups:
                for r in (r for r in ev if r.label == group and size_of(r) == size):
                    values = key(r.evaluation)
                    xs = np.arange(first_layer, first_layer + len(values))
                    layers = max(layers, int(xs[-1]))
                    ax.plot(xs, values, "o-", color=colors[group], ms=3, lw=1.3, label=group)
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
