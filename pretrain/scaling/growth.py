"""How the residual stream's variance grows with depth, in numbers the placement papers' claims can be
checked against. `var` is the per-layer list of pretrain/scaling/depth.py: var[0] the embedding
output, var[l] the stream after block l (l = 1..L).

  log_slope     least-squares slope of ln var[l] over the blocks l = 1..L (the embedding output left
                out: its scale is the embedding's initialization, not depth): the growth rate per block
                (var ~ exp(slope * l) when the growth is exponential; exp(slope) is the factor per block)
  linear_ratio  var[L] / (var[0] + L * (var[1] - var[0])): the last layer's variance over what linear
                growth at the first block's increment would give. 1 when every block adds the same
                variance (a sum of independent, equally scaled block outputs, e.g. Peri-LN's normalized
                outputs: the expectation for Peri-LN), above 1 when the variance grows faster (Pre-LN is
                claimed to grow exponentially), below 1 when it grows slower or is bounded (LNS)
  growth        var[L] / var[1]
  last          var[L]

Only meaningful with L >= 2 (a slope needs two blocks); None otherwise.
"""

from __future__ import annotations

import math

import numpy as np


def log_slope(var: list[float]) -> float | None:
    blocks = np.asarray(var[1:], dtype=float)
    if len(blocks) < 2 or not np.all(blocks > 0):
        return None
    depth = np.arange(1, len(blocks) + 1, dtype=float)
    return float(np.polyfit(depth, np.log(blocks), 1)[0])


def linear_ratio(var: list[float]) -> float | None:
    if len(var) < 3:
        return None
    linear = var[0] + (len(var) - 1) * (var[1] - var[0])
    return var[-1] / linear if linear > 0 else None


def growth_summary(var: list[float]) -> dict:
    ok = len(var) >= 3 and var[1] > 0
    slope = log_slope(var)
    return {
        "log_slope": slope,
        "factor_per_block": None if slope is None else math.exp(slope),
        "linear_ratio": linear_ratio(var),
        "growth": var[-1] / var[1] if ok else None,
        "last": var[-1] if len(var) > 1 else None,
    }
