"""The placement papers' qualitative claims, checked against a sweep's measurements, size by size.

  variance_growth  Pre-LN's residual variance grows with depth (The Curse of Depth; Peri-LN paper)
  bounded          Peri-LN and LNS keep it bounded: less growth through depth than Pre-LN
  loss_order       Peri-LN and LNS reach a lower loss than Pre-LN; Post-LN is the worst of the four

Each verdict comes from explicit rules on the numbers (written into the report next to them), so a
claim is "holds" only where the measurements say so; sizes that disagree are named. Growth is the
residual variance after the last block over that after the first (the embedding output is left
out: its scale is the embedding's init, not depth). One seed per cell: loss differences smaller
than seed-to-seed noise cannot be told apart, and the report says so.
"""
from __future__ import annotations

GROWS_FACTOR = 2.0  # "grows with depth": the last block's variance at least this multiple of the first's
GROWS_STEPS = 0.75  # ... and larger than the previous block's at this fraction of the blocks


def variance_growth(var: list[float]) -> float | None:
    return var[-1] / var[1] if len(var) > 2 and var[1] > 0 else None


def rising_fraction(var: list[float]) -> float | None:
    blocks = var[1:]
    if len(blocks) < 2:
        return None
    return sum(b > a for a, b in zip(blocks[:-1], blocks[1:])) / (len(blocks) - 1)


def _by_size_and_placement(results, size_of, sizes):
    table = {}
    for r in results:
        if r.evaluation is None:
            continue
        placement = r.evaluation.get("placement")
        table.setdefault(size_of(r), {})[placement] = r
    return [(s, table[s]) for s in sizes if s in table]


def _verdict(ok_sizes: list[str], all_sizes: list[str]) -> str:
    if not all_sizes:
        return "not measured"
    if len(ok_sizes) == len(all_sizes):
        return f"holds at every size ({len(all_sizes)})"
    if not ok_sizes:
        return "does not hold at any size"
    return f"holds at {len(ok_sizes)} of {len(all_sizes)} sizes ({', '.join(ok_sizes)})"


def check(results, size_of, sizes: list[str]) -> list[dict]:
    """[{claim, rule, verdict, rows: [[size, ...]], header}] for the claims the sweep can test."""
    grid = _by_size_and_placement(results, size_of, sizes)
    out = []

    # 1. Pre-LN variance grows with depth.
    rows, ok, tested = [], [], []
    for size, cells in grid:
        r = cells.get("pre")
        if r is None or not r.evaluation.get("depth"):
            continue
        var = r.evaluation["depth"]["var"]
        g, f = variance_growth(var), rising_fraction(var)
        if g is None:
            continue
        tested.append(size)
        holds = g >= GROWS_FACTOR and f >= GROWS_STEPS
        ok += [size] if holds else []
        rows.append([size, f"{var[1]:.3g}", f"{var[-1]:.3g}", f"{g:.2f}x", f"{100 * f:.0f}%", "yes" if holds else "no"])
    if tested:
        out.append({"claim": "Pre-LN hidden-state variance grows with depth",
                    "rule": f"the residual variance after the last block is at least {GROWS_FACTOR:g}x that after the "
                            f"first block, and rises from one block to the next at least {100 * GROWS_STEPS:.0f}% "
                            "of the time",
                    "verdict": _verdict(ok, tested),
                    "header": ["size", "var after block 1", "var after last block", "growth", "blocks rising",
                               "holds"], "rows": rows})

    # 2. Peri-LN and LNS bounded (less growth than Pre-LN at the same size).
    for other, name in (("peri", "Peri-LN"), ("lns", "LNS")):
        rows, ok, tested = [], [], []
        for size, cells in grid:
            pre, r = cells.get("pre"), cells.get(other)
            if pre is None or r is None or not (pre.evaluation.get("depth") and r.evaluation.get("depth")):
                continue
            gp, go = variance_growth(pre.evaluation["depth"]["var"]), variance_growth(r.evaluation["depth"]["var"])
            if gp is None or go is None:
                continue
            tested.append(size)
            holds = go < gp
            ok += [size] if holds else []
            rows.append([size, f"{gp:.2f}x", f"{go:.2f}x", f"{max(r.evaluation['depth']['var'][1:]):.3g}",
                         f"{max(pre.evaluation['depth']['var'][1:]):.3g}", "yes" if holds else "no"])
        if tested:
            out.append({"claim": f"{name} keeps the hidden-state variance bounded (less growth through depth than "
                                 "Pre-LN)",
                        "rule": f"{name}'s growth (variance after the last block / after the first) is below Pre-LN's "
                                "at the same size",
                        "verdict": _verdict(ok, tested),
                        "header": ["size", "Pre-LN growth", f"{name} growth", f"{name} max var", "Pre-LN max var",
                                   "holds"], "rows": rows})

    # 3. Loss order, on the test split (out of domain here) and the validation split.
    for split in ("test", "valid"):
        rows, ok, tested = [], [], []
        for size, cells in grid:
            if not {"pre", "peri", "lns", "post"} <= set(cells):
                continue
            loss = {p: cells[p].evaluation[split]["loss"] for p in ("pre", "post", "peri", "lns")}
            tested.append(size)
            order = " < ".join(f"{p} {loss[p]:.3f}" for p in sorted(loss, key=loss.get))
            holds = loss["peri"] < loss["pre"] and loss["lns"] < loss["pre"] and loss["post"] == max(loss.values())
            ok += [size] if holds else []
            rows.append([size, order, f"{loss['peri'] - loss['pre']:+.3f}", f"{loss['lns'] - loss['pre']:+.3f}",
                         "yes" if loss["post"] == max(loss.values()) else "no", "yes" if holds else "no"])
        if tested:
            out.append({"claim": f"Loss order ({split} split): Peri-LN and LNS below Pre-LN, Post-LN the worst",
                        "rule": f"{split} loss of peri < pre and lns < pre, and post the highest of the four",
                        "verdict": _verdict(ok, tested),
                        "header": ["size", f"{split} loss, best first", "peri - pre", "lns - pre", "post worst",
                                   "holds"], "rows": rows})
    return out
