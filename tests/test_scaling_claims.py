"""The placement claims' verdicts on made-up measurements whose answer is known by construction."""
from __future__ import annotations

from types import SimpleNamespace

from pretrain.scaling.claims import check, rising_fraction, variance_growth


def cell(size, placement, var, test, valid=None):
    ev = {"placement": placement, "depth": {"var": var}, "test": {"loss": test}, "valid": {"loss": valid or test}}
    return SimpleNamespace(size=size, evaluation=ev)


def grid(pre_var_by_size, losses_by_size):
    out = []
    for size, pre_var in pre_var_by_size.items():
        flat = [1.0] + [2.0] * (len(pre_var) - 1)
        for p, var in (("pre", pre_var), ("post", flat), ("peri", flat), ("lns", [1.0] + [2.0 + 0.1 * i for i in
                                                                                        range(len(pre_var) - 1)])):
            out.append(cell(size, p, var, losses_by_size[size][p]))
    return out


GOOD = {"pre": 3.0, "post": 3.5, "peri": 2.8, "lns": 2.9}


def test_growth_and_rising_fraction():
    assert variance_growth([0.01, 1.0, 2.0, 4.0]) == 4.0  # the embedding output is left out
    assert rising_fraction([0.0, 1.0, 2.0, 1.5, 3.0]) == 2 / 3
    assert variance_growth([1.0, 2.0]) is None


def test_verdicts_follow_the_numbers():
    # LNS's variance: [1, 2.0, 2.1, 2.2, 2.3], growth 1.15; Peri-LN's flat, growth 1.
    results = grid({"a": [0.01, 1, 2, 4, 8], "b": [0.01, 1, 1.03, 1.06, 1.1]},
                   {"a": GOOD, "b": {"pre": 3.0, "post": 3.5, "peri": 3.1, "lns": 2.9}})
    claims = {c["claim"].split(" (")[0].split(":")[0]: c for c in check(results, lambda r: r.size, ["a", "b"])}
    assert claims["Pre-LN hidden-state variance grows with depth"]["verdict"] == "holds at 1 of 2 sizes (a)"
    peri = claims["Peri-LN keeps the hidden-state variance bounded"]
    assert peri["verdict"] == "holds at every size (2)"  # growth 1 against Pre-LN's 8 and 1.1
    lns = claims["LNS keeps the hidden-state variance bounded"]
    assert lns["verdict"] == "holds at 1 of 2 sizes (a)"  # 1.15 is below 8 but above 1.1
    assert [row[-1] for row in lns["rows"]] == ["yes", "no"] and lns["rows"][1][1:3] == ["1.10x", "1.15x"]
    order = next(c for c in check(results, lambda r: r.size, ["a", "b"]) if c["claim"].startswith("Loss order (test"))
    assert order["verdict"] == "holds at 1 of 2 sizes (a)"  # at b, peri is above pre
    assert order["rows"][1][2] == "+0.100"


def test_post_not_worst_breaks_the_order():
    results = grid({"a": [0.01, 1, 2, 4, 8]}, {"a": {"pre": 3.0, "post": 2.5, "peri": 2.8, "lns": 2.9}})
    order = next(c for c in check(results, lambda r: r.size, ["a"]) if c["claim"].startswith("Loss order (test"))
    assert order["verdict"] == "does not hold at any size" and order["rows"][0][4] == "no"
