"""Scaling-law fits recover known constants from synthetic data; the residual bootstrap's intervals cover
the true constants at about their stated rate; parameters at a bound are flagged; the sweep-level fit
(grouping, seeds, held-out prediction against the power law and the naive baseline, small-sweep
honesty, clear errors) on fake evaluated cells."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from model import build_model
from pretrain.config import ConfigError, resolve
from pretrain.scaling import laws
from pretrain.scaling.__main__ import main
from pretrain.scaling.cell_files import EVAL_FILE, EVAL_VERSION
from pretrain.scaling.fit import fit_sweep
from pretrain.scaling.spec import load_sweep

ROOT = Path(__file__).resolve().parent.parent
TRUE = {"E": 1.8, "A": 400.0, "alpha": 0.34}
TRUE_ND = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Chinchilla's constants


def law(p, N, D=None):  # written out here, independently of laws.predict
    out = p["E"] + p["A"] / np.asarray(N, dtype=float) ** p["alpha"]
    return out if D is None else out + p["B"] / np.asarray(D, dtype=float) ** p["beta"]


def test_fit_recovers_known_constants_with_noise():
    rng = np.random.default_rng(0)
    N = np.logspace(5, 8, 8)
    L = law(TRUE, N) * np.exp(rng.normal(0, 0.003, N.size))
    fit = laws.fit_law(N, L)
    assert fit.params["E"] == pytest.approx(TRUE["E"], abs=0.05)
    assert fit.params["alpha"] == pytest.approx(TRUE["alpha"], abs=0.02)
    assert fit.params["A"] == pytest.approx(TRUE["A"], rel=0.15)
    assert fit.rms_log_residual < 0.005
    samples, discarded = laws.bootstrap(N, L, resamples=150, seed=1)
    assert discarded < 20 and len(samples) + discarded == 150
    for k in laws.LN_PARAMS:
        lo, hi = laws.percentile_ci([s[k] for s in samples])
        assert lo <= TRUE[k] <= hi, (k, lo, hi)


def test_held_out_largest_size_is_predicted():
    rng = np.random.default_rng(2)
    N = np.logspace(5, 8, 8)
    L = law(TRUE, N) * np.exp(rng.normal(0, 0.002, N.size))
    fit = laws.fit_law(N[:-1], L[:-1])
    predicted = float(laws.predict(fit.params, N[-1]))
    assert abs(predicted - L[-1]) / L[-1] < 0.01
    assert abs(predicted - law(TRUE, N[-1])) / law(TRUE, N[-1]) < 0.01


def test_fit_without_noise_is_exact():
    N = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    fit = laws.fit_law(N, law(TRUE, N))
    for k in laws.LN_PARAMS:
        assert fit.params[k] == pytest.approx(TRUE[k], rel=1e-4)


def test_joint_law_in_n_and_d_recovers_known_constants():
    rng = np.random.default_rng(3)
    N, D = np.meshgrid(np.logspace(6, 8.5, 5), np.logspace(8, 10, 4))
    N, D = N.ravel(), D.ravel()
    L = law(TRUE_ND, N, D) * np.exp(rng.normal(0, 0.002, N.size))
    fit = laws.fit_law(N, L, D)
    assert fit.params["E"] == pytest.approx(TRUE_ND["E"], abs=0.1)
    assert fit.params["alpha"] == pytest.approx(TRUE_ND["alpha"], abs=0.03)
    assert fit.params["beta"] == pytest.approx(TRUE_ND["beta"], abs=0.03)
    bigger = (3e9, 3e10)  # an extrapolation in both N and D
    assert float(laws.predict(fit.params, *bigger)) == pytest.approx(float(law(TRUE_ND, *bigger)), rel=0.01)


def test_identifiability_and_percentiles():
    assert not laws.identifiable([1, 1, 2, 2])
    assert laws.identifiable([1, 2, 3])
    assert not laws.identifiable([1, 2, 3, 4, 5], [7, 7, 7, 7, 7])
    assert laws.identifiable([1, 2, 3, 1, 2], [7, 7, 7, 8, 8])
    assert laws.percentile_ci(list(range(101))) == pytest.approx([2.5, 97.5])
    assert laws.percentile_ci([1.0]) is None


def test_residual_bootstrap_intervals_cover_the_truth_at_their_stated_rate():
    """40 synthetic studies shaped like ours (5 sizes x 2 seeds, 0.5% log-normal seed noise): the 95%
    intervals of every parameter and of the prediction at 2x the largest size contain the true value in
    at least 85% of them (a bootstrap with 7 residual degrees of freedom is a little short of 95%; a
    broken one, e.g. without the sqrt(n/(n-p)) inflation or resampling the wrong thing, lands far lower).
    Least squares (delta 1) keeps the 4,000 refits fast; the resampling is the same for any loss."""
    truth = {"E": 3.0, "A": 40.0, "alpha": 0.3}
    N = np.repeat(np.geomspace(5e4, 4.5e5, 5), 2)
    held = 9e5
    reps, covered = 40, {"E": 0, "A": 0, "alpha": 0, "prediction": 0}
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        L = law(truth, N) * np.exp(rng.normal(0, 0.005, N.size))
        fit = laws.fit_law(N, L, delta=1.0)
        samples = laws.bootstrap_residuals(N, L, resamples=100, seed=rep, delta=1.0, fit=fit)
        assert len(samples) == 100
        for k in laws.LN_PARAMS:
            lo, hi = laws.percentile_ci([s[k] for s in samples])
            covered[k] += lo <= truth[k] <= hi
        lo, hi = laws.percentile_ci([law(s, held) for s in samples])
        covered["prediction"] += lo <= law(truth, held) <= hi
    rates = {k: v / reps for k, v in covered.items()}
    assert all(rate >= 0.85 for rate in rates.values()), rates


def test_too_few_points_give_no_bootstrap():
    N = np.array([1e5, 3e5, 1e6])
    assert laws.bootstrap_residuals(N, law(TRUE, N), resamples=10) == []


def test_parameters_at_a_bound_are_flagged():
    N = np.repeat(np.geomspace(5e4, 4.5e5, 5), 2)
    noise = np.exp(np.random.default_rng(4).normal(0, 0.002, N.size))
    # a pure power law: the best E is 0, the lower edge of its range
    assert "E" in laws.fit_law(N, 50.0 * N**-0.2 * noise).at_bound
    # no dependence on N at all: the power term vanishes (A at 0 or alpha at 0)
    flat = laws.fit_law(N, np.full(N.size, 4.0) * noise)
    assert {"A", "alpha"} & set(flat.at_bound), flat
    # a law well inside its range: nothing flagged
    assert laws.fit_law(N, law({"E": 3.0, "A": 40.0, "alpha": 0.3}, N) * noise).at_bound == ()
    # the rule itself, on hand-made parameters
    assert laws.at_bound({"E": 1e-4, "A": 5.0, "alpha": 0.3}, [1e5], [4.0]) == ("E",)
    assert laws.at_bound({"E": 3.0, "A": 1e-9, "alpha": 0.3}, [1e5], [4.0]) == ("A",)
    assert laws.at_bound({"E": 3.0, "A": 5.0, "alpha": laws.EXPONENT_MAX}, [1.0], [8.0]) == ("alpha",)


def test_two_parameter_power_law_is_a_straight_line_in_log_log():
    N = np.array([1e5, 2e5, 4e5, 8e5])
    L = 30.0 * N**-0.15
    p = laws.fit_power_law(N, L)
    assert p["A"] == pytest.approx(30.0, rel=1e-9) and p["alpha"] == pytest.approx(0.15, rel=1e-9)
    assert laws.predict_power_law(p, 1.6e6) == pytest.approx(30.0 * 1.6e6**-0.15, rel=1e-9)


# ------------------------------------------------------------------- the sweep-level fit


SIZES = {"xs": (64, 2), "s": (96, 2), "m": (128, 2), "l": (160, 2), "xl": (192, 2)}


def write_sweep(tmp_path: Path, sizes=SIZES, placements=("pre", "peri"), seeds=(1,), hold_out="xl") -> Path:
    size_lines = "\n".join(
        f"    {n}: {{model.hidden_size: {h}, model.num_layers: {layers}, model.num_heads: 2}}"
        for n, (h, layers) in sizes.items()
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(f"""name: fake
base: {ROOT / "configs" / "tiny.yaml"}
out: {tmp_path / "cells"}
set: {{model.vocab_size: 512}}
axes:
  size:
{size_lines}
  model.placement: [{", ".join(placements)}]
  run.seed: [{", ".join(map(str, seeds))}]
{"hold_out: {size: " + hold_out + "}" if hold_out else ""}
""")
    return path


def fake_n(cell) -> int:
    h = cell.config.model.hidden_size
    return 12 * h * h * cell.config.model.num_layers + (7 if cell.labels["model.placement"] == "peri" else 0)


def fake_evaluations(sweep, truth: dict, noise: float = 0.0, skip=(), seed=0) -> dict:
    """scaling_eval.json for every cell: N from a simple formula, the validation (and test) loss from the law."""
    rng = np.random.default_rng(seed)
    values = {}
    for cell in sweep.cells:
        if cell.name in skip:
            continue
        N = fake_n(cell)
        p = truth[cell.labels["model.placement"]]
        loss = float(law(p, N) * np.exp(rng.normal(0, noise)))
        values[cell.name] = (N, loss)
        d = sweep.out / cell.name / "eval"
        d.mkdir(parents=True, exist_ok=True)
        (d / EVAL_FILE).write_text(
            json.dumps(
                {
                    "version": EVAL_VERSION,
                    "level": "full",
                    "cell": cell.name,
                    "non_embedding_parameters": N,
                    "trained_tokens": 10_240,
                    "diverged": False,
                    "init": {"loss": 9.0},
                    "test": {"loss": loss, "bits_per_byte": loss / 2},
                    "valid": {"loss": loss, "bits_per_byte": loss / 2},
                }
            )
        )
    return values


TRUTHS = {"pre": {"E": 2.0, "A": 60.0, "alpha": 0.3}, "peri": {"E": 1.5, "A": 90.0, "alpha": 0.35}}


def test_sweep_fit_per_placement_with_held_out_prediction(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    values = fake_evaluations(sweep, TRUTHS)
    result = fit_sweep(sweep, resamples=50)
    assert result["metric"] == "valid_loss"  # the in-domain validation loss by default
    fits = {f["label"]: f for f in result["fits"]}
    assert set(fits) == {"pre", "peri"} and result["fits_nd"] == []
    for placement, f in fits.items():
        assert f["status"] == "barely determined"  # 4 sizes, 3 parameters
        assert len(f["points"]) == 4 and all("size-xl" not in p["cell"] for p in f["points"])
        assert f["params"]["alpha"] == pytest.approx(TRUTHS[placement]["alpha"], rel=1e-3)
        (held,) = f["held_out"]
        assert held["size"] == "xl" and held["cells"] == [f"size-xl_placement-{placement}_seed-1"]
        N, actual = values[held["cells"][0]]
        assert held["N"] == N and held["actual"] == pytest.approx(actual)
        assert held["predicted"] == pytest.approx(float(law(TRUTHS[placement], N)), rel=1e-4)
        assert abs(held["relative_error"]) < 1e-4 and held["winner"] == "law"
        # the naive baseline predicts the largest fitted size's loss; the power law is fitted in log-log
        largest = max(
            (fake_n(c), values[c.name][1])
            for c in sweep.cells
            if c.labels["model.placement"] == placement and c.labels["size"] != "xl"
        )
        assert held["naive"]["predicted"] == pytest.approx(largest[1])
        assert held["naive"]["relative_error"] == pytest.approx((largest[1] - actual) / actual)
        pts = [(math.log(p["N"]), math.log(p["L"])) for p in f["points"]]
        x, y = np.array(pts).T
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        power = math.exp(y.mean() - slope * x.mean()) * N**slope
        assert held["power_law"]["relative_error"] == pytest.approx((power - actual) / actual, rel=1e-6)


def test_seeds_are_points_and_the_held_out_actual_is_their_mean(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, seeds=(1, 2)))
    values = fake_evaluations(sweep, TRUTHS, noise=0.002)
    result = fit_sweep(sweep, metric="test_bpb", resamples=40)
    f = next(f for f in result["fits"] if f["label"] == "pre")
    assert len(f["points"]) == 8 and f["distinct_sizes"] == 4 and f["status"] == "barely determined"
    assert all(p["L"] < 2 for p in f["points"])  # bits per byte = loss / 2 in the fake evaluations
    assert f["ci95"]["alpha"][0] < f["params"]["alpha"] < f["ci95"]["alpha"][1]
    (held,) = f["held_out"]
    seeds = [values[f"size-xl_placement-pre_seed-{s}"][1] / 2 for s in (1, 2)]
    assert held["actual_seeds"] == pytest.approx(seeds) and held["actual"] == pytest.approx(np.mean(seeds))
    # the pooled seed sd from the 8 (placement, size) pairs of two seeds, by hand
    pairs = [
        [values[f"size-{s}_placement-{p}_seed-{seed}"][1] / 2 for seed in (1, 2)]
        for s in SIZES
        for p in ("pre", "peri")
    ]
    assert result["seed_noise"]["sd"] == pytest.approx(math.sqrt(sum((a - b) ** 2 / 2 for a, b in pairs) / len(pairs)))
    assert held["winner_resolved"] in (True, False)


def test_a_fit_at_a_bound_is_flagged_not_ok(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, seeds=(1, 2)))
    pure = {"pre": {"E": 0.0, "A": 60.0, "alpha": 0.3}, "peri": TRUTHS["peri"]}
    fake_evaluations(sweep, pure, noise=0.001)
    fits = {f["label"]: f for f in fit_sweep(sweep, resamples=20)["fits"]}
    assert fits["pre"]["status"] == "at bound" and "E" in fits["pre"]["at_bound"]
    assert fits["pre"]["note"].startswith("at bound: E")
    assert fits["peri"]["at_bound"] == [] and fits["peri"]["status"] == "barely determined"  # 4 sizes


def test_too_few_sizes_and_no_evaluation_are_said_not_crashed(tmp_path, capsys):
    sweep_file = write_sweep(tmp_path, sizes={"xs": (64, 2), "s": (96, 2), "xl": (192, 2)})
    sweep = load_sweep(sweep_file)
    from pretrain.cli import run

    assert run(main, ["fit", str(sweep_file)]) == 2
    assert "none of its 6 cells" in capsys.readouterr().err
    fake_evaluations(sweep, TRUTHS)
    assert main(["fit", str(sweep_file), "--bootstrap", "10"]) == 0
    out = capsys.readouterr().out
    assert "not fitted: 2 distinct model sizes" in out
    written = json.loads((sweep.out / "fit.json").read_text())
    assert {f["status"] for f in written["fits"]} == {"insufficient"}
    assert written["fits"][0]["held_out"][0]["predicted"] is None


def test_exactly_three_sizes_interpolate_without_intervals(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, sizes={"xs": (64, 2), "s": (96, 2), "m": (128, 2), "xl": (192, 2)}))
    fake_evaluations(sweep, TRUTHS)
    f = fit_sweep(sweep, resamples=20)["fits"][0]
    assert f["status"] == "exact" and f["ci95"]["E"] is None and f["held_out"][0]["ci95"] is None


def test_unevaluated_held_out_size_is_predicted_ahead(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    held = [c.name for c in sweep.cells if c.labels["size"] == "xl"]
    fake_evaluations(sweep, TRUTHS, skip=held)
    result = fit_sweep(sweep, resamples=20)
    h = result["fits"][0]["held_out"][0]
    assert h["actual"] is None and h["predicted"] is not None and "ahead" in h["note"]
    cfg = sweep.cell(h["cells"][0]).config
    model, _ = build_model(resolve(cfg).model, "torch", "meta")  # the size the cell will have
    assert h["N"] == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))
    assert {m["cell"] for m in result["cells"]["missing"]} == set(held)


def test_unknown_metric_is_refused(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    with pytest.raises(ConfigError, match="allowed: test_loss"):
        fit_sweep(sweep, metric="accuracy")
