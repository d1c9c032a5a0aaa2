"""The Step Law behind `train.lr: auto` / `global_batch_size: auto` against the paper's formula written out
here, and our fit of the same laws recovering known constants from synthetic LR x batch sweeps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from kernels.errors import ConfigError
from pretrain.config import load_config, resolve
from pretrain.scaling.hparam_laws import PowerLaw, SweepPoint, comparison_lines, fit_laws, optima
from tests.conftest import ROOT


def paper_lr(N: float, D: float) -> float:
    """Li et al. 2025 (Step Law): peak LR for N non-embedding parameters and D tokens."""
    return 1.79 * N**-0.713 * D**0.307


def paper_batch_tokens(D: float) -> float:
    return 0.58 * D**0.571


def non_embedding(d: int, layers: int, ffn: int) -> int:
    """Pre-LN RMSNorm GPT with SwiGLU, no biases, multi-head attention: per block qkv (3 d^2), proj (d^2),
    fc1 (2 d ffn), fc2 (ffn d) and two gains; one final gain."""
    return layers * (4 * d * d + 3 * d * ffn + 2 * d) + d


@pytest.mark.parametrize("d, layers, heads, steps, batch", [(256, 4, 4, 2000, 32), (1024, 8, 16, 30000, 128)])
def test_auto_lr_is_the_step_law_of_n_and_d(d, layers, heads, steps, batch):
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            "train.lr=auto",
            f"model.hidden_size={d}",
            f"model.num_layers={layers}",
            f"model.num_heads={heads}",
            "model.placement=pre",
            "model.seq_len=512",
            "model.vocab_size=4096",
            f"train.max_steps={steps}",
            f"train.global_batch_size={batch}",
        ],
    )
    t = resolve(cfg).train
    ffn = -(-int(8 * d / 3) // 64) * 64
    N, D = non_embedding(d, layers, ffn), steps * batch * 512
    assert t.tokens == D
    assert t.lr == pytest.approx(paper_lr(N, D), rel=1e-12)
    assert f"N={N:,}" in t.derived[0] and f"D={D:,}" in t.derived[0]


@pytest.mark.parametrize("tokens, world", [(2e9, 8), (3e11, 64)])
def test_auto_batch_is_the_step_law_of_d_rounded_to_the_layout(tokens, world):
    cfg = load_config(
        ROOT / "configs" / "gpt-125m.yaml",
        ["train.global_batch_size=auto", f"train.tokens={int(tokens)}", "train.micro_batch_size=4"],
    )
    t = resolve(cfg, world_size=world).train
    sequences = paper_batch_tokens(tokens) / 2048
    unit = 4 * world  # micro x dp
    assert t.global_batch_size % unit == 0
    k = t.global_batch_size // unit
    assert k & (k - 1) == 0  # a power of two
    assert abs(math.log2(t.global_batch_size / max(sequences, unit))) <= 0.5 + 1e-9
    assert t.max_steps == round(tokens / (t.global_batch_size * 2048))
    assert "replaces the configured 4,800" in " ".join(t.derived)


def test_auto_batch_needs_the_token_budget():
    cfg = load_config(ROOT / "configs" / "gpt-125m.yaml", ["train.global_batch_size=auto"])
    with pytest.raises(ConfigError, match="global_batch_size: auto needs the planned token budget"):
        resolve(cfg)


# ------------------------------------------------------------------------------------ fitting


TRUE_LR = PowerLaw(2.5, -0.65, 0.28)
TRUE_BATCH = PowerLaw(0.4, 0.05, 0.6)


def synthetic_sweep(offset: float) -> list[SweepPoint]:
    """Runs whose final loss is a convex bowl in (log lr, log batch) around the true optimum of each (N, D),
    on a half-decade grid shifted by `offset` decades from the optimum (0: the optimum is a grid point)."""
    points = []
    for N, D in itertools.product((1e7, 5e7, 2e8), (1e9, 1e10, 1e11)):
        lr0, b0 = TRUE_LR(N, D), TRUE_BATCH(N, D)
        for i, j in itertools.product(range(-3, 4), range(-3, 4)):
            lr = lr0 * 10 ** (0.5 * i + offset)
            b = b0 * 10 ** (0.5 * j - offset)
            loss = 3.0 + 0.2 * np.log(lr / lr0) ** 2 + 0.05 * np.log(b / b0) ** 2 + 0.01 * np.log(lr / lr0) ** 2
            points.append(SweepPoint(N, D, lr, b, float(loss)))
    return points


@pytest.mark.parametrize("offset, refine", [(0.0, False), (0.0, True), (0.17, True)])
def test_fit_recovers_known_constants(offset, refine):
    fit = fit_laws(synthetic_sweep(offset), refine=refine)
    for ours, true in ((fit.lr.law, TRUE_LR), (fit.batch.law, TRUE_BATCH)):
        assert ours.c == pytest.approx(true.c, rel=1e-6)
        assert ours.alpha == pytest.approx(true.alpha, abs=1e-9)
        assert ours.beta == pytest.approx(true.beta, abs=1e-9)
    assert fit.lr.fitted == ("N", "D") and fit.lr.points == 9 and not fit.notes


def test_fit_without_refinement_is_off_the_grid_by_at_most_half_a_step():
    fit = fit_laws(synthetic_sweep(0.17), refine=False)
    for o in fit.optima:
        assert abs(math.log10(o.lr / TRUE_LR(o.N, o.D))) <= 0.25 + 1e-9


def test_diverged_runs_and_edge_optima_are_handled():
    points = synthetic_sweep(0.0)
    N, D = points[0].N, points[0].D
    best = min((p for p in points if (p.N, p.D) == (N, D)), key=lambda p: p.loss)
    points = [SweepPoint(N, D, best.lr, best.batch, math.inf) if p == best else p for p in points]  # it diverged
    found = {(o.N, o.D): o for o in optima(points, refine=False)}
    assert found[(N, D)].lr != best.lr or found[(N, D)].batch != best.batch
    edge = [p for p in points if not ((p.N, p.D) == (N, D) and p.lr > best.lr * 1.01)]  # keep the lower lrs only
    fit = fit_laws(edge, refine=True)
    assert any("at the grid's edge" in n for n in fit.notes)


def test_one_model_size_holds_the_n_exponent_at_zero():
    points = [p for p in synthetic_sweep(0.0) if p.N == 5e7]
    fit = fit_laws(points)
    assert fit.lr.fitted == ("D",) and fit.lr.law.alpha == 0.0
    assert fit.lr.law.beta == pytest.approx(TRUE_LR.beta)
    assert any("exponent is held at 0" in n for n in fit.notes)


def test_comparison_section_shows_both_laws():
    lines = comparison_lines(fit_laws(synthetic_sweep(0.0)))
    text = "\n".join(lines)
    assert "lr* = 1.79 * N^-0.713 * D^0.307" in text and "B* (tokens) = 0.58 * D^0.571" in text
    assert "lr* = 2.5 * N^-0.65 * D^0.28" in text
    assert sum(line.startswith("| 1e+07") or line.startswith("| 5e+07") for line in lines) == 6


def test_the_resolved_config_records_the_values_and_the_law():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.lr=auto", "model.vocab_size=256"])
    text = resolve(cfg).to_yaml()
    assert "lr: auto" not in text and "Step Law (Li et al. 2025" in text
    again = resolve(load_config(ROOT / "configs" / "tiny.yaml", ["train.lr=auto", "model.vocab_size=256"]))
    assert again.to_yaml() == text  # a resume resolves the same values: no "setting changed"


def test_points_from_a_sweeps_cells():
    """A sweep's evaluated cells become points: N and D as evaluated, the cell's lr and batch (sequences x
    seq_len tokens), the metric; a diverged cell is an infinite loss; a cell not evaluated is left out."""
    from types import SimpleNamespace

    from pretrain.scaling.hparam_laws import points_from_results

    def cell(lr, gbs, loss, diverged=False, evaluated=True):
        config = SimpleNamespace(
            train=SimpleNamespace(lr=lr, global_batch_size=gbs), model=SimpleNamespace(seq_len=256)
        )
        return SimpleNamespace(
            cell=SimpleNamespace(config=config),
            evaluation={"x": 1} if evaluated else None,
            diverged=diverged,
            N=1e6,
            D=5e7,
            metric=lambda name, loss=loss: loss,
        )

    points = points_from_results(
        [cell(1e-3, 16, 3.2), cell(3e-3, 32, 9.9, diverged=True), cell(1e-2, 8, 3.0, False, False)]
    )
    assert [(p.lr, p.batch, p.loss) for p in points] == [(1e-3, 4096.0, 3.2), (3e-3, 8192.0, math.inf)]


def test_at_fixed_tokens_per_parameter_the_law_along_the_line_is_fitted():
    """A study at D = 20 N (ours): N and D cannot be told apart, so the fit is the law along the line, whose
    N exponent is alpha + beta of the true law; said in a note."""
    points = [p for p in synthetic_sweep(0.0) if (p.N, p.D) in ((1e7, 1e9), (5e7, 1e10), (2e8, 1e11))]
    # D/N is not constant on these three; put them on one line D = 100 N with the same bowl
    line = []
    for p in points:
        D = 100 * p.N
        lr0, b0 = TRUE_LR(p.N, D), TRUE_BATCH(p.N, D)
        lr, b = lr0 * (p.lr / TRUE_LR(p.N, p.D)), b0 * (p.batch / TRUE_BATCH(p.N, p.D))
        line.append(SweepPoint(p.N, D, lr, b, p.loss))
    fit = fit_laws(line, refine=False)
    assert fit.lr.fitted == ("N",)
    assert fit.lr.law.alpha == pytest.approx(TRUE_LR.alpha + TRUE_LR.beta, abs=1e-9)
    assert fit.lr.law(3e7, 3e9) == pytest.approx(TRUE_LR(3e7, 3e9), rel=1e-9)
    assert any("proportional to N" in n for n in fit.notes)


def test_seeds_are_averaged_before_the_best_cell_is_chosen():
    """Two seeds per cell: a lucky seed at a worse learning rate must not win over a better mean."""
    N, D = 1e7, 2e8
    points = [
        SweepPoint(N, D, 1e-3, 1e5, 3.00),
        SweepPoint(N, D, 1e-3, 1e5, 3.02),  # mean 3.01
        SweepPoint(N, D, 3e-3, 1e5, 2.95),
        SweepPoint(N, D, 3e-3, 1e5, 3.15),  # mean 3.05, but holds the single lowest loss
        SweepPoint(N, D, 1e-2, 1e5, 3.20),
    ]
    (best,) = optima(points, refine=False)
    assert best.lr == pytest.approx(1e-3) and best.loss == pytest.approx(3.01)
    fit = fit_laws(points)  # one batch size in the sweep: no batch law, and not "at the grid's edge" either
    assert fit.batch is None and best.not_swept == ["batch"] and "batch" not in best.at_edge
    assert any("batch: one value" in n for n in fit.notes)
