"""Depth diagnostics of pretrain/scaling/depth.py against direct computations on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.placement import PLACEMENTS
from pretrain.config import Config, ModelConfig, resolve
from pretrain.scaling.depth import depth_profile, run_blocks

VOCAB, T, B = 40, 8, 3


def tiny_model(placement: str, num_layers: int = 4):
    cfg = Config()
    cfg.model = ModelConfig(
        vocab_size=VOCAB, hidden_size=16, num_layers=num_layers, num_heads=2, seq_len=T, placement=placement
    )
    torch.manual_seed(0)
    model = build_model(resolve(cfg).model, "torch")[0].eval()
    with torch.no_grad():  # weights far from init, so every block matters and norm gains are not all 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15))
    return model


def direct_streams(model, tokens, skip=None):
    """The residual stream by hand: every block computes its own input norm (h is never handed on),
    a removed block is not called at all, and the final norm is applied before the output layer."""
    x = model.embed_norm(model.embed(tokens.t()))
    xs = [x]
    for i, block in enumerate(model.blocks, start=1):
        if i != skip:
            x, _ = block(x, None)
        xs.append(x)
    logits = model.head(model.final_norm(x))
    return xs, logits


def direct_loss(model, tokens, labels, skip=None) -> float:
    _, logits = direct_streams(model, tokens, skip)
    return float(F.cross_entropy(logits.reshape(-1, VOCAB), labels.t().reshape(-1)))


def probe(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_depth_profile_matches_direct_computation(placement):
    model = tiny_model(placement)
    tokens, labels = probe()
    with torch.no_grad():
        prof = depth_profile(model, tokens, labels, batch_size=2)  # 2 batches: the accumulation is tested too
        xs, _ = direct_streams(model, tokens)
        base = direct_loss(model, tokens, labels)
        removed = [direct_loss(model, tokens, labels, skip=layer) for layer in range(1, 5)]
    with torch.no_grad():
        assert base == pytest.approx(float(model(tokens, labels)), rel=1e-6)
    assert prof["removal"]["base_loss"] == pytest.approx(base, rel=1e-5)
    assert prof["removal"]["loss"] == pytest.approx(removed, rel=1e-5)
    assert prof["removal"]["increase"] == pytest.approx([r - base for r in removed], abs=1e-5)
    assert len(prof["var"]) == 5 and len(prof["angular_distance"]) == 4
    assert prof["var"] == pytest.approx([float(x.double().var()) for x in xs], rel=1e-5)
    assert prof["max_abs"] == pytest.approx([float(x.abs().max()) for x in xs], rel=1e-6)
    angular = []
    for a, b in zip(xs[:-1], xs[1:], strict=True):  # per token: arccos of the cosine over the hidden dimension, / pi
        a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        angular.append(float(torch.tensor([math.acos(max(-1.0, min(1.0, c))) for c in cos.tolist()]).mean()) / math.pi)
    assert prof["angular_distance"] == pytest.approx(angular, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("placement", ["pre", "peri", "lns"])
def test_an_identity_block_costs_nothing_to_remove(placement):
    """A block whose sublayers output zero leaves the residual stream as it is (Pre-LN, LNS; Peri-LN's
    output norm of zero is zero): removing it changes nothing, its angular distance is 0; the other
    blocks still matter."""
    model = tiny_model(placement)
    with torch.no_grad():
        model.blocks[1].attn.fn.proj.weight.zero_()
        model.blocks[1].mlp.fn.fc2.weight.zero_()
    tokens, labels = probe()
    prof = depth_profile(model, tokens, labels)
    assert prof["removal"]["increase"][1] == pytest.approx(0.0, abs=1e-6)
    assert prof["angular_distance"][1] == pytest.approx(0.0, abs=1e-6)
    assert prof["var"][2] == pytest.approx(prof["var"][1], rel=1e-6)
    assert min(abs(prof["removal"]["increase"][i]) for i in (0, 2, 3)) > 1e-4


@pytest.mark.parametrize("placement", ["pre", "post", "peri"])
def test_skipping_the_last_block_applies_the_final_norm(placement):
    """With the last block removed, what the output layer reads is final_norm(x_{L-1})."""
    model = tiny_model(placement, num_layers=3)
    tokens, _ = probe()
    h, xs = run_blocks(model, tokens, skip=3, keep=True)
    with torch.no_grad():
        expected = model.final_norm(direct_streams(model, tokens)[0][2])
    torch.testing.assert_close(h, expected)
    torch.testing.assert_close(xs[3], xs[2])  # the stream passes the removed block unchanged


def test_depth_profile_refuses_training_mode():
    model = tiny_model("pre").train()
    with pytest.raises(ValueError, match="eval mode"):
        depth_profile(model, *probe())


def test_growth_metrics_against_a_direct_computation():
    """The log-variance slope and the growth relative to linear of pretrain/scaling/growth.py, on the
    variances measured directly on a tiny model and on profiles whose answer is known exactly."""
    from pretrain.scaling.growth import growth_summary, linear_ratio, log_slope

    model = tiny_model("pre", num_layers=5)
    tokens, labels = probe()
    with torch.no_grad():
        prof = depth_profile(model, tokens, labels)
        var = [float(x.double().var()) for x in direct_streams(model, tokens)[0]]
    depths, logs = list(range(1, 6)), [math.log(v) for v in var[1:]]
    d_mean, l_mean = sum(depths) / 5, sum(logs) / 5  # least squares slope, written out
    num = sum((d - d_mean) * (y - l_mean) for d, y in zip(depths, logs, strict=True))
    slope = num / sum((d - d_mean) ** 2 for d in depths)
    g = growth_summary(prof["var"])
    assert g["log_slope"] == pytest.approx(slope, rel=1e-4)
    assert g["factor_per_block"] == pytest.approx(math.exp(slope), rel=1e-4)
    assert g["linear_ratio"] == pytest.approx(var[5] / (var[0] + 5 * (var[1] - var[0])), rel=1e-4)
    assert g["growth"] == pytest.approx(var[5] / var[1], rel=1e-4) and g["last"] == pytest.approx(var[5], rel=1e-5)
    # exponential growth: the slope is ln 2 per block whatever the embedding's variance
    assert log_slope([0.3] + [5 * 2.0**k for k in range(1, 9)]) == pytest.approx(math.log(2))
    # linear growth (any start) is 1, bounded growth below 1, exponential far above
    assert linear_ratio([0.5 + 0.7 * k for k in range(0, 9)]) == pytest.approx(1.0)
    assert linear_ratio([0.0] + [1.0] * 8) == pytest.approx(1 / 8)
    assert linear_ratio([1.0] + [2.0**k for k in range(1, 9)]) == pytest.approx(2**8 / 9)
    assert linear_ratio([1.0, 0.5, 0.4]) is None  # shrinking at the first block: no linear reference
    assert growth_summary([1.0, 2.0])["log_slope"] is None


@pytest.mark.parametrize("placement", ["pre", "post", "peri", "lns"])
def test_variance_at_initialization_follows_the_placement(placement):
    """What the growth metrics say at initialization, where the answer is known: Peri-LN starts from a
    normalized embedding (variance 1) and every block adds normalized outputs, about linearly; Pre-LN's
    and LNS's blocks add small outputs (projections initialised at 0.02 / sqrt(2L)) to an embedding of
    variance 0.02^2, about linearly too; Post-LN normalizes after every block: flat at 1, i.e. 1/L of
    linear growth."""
    from pretrain.scaling.growth import growth_summary

    cfg = Config()
    cfg.model = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=8, num_heads=2, seq_len=T, placement=placement)
    torch.manual_seed(0)
    model = build_model(resolve(cfg).model, "torch")[0].eval()
    var = depth_profile(model, *probe())["var"]
    ratio = growth_summary(var)["linear_ratio"]
    if placement == "post":
        assert var[1:] == pytest.approx([1.0] * 8, rel=1e-3) and ratio == pytest.approx(1 / 8, rel=0.01)
    elif placement == "peri":
        assert var[0] == pytest.approx(1.0, rel=0.05) and all(b > a for a, b in zip(var, var[1:], strict=False))
        assert 0.7 < ratio < 1.4
    else:
        assert var[0] == pytest.approx(0.02**2, rel=0.15) and var[-1] < 0.01 and 0.7 < ratio < 1.4
