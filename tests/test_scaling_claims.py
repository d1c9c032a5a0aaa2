"""The placement claims' verdicts on made-up measurements whose answer is known by construction: the
decision rule itself, then every claim on a fake study (3 sizes x 4 placements x 2 seeds, with an LR
search) where some claims hold, some fail and some are within the seed noise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from pretrain.scaling.claims import FAILS, HOLDS, UNMEASURED, UNRESOLVED, Comparison, check, verdict


def test_the_decision_rule():
    c = lambda d, t=0.1, s="a": Comparison(s, d, t)
    assert verdict([c(-0.5), c(-0.3)])[0] == HOLDS
    assert verdict([c(0.5), c(0.3)])[0] == FAILS
    assert verdict([c(-0.01), c(0.02)])[0] == UNRESOLVED  # within the noise
    # the mean is resolved in the claimed direction but one size is resolved against it: not resolved
    v, why = verdict([c(-0.9, s="a"), c(-0.9, s="b"), c(0.3, s="c")])
    assert v == UNRESOLVED and "against the claim at c" in why
    # averaging over sizes: each size alone is within its noise, their mean is not (0.1 * sqrt(4) / 4 = 0.05)
    assert verdict([c(-0.08, s=s) for s in "abcd"])[0] == HOLDS
    assert verdict([c(-0.5, None)])[0] == UNRESOLVED  # no seed spread measured
    assert verdict([])[0] == UNMEASURED


@dataclass
class FakeCellSpec:
    study: bool = True
    search: bool = False


@dataclass
class Fake:
    """What claims.check reads from a CellResult."""

    placement: str
    size: str
    seed: int
    N: int
    evaluation: dict
    lr: float = 1e-3
    cell: FakeCellSpec = field(default_factory=FakeCellSpec)

    @property
    def label(self):
        return self.placement

    @property
    def usable(self):
        return not self.evaluation.get("diverged")

    @property
    def diverged(self):
        return bool(self.evaluation.get("diverged"))

    def metric(self, name):
        return self.evaluation["valid"]["loss"] if self.usable else float("nan")


LOSS = {"pre": 3.0, "peri": 2.9, "lns": 3.0, "post": 3.5}
SIZES = {"s": 10_000, "m": 40_000, "l": 160_000}
LAYERS = 6


def variance(placement: str, N: int, jitter: float) -> list[float]:
    # Pre-LN and LNS: exponential in depth, the last layer growing as N; Peri-LN: linear in depth, flat in N
    scale = N / 10_000
    if placement == "peri":
        blocks = [layer * (1 + jitter) for layer in range(1, LAYERS + 1)]
    else:
        blocks = [scale * 2.0**layer * (1 + jitter) for layer in range(1, LAYERS + 1)]
    return [0.01] + blocks


def removal(placement: str) -> list[float]:
    deep = 0.01 if placement == "pre" else 0.2 if placement == "lns" else 0.011
    return [0.5] * (LAYERS // 2) + [deep] * (LAYERS - LAYERS // 2)


def fake_study() -> list[Fake]:
    out = []
    for size, N in SIZES.items():
        for placement, loss in LOSS.items():
            for seed, jitter in ((1, -0.002), (2, 0.002)):
                depth = {"var": variance(placement, N, 10 * jitter), "removal": {"increase": removal(placement)}}
                ev = {"placement": placement, "valid": {"loss": loss + jitter}, "depth": depth}
                out.append(Fake(placement, size, seed, N, ev))
    # An LR search at size s, one seed: Pre-LN diverges at the largest rate, Peri-LN degrades gently.
    grid = [1e-3, 3e-3, 1e-2]
    search = {"pre": [3.4, 3.0, None], "peri": [3.0, 2.9, 2.95], "lns": [3.3, 3.0, 3.2], "post": [3.6, 3.5, 3.9]}
    for placement, losses in search.items():
        for lr, loss in zip(grid, losses, strict=True):
            ev = {
                "placement": placement,
                "init": {"loss": 8.0},
                "diverged": loss is None,
                "valid": {"loss": loss} if loss is not None else None,
            }
            out.append(Fake(placement, "s", 1, SIZES["s"], ev, lr=lr, cell=FakeCellSpec(study=False, search=True)))
    return out


@pytest.fixture(scope="module")
def claims():
    results = fake_study()
    return {c["claim"]: c for c in check(results, lambda r: r.size, list(SIZES))}


def test_loss_order_claims(claims):
    assert claims["Peri-LN reaches a lower validation loss than Pre-LN"]["verdict"] == HOLDS
    assert claims["LNS reaches a lower validation loss than Pre-LN"]["verdict"] == UNRESOLVED  # identical losses
    assert claims["Post-LN reaches a higher validation loss than Pre-LN"]["verdict"] == HOLDS
    within = claims["Tuned Post-LN lands within 5% of Pre-LN at these depths"]
    assert within["verdict"] == FAILS and within["rows"][0][3] == "+16.67%"
    # the seed spread that decides, per size: the pooled sd of (x +- 0.002) pairs is 0.002 * sqrt(2), with
    # 4 degrees of freedom (4 placements x (2 seeds - 1)), so t = 2.776 (scipy's Student t, 97.5%)
    assert "m 0.00283 (4 dof, t 2.78)" in claims["Peri-LN reaches a lower validation loss than Pre-LN"]["spread"]


def test_variance_growth_claims(claims):
    assert claims["Pre-LN's residual variance grows faster than linearly with depth"]["verdict"] == HOLDS
    assert claims["Peri-LN's residual variance grows more slowly with depth than Pre-LN's"]["verdict"] == HOLDS
    # LNS's variance is made identical to Pre-LN's: no difference to resolve
    assert claims["LNS's residual variance grows more slowly with depth than Pre-LN's"]["verdict"] == UNRESOLVED
    across = claims["Across sizes, Pre-LN's last-layer variance rises faster with N than peri's"]
    assert across["verdict"] == HOLDS
    slopes = {row[0]: float(row[1]) for row in across["rows"]}
    assert slopes["pre"] == pytest.approx(1.0, abs=0.02) and slopes["peri"] == pytest.approx(0.0, abs=0.02)
    assert claims["Across sizes, Pre-LN's last-layer variance rises faster with N than lns's"]["verdict"] == UNRESOLVED


def test_late_layer_and_lr_sensitivity_claims(claims):
    assert claims["LNS's deeper blocks contribute more than Pre-LN's"]["verdict"] == HOLDS
    assert claims["Peri-LN's deeper blocks contribute more than Pre-LN's"]["verdict"] in (HOLDS, UNRESOLVED)
    lr = claims["Peri-LN is less sensitive to the learning rate than Pre-LN"]
    # by hand, L0 = 8: pre: (3.4 - 3.0 + 0 + 8 - 3.0) / 3 = 1.8; peri: (0.1 + 0 + 0.05) / 3 = 0.05
    (row,) = lr["rows"]
    assert float(row[1]) == pytest.approx(1.8) and float(row[3]) == pytest.approx(0.05)
    assert lr["verdict"] == HOLDS


def test_one_seed_resolves_nothing():
    results = [r for r in fake_study() if r.seed == 1]
    out = {c["claim"]: c for c in check(results, lambda r: r.size, list(SIZES))}
    assert out["Peri-LN reaches a lower validation loss than Pre-LN"]["verdict"] == UNRESOLVED
    assert "one seed per cell" in out["Peri-LN reaches a lower validation loss than Pre-LN"]["decided_by"]
    assert math.isclose(float(out["Peri-LN is less sensitive to the learning rate than Pre-LN"]["rows"][0][1]), 1.8)


def test_each_size_is_judged_by_its_own_seed_spread():
    """The spread shrinks with size (20x in the placement study): a difference at the largest size that is
    far outside that size's spread must be resolved, though it is inside the smallest size's spread; and
    Peri-LN's advantage at the small sizes must not outvote its resolved deficit at the largest."""
    spread = {"s": 0.3, "m": 0.05, "l": 0.005}  # each seed at loss +- spread
    gap = {"s": -0.4, "m": -0.1, "l": +0.05}  # peri - pre
    out = []
    for size, N in SIZES.items():
        for placement in LOSS:
            for seed, sign in ((1, -1), (2, 1)):
                loss = 3.0 + (gap[size] if placement == "peri" else 0.0) + sign * spread[size]
                out.append(Fake(placement, size, seed, N, {"placement": placement, "valid": {"loss": loss}}))
    peri = {c["claim"]: c for c in check(out, lambda r: r.size, list(SIZES))}[
        "Peri-LN reaches a lower validation loss than Pre-LN"
    ]
    states = {row[0]: row[-1] for row in peri["rows"]}
    # per size: sd = spread * sqrt(2), threshold t(4 dof) * sd * sqrt(2/2) = 2.776 * 1.414 * spread (l: 0.0196
    # < 0.05); one sd pooled over every size (0.25) would have put l's 0.05 inside the noise
    assert states == {"s": "within noise", "m": "within noise", "l": "against"}
    assert peri["verdict"] == UNRESOLVED and "resolved against the claim at l" in peri["decided_by"]
